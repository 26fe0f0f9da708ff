"""Z-occlusion of many regions in near-linear time: what each shape keeps of itself under those above it.

Processed from the top down, each entity's visible region is its shape minus the union of the shapes
above it. Computing that union afresh for every entity is quadratic (seconds at a few hundred heavily
overlapping shapes, 22 s at 2000); here the union of everything placed so far is kept on a uniform
grid of tiles (:class:`Coverage`): each tile holds that union clipped to the tile, folded in lazily,
and a tile once fully covered is never touched again. An entity then costs a few tile-sized boolean
operations, and one under fully covered tiles (hidden) costs none.

An image of at most :data:`EXACT_MAX` entities takes the direct difference instead, so every image
a model family runs (≤ 62 entities) gets exactly the regions it always had: its masks, and so its
cache keys, do not change.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import shapely

from .shapes import EMPTY, MIN_AREA, polygonal

EXACT_MAX = 64  # entities in one image up to which each region is the direct difference
MAX_TILES = 64  # per side
NAMED = 3  # hiders named in a message about a hidden region on the tiled path
FEW_ABOVE = 8  # above a larger image, an entity with at most this many shapes above it (by bounding box)
# still takes the direct difference: cheaper than its tiles when shapes barely overlap


class Coverage:
    """The union of the shapes added so far, per tile of a grid over the canvas.

    Tiles are about as large as the shapes' median bounding box (smaller where they pile up deep), so
    a shape meets a handful of tiles and a tile a handful of shapes' edges."""

    def __init__(self, canvas: tuple[int, int], geoms: list[Any]):
        w, h = canvas
        arr = np.asarray(geoms, dtype=object)
        b = shapely.bounds(arr) if geoms else np.zeros((0, 4))
        sides = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) if len(b) else np.asarray([max(w, h)])
        # shapes piled many deep fill small tiles soon (a full tile costs nothing); sparse ones are
        # cheaper on larger tiles (fewer clips and folds): tuned on bench/bench_occlusion.py
        depth = float(shapely.area(arr).sum()) / (w * h) if geoms else 1.0
        scale = min(2.0, max(0.5, 2.0 * max(depth, 1e-6) ** -0.3))
        side = max(float(np.median(sides)) * scale, 1.0)
        self.nx = min(MAX_TILES, max(1, math.ceil(w / side)))
        self.ny = min(MAX_TILES, max(1, math.ceil(h / side)))
        self.tw, self.th = w / self.nx, h / self.ny
        n = self.nx * self.ny
        self.pending: list[list[Any]] = [[] for _ in range(n)]  # added, not yet folded into cover
        self.cover: list[Any] = [None] * n
        self.full = [False] * n

    def rect(self, t: int) -> tuple[float, float, float, float]:
        i, j = t % self.nx, t // self.nx
        return (i * self.tw, j * self.th, (i + 1) * self.tw, (j + 1) * self.th)

    def tiles(self, bounds) -> list[int]:
        """The tiles a bounding box meets."""
        x0, y0, x1, y1 = bounds
        i0, i1 = max(0, int(x0 // self.tw)), min(self.nx - 1, int(x1 // self.tw))
        j0, j1 = max(0, int(y0 // self.th)), min(self.ny - 1, int(y1 // self.th))
        return [j * self.nx + i for j in range(j0, j1 + 1) for i in range(i0, i1 + 1)]

    def place(self, g):
        """What of ``g`` the shapes placed before leave uncovered (EMPTY when nothing); then place ``g``.

        Per tile: fold what was placed into the tile's union, skip a full tile, and take ``g``'s piece
        minus the union (``covers`` first: a predicate is cheaper than an overlay)."""
        b = g.bounds
        pieces = []
        for t in self.tiles(b):
            self._fold(t)
            if self.full[t]:
                continue
            piece = _clip(g, self.rect(t), b)
            if piece.is_empty:
                continue
            self.pending[t].append(piece)
            cover = self.cover[t]
            if cover is None:
                pieces.append(piece)
            elif not cover.covers(piece):
                pieces.append(piece.difference(cover))
        if not pieces:
            return EMPTY
        return polygonal(pieces[0] if len(pieces) == 1 else shapely.union_all(pieces))

    def add(self, g) -> None:
        """Place ``g`` without asking what of it is visible (clipped to each tile when folded)."""
        for t in self.tiles(g.bounds):
            if not self.full[t]:
                self.pending[t].append(g)

    def _fold(self, t: int) -> None:
        if self.full[t] or not self.pending[t]:
            return
        r = self.rect(t)
        parts = [_clip(g, r) for g in self.pending[t]]
        if self.cover[t] is not None:
            parts.append(self.cover[t])
        self.pending[t] = []
        cover = polygonal(parts[0] if len(parts) == 1 else shapely.union_all(parts))
        if cover.area >= (r[2] - r[0]) * (r[3] - r[1]) - MIN_AREA:
            self.full[t], cover = True, None
        else:
            shapely.prepare(cover)  # place() asks it `covers` many times
        self.cover[t] = cover


def _clip(g, r: tuple[float, float, float, float], bounds: tuple | None = None):
    """``g`` within the rectangle ``r`` (``g`` itself when it lies inside)."""
    x0, y0, x1, y1 = bounds or g.bounds
    if x0 >= r[0] and y0 >= r[1] and x1 <= r[2] and y1 <= r[3]:
        return g
    return shapely.clip_by_rect(g, *r)


def occlude(geoms: dict[int, Any], keys: dict[int, tuple[float, int]], canvas: tuple[int, int]):
    """Each shape's visible region after z-occlusion (the higher key wins): ``{index: (region, hiders)}``
    where ``hiders`` is None for a visible region, else ``(named, more)`` for a hidden one: the indices to
    name in the message (one that hides it alone, else those that overlap it) and whether others do too."""
    ok = list(geoms)
    order = sorted(ok, key=lambda i: keys[i], reverse=True)  # top first
    arr = np.asarray([geoms[i] for i in ok], dtype=object)
    tree = shapely.STRtree(arr) if ok else None
    rank = np.empty(len(ok), dtype=np.int64)  # position from the top, per tree index
    pos = {i: k for k, i in enumerate(ok)}
    for r, i in enumerate(order):
        rank[pos[i]] = r
    cov = Coverage(canvas, list(arr)) if len(ok) > EXACT_MAX else None
    ids = np.asarray(ok, dtype=np.int64)
    bounds = shapely.bounds(arr) if ok else np.zeros((0, 4))
    out: dict[int, tuple[Any, Any]] = {}
    for r, i in enumerate(order):
        g = geoms[i]
        if cov is None:
            out[i] = _exact(i, g, ok, geoms, keys, tree)
            continue
        near = tree.query(g)
        near = near[rank[near] < r]  # above it, by bounding box
        if len(near) <= FEW_ABOVE:  # cheaper directly than on the tiles
            out[i] = _exact(i, g, ok, geoms, keys, tree)
            cov.add(g)
            continue
        region = cov.place(g)
        if region.area < MIN_AREA:
            out[i] = (EMPTY, _hiders(g, near[np.argsort(ids[near])], ids, arr, bounds))
        else:
            out[i] = (region, None)
    return out


def _exact(i: int, g, ok: list[int], geoms: dict, keys: dict, tree):
    """The direct difference (the result small scenes always had) and, when hidden, who hides it."""
    above = [ok[j] for j in tree.query(g, predicate="intersects") if keys[ok[j]] > keys[i]]
    if not above:
        return g, None
    region = polygonal(g.difference(shapely.union_all([geoms[j] for j in above])))
    if region.area >= MIN_AREA:
        return region, None
    hiders = [j for j in sorted(above) if geoms[j].intersection(g).area >= MIN_AREA]
    alone = [j for j in hiders if g.difference(geoms[j]).area < MIN_AREA]
    return EMPTY, (alone[:1] or hiders, False)


def _hiders(g, above: np.ndarray, ids: np.ndarray, arr: np.ndarray, bounds: np.ndarray):
    """Who hides ``g`` on the tiled path, at a bounded cost: the first shape above it (scene order)
    that covers it alone, else the first :data:`NAMED` that overlap it, and whether more do. ``above``:
    tree indices in scene order; ``ids``, ``arr``, ``bounds``: each tree index's entity, shape, bounds."""
    x0, y0, x1, y1 = g.bounds
    b = bounds[above]
    holds = above[(b[:, 0] <= x0) & (b[:, 1] <= y0) & (b[:, 2] >= x1) & (b[:, 3] >= y1)]
    for j in holds:  # only a shape whose bounding box holds g's can hide it alone
        if arr[j].covers(g):
            return [int(ids[j])], False
    shapely.prepare(g)
    named = []
    for j in above:
        if g.intersects(arr[j]) and not g.touches(arr[j]):  # prepared predicates: no overlay
            named.append(int(ids[j]))
            if len(named) > NAMED:
                break
    return named[:NAMED], len(named) > NAMED
