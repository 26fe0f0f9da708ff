"""The step program of a plan job (docs/plan-format.md, OP): the ops the sampler interprets.

Part of the plan format, ``scenec-plan/1``; ``spec/plan.py`` re-exports every name.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _T(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


# --- the step program ------------------------------------------------------------------------------

class Denoise(_T):
    """One sampler step from level ``from`` to ``to`` (= from + 1)."""

    op: Literal["denoise"] = "denoise"
    from_: int = Field(alias="from")
    to: int
    regional: bool = True  # use the region masks (false after attention.until)
    theta: float | None = None  # coupling weight of the entity streams (groups), else None
    eta: float = 0.0  # 0: deterministic; > 0: share of fresh noise (COW cycles)


class Renoise(_T):
    """Jump back up from level ``from`` to ``to`` (< from) in closed form (COW's cycles)."""

    op: Literal["renoise"] = "renoise"
    from_: int = Field(alias="from")
    to: int


class Paste(_T):
    """Replace condition ``condition``'s region of the latent with its reference latent at level ``at``."""

    op: Literal["paste"] = "paste"
    condition: int
    at: int


class Fork(_T):
    """The shared prefix of a coupling group ends here."""

    op: Literal["fork"] = "fork"


class Seed(_T):
    """COW's seed initialisation: the latent becomes the inversion, at level ``at``, of the seed canvas
    (the placed references of ``conditions`` on one grey canvas)."""

    op: Literal["seed"] = "seed"
    at: int
    conditions: list[int] = Field(min_length=1)


Op = Annotated[Denoise | Renoise | Paste | Fork | Seed, Field(discriminator="op")]
OP_KINDS = ("denoise", "renoise", "paste", "fork", "seed")
