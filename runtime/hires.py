"""The hires pass (compiler/hires.py; A1111's "Hires. fix"): a job's first image enlarged with a Pillow filter and
repainted at the larger canvas by the plan's second pass, an img2img job of its own.

As A1111 with an image upscaler (``Lanczos``, ``Nearest``) and ComfyUI's ``ImageScale`` → ``VAEEncode`` →
``KSampler(denoise)``: the first pass is decoded, resized, encoded again by the VAE (the second job's init image,
runtime/methods/inpaint.py) and noised to the second pass's start with noise drawn from the job's seed at the
larger size; the second pass runs the last ``steps`` steps of its schedule.
"""

from __future__ import annotations

import numpy as np

from scenec.spec.plan import Job, Plan

from .sampler import JobResult, run_job

FILTERS = {"lanczos": "LANCZOS", "bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST"}


def enlarge(image, size: tuple[int, int], upscaler: str) -> np.ndarray:
    """The first pass's image (PIL) at ``size`` (width, height) with the upscaler's Pillow filter, as uint8 RGB."""
    from PIL import Image

    return np.asarray(image.convert("RGB").resize(size, getattr(Image.Resampling, FILTERS[upscaler])), np.uint8)


def second_pass(backend, plan: Plan, job: Job, first: JobResult, progress=None) -> JobResult:
    """Job ``job``'s hires pass from its first pass's result: the enlarged image repainted at the second canvas.
    Its timings are the second pass's, ``first_…`` the first pass's, ``total_s`` both."""
    hr = plan.doc.hires
    canvas = hr.plan["canvas"]
    init = enlarge(first.image, (canvas["width"], canvas["height"]), hr.upscaler)
    stage = plan.hires_stage(job.id, init)
    r = run_job(backend, stage, job.id, progress=progress)
    r.timings = {**r.timings, **{f"first_{k}": v for k, v in first.timings.items()},
                 "total_s": first.timings.get("total_s", 0.0) + r.timings.get("total_s", 0.0)}
    r.diagnostics = {**first.diagnostics, **r.diagnostics}
    return r


def run_image(backend, plan: Plan, job: Job, progress=None) -> JobResult:
    """A job's output image: :func:`run_job`, then the second pass when the plan has one (``progress`` counts the
    ops of both). What writes an image calls this (runtime/outputs.py, ``scenec build --from``)."""
    first = run_job(backend, plan, job, progress=progress)
    if plan.doc.hires is None:
        return first
    n = len(job.program)
    return second_pass(backend, plan, job, first, progress=None if progress is None else (lambda k: progress(n + k)))

