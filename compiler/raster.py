"""Rasterization: regions → area-weighted, feathered coverage masks on the model's grids. numpy + shapely.

Masks are *area-weighted* coverage: a cell's value is the fraction of its area inside the region,
computed exactly (Green's theorem over the polygon's edges, see ``_coverage``) rather than by
sampling pixel centres, so that a box on cell edges gives exactly 0/1 and a half-covered cell
exactly 0.5 on every grid, whatever its resolution.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import shapely
from shapely.geometry import box as _box

MAX_FEATHER_LEVELS = 16


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
    eroded = erode(geom, (np.arange(k) + 0.5) / k * f, canvas)
    layers = [(g, 1.0 / k) for g in eroded if not g.is_empty]
    if len(_FEATHER_CACHE) > 256:
        _FEATHER_CACHE.clear()
    _FEATHER_CACHE[key] = (geom, layers)
    return layers


def erode(geom, dists: np.ndarray, canvas) -> list:
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


def fit_geometry(size: tuple[int, int], bounds, fit: str):
    """Where a reference of ``size`` (w, h) goes in a region's bounding box: (scaled size, box size (w, h),
    offset of the image in the box). ``contain`` letterboxes, ``cover`` crops (negative offset), ``stretch``
    fills."""
    x0, y0, x1, y1 = bounds
    bw, bh = max(1, round(x1 - x0)), max(1, round(y1 - y0))
    rw, rh = size
    if fit == "stretch":
        return (bw, bh), (bw, bh), (0, 0)
    s = min(bw / rw, bh / rh) if fit == "contain" else max(bw / rw, bh / rh)
    scaled = (max(1, round(rw * s)), max(1, round(rh * s)))
    return scaled, (bw, bh), ((bw - scaled[0]) // 2, (bh - scaled[1]) // 2)


def footprint(size: tuple[int, int], bounds, fit: str) -> tuple[int, int, int, int]:
    """The placed image's footprint (x0, y0, x1, y1) in canvas pixels: its part inside the bounding box."""
    scaled, (bw, bh), (ox, oy) = fit_geometry(size, bounds, fit)
    bx, by = round(bounds[0]), round(bounds[1])
    return bx + max(0, ox), by + max(0, oy), bx + min(bw, ox + scaled[0]), by + min(bh, oy + scaled[1])


def fit_into_box(ref, bounds, fit: str):
    """A reference image fitted into a region's bounding box: (scaled image, box size (w, h), offset of
    the image in the box), as :func:`fit_geometry` places it."""
    from PIL import Image

    size, box, offset = fit_geometry(ref.size, bounds, fit)
    return ref.resize(size, Image.Resampling.LANCZOS), box, offset


def place_on_canvas(rgb, box, fit: str, canvas, fill: int):
    """``background.image`` fitted into ``box`` (fractions of the canvas) on a canvas of grey ``fill`` (a PIL image),
    and its footprint in canvas pixels (None when it covers the canvas: nothing is outpainted), as references are
    placed in their boxes (:func:`fit_into_box`)."""
    from PIL import Image

    w, h = canvas
    bounds = (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
    scaled, (bw, bh), offset = fit_into_box(rgb, bounds, fit)
    inner = Image.new("RGB", (bw, bh), (fill,) * 3)
    inner.paste(scaled, offset)
    out = Image.new("RGB", (w, h), (fill,) * 3)
    out.paste(inner, (round(bounds[0]), round(bounds[1])))
    foot = footprint(rgb.size, bounds, fit)
    return out, None if tuple(foot) == (0, 0, w, h) else tuple(foot)
