"""Geometry: scene shapes → shapely geometries → z-occluded, feathered regions → coverage masks.

Coordinates are canvas pixels, x to the right, y down. Shapes are clipped to the canvas when they
are built, so every geometry handed on lies inside ``[0, W] × [0, H]``.

Masks are *area-weighted* coverage: a cell's value is the fraction of its area inside the region,
computed exactly (Green's theorem over the polygon's edges, see ``_coverage``) rather than by
sampling pixel centres, so that a box on cell edges gives exactly 0/1 and a half-covered cell
exactly 0.5 on every grid, whatever its resolution.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon, box as _box
from shapely.validation import explain_validity

from scenec.spec import models as m

ELLIPSE_QUAD_SEGS = 32  # 128 vertices: area error 0.04 %, invisible at any canvas size we allow
MASK_WORK_SIDE = 256  # masks are traced at most this large (long side): enough for a layout, cheap to union
MIN_AREA = 1e-3  # px²; below this a shape or region is "empty" (float slivers of boolean ops)
MAX_FEATHER_LEVELS = 16
MAX_MASK_RUNS = 4096  # above this a mask is traced at half the resolution (union cost grows fast)


@dataclass(frozen=True)
class Region:
    entity: str
    geom: Any  # shapely geometry after occlusion, canvas pixels
    feather_px: float
    z: float


EMPTY = Polygon()


# --- shapes ------------------------------------------------------------------------------------

def shape_geometry(ls, shape, path: tuple, canvas, diags, units: str = "norm"):
    """A scene shape (at ``path`` in the scene) as a shapely geometry in canvas pixels, or None.

    None means a problem was reported to ``diags`` (at the position of the shape that has it);
    callers skip the shape rather than report follow-on errors.
    """
    w, h = canvas
    units = shape.units or units
    sx, sy = (1.0, 1.0) if units == "px" else (float(w), float(h))
    pos = ls.pos(path)
    kind = _kind(shape)

    if isinstance(shape, m.BoxShape):
        x0, y0, x1, y1 = shape.box
        if not (x1 > x0 and y1 > y0):
            diags.error(pos, f"degenerate box [{_n(x0)}, {_n(y0)}, {_n(x1)}, {_n(y1)}]: it has no area",
                        hint="a box is [x0, y0, x1, y1] with x1 > x0 and y1 > y0 (the top-left corner first)")
            return None
        return _in_canvas(ls, shape, path, _box(x0 * sx, y0 * sy, x1 * sx, y1 * sy), canvas, units, diags)

    if isinstance(shape, m.PolygonShape):
        pts = np.asarray(shape.polygon, dtype=np.float64) * (sx, sy)
        if _collinear(pts):
            diags.error(pos, "degenerate polygon: its points lie on one line, so it has no area")
            return None
        g = Polygon(pts)
        if not g.is_valid:
            diags.error(pos, _self_intersection_message(g, pts, sx, sy),
                        hint="list the points in order around the outline, without crossing; "
                             "shapes that overlap themselves can be written as a `union`")
            return None
        if g.area < MIN_AREA:
            diags.error(pos, "degenerate polygon: it has no area")
            return None
        return _in_canvas(ls, shape, path, g, canvas, units, diags)

    if isinstance(shape, m.EllipseShape):
        (cx, cy), (rx, ry) = shape.ellipse.center, shape.ellipse.radii
        rx, ry = rx * sx, ry * sy
        if rx * ry < MIN_AREA:
            diags.error(pos, "degenerate ellipse: its radii are too small to cover any area")
            return None
        g = shapely.Point(cx * sx, cy * sy).buffer(1.0, quad_segs=ELLIPSE_QUAD_SEGS)
        g = affinity.scale(g, rx, ry, origin=(cx * sx, cy * sy))
        return _in_canvas(ls, shape, path, g, canvas, units, diags)

    if isinstance(shape, m.MaskShape):
        return _mask_geometry(ls, shape, path, canvas, diags)

    children = getattr(shape, kind)
    geoms = [shape_geometry(ls, c, path + (kind, i), canvas, diags, units) for i, c in enumerate(children)]
    if any(g is None for g in geoms):
        return None
    if kind == "union":
        g = shapely.union_all(geoms)
        why = "its shapes are empty"
    elif kind == "intersection":
        g = shapely.intersection_all(geoms)
        why = "its shapes have no area in common"
    else:
        g = geoms[0].difference(shapely.union_all(geoms[1:])) if len(geoms) > 1 else geoms[0]
        why = "the shapes subtracted cover all of the first"
    g = _polygonal(g)
    if g.area < MIN_AREA:
        diags.error(pos, f"{kind} is empty: {why}")
        return None
    return g


def _kind(shape) -> str:
    for k in m.SHAPE_KINDS:
        if hasattr(shape, k):
            return k
    raise TypeError(f"not a shape: {shape!r}")


def _n(v: float) -> str:
    return f"{v:g}"


def _collinear(pts: np.ndarray) -> bool:
    d = pts[1:] - pts[0]
    cross = d[:-1, 0] * d[1:, 1] - d[:-1, 1] * d[1:, 0] if len(d) > 1 else np.zeros(0)
    scale = max(float(np.abs(d).max(initial=0.0)), 1e-12)
    return not np.any(np.abs(cross) > 1e-9 * scale * scale)


def _self_intersection_message(g: Polygon, pts: np.ndarray, sx: float, sy: float) -> str:
    """Where a polygon crosses itself, in the shape's own units, and which edges do."""
    msg = "polygon is not simple: its outline crosses itself"
    where = re.search(r"\[([-+0-9.eE]+) ([-+0-9.eE]+)\]", explain_validity(g))
    if where:
        x, y = float(where.group(1)) / sx, float(where.group(2)) / sy
        msg += f" at ({x:.4g}, {y:.4g})"
    pair = _crossing_edges(pts)
    if pair is not None:
        (a, b), (c, d) = pair
        msg += f" (edge {a}→{b} meets edge {c}→{d}; points counted from 0)"
    return msg


def _crossing_edges(pts: np.ndarray):
    """The first two non-adjacent edges of a closed polyline that touch (O(n²); n is small)."""
    n = len(pts)
    if n > 400:
        return None
    segs = [shapely.LineString([pts[i], pts[(i + 1) % n]]) for i in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if j == i + 1 or (i == 0 and j == n - 1):
                # adjacent edges share a point; they only "cross" if they overlap along a line
                if segs[i].intersection(segs[j]).length > 0:
                    return (i, (i + 1) % n), (j, (j + 1) % n)
                continue
            if segs[i].intersects(segs[j]):
                return (i, (i + 1) % n), (j, (j + 1) % n)
    return None


def _in_canvas(ls, shape, path, g, canvas, units, diags):
    """Clip a leaf shape to the canvas; a shape with nothing inside is an error (often wrong units)."""
    w, h = canvas
    c = _polygonal(shapely.clip_by_rect(g, 0.0, 0.0, float(w), float(h)))
    if c.area >= MIN_AREA:
        return c
    hint = None
    x0, y0, x1, y1 = g.bounds
    if units == "norm" and max(x1, y1) > max(w, h) * 1.5:
        hint = "coordinates are fractions of the canvas (0 to 1); for pixels add `units: px` to the shape"
    elif units == "px" and max(abs(x0), abs(y0), abs(x1), abs(y1)) <= 1.0:
        hint = "with `units: px` coordinates are pixels; drop it for fractions of the canvas"
    diags.error(ls.pos(path), f"{_kind(shape)} lies entirely outside the canvas ({w}x{h} px)", hint)
    return None


def _polygonal(g):
    """Only the areal parts of a geometry (boolean ops can leave lines and points behind)."""
    if g is None or g.is_empty:
        return EMPTY
    if isinstance(g, (Polygon, MultiPolygon)):
        return g
    parts = [p for p in shapely.get_parts(g) if isinstance(p, (Polygon, MultiPolygon)) and not p.is_empty]
    if not parts:
        return EMPTY
    return parts[0] if len(parts) == 1 else shapely.union_all(parts)


def _mask_geometry(ls, shape, path, canvas, diags):
    """A mask image as polygons: threshold at 128 (white = inside), runs per row merged into boxes."""
    from .files import open_image

    im = open_image(ls, path + ("mask",), shape.mask, diags, what="mask")
    if im is None:
        return None
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))  # transparent = outside
        im = Image.alpha_composite(bg, rgba)
    gray = im.convert("L")
    mw, mh = gray.size
    s = min(1.0, MASK_WORK_SIDE / max(mw, mh))
    if s < 1.0:
        # area filter, then threshold: a working pixel is inside when most of what it covers is white
        gray = gray.resize((max(1, round(mw * s)), max(1, round(mh * s))), Image.Resampling.BOX)
    inside = np.asarray(gray) >= 128
    while _runs(inside) > MAX_MASK_RUNS and min(gray.size) > 16:
        # a noisy mask (dithering, texture) would take seconds to union: trace it coarser
        gray = gray.resize((max(1, gray.size[0] // 2), max(1, gray.size[1] // 2)), Image.Resampling.BOX)
        inside = np.asarray(gray) >= 128
    g = mask_to_geometry(inside)
    if g.is_empty:
        diags.error(ls.pos(path), f"mask `{shape.mask}` is empty: no pixel is white (≥ 128)",
                    hint="white pixels mark the inside of a mask shape")
        return None
    gh, gw = inside.shape
    w, h = canvas
    return affinity.scale(g, w / gw, h / gh, origin=(0, 0))


def _runs(inside: np.ndarray) -> int:
    """Number of horizontal runs of inside pixels (each becomes at most one box)."""
    starts = np.count_nonzero(inside[:, 1:] & ~inside[:, :-1])
    return int(starts + np.count_nonzero(inside[:, 0]))


def mask_to_geometry(inside: np.ndarray):
    """Boolean image → polygon in its pixel coordinates: row runs, stacked runs merged, then union."""
    hgt, wid = inside.shape
    padded = np.zeros((hgt, wid + 2), np.int8)
    padded[:, 1:-1] = inside
    d = np.diff(padded, axis=1)
    rs, xs = np.nonzero(d == 1)
    _, xe = np.nonzero(d == -1)
    if len(rs) == 0:
        return EMPTY
    # a run identical to one in the row above extends that box (rectangles become one box)
    active: dict[tuple[int, int], int] = {}  # (x0, x1) -> top row
    boxes: list[tuple[int, int, int, int]] = []
    rows, first = np.unique(rs, return_index=True)
    bounds = list(first[1:]) + [len(rs)]
    prev = -2
    for r, a0, a1 in zip(rows.tolist(), first.tolist(), bounds):
        runs = list(zip(xs[a0:a1].tolist(), xe[a0:a1].tolist()))
        keep = set(runs) if r == prev + 1 else set()
        for key in [k for k in active if k not in keep]:
            boxes.append((key[0], active.pop(key), key[1], prev + 1))
        for key in runs:
            active.setdefault(key, r)
        prev = r
    for key, top in active.items():
        boxes.append((key[0], top, key[1], prev + 1))
    arr = np.asarray(boxes, dtype=np.float64)
    return _polygonal(shapely.union_all(shapely.box(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])))


# --- regions -----------------------------------------------------------------------------------

def resolve_regions(ls, entity_ids, canvas, diags) -> dict[str, Region]:
    """Regions of the given entities after z-occlusion; problems go to diags.

    ``entity_ids`` may be a subset of the scene's entities (one variant of a coupling group): only
    those present occlude each other. Where regions overlap the higher ``z`` wins (default: the
    entity's index in the scene list), ties go to the later entity. Every requested id gets a
    Region; one whose shape has a problem gets an empty geometry (and the problem is in ``diags``).
    """
    w, h = canvas
    full = _box(0.0, 0.0, float(w), float(h))
    short = min(w, h)
    index = {e.id: i for i, e in enumerate(ls.scene.entities)}
    present = sorted({i for i in (index.get(e) for e in entity_ids) if i is not None})
    geoms: dict[int, Any] = {}
    keys: dict[int, tuple[float, int]] = {}
    for i in present:
        e = ls.scene.entities[i]
        keys[i] = (float(e.z) if e.z is not None else float(i), i)
        geoms[i] = full if e.shape is None else shape_geometry(ls, e.shape, ("entities", i, "shape"), canvas, diags)

    ok = [i for i in present if geoms[i] is not None]
    order = sorted(ok, key=lambda i: keys[i], reverse=True)  # top first
    tree = shapely.STRtree([geoms[i] for i in ok]) if ok else None
    pos_of = {i: k for k, i in enumerate(ok)}
    out: dict[str, Region] = {}
    for i in order:
        e = ls.scene.entities[i]
        g = geoms[i]
        above = [ok[j] for j in tree.query(g, predicate="intersects") if keys[ok[j]] > keys[i]]
        region = g
        if above:
            occ = shapely.union_all([geoms[j] for j in above])
            region = _polygonal(g.difference(occ))
            if region.area < MIN_AREA:
                hiders = [j for j in sorted(above, key=lambda j: pos_of[j])
                          if geoms[j].intersection(g).area >= MIN_AREA]
                alone = [j for j in hiders if g.difference(geoms[j]).area < MIN_AREA]
                names = [ls.scene.entities[j].id for j in (alone[:1] or hiders)]
                by = f"`{names[0]}`" if len(names) == 1 else \
                    ", ".join(f"`{n}`" for n in names[:-1]) + f" and `{names[-1]}` together"
                where = ("entities", i, "shape") if e.shape is not None else ("entities", i, "id")
                diags.error(ls.pos(where), f"the region of `{e.id}` is hidden entirely by {by}",
                            hint=f"give `{e.id}` a higher `z` than what covers it, or change the shapes")
                region = EMPTY
        out[e.id] = Region(e.id, region, float(e.feather or 0.0) * short, keys[i][0])
    for i in present:
        e = ls.scene.entities[i]
        if e.id not in out:
            out[e.id] = Region(e.id, EMPTY, float(e.feather or 0.0) * short, keys[i][0])
    for eid in entity_ids:
        if eid not in out:  # an unknown id: the check pass reports it
            out[eid] = Region(eid, EMPTY, 0.0, 0.0)
    return {eid: out[eid] for eid in sorted(out, key=lambda x: index.get(x, len(index)))}


def check_geometry(ls, family, diags) -> None:
    """Every geometric check of a scene: each shape, each `related` shape, and occlusion per image.

    Occlusion depends on which entities share an image, so with groups it is checked once per
    variant's entity set; without, once for all entities. A region smaller than one attention
    token of ``family`` gets a warning: the model can barely place anything there.
    """
    sc = ls.scene
    canvas = (sc.canvas.width, sc.canvas.height)
    ids = {e.id for e in sc.entities}
    sets: list[tuple[str, ...]] = []
    if sc.groups:
        for g in sc.groups:
            for v in g.variants:
                s = tuple(e for e in (v.entities or []) if e in ids)
                if s and s not in sets:
                    sets.append(s)
        # shapes of entities no variant names are still checked
        named = {e for s in sets for e in s}
        for i, e in enumerate(sc.entities):
            if e.id not in named and e.shape is not None:
                shape_geometry(ls, e.shape, ("entities", i, "shape"), canvas, diags)
    else:
        sets.append(tuple(e.id for e in sc.entities))
    index = {e.id: i for i, e in enumerate(sc.entities)}
    token_area = float(family.token_px) ** 2 if family is not None else 0.0
    warned: set[str] = set()
    for s in sets:
        regions = resolve_regions(ls, list(s), canvas, diags)
        for eid, r in regions.items():
            if eid in warned or r.geom.is_empty or eid not in index:
                continue
            if r.feather_px > 0 and _never_solid(r.geom, r.feather_px, canvas):
                i = index[eid]
                diags.warning(ls.pos(("entities", i, "feather")),
                              f"the region of `{eid}` is narrower than its feather ({r.feather_px:.0f} px): "
                              "its mask stays below half strength", hint="use a smaller `feather`")
                warned.add(eid)
                continue
            if r.geom.area < token_area:
                i = index[eid]
                where = ("entities", i, "shape") if sc.entities[i].shape is not None else ("entities", i, "id")
                diags.warning(ls.pos(where), f"the region of `{eid}` covers {r.geom.area:.0f} px², less than one "
                                            f"attention token ({family.token_px}x{family.token_px} px)",
                              hint="the model can barely place anything there; make the shape larger")
                warned.add(eid)
    for i, e in enumerate(sc.entities):
        if e.reference is not None and e.reference.related is not None:
            shape_geometry(ls, e.reference.related, ("entities", i, "reference", "related"), canvas, diags)


def _never_solid(geom, f: float, canvas) -> bool:
    """True when no point of the region is ``f / 2`` inside it: its mask stays below half strength."""
    return all(g.is_empty for g in _erode(geom, np.asarray([f / 2.0]), canvas))


# --- rasterization -----------------------------------------------------------------------------

def rasterize(geom, feather_px: float, canvas, px_per_cell: int) -> np.ndarray:
    """Area-weighted coverage of ``geom`` (feathered inward) on a grid of ``px_per_cell`` pixels.

    Returns float32 ``[ceil(H/px), ceil(W/px)]`` in [0, 1]. Partial cells at the canvas edge are
    normalised by their part inside the canvas, so the whole canvas is 1.0 everywhere.

    Feathering ramps coverage from 0 at the region's boundary to 1 at ``feather_px`` inside, as the
    mean of ``K`` inward offsets of the region (the canvas edge is not a boundary: a region touching
    it stays solid there). Nothing outside ``geom`` ever gets coverage. ``geom=None`` means the
    whole canvas.
    """
    w, h = canvas
    px = float(px_per_cell)
    gh, gw = -(-h // px_per_cell), -(-w // px_per_cell)
    if geom is None:
        return np.ones((gh, gw), np.float32)
    if geom.is_empty:
        return np.zeros((gh, gw), np.float32)
    layers = _feather_layers(geom, float(feather_px), canvas)
    out = np.zeros((gh, gw), np.float32)
    got = _coverage(layers, px, gh, gw)
    if got is None:
        return out
    acc, r0, c0 = got
    r1, c1 = r0 + acc.shape[0], c0 + acc.shape[1]
    # normalise partial edge cells by their in-canvas area
    ch = np.minimum(1.0, h / px - np.arange(r0, r1))
    cw = np.minimum(1.0, w / px - np.arange(c0, c1))
    if ch[-1] < 1.0 or cw[-1] < 1.0:
        acc /= ch[:, None] * cw[None, :]
    np.clip(acc, 0.0, 1.0, out=acc)
    acc[acc < 1e-9] = 0.0
    acc[acc > 1.0 - 1e-9] = 1.0
    out[r0:r1, c0:c1] = acc
    return out


def rasterize_grids(geom, feather_px: float, canvas, grids) -> dict[str, np.ndarray]:
    """``rasterize`` on several grids (``[(name, px_per_cell)]``, e.g. ``Family.grids``) at once.

    Area-weighted coverage is additive, so a coarser grid whose cells are whole blocks of the
    finest one is the block mean of it: exact, and cheaper than rasterising again.
    """
    w, h = canvas
    grids = list(grids)
    fine_px = min(px for _, px in grids)
    fine = rasterize(geom, feather_px, canvas, fine_px)
    out = {}
    for name, px in grids:
        f = px // fine_px
        if px == fine_px:
            out[name] = fine
        elif px % fine_px == 0 and w % px == 0 and h % px == 0:
            gh, gw = h // px, w // px
            out[name] = fine.reshape(gh, f, gw, f).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)
        else:
            out[name] = rasterize(geom, feather_px, canvas, px)
    return out


_FEATHER_CACHE: dict[tuple, tuple[Any, list]] = {}


def _feather_layers(geom, f: float, canvas) -> list[tuple[Any, float]]:
    """(geometry, weight) pairs whose weighted coverages sum to the feathered coverage.

    Cached on the geometry's identity: the same region is rasterised on several grids.
    """
    w, h = canvas
    if f <= 0.0:
        return [(shapely.clip_by_rect(geom, 0.0, 0.0, float(w), float(h)), 1.0)]
    key = (id(geom), f, w, h)
    hit = _FEATHER_CACHE.get(key)
    if hit is not None and hit[0] is geom:
        return hit[1]
    k = int(min(MAX_FEATHER_LEVELS, max(2, math.ceil(f / 2.0))))  # offset steps of ≤ 2 px
    eroded = _erode(geom, (np.arange(k) + 0.5) / k * f, canvas)
    layers = [(g, 1.0 / k) for g in eroded if not g.is_empty]
    if len(_FEATHER_CACHE) > 256:
        _FEATHER_CACHE.clear()
    _FEATHER_CACHE[key] = (geom, layers)
    return layers


def _erode(geom, dists: np.ndarray, canvas) -> list:
    """Inward offsets of ``geom`` by each distance, clipped to the canvas.

    The canvas edge is not a boundary of the region (a shape cut by it continues off-canvas), so a
    geometry touching it is first extended across it by a frame wider than the offsets.
    """
    w, h = canvas
    x0, y0, x1, y1 = geom.bounds
    src = geom
    if x0 <= 0.0 or y0 <= 0.0 or x1 >= w or y1 >= h:
        m_ = 2.0 * float(np.max(dists)) + 2.0
        frame = _box(-m_, -m_, w + m_, h + m_).difference(_box(0.0, 0.0, float(w), float(h)))
        src = shapely.union(geom, frame)
    eroded = shapely.buffer(np.full(len(dists), src, dtype=object), -np.asarray(dists, np.float64), quad_segs=4)
    return list(shapely.clip_by_rect(eroded, 0.0, 0.0, float(w), float(h)))


def _coverage(layers: list[tuple[Any, float]], px: float, gh: int, gw: int):
    """Exact area of each grid cell inside the weighted polygons, in cell units (float64).

    Returns ``(window, row0, col0)``: the values on the window of cells the outlines span (all
    other cells are 0), or None when there is nothing to draw.

    By Green's theorem, area(P ∩ cell) = ∮_∂P χ(x) h(y) dx with χ the cell's column and
    h(y) = clamp(y − y_top, 0, 1). Each edge is cut where it crosses grid lines; a piece inside cell
    (r, c) adds dx·(mean y − r) to that cell and dx·1 to every cell above it in the column (a
    difference array summed down the rows). Ring orientation gives exteriors + and holes −.
    """
    geoms = [g for g, _ in layers]
    weights = np.asarray([wt for _, wt in layers], np.float64)
    polys, pidx = shapely.get_parts(np.asarray(geoms, dtype=object), return_index=True)
    while np.any(np.isin(shapely.get_type_id(polys), (4, 5, 6, 7))):  # collections inside collections
        sub, j = shapely.get_parts(polys, return_index=True)
        polys, pidx = sub, pidx[j]
    is_poly = shapely.get_type_id(polys) == 3
    polys, pidx = polys[is_poly], pidx[is_poly]
    if len(polys) == 0:
        return None
    rings, ridx = shapely.get_rings(polys, return_index=True)
    exterior = np.ones(len(rings), bool)
    exterior[1:] = ridx[1:] != ridx[:-1]
    ring_w = weights[pidx[ridx]] * np.where(exterior, 1.0, -1.0)
    coords, cidx = shapely.get_coordinates(rings, return_index=True)
    coords = coords / px
    same = cidx[1:] == cidx[:-1]
    p0, p1, er = coords[:-1][same], coords[1:][same], cidx[:-1][same]
    x0, y0, x1, y1 = p0[:, 0], p0[:, 1], p1[:, 0], p1[:, 1]
    # orientation of each ring from its own signed ∮ y dx, so exteriors add and holes subtract
    signed = np.bincount(er, weights=(x1 - x0) * (y0 + y1) * 0.5, minlength=len(rings))
    mult = ring_w / np.where(signed == 0.0, 1.0, np.sign(signed))
    keep = x1 != x0  # vertical edges have dx = 0: no contribution
    x0, y0, x1, y1, er = x0[keep], y0[keep], x1[keep], y1[keep], er[keep]
    ne = len(x0)
    if ne == 0:
        return None
    dx, dy = x1 - x0, y1 - y0
    # parameters t in (0, 1) where each edge crosses a vertical or a horizontal grid line
    ts = [np.zeros(ne), np.ones(ne)]
    ids = [np.arange(ne), np.arange(ne)]
    for a, b, d in ((x0, x1, dx), (y0, y1, dy)):
        lo = np.floor(np.minimum(a, b)) + 1.0
        hi = np.ceil(np.maximum(a, b)) - 1.0
        n = np.maximum(0, (hi - lo + 1).astype(np.int64))
        n[d == 0] = 0
        tot = int(n.sum())
        if tot:
            e = np.repeat(np.arange(ne), n)
            off = np.arange(tot) - np.repeat(np.cumsum(n) - n, n)
            k = lo[e] + off
            ts.append((k - a[e]) / d[e])
            ids.append(e)
    t = np.concatenate(ts)
    e = np.concatenate(ids)
    order = np.argsort(e * 2.0 + t, kind="stable")  # by edge, then along it (t in [0, 1])
    t, e = t[order], e[order]
    nxt = e[1:] == e[:-1]
    ta, tb, e = t[:-1][nxt], t[1:][nxt], e[:-1][nxt]
    xa, xb = x0[e] + ta * dx[e], x0[e] + tb * dx[e]
    ya, yb = y0[e] + ta * dy[e], y0[e] + tb * dy[e]
    mx, my = (xa + xb) * 0.5, (ya + yb) * 0.5
    c = np.clip(np.floor(mx).astype(np.int64), 0, gw - 1)
    r = np.clip(np.floor(my).astype(np.int64), 0, gh - 1)
    dxp = (xb - xa) * mult[er[e]]
    # only the window the pieces span: above it each column's pieces sum to dx = 0 (closed rings)
    r0, c0 = int(r.min()), int(c.min())
    nh, nw = int(r.max()) - r0 + 1, int(c.max()) - c0 + 1
    r -= r0
    c -= c0
    flat = r * nw + c
    part = np.bincount(flat, weights=dxp * (my - (r + r0)), minlength=nh * nw).reshape(nh, nw)
    acc = -np.bincount(flat, weights=dxp, minlength=nh * nw).reshape(nh, nw)
    acc[0] += np.bincount(c, weights=dxp, minlength=nw)
    if nh * nw <= 65536:
        np.cumsum(acc, axis=0, out=acc)
    else:  # numpy's cumsum down a big array is slower than adding rows in turn
        for i in range(1, nh):
            acc[i] += acc[i - 1]
    acc += part
    return acc, r0, c0


def write_mask_pngs(regions, canvas, out_dir) -> None:
    """See ``compiler.preview.write_mask_pngs`` (kept here too: the CLI imports it from geometry)."""
    from .preview import write_mask_pngs as _write

    _write(regions, canvas, out_dir)
