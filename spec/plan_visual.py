"""The plan's visual prompts (``Job.visuals``, docs/plan-format.md): the type and its check.

Object-level visual prompts (arXiv 2501.01424): an entity's look given as an image, which the runtime
turns into extra key/value tokens seen only by the image tokens of the entity's region.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from .errors import PlanError

MAX_VISUAL_SIDE = 512  # the compiler scales larger images down (CLIP sees 224 px)


class Refine(BaseModel):
    """Test-time refinement of the value tokens (arXiv 2501.01424, §3.4): ``steps`` Adam steps of rate
    ``lr`` on the denoise ops that start at a step index in ``at`` (sorted, distinct, inside the window)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    steps: int = Field(ge=1)
    lr: float = Field(gt=0.0)
    at: tuple[int, ...] = Field(min_length=1)


class Visual(BaseModel):
    """One visual prompt: its image, adapter, scale, step window and the entity's region masks (None = the
    whole canvas)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    entity: str
    image: str  # tensor name: uint8 [h, w, 3], the object's image, at most MAX_VISUAL_SIDE a side
    sha256: str = ""
    mode: Literal["kv-mixed", "ip-adapter"] = "kv-mixed"
    adapter: str | None = None  # absolute path of a .safetensors file; None = the tiny models' built-in one
    adapter_sha256: str | None = None
    # absolute path of the adapter's image encoder directory (None: built in); like `adapter`, not part of the
    # job_hash: the build's cache key holds a digest of its files (scenec/build/keys.py, as a model directory's)
    encoder: str | None = None
    scale: float = Field(1.0, ge=0.0)
    window: tuple[int, int]  # acts on the denoise ops with window[0] <= from < window[1]
    masks: dict[str, str] | None = None
    refine: Refine | None = None  # absent from the plan when None (plans without it are unchanged)

    @model_serializer(mode="wrap")
    def _without_absent_refine(self, handler):
        d = handler(self)
        if self.refine is None:
            d.pop("refine", None)
        return d

    def refines(self, step: int) -> bool:
        """Whether the value tokens are refined before the denoise op starting at step index ``step``."""
        return self.refine is not None and step in self.refine.at and self.acts(step)

    def acts(self, step: int) -> bool:
        """Whether the denoise op starting at step index ``step`` sees the visual tokens."""
        return self.scale > 0 and self.window[0] <= step < self.window[1]


def check_visual(plan, vp: Visual, what: str) -> None:
    """A visual prompt's image tensor, masks (every grid), window and adapter digest (``Plan._check_job``)."""
    vw = f"{what}: visual prompt {vp.entity!r}"
    t = plan.tensor(vp.image)
    shape = tuple(getattr(t, "shape", ()))
    if str(getattr(t, "dtype", "")) != "uint8" or len(shape) != 3 or shape[2] != 3 or \
            not 0 < min(shape[:2]) <= max(shape[:2]) <= MAX_VISUAL_SIDE:
        raise PlanError(f"{vw}: need a uint8 [h, w, 3] image of at most {MAX_VISUAL_SIDE} pixels a side, got "
                        f"{getattr(t, 'dtype', '?')} {list(shape)}")
    plan._check_masks(vp.masks, vw)
    if not 0 <= vp.window[0] <= vp.window[1] <= plan.steps:
        raise PlanError(f"{vw}: window {list(vp.window)} outside 0..{plan.steps}")
    r = vp.refine
    if r is not None:
        if vp.mode != "kv-mixed" or vp.scale <= 0:
            raise PlanError(f"{vw}: refine needs kv-mixed mode and a scale > 0")
        if list(r.at) != sorted(set(r.at)) or not all(vp.window[0] <= s < vp.window[1] for s in r.at):
            raise PlanError(f"{vw}: refine at {list(r.at)} must be distinct sorted steps inside the window "
                            f"{list(vp.window)}")
    if (vp.adapter is None) != (vp.adapter_sha256 is None):
        raise PlanError(f"{vw}: an adapter needs its sha256 and the reverse")
