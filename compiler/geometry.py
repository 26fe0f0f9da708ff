"""Regions: the entities' shapes after z-occlusion and feathering, and the geometric checks of a scene.

Shapes become geometries in ``compiler/shapes.py``; regions become coverage masks in
``compiler/raster.py``. Coordinates are canvas pixels, x to the right, y down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from shapely.geometry import box as _box

from .occlusion import occlude
from .raster import erode
from .shapes import EMPTY, shape_geometry


@dataclass(frozen=True)
class Region:
    entity: str
    geom: Any  # shapely geometry after occlusion, canvas pixels
    feather_px: float
    z: float


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

    ok = {i: geoms[i] for i in present if geoms[i] is not None}
    out: dict[str, Region] = {}
    for i, (region, hiders) in occlude(ok, keys, canvas).items():
        e = ls.scene.entities[i]
        if hiders is not None:
            by = _hidden_by([ls.scene.entities[j].id for j in hiders[0]], hiders[1])
            where = ("entities", i, "shape") if e.shape is not None else ("entities", i, "id")
            diags.error(ls.pos(where), f"the region of `{e.id}` is hidden entirely by {by}",
                        hint=f"give `{e.id}` a higher `z` than what covers it, or change the shapes")
        out[e.id] = Region(e.id, region, float(e.feather or 0.0) * short, keys[i][0])
    for i in present:
        e = ls.scene.entities[i]
        if e.id not in out:
            out[e.id] = Region(e.id, EMPTY, float(e.feather or 0.0) * short, keys[i][0])
    for eid in entity_ids:
        if eid not in out:  # an unknown id: the check pass reports it
            out[eid] = Region(eid, EMPTY, 0.0, 0.0)
    return {eid: out[eid] for eid in sorted(out, key=lambda x: index.get(x, len(index)))}


def _hidden_by(names: list[str], more: bool) -> str:
    """`a` | `a` and `b` together | `a`, `b`, `c` and others above it together."""
    quoted = [f"`{n}`" for n in names]
    if not quoted:
        return "the entities above it together"
    if more:
        return ", ".join(quoted) + " and others above it together"
    if len(quoted) == 1:
        return quoted[0]
    return ", ".join(quoted[:-1]) + f" and {quoted[-1]} together"


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
    return all(g.is_empty for g in erode(geom, np.asarray([f / 2.0]), canvas))
