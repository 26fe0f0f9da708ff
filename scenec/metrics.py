"""The coupled-generation metrics of ``scenec eval`` and ``scenec tune`` (Coupled Image Generation,
arXiv 2506.06826, §4; docs/eval-tune-split.md), as small pure numpy functions:

- **BgSim** = −ρ · mean_{p ∉ R} ‖x_i(p) − x_j(p)‖² / 3, averaged over the pairs (i, j) of variants
  built with the same seed: the normalised squared distance of the backgrounds (pixels RGB in [0, 1],
  the squared distance per channel), on the paper's scale (it reports values near −2e-4); R is the
  joint entity region (the union of the entity regions of every variant of the group),
  ρ = |pixels ∉ R| / |pixels| the validity ratio;
- **combined** = a · BgSim + b · CLIPScore (``--weights a,b``; default 1,1). CLIPScore is
  :mod:`scenec.clip` (100 · cos, the paper's scale).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Sequence

import numpy as np

# (image HxWx3 float in [0, 1], text) -> bool mask HxW of the subject, or None when it finds none
Segmenter = Callable[[np.ndarray, str], "np.ndarray | None"]


class EvalError(Exception):
    """An expected failure of ``scenec eval`` / ``scenec tune``: one sentence a user can act on.

    ``exit_code``: 2 for invalid input (the default), 1 for what is missing or failed at run time.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def to_float_image(img: Any) -> np.ndarray:
    """A PIL image or array → float64 HxWx3 in [0, 1] (uint8 is divided by 255; alpha dropped)."""
    a = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    a = a[..., :3]
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    return np.clip(a.astype(np.float64), 0.0, 1.0)


def upsample_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A coverage grid ``[h, w]`` → boolean ``[H, W]`` (``size`` = (H, W)): a pixel is inside when its cell's
    coverage is > 0 (nearest neighbour; feathered edges count as entity, so the background stays clean)."""
    m = np.asarray(mask, dtype=np.float64)
    H, W = size
    h, w = m.shape
    ys = np.minimum((np.arange(H) * h) // H, h - 1)
    xs = np.minimum((np.arange(W) * w) // W, w - 1)
    return m[np.ix_(ys, xs)] > 0.0


def bg_similarity(images: Sequence[np.ndarray], inside: np.ndarray | None) -> dict:
    """BgSim = −ρ · mean over pixels outside ``inside``, channels and image pairs of the squared difference.

    ``ρ`` (validity ratio) = fraction of pixels outside the joint entity region; ``mean_sq`` the mean
    squared difference per channel (RGB in [0, 1]) outside it. Returns ``{"bgsim", "mean_sq",
    "validity"}``; ``bgsim`` is None with fewer than two images, and 0 when no pixel lies outside (ρ = 0).
    """
    imgs = [to_float_image(x) for x in images]
    shape = imgs[0].shape[:2] if imgs else (0, 0)
    outside = np.ones(shape, bool) if inside is None else ~np.asarray(inside, bool)
    validity = float(outside.mean()) if outside.size else 0.0
    if len(imgs) < 2:
        return {"bgsim": None, "mean_sq": None, "validity": validity}
    if any(x.shape != imgs[0].shape for x in imgs):
        raise EvalError(f"the images of a group differ in size ({sorted({x.shape[:2] for x in imgs})})")
    if not outside.any():
        return {"bgsim": 0.0, "mean_sq": None, "validity": 0.0}
    d = [np.square(a[outside] - b[outside]).mean() for a, b in itertools.combinations(imgs, 2)]
    mean_sq = float(np.mean(d))
    return {"bgsim": -validity * mean_sq, "mean_sq": mean_sq, "validity": validity}


def combined(bgsim: float | None, clipscore: float | None, weights: tuple[float, float]) -> float | None:
    """a·BgSim + b·CLIPScore; a term whose weight is 0 may be missing; otherwise None when one is."""
    a, b = weights
    total = 0.0
    for w, v in ((a, bgsim), (b, clipscore)):
        if w == 0:
            continue
        if v is None:
            return None
        total += w * v
    return total


def parse_weights(text: str) -> tuple[float, float]:
    """``"a,b"`` → (a, b); raises EvalError with one sentence."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        a, b = (float(p) for p in parts)
    except ValueError:
        raise EvalError(f"--weights must be two numbers `a,b` (a·BgSim + b·CLIPScore), not `{text}`") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise EvalError(f"--weights must be finite numbers, not `{text}`")
    return a, b
