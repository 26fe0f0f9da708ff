"""Non-finite values fail a job: a NaN anywhere would otherwise become a black PNG recorded as built.

The sampler checks each row's final latents, the families their decoded image before it is turned
into 8-bit pixels (where NaN would silently become 0).
"""

from __future__ import annotations

import torch

from scenec.spec.errors import NonFinite


def require_finite(t: torch.Tensor, what: str) -> None:
    """Raise NonFinite, naming ``what``, unless every value of ``t`` is finite."""
    if bool(torch.isfinite(t).all()):
        return
    hint = "; float16 overflows easily: try --dtype bf16 or fp32" if t.dtype == torch.float16 else ""
    raise NonFinite(f"{what} has NaN or infinite values; no image written{hint}")
