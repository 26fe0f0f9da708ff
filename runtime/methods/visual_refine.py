"""Test-time refinement of a visual prompt's value tokens (``visual.refine``).

"Object-level Visual Prompts for Compositional Image Generation" (Parmar et al., arXiv 2501.01424),
§3.4, compositional guidance: at inference the appearance (value) tokens of each visual prompt are
refined by a few gradient steps on an image-similarity loss between the predicted clean image's object
region and the visual prompt, the diffusion model, the key (layout) tokens and every weight frozen.

Before a denoise op whose start step the plan lists in ``refine.at``: the positive branch's fine
tokens become a leaf; the guided model output at the current latent (the family's own ``predict``,
every method's modifiers as in the real step) gives the predicted clean latent (the solver's
``clean``: x − σ·v on flow models, (x − √(1−ᾱ)·ε)/√ᾱ on ε models), the VAE decodes it, the region's
bounding box is cropped (gray 128 outside the region's mask), resized and normalised in torch as the
image encoder's processor does, and the encoder's pooled embedding is compared with the visual prompt's:
loss = 1 − cos(e(crop), e(prompt)), minimised by Adam (``lr``) for ``steps`` steps. The refined tokens
serve the rest of the job. Each refinement costs ``steps`` forward + backward passes of the model, VAE
decode and image encoder, and one more forward to measure the loss after (recorded in the run's
``diagnostics``, the image's sidecar, and logged at debug level).

The loss and the fixed region are scenec's choices: the paper segments the predicted image and matches
segments with DINOv2 (docs/visual-prompts.md). The denoiser and the VAE are gradient-checkpointed during
the refinement (:func:`checkpointed`).

The sampler's entry points run under ``torch.no_grad()``, not ``inference_mode``: tensors made in
inference mode (the adapter and encoder loaded in a run's setup, the region masks) cannot be saved
for backward, and the refinement needs them in its graph. It turns gradients on locally
(``enable_grad``), every weight frozen (:func:`frozen`), on a copy of the latent.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from scenec.spec.errors import Unsupported

log = logging.getLogger(__name__)


def region_mask(plan, vp) -> np.ndarray | None:
    """The visual prompt's region on its finest grid (bool, coverage > 0), or None: no region, or an empty one."""
    if not vp.masks:
        return None
    g = max(vp.masks, key=lambda name: math.prod(plan.grid(name)))
    m = plan.mask(vp.masks, g) > 0
    return m if m.any() else None


def region_box(plan, vp, height: int, width: int) -> tuple[int, int, int, int]:
    """The pixel bounding box ``(top, bottom, left, right)`` of the visual prompt's region on an image of
    ``height`` × ``width`` (the region's mask on its finest grid, coverage > 0); the whole image without one."""
    m = region_mask(plan, vp)
    if m is None:
        return 0, height, 0, width
    gh, gw = m.shape
    ys, xs = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return (ys[0] * height // gh, -(-(ys[-1] + 1) * height // gh), xs[0] * width // gw,
            -(-(xs[-1] + 1) * width // gw))


GRAY = 128 / 127.5 - 1  # uint8 gray 128 in the VAE's [-1, 1]


def region_crop(plan, vp, img: torch.Tensor) -> torch.Tensor:
    """The region's bounding box of ``img`` (``[B, 3, H, W]`` in [-1, 1]) with the pixels outside the region's
    mask set to gray 128, as the visual prompt image's background is (docs/visual-prompts.md)."""
    h, w = img.shape[-2:]
    top, bottom, left, right = region_box(plan, vp, h, w)
    crop = img[..., top:bottom, left:right]
    m = region_mask(plan, vp)
    if m is None:
        return crop
    gh, gw = m.shape
    rows, cols = np.arange(top, bottom) * gh // h, np.arange(left, right) * gw // w  # each pixel's cell
    inside = torch.from_numpy(np.ascontiguousarray(m[rows][:, cols])).to(img.device)
    return torch.where(inside, crop, torch.full((), GRAY, dtype=crop.dtype, device=crop.device))


def clip_pixels(img: torch.Tensor, proc) -> torch.Tensor:
    """An image ``[B, 3, h, w]`` in [-1, 1] as ``CLIPImageProcessor`` prepares one, differentiably:
    resize the shortest edge (bicubic, antialiased, the long edge truncated), centre crop, rescale to [0, 1],
    mean/std normalise. Against the processor (PIL) on uniform noise: ≤ 0.014 max / 0.004 mean (normalised
    units) when downscaling; up to 0.3 max / 0.006 mean when upscaling (bicubic −0.75 in torch, −0.5 in PIL)."""
    x = ((img.float() + 1) / 2).clamp(0, 1)
    ch, cw = proc.crop_size["height"], proc.crop_size["width"]
    short = proc.size.get("shortest_edge", min(ch, cw))
    h, w = x.shape[-2:]
    # the long edge truncated, as transformers' get_resize_output_image_size does
    nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    nh, nw = max(ch, nh), max(cw, nw)
    # clamped as PIL's uint8 resize saturates bicubic's overshoot
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - ch) // 2, (nw - cw) // 2
    x = x[..., top:top + ch, left:left + cw]
    mean = torch.tensor(proc.image_mean, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(proc.image_std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean) / std


def vae_image(backend, z: torch.Tensor, plan) -> torch.Tensor:
    """A latent as the family's VAE decodes it, differentiably: ``[1, 3, H, W]`` float32 in about [-1, 1]
    (Flux: unpacked, unscaled and unshifted as FluxPipeline does; SD/SDXL: unscaled)."""
    pipe = backend.pipe
    vae = pipe.vae
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)  # as SDXL's decode does: its VAE overflows in fp16
    if backend.family == "flux":
        width, height = plan.canvas
        z = pipe._unpack_latents(z, height, width, pipe.vae_scale_factor)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
    else:
        z = z / vae.config.scaling_factor
    return vae.decode(z.to(vae.dtype), return_dict=False)[0].float()


def _pooled(encoder, pixels: torch.Tensor) -> torch.Tensor:
    """The image encoder's pooled embedding (CLIP vision: the post-layernormed class token)."""
    return encoder(pixel_values=pixels.to(encoder.dtype)).pooler_output.float()


def target_embedding(prompt, rgb: np.ndarray, device) -> torch.Tensor:
    """The visual prompt image's pooled embedding (its processor's own preprocessing), once per prompt."""
    from PIL import Image

    if getattr(prompt, "target", None) is None:
        encoder, proc = prompt.encoder
        pix = proc(images=Image.fromarray(np.asarray(rgb, np.uint8)), return_tensors="pt").pixel_values.to(device)
        with torch.no_grad():
            prompt.target = _pooled(encoder, pix)
    return prompt.target


@contextmanager
def frozen(*modules):
    """Every parameter of ``modules`` with ``requires_grad`` False for the block (restored after): only the
    value tokens get a gradient, and nothing else is recorded for backward."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield params
    finally:
        for p, r in zip(params, before):
            p.requires_grad_(r)


CALL_STATE = ("mods", "n_img", "rows", "cache")  # the Attention state a model call sets (runtime/attention.py)


@contextmanager
def checkpointed(model, ctl=None):
    """Gradient checkpointing (Chen et al. 2016, arXiv 1604.06174, §3) of a diffusers model for the block:
    each checkpointed block keeps only its inputs and recomputes its activations in backward, instead of
    keeping every activation of every block until backward; restored after. ``ctl``: the family's
    :class:`~scenec.runtime.attention.Attention`, whose per-call state (modifiers, image tokens, rows, the
    call's bias cache) is that of the last model call when backward runs (true CFG calls the model twice):
    each block is recomputed under the state of the call that ran it. A model without checkpointing runs as is."""
    if not getattr(model, "_supports_gradient_checkpointing", False):
        yield
        return
    was = model.is_gradient_checkpointing

    def ckpt(block, *args):
        state = None if ctl is None else {a: getattr(ctl, a) for a in CALL_STATE}

        def run(*a):
            if state is None:
                return block(*a)
            now = {n: getattr(ctl, n) for n in CALL_STATE}
            for n, val in state.items():
                setattr(ctl, n, val)
            try:
                return block(*a)
            finally:
                for n, val in now.items():
                    setattr(ctl, n, val)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(ckpt)
    try:
        yield
    finally:
        if was:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()


def refine(run, prompt, op) -> dict:
    """Refine ``prompt``'s positive value tokens before denoise ``op`` (module docstring); the losses."""
    vp, be, r = prompt.vp, run.backend, prompt.vp.refine
    if torch.is_inference_mode_enabled():
        raise Unsupported(f"visual prompt {vp.entity!r}: refine takes gradients, which torch.inference_mode() "
                          "forbids: run the job through run_job/run_batch (torch.no_grad())")
    encoder, proc = prompt.encoder
    denoiser = be.transformer if getattr(be, "transformer", None) is not None else be.unet  # Flux | UNet
    with torch.enable_grad(), frozen(denoiser, be.pipe.vae, encoder, prompt.adapter), \
            checkpointed(denoiser, be.attn), checkpointed(be.pipe.vae):
        target = target_embedding(prompt, run.plan.tensor(vp.image), be.device).clone()
        x = run.x.clone()
        fine = prompt.pos[1].detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([fine], lr=r.lr)
        losses, prompt.cached = [], False  # each checkpointed block makes its own projections, forward and again
        try:
            for k in range(r.steps + 1):
                last = k == r.steps  # the loss after the last update: measured, not stepped
                prompt.set_fine(fine)
                with torch.set_grad_enabled(not last):
                    out = run.predict(x, op.from_, op)
                    img = vae_image(be, run.solver.clean(x, out, op.from_), run.plan)
                    emb = _pooled(encoder, clip_pixels(region_crop(run.plan, vp, img), proc))
                    loss = 1 - F.cosine_similarity(emb, target, dim=-1).mean()
                losses.append(float(loss.detach()))
                if not last:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        finally:
            prompt.cached = True
        prompt.set_fine(fine.detach())
    note = {"entity": vp.entity, "step": op.from_, "steps": r.steps, "lr": r.lr, "loss_before": losses[0],
            "loss_after": losses[-1]}
    run.diagnostics.setdefault("visual_refine", []).append(note)
    log.debug("visual.refine %s at step %d: loss %.6f -> %.6f", vp.entity, op.from_, losses[0], losses[-1])
    return note
