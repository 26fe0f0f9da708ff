"""One training example of `scenec train-adapter` made ready (runtime/train_adapter.py): the object's crop and
its augmentation (Parmar et al., arXiv 2501.01424, §3), its region on each attention grid and the one-job
plan its model call runs in."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from scenec.compiler.visual import GRAY, pad_square
from scenec.spec.plan import FORMAT as PLAN_FORMAT
from scenec.spec.plan import Plan


def object_crop(rgb: np.ndarray, mask: np.ndarray, side: int = 512) -> np.ndarray:
    """The object cut from its own image (arXiv 2501.01424, §3): the mask's bounding box, gray outside
    the mask, padded to a gray square (CLIP's processor center-crops: the whole object stays in view),
    at most ``side`` px; uint8 ``[s, s, 3]``. A scene's kv-mixed visual prompt is prepared alike
    (``compiler.visual.prepare_image``: a cut-out's alpha on gray, the same square padding)."""
    from PIL import Image

    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    cut = np.where(mask[y0:y1, x0:x1, None], rgb[y0:y1, x0:x1], GRAY).astype(np.uint8)
    sq = pad_square(cut)  # the compiler pads a kv-mixed visual prompt with the same function
    s = sq.shape[0]
    if s > side:
        sq = np.asarray(Image.fromarray(sq).resize((side, side), Image.LANCZOS))
    return sq


def augment(crop: np.ndarray, gen: torch.Generator):
    """A random horizontal flip and the object scaled by 0.8–1 at a random place in its gray square
    (the paper's augmentation of the visual prompt, §3), as a PIL image; draws from ``gen``."""
    from PIL import Image

    flip, scale, ox, oy = torch.rand(4, generator=gen).tolist()
    s = crop.shape[0]
    k = max(1, round(s * (0.8 + 0.2 * scale)))
    img = Image.fromarray(crop)
    if flip < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    out = Image.new("RGB", (s, s), (GRAY, GRAY, GRAY))
    out.paste(img.resize((k, k), Image.BILINEAR), (int(ox * (s - k)), int(oy * (s - k))))
    return out


def cells(mask: np.ndarray, px: int, grid: tuple[int, int]) -> torch.Tensor:
    """Bool ``[h*w]``: the grid cells of ``px`` pixels holding any of the mask (coverage > 0, the rule of
    ``layout.region_membership`` that inference uses)."""
    h, w = grid
    pad = np.zeros((h * px, w * px), bool)
    pad[:mask.shape[0], :mask.shape[1]] = mask
    return torch.from_numpy(pad.reshape(h, px, w, px).any(axis=(1, 3)).reshape(-1))


def training_plan(model, family, width: int, height: int, caption: str, guidance: float) -> Plan:
    """A one-job plan of one unguided denoise op over the caption (what :func:`model_output` needs of a
    run: the canvas, the family's grids, the text), in the plan format (docs/plan-format.md)."""
    from scenec.compiler.caps import grid_size

    grids = {g: list(grid_size((width, height), px)) for g, px in family.grids}
    program = [{"op": "denoise", "from": 0, "to": 1, "regional": False, "theta": None, "eta": 0.0}]
    job = {"id": "train", "job_hash": "train", "name": "train", "seed": 0, "group": None, "variant": None,
           "source": {"file": "metadata.jsonl", "line": 1}, "global": {"prompt": 0, "negative": 1},
           "entities": [], "init_image": None, "inpaint_mask": None, "conditions": [], "program": program}
    doc = {"format": PLAN_FORMAT, "scenec_version": "0.1.0", "plan_hash": "train",
           "scene": {"name": "train", "file": "metadata.jsonl"}, "model": model.model_dump(),
           "canvas": {"width": width, "height": height}, "grids": grids,
           "sampler": {"kind": family.sampler, "steps": 1, "guidance": guidance, "true_cfg": 1.0},
           "attention": {"image_self": "open", "blocks": "all", "until": 1.0, "pad_prompts": None},
           "prompts": [caption, ""], "output": {"dir": "out", "ext": "png"}, "jobs": [job], "groups": []}
    return Plan(doc, {})


@dataclass
class Prepared:
    """An example ready to train on: its plan, clean latent (on the CPU), crop and region per grid; ``blank``:
    its plan with an empty caption (the text dropped, condition dropout)."""

    plan: Plan
    blank: Plan
    x0: torch.Tensor
    crop: np.ndarray
    visible: dict[int, torch.Tensor]
