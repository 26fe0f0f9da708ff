"""Layout previews and mask dumps: see what a scene will ask of the model before paying for a GPU.

``render_preview`` draws each image's layout (regions after occlusion and feathering, reference
thumbnails in their regions, related regions dashed, the background image faintly behind); the
variants of a coupling group form a contact sheet. ``write_mask_pngs`` writes the coverage masks
themselves. Pillow only, and every file is written atomically (a crash leaves no half PNG).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from shapely import affinity

from scenec.spec.fsio import atomic_write

from .files import to_rgb
from .raster import fit_into_box, rasterize

TILE = 512  # long side of one layout, px
PAD = 16
TITLE_H = 28
HEADER_H = 34
MAX_COLS = 4
FILL_ALPHA = 0.42  # of a fully covered pixel: the layout stays readable where regions are dense
REF_ALPHA = 0.9
BG_FADE = 0.4  # share of the background image kept (the rest is paper white)

# Okabe–Ito and Tableau hues: distinct, and still distinct for the colour-blind (first eight)
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (213, 94, 0), (0, 114, 178), (204, 121, 167),
           (240, 228, 66), (120, 94, 240), (255, 112, 166), (100, 143, 255), (54, 162, 125), (200, 82, 0),
           (158, 118, 72), (0, 191, 196), (180, 60, 60), (110, 110, 110)]
PAPER = (246, 246, 244)
INK = (34, 34, 38)


# --- atomic writes -----------------------------------------------------------------------------

def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# --- masks -------------------------------------------------------------------------------------

def write_mask_pngs(regions, canvas, out_dir) -> list[Path]:
    """``out_dir/<entity>.png`` per region at canvas size: white inside, grey where partly covered.

    ``regions``: ``{entity: Region}`` or ``[(entity, Region)]``. Coverage is rasterised at one
    pixel per cell, so the PNG is exactly the mask the model's grids are averaged from.
    """
    out_dir = Path(out_dir)
    items = regions.items() if isinstance(regions, dict) else regions
    written = []
    for eid, reg in items:
        cov = rasterize(reg.geom, reg.feather_px, canvas, 1)
        im = Image.fromarray(np.round(cov * 255.0).astype(np.uint8), mode="L")
        p = out_dir / f"{eid}.png"
        atomic_write(p, _png_bytes(im))
        written.append(p)
    return written


# --- preview -----------------------------------------------------------------------------------

def render_preview(ls, jobs: list[dict], out_path, background=None) -> Path:
    """Draw the layout of each job into one PNG at ``out_path``.

    ``jobs``: dicts with ``title``, ``group`` (None or the group id), ``regions`` ([(entity,
    Region)]), ``references`` ([(entity, image path, fit, Region)]), ``related`` ([(entity,
    shapely geometry)]) and optionally ``whole_canvas`` (names of prompts that act everywhere,
    e.g. a variant's own prompt). Jobs of one group become one titled contact sheet; sections
    stack vertically. ``background``: the background image's path, drawn faintly behind.
    """
    canvas = (ls.scene.canvas.width, ls.scene.canvas.height)
    fonts = _Fonts()
    colours = _colour_map(jobs)
    bg = _load_background(background, canvas, ls.scene.background)
    tiles = [(job, _draw_tile(job, canvas, colours, bg, fonts)) for job in jobs]

    sections: list[tuple[str | None, list[tuple[str, Image.Image]]]] = []
    by_group: dict[str, int] = {}
    for job, tile in tiles:
        g = job.get("group")
        title = str(job.get("title") or "")
        if g is None:
            sections.append((None, [(title, tile)]))
        elif g in by_group:
            sections[by_group[g]][1].append((title, tile))
        else:
            by_group[g] = len(sections)
            sections.append((f"group {g}", [(title, tile)]))
    # consecutive ungrouped jobs share one grid
    merged: list[tuple[str | None, list]] = []
    for head, items in sections:
        if head is None and merged and merged[-1][0] is None:
            merged[-1][1].extend(items)
        else:
            merged.append((head, list(items)))

    sheet = _compose(merged, fonts)
    out = Path(out_path)
    atomic_write(out, _png_bytes(sheet))
    return out


class _Fonts:
    """Pillow's bundled font at a few sizes (FreeType when available, else the bitmap fallback)."""

    def __init__(self):
        self.label = self._load(14)
        self.title = self._load(15)
        self.header = self._load(18)

    @staticmethod
    def _load(size: int):
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1
            return ImageFont.load_default()


def _colour_map(jobs: list[dict]) -> dict[str, tuple[int, int, int]]:
    """One colour per entity, the same in every tile (first appearance order)."""
    out: dict[str, tuple[int, int, int]] = {}
    for job in jobs:
        for eid, _ in job.get("regions", []):
            if eid not in out:
                out[eid] = PALETTE[len(out) % len(PALETTE)]
    return out


def _load_background(path, canvas, spec=None) -> Image.Image | None:
    """The background image as the plan places it (``spec``: the scene's ``background``, its ``fit`` and ``box``)."""
    if path is None:
        return None
    try:
        with Image.open(path) as im:
            if spec is not None and (spec.fit != "stretch" or spec.box is not None):
                from .raster import place_on_canvas

                return place_on_canvas(to_rgb(im), spec.box or [0.0, 0.0, 1.0, 1.0], spec.fit, canvas, 235)[0]
            return to_rgb(im).resize(canvas, Image.Resampling.LANCZOS)  # as the plan fits it
    except (OSError, ValueError):
        return None


def _tile_size(canvas) -> tuple[int, int, float, float]:
    w, h = canvas
    s = TILE / max(w, h)
    tw, th = max(1, round(w * s)), max(1, round(h * s))
    return tw, th, tw / w, th / h


def _to_tile(geom, sx: float, sy: float):
    return affinity.scale(geom, sx, sy, origin=(0, 0))


def _draw_tile(job: dict, canvas, colours, bg, fonts) -> Image.Image:
    tw, th, sx, sy = _tile_size(canvas)
    tile = Image.new("RGBA", (tw, th), PAPER + (255,))
    if bg is not None:
        faint = Image.blend(Image.new("RGB", (tw, th), PAPER), bg.resize((tw, th), Image.Resampling.LANCZOS), BG_FADE)
        tile.paste(faint.convert("RGBA"))
    _grid_lines(tile)

    regions = [(eid, r) for eid, r in job.get("regions", []) if r is not None and r.geom is not None]
    covers: dict[str, np.ndarray] = {}
    tgeoms: dict[str, Any] = {}
    for eid, r in regions:
        g = _to_tile(r.geom, sx, sy)
        tgeoms[eid] = g
        covers[eid] = rasterize(g, r.feather_px * min(sx, sy), (tw, th), 1)
        a = np.round(covers[eid] * FILL_ALPHA * 255.0).astype(np.uint8)
        layer = Image.new("RGBA", (tw, th), colours.get(eid, INK) + (0,))
        layer.putalpha(Image.fromarray(a, mode="L"))
        tile = Image.alpha_composite(tile, layer)

    for eid, path, fit, reg in job.get("references", []):
        cov = covers.get(eid)
        g = tgeoms.get(eid)
        if reg is not None and (cov is None or g is None):
            g = _to_tile(reg.geom, sx, sy)
            cov = rasterize(g, reg.feather_px * min(sx, sy), (tw, th), 1)
        if g is None or g.is_empty:
            continue
        thumb = _fitted_reference(path, fit, g.bounds, cov, (tw, th))
        if thumb is not None:
            tile = Image.alpha_composite(tile, thumb)

    draw = ImageDraw.Draw(tile)
    for eid, g in tgeoms.items():
        _outline(draw, g, colours.get(eid, INK) + (255,), width=2)
    with_ref = {eid for eid, *_ in job.get("references", [])}
    taken = [g for g in tgeoms.values() if not g.is_empty]
    for eid, rel in job.get("related", []):
        if rel is not None and not rel.is_empty:
            trel = _to_tile(rel, sx, sy)
            _outline(draw, trel, colours.get(eid, INK) + (255,), width=2, dash=(9, 6))
            free = trel.difference(_union(taken)) if taken else trel
            _label(draw, _label_point(free if free.area > 100 else trel), f"{eid}: related",
                   colours.get(eid, INK), fonts.label, (tw, th), dashed=True)
    for eid, g in tgeoms.items():
        if g.is_empty:
            continue
        # over a reference thumbnail the label goes to the top, to leave the picture visible
        _label(draw, _label_point(g, prefer="top" if eid in with_ref else "inside"), eid,
               colours.get(eid, INK), fonts.label, (tw, th))
    whole = [str(x) for x in job.get("whole_canvas", []) or []]
    if whole or not tgeoms:
        text = ", ".join(whole) + ": whole canvas" if whole else "no entity regions"
        _label(draw, (8, th - 8), text, (150, 150, 150), fonts.label, (tw, th), dashed=True)  # clamped into the corner
    draw.rectangle((0, 0, tw - 1, th - 1), outline=(170, 170, 170, 255), width=1)
    return tile.convert("RGB")


def _grid_lines(tile: Image.Image) -> None:
    """Faint lines at quarters of the canvas: orientation, and a hint of normalised coordinates."""
    draw = ImageDraw.Draw(tile)
    w, h = tile.size
    for k in range(1, 4):
        x, y = round(w * k / 4), round(h * k / 4)
        draw.line((x, 0, x, h), fill=(215, 215, 212, 255), width=1)
        draw.line((0, y, w, y), fill=(215, 215, 212, 255), width=1)


def _rings(g) -> Iterable[np.ndarray]:
    import shapely

    polys = shapely.get_parts(g)
    for p in polys:
        if p.geom_type == "Polygon":
            yield np.asarray(p.exterior.coords)
            for r in p.interiors:
                yield np.asarray(r.coords)
        elif p.geom_type in ("LineString", "LinearRing"):
            yield np.asarray(p.coords)
        elif p.geom_type in ("MultiPolygon", "GeometryCollection"):
            yield from _rings(p)


def _outline(draw: ImageDraw.ImageDraw, g, colour, width: int = 2, dash: tuple[int, int] | None = None) -> None:
    for ring in _rings(g):
        if len(ring) < 2:
            continue
        if dash is None:
            draw.line([tuple(p) for p in ring], fill=colour, width=width, joint="curve")
            continue
        # walk the ring, drawing `on` px of every `on + off`
        on, off = dash
        seg = np.diff(ring, axis=0)
        lens = np.hypot(seg[:, 0], seg[:, 1])
        total = float(lens.sum())
        if total <= 0:
            continue
        cum = np.concatenate([[0.0], np.cumsum(lens)])
        starts = np.arange(0.0, total, on + off)
        for s0 in starts:
            s1 = min(s0 + on, total)
            ts = np.concatenate([[s0], cum[(cum > s0) & (cum < s1)], [s1]])
            pts = [tuple(np.array([np.interp(t, cum, ring[:, 0]), np.interp(t, cum, ring[:, 1])])) for t in ts]
            draw.line(pts, fill=colour, width=width)


def _label_point(g, prefer: str = "inside") -> tuple[float, float]:
    """Where a label reads best: the pole of inaccessibility of the largest part (not the centroid,
    which can fall outside a ring or a crescent); for ``prefer='top'``, just inside the top edge."""
    import shapely

    parts = [p for p in shapely.get_parts(g) if p.geom_type == "Polygon"]
    if not parts:
        c = g.representative_point()
        return c.x, c.y
    big = max(parts, key=lambda p: p.area)
    if prefer == "top":
        x0, y0, x1, y1 = big.bounds
        p = shapely.Point((x0 + x1) / 2, y0 + 16)
        if big.contains(p):
            return p.x, p.y
    try:
        from shapely.ops import polylabel

        c = polylabel(big, tolerance=max(1.0, math.sqrt(big.area) / 50))
    except Exception:  # noqa: BLE001 - degenerate slivers: any inside point will do
        c = big.representative_point()
    # the centroid reads better when it is comfortably inside (polylabel wanders along the
    # midline of long boxes)
    m = big.centroid
    if big.contains(m) and big.boundary.distance(m) >= min(14.0, 0.6 * big.boundary.distance(c)):
        return m.x, m.y
    return c.x, c.y


def _union(geoms):
    import shapely

    return shapely.union_all(geoms)


def _label(draw, xy, text: str, colour, font, size, dashed: bool = False) -> None:
    """The entity id on a pale chip edged in its colour: readable over any fill or photo."""
    x, y = xy
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    tw_, th_ = r - l, b - t
    padx, pady = 6, 3
    w, h = tw_ + 2 * padx, th_ + 2 * pady
    m_ = 4  # keep chips off the tile's border
    x0 = max(m_, min(x - w / 2, size[0] - w - m_))
    y0 = max(m_, min(y - h / 2, size[1] - h - m_))
    fill = tuple(int(255 - (255 - c) * 0.18) for c in colour) + (235,)
    draw.rounded_rectangle((x0, y0, x0 + w, y0 + h), radius=5, fill=fill,
                           outline=tuple(colour) + (255,), width=1 if dashed else 2)
    draw.text((x0 + padx - l, y0 + pady - t), text, fill=INK + (255,), font=font)


def _fitted_reference(path, fit: str, bounds, cover: np.ndarray, size) -> Image.Image | None:
    """The reference image fitted into the region's box (contain | cover | stretch), alpha = region."""
    try:
        with Image.open(path) as im:
            ref = to_rgb(im)
    except (OSError, ValueError):
        return None
    x0, y0 = bounds[:2]
    scaled, _, off = fit_into_box(ref, bounds, fit)
    dims = scaled.size
    rgb = Image.new("RGB", size, (0, 0, 0))
    foot = Image.new("L", size, 0)
    ox, oy = round(x0) + off[0], round(y0) + off[1]
    rgb.paste(scaled, (ox, oy))
    foot.paste(255, (ox, oy, ox + dims[0], oy + dims[1]))
    alpha = np.asarray(foot, np.float32) / 255.0 * cover * REF_ALPHA
    out = rgb.convert("RGBA")
    out.putalpha(Image.fromarray(np.round(alpha * 255.0).astype(np.uint8), mode="L"))
    return out


def _compose(sections, fonts) -> Image.Image:
    """Sections top to bottom; each a header (groups) and a grid of titled tiles."""
    blocks = []
    for head, items in sections:
        n = len(items)
        cols = min(MAX_COLS, n) if head is not None else min(MAX_COLS, max(1, math.ceil(math.sqrt(n))))
        rows = math.ceil(n / cols)
        tw = max(t.size[0] for _, t in items)
        th = max(t.size[1] for _, t in items)
        cw, chh = tw + PAD, th + TITLE_H + PAD
        hh = HEADER_H if head else 0
        block = Image.new("RGB", (cols * cw - PAD, hh + rows * chh - PAD), (255, 255, 255))
        d = ImageDraw.Draw(block)
        if head:
            d.text((0, 6), head, fill=INK, font=fonts.header)
            d.line((0, hh - 6, block.size[0], hh - 6), fill=(200, 200, 200), width=1)
        for k, (t, tile) in enumerate(items):
            cx, cy = (k % cols) * cw, hh + (k // cols) * chh
            d.text((cx, cy + 5), _ellipsize(d, t, fonts.title, tw), fill=INK, font=fonts.title)
            block.paste(tile, (cx, cy + TITLE_H))
        blocks.append(block)
    width = max(b.size[0] for b in blocks) + 2 * PAD if blocks else TILE + 2 * PAD
    height = sum(b.size[1] for b in blocks) + PAD * (len(blocks) + 1)
    sheet = Image.new("RGB", (width, max(height, 2 * PAD)), (255, 255, 255))
    y = PAD
    for b in blocks:
        sheet.paste(b, (PAD, y))
        y += b.size[1] + PAD
    return sheet


def _ellipsize(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


# --- overlay on a built image ------------------------------------------------------------------

def z_ranks(regions: list) -> dict[str, int]:
    """Each region's place in the z-order, 1 on top: higher ``z`` first; ties: the later entity wins."""
    order = sorted(range(len(regions)), key=lambda k: (-regions[k][1].z, -k))
    return {regions[k][0]: n + 1 for n, k in enumerate(order)}


def render_overlay(image, regions: list, out_path, title: str | None = None) -> Path:
    """Draw ``regions`` ([(entity, Region)], scene order) over ``image`` (a PIL image at canvas size):
    translucent fills, outlines, and a label per region with its z and its place in the z-order
    (1 = drawn on top). Written atomically to ``out_path`` at the image's size."""
    base = image.convert("RGBA")
    size = base.size
    fonts = _Fonts()
    colours = _colour_map([{"regions": regions}])
    live = [(eid, r) for eid, r in regions if r is not None and r.geom is not None and not r.geom.is_empty]
    for eid, r in live:
        cov = rasterize(r.geom, r.feather_px, size, 1)
        layer = Image.new("RGBA", size, colours.get(eid, INK) + (0,))
        layer.putalpha(Image.fromarray(np.round(cov * FILL_ALPHA * 0.8 * 255.0).astype(np.uint8), mode="L"))
        base = Image.alpha_composite(base, layer)
    draw = ImageDraw.Draw(base)
    rank = z_ranks(live)
    for eid, r in live:
        _outline(draw, r.geom, colours.get(eid, INK) + (255,), width=2)
    for eid, r in live:
        z = f"{r.z:g}"
        _label(draw, _label_point(r.geom), f"{eid}  z={z} #{rank[eid]}", colours.get(eid, INK), fonts.label, size)
    if title:
        _label(draw, (8, size[1] - 8), title, (150, 150, 150), fonts.label, size, dashed=True)
    out = Path(out_path)
    atomic_write(out, _png_bytes(base.convert("RGB")))
    return out
