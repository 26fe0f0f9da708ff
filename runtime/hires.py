"""The hires pass (compiler/hires.py; A1111's "Hires. fix"): a job's first image enlarged and repainted at the
larger canvas by the plan's second pass, an img2img job of its own.

Two ways to enlarge, as in A1111 and ComfyUI:

- an image filter (``lanczos``, ``bicubic``, ``bilinear``, ``nearest``: A1111's ``Lanczos``/``Nearest`` upscalers,
  ComfyUI's ``ImageScale`` → ``VAEEncode``): the first pass is decoded, resized with Pillow, and encoded again by the
  VAE as the second job's init image (runtime/methods/inpaint.py);
- in latent space (``latent``, ``latent-bicubic``, ``latent-nearest``, ``latent-nearest-exact``: A1111's ``Latent``,
  ``Latent (bicubic)``, ``Latent (nearest)``, ``Latent (nearest-exact)``; ComfyUI's ``LatentUpscale``): the first
  pass's final latent, not decoded, resized with ``torch.nn.functional.interpolate`` (no antialiasing) and given to
  the second job as its init image's latent.

Either way the init is noised to the second pass's start with noise drawn from the job's seed at the larger size,
and the second pass runs the last ``steps`` steps of its schedule.
"""

from __future__ import annotations

import numpy as np

from scenec.spec.plan import Job, Plan

from .sampler import JobResult, run_job

FILTERS = {"lanczos": "LANCZOS", "bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST"}
LATENT_MODES = {"latent": "bilinear", "latent-bicubic": "bicubic", "latent-nearest": "nearest",
                "latent-nearest-exact": "nearest-exact"}  # torch's interpolate modes


def enlarge(image, size: tuple[int, int], upscaler: str) -> np.ndarray:
    """The first pass's image (PIL) at ``size`` (width, height) with the upscaler's Pillow filter, as uint8 RGB."""
    from PIL import Image

    return np.asarray(image.convert("RGB").resize(size, getattr(Image.Resampling, FILTERS[upscaler])), np.uint8)


def enlarge_latent(backend, x, plan: Plan, stage: Plan, upscaler: str):
    """The first pass's final latent ``x`` (of ``plan``) on ``stage``'s latent grid, in the family's layout
    (A1111: ``F.interpolate(samples, size, mode, antialias=False)``; interpolated in float32)."""
    import torch.nn.functional as F

    z = backend.latent_image(x, plan)
    z = F.interpolate(z.float(), size=stage.grid("latent"), mode=LATENT_MODES[upscaler])
    return backend.latent_layout(z.to(x.dtype))


def second_pass(backend, plan: Plan, job: Job, first: JobResult, progress=None) -> JobResult:
    """Job ``job``'s hires pass from its first pass's result: the enlarged image repainted at the second canvas.
    Its timings are the second pass's, ``first_…`` the first pass's, ``total_s`` both."""
    hr = plan.doc.hires
    if hr.upscaler in LATENT_MODES:
        stage = plan.hires_stage(job.id)  # its init image is a placeholder: the latent is given
        r = run_job(backend, stage, job.id, progress=progress,
                    init_latent=enlarge_latent(backend, first.latents, plan, stage, hr.upscaler))
    else:
        canvas = hr.plan["canvas"]
        stage = plan.hires_stage(job.id, enlarge(first.image, (canvas["width"], canvas["height"]), hr.upscaler))
        r = run_job(backend, stage, job.id, progress=progress)
    r.timings = {**r.timings, **{f"first_{k}": v for k, v in first.timings.items()},
                 "total_s": first.timings.get("total_s", 0.0) + r.timings.get("total_s", 0.0)}
    r.diagnostics = {**first.diagnostics, **r.diagnostics}
    return r


def decodes(plan: Plan) -> bool:
    """Whether a job's first pass is decoded: always, but when a hires pass enlarges its latent."""
    return plan.doc.hires is None or plan.doc.hires.upscaler not in LATENT_MODES


def overlaid(plan: Plan, job: Job, r: JobResult) -> JobResult:
    """``background.overlay`` (A1111's overlay after inpainting): the init image's own pixels pasted back over what
    the model did not paint, ``image·m + init·(1 − m)`` with the job's painted part ``m`` at canvas size (soft at the
    regions' feathered edges), instead of the init image through the VAE."""
    from PIL import Image

    m = np.asarray(plan.tensor(job.overlay), np.float32)[..., None]
    init = np.asarray(plan.tensor(job.init_image), np.float32)
    out = np.asarray(r.image.convert("RGB"), np.float32)
    r.image = Image.fromarray(np.clip(np.round(out * m + init * (1.0 - m)), 0, 255).astype(np.uint8))
    return r


def finish(backend, plan: Plan, job: Job, first, progress=None):
    """A job's output from its first pass's result (or error): the second pass when the plan has one, the init
    image's pixels pasted back with ``background.overlay``. ``progress`` counts on from the first pass's ops."""
    if isinstance(first, Exception):
        return first
    if job.overlay is not None and first.image is not None:
        first = overlaid(plan, job, first)
    if plan.doc.hires is None:
        return first
    n = len(job.program)
    return second_pass(backend, plan, job, first, progress=None if progress is None else (lambda k: progress(n + k)))


def run_image(backend, plan: Plan, job: Job, progress=None) -> JobResult:
    """A job's output image: :func:`run_job`, then :func:`finish` (``progress`` counts the ops of both). What writes
    an image calls this, or runs a coupling group and finishes each result (runtime/outputs.py, ``build --from``)."""
    return finish(backend, plan, job, run_job(backend, plan, job, progress=progress, decode=decodes(plan)), progress)
