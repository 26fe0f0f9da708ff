"""Geometry: scene shapes → shapely geometries → z-occluded, feathered regions → coverage masks.

(Stub: being written; the signatures below are the contract other modules use.)
Coordinates are canvas pixels, x to the right, y down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Region:
    entity: str
    geom: Any  # shapely geometry after occlusion, canvas pixels
    feather_px: float
    z: float


def resolve_regions(ls, entity_ids, canvas, diags) -> dict[str, Region]:
    """Regions of the given entities (list order) after z-occlusion; problems go to diags."""
    raise NotImplementedError


def shape_geometry(ls, shape, path: tuple, canvas, diags, units: str = "norm"):
    """A scene shape (at ``path`` in the scene) as a shapely geometry in canvas pixels, or None."""
    raise NotImplementedError


def rasterize(geom, feather_px: float, canvas, px_per_cell: int) -> np.ndarray:
    """Area-weighted coverage of ``geom`` (feathered inward) on a grid of ``px_per_cell`` pixels."""
    raise NotImplementedError


def check_geometry(ls, family, diags) -> None:
    """Every geometric check of a scene."""
    raise NotImplementedError
