"""Scene shapes → shapely geometries in canvas pixels (boxes, polygons, ellipses, masks, boolean ops).

Coordinates are canvas pixels, x to the right, y down. Shapes are clipped to the canvas when they
are built, so every geometry handed on lies inside ``[0, W] × [0, H]``. A problem with a shape goes
to the diagnostics at the position of the shape that has it.
"""

from __future__ import annotations

import re

import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon, box as _box
from shapely.validation import explain_validity

from scenec.spec import models as m

ELLIPSE_QUAD_SEGS = 32  # 128 vertices: area error 0.04 %, invisible at any canvas size we allow
MASK_WORK_SIDE = 256  # masks are traced at most this large (long side): enough for a layout, cheap to union
MIN_AREA = 1e-3  # px²; below this a shape or region is "empty" (float slivers of boolean ops)
MAX_MASK_RUNS = 4096  # above this a mask is traced at half the resolution (union cost grows fast)

EMPTY = Polygon()


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
    g = polygonal(g)
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
    c = polygonal(shapely.clip_by_rect(g, 0.0, 0.0, float(w), float(h)))
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


def polygonal(g):
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
    return polygonal(shapely.union_all(shapely.box(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])))
