"""The plan's ControlNet conditions (``Job.controls``, docs/plan-format.md): the type and its check.

ControlNet (Zhang et al. 2023, arXiv 2302.05543): a trainable copy of the UNet's encoder reads a control
image and adds its residuals to the UNet's skip connections and middle block.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .errors import PlanError


class Control(BaseModel):
    """One ControlNet condition: its image at canvas size, its model, scale and step window."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    image: str  # tensor name: uint8 [H, W, 3] at the canvas size
    sha256: str = ""
    # absolute path of a diffusers ControlNetModel directory; None = the tiny models' built-in one. Like a visual
    # prompt's encoder, not part of the job_hash: the build's cache key holds a digest of its files
    model: str | None = None
    model_spec: str | None = None  # as the scene names it (messages)
    scale: float = Field(1.0, ge=0.0)
    mode: int | None = Field(None, ge=0)  # a Union ControlNet's control type (Flux; `controlnet_mode`)
    window: tuple[int, int]  # acts on the denoise ops with window[0] <= from < window[1]
    region: str | None = None  # the entity whose region it acts in (messages); None: the whole image
    masks: dict[str, str] | None = None  # that region's masks (grid → tensor name), as an entity stream's

    def acts(self, step: int) -> bool:
        return self.scale > 0 and self.window[0] <= step < self.window[1]


def check_control(plan, c: Control, what: str) -> None:
    """A control's image tensor (uint8 at the canvas size) and window (``Plan._check_job``)."""
    t = plan.tensor(c.image)
    w, h = plan.canvas
    shape = tuple(getattr(t, "shape", ()))
    if str(getattr(t, "dtype", "")) != "uint8" or shape != (h, w, 3):
        raise PlanError(f"{what}: control image {c.image!r} must be uint8 [{h}, {w}, 3], got "
                        f"{getattr(t, 'dtype', '?')} {list(shape)}")
    if not 0 <= c.window[0] <= c.window[1] <= plan.steps:
        raise PlanError(f"{what}: control window {list(c.window)} outside 0..{plan.steps}")
    plan._check_masks(c.masks, f"{what}: control in {c.region!r}")
