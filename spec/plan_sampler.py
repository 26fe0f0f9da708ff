"""The plan's sampler section (docs/plan-format.md): the solver, steps, guidance, and the guidance knobs of the
SD family: CFG rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
arXiv 2305.08891, §3.4, Eq. 15-16: diffusers' ``guidance_rescale``) and FreeU (Si et al. 2023, arXiv 2309.11497:
diffusers' ``unet.enable_freeu``). Both are absent from ``plan.json`` when off, so plans without them keep the
hashes they had before plans carried them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_serializer


class _T(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


class FreeU(_T):
    """diffusers' ``unet.enable_freeu(s1, s2, b1, b2)``: skip (s) and backbone (b) scales of the first two decoder
    stages."""

    s1: float = Field(ge=0.0)
    s2: float = Field(ge=0.0)
    b1: float = Field(ge=0.0)
    b2: float = Field(ge=0.0)


class Sampler(_T):
    kind: str
    steps: int = Field(gt=0)
    guidance: float = 3.5
    true_cfg: float = 1.0
    cfg_rescale: float = Field(0.0, ge=0.0, le=1.0)  # diffusers' guidance_rescale; 0: off (absent from the plan)
    freeu: FreeU | None = None  # None: off (absent from the plan)

    @model_serializer(mode="wrap")
    def _without_absent(self, handler):
        d = handler(self)
        if not d.get("cfg_rescale"):
            d.pop("cfg_rescale", None)
        if d.get("freeu") is None:
            d.pop("freeu", None)
        return d
