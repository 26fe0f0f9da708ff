"""Cost of COW reference conditions (cyclic one-way diffusion, arXiv 2306.08247) against the plain scene.

One job, batch 1, random weights (same arithmetic as real ones), COW's setting: window 0.7 → 0.5 (noise
levels on the model's schedule), seed initialisation, 10 cycles, η = 1 inside the cycles and 0.1 after,
SOW modulation on. Cases:

  flux   Flux-sized DiT (FLUX.1's default transformer config) at 1024², 28 steps
  sd     SD-2.1-sized UNet at 512², DDIM, 50 steps (CFG: two UNet passes per step)

Each case reports: plain job, COW job with the inversion cached (the steady state of a rebuild;
``runtime/inversion.CACHE``, kept in memory only here), the inversion alone (first build), and the
ratio COW/plain. Jobs run through the one sampler (``runtime/sampler.run_job``). The text encoders and VAE are the tiny
ones (they are not what COW costs); ``--tiny`` runs both cases with the tiny models at 256² on CPU.

Usage: python bench/bench_cow.py [--tiny] [--cases flux,sd] [--steps N] [--cycles K] [--reps R] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import use_checkout

ROOT = Path(__file__).resolve().parent.parent




def on_grid(px: np.ndarray, grid) -> np.ndarray:
    """A pixel mask max-pooled onto a plan grid (each cell: whether any of its pixels is inside)."""
    h, w = grid
    H, W = px.shape
    return px.reshape(h, H // h, w, W // w).max(axis=(1, 3)).astype(np.float32)


def _plans(family: str, size: int, steps: int, cycles: int, guidance: float):
    """Hand-built plans (docs/plan-format.md): the plain scene, and the same with one reference condition.

    SD plans come from ``sd_plan`` (masks on every UNet grid: ``latent``, ``a16``, ``a32``, ``a64``); the
    condition's masks cover every grid of the plan, as the compiler lowers an entity region."""
    from scenec.compiler.caps import ALIASES
    from scenec.compiler.levels import level_index, noise_levels
    from scenec.compiler.schedule import Cow, ProgramInputs, build_program
    from scenec.runtime.testing import make_plan, sd_plan

    tok = size // 16
    cm = np.zeros((tok, tok), np.float32)
    cm[tok // 4: 3 * tok // 4, tok // 4: 3 * tok // 4] = 1
    rel = np.zeros((tok, tok), np.float32)
    rel[3 * tok // 4:, :] = 1
    px, rel_px = (np.repeat(np.repeat(m, 16, 0), 16, 1) for m in (cm, rel))
    rgb = np.where(px[..., None] > 0, np.random.default_rng(0).integers(0, 255, (size, size, 3)), 128)
    levels = noise_levels(ALIASES["tiny" if family == "flux" else "tiny-sd"], (size, size), steps)
    start, end = level_index(0.7, levels), level_index(0.5, levels)
    program = [op.model_dump(by_alias=True, mode="json") for op in
               build_program(ProgramInputs(steps, conditions=[Cow(0, start, end, cycles, None, 1.0, 0.1)]))]

    def with_reference(doc: dict, tensors: dict) -> None:
        masks, related = {}, {}
        for g, hw in doc["grids"].items():
            tensors[f"cond/{g}"], tensors[f"rel/{g}"] = on_grid(px, hw), on_grid(rel_px, hw)
            masks[g], related[g] = f"cond/{g}", f"rel/{g}"
        tensors["cond/rgba"] = np.dstack([rgb, px * 255]).astype(np.uint8)
        job = doc["jobs"][0]
        job["conditions"] = [{
            "entity": "face", "image": "cond/rgba", "sha256": "bench", "fit": "contain", "window": [start, end],
            "cycles": cycles, "preserve": None, "eta": 1.0, "masks": masks, "related": related,
            "modulation": {"suppress": 1.0, "enhance": 1.0, "decay": 0.8, "distance": 1.0, "threshold": 0.5}}]
        job["program"] = program

    make = sd_plan if family == "sd" else make_plan
    kw = dict(prompt="a portrait in a studio", width=size, height=size, steps=steps, guidance=guidance)
    return make(**kw), make(edit=with_reference, **kw)


def _backend(family: str, tiny: bool, dev, dtype):
    """``tiny`` / ``tiny-sd``; else the tiny text encoders and VAE with a real-sized denoiser (FLUX.1's
    transformer config, stable-diffusion-2-1-base's UNet config) in the family's backend."""
    from scenec.runtime.families import load_backend

    if tiny:
        return load_backend("tiny" if family == "flux" else "tiny-sd", device=dev, dtype=dtype)
    if family == "flux":
        from diffusers import FluxPipeline, FluxTransformer2DModel

        from scenec.runtime.families.flux import FluxBackend
        from scenec.runtime.tiny import build_tiny_flux

        parts = build_tiny_flux(dtype=dtype, device=dev).components()
        torch.manual_seed(0)  # text projections from the tiny encoders' width
        with torch.device(dev):
            parts["transformer"] = FluxTransformer2DModel(guidance_embeds=True, joint_attention_dim=32,
                                                          pooled_projection_dim=32).to(dtype).eval().requires_grad_(False)
        pipe = FluxPipeline(**parts)
        pipe.set_progress_bar_config(disable=True)
        return FluxBackend(pipe, "bench-flux", torch.device(dev), dtype)
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from scenec.runtime.families.sd import SDBackend
    from scenec.runtime.tiny_sd import build_tiny_sd

    parts = build_tiny_sd(dtype=dtype, device=dev)
    torch.manual_seed(0)  # cross-attention width from the tiny encoder
    with torch.device(dev):
        parts["unet"] = UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True, cross_attention_dim=32, layers_per_block=2,
        ).to(dtype).eval().requires_grad_(False)
    pipe = StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return SDBackend(pipe, "bench-sd", torch.device(dev), dtype)


def _time(fn, reps: int, sync) -> float:
    out = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny models at 256² on CPU (smoke run)")
    ap.add_argument("--cases", default="flux,sd")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: flux 28, sd 50; tiny 10)")
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    reps = 1 if args.tiny else args.reps

    use_checkout()
    from scenec.runtime.inversion import CACHE
    from scenec.runtime.sampler import run_job
    from scenec.spec.plan import Denoise

    CACHE.disk = False  # the bench measures inversion explicitly; leave the user's cache alone
    results = []
    for case in [c for c in args.cases.split(",") if c]:
        if case == "flux":
            size, steps, guidance = (256, args.steps or 10, 3.5) if args.tiny else (1024, args.steps or 28, 3.5)
        elif case == "sd":
            size, steps, guidance = (256, args.steps or 10, 7.5) if args.tiny else (512, args.steps or 50, 7.5)
        else:
            raise SystemExit(f"unknown case {case!r} (flux, sd)")
        be = _backend(case, args.tiny, dev, dtype)
        plain, ref = _plans(case, size, steps, args.cycles, guidance)
        run = lambda p: run_job(be, p, p.jobs[0], decode=False)  # noqa: E731
        run(plain)  # warm-up
        CACHE.clear()
        t0 = time.perf_counter()
        run(ref)  # first build: includes the inversion
        sync()
        first = time.perf_counter() - t0
        t_plain = _time(lambda: run(plain), reps, sync)
        t_cow = _time(lambda: run(ref), reps, sync)  # inversion cached
        job = ref.jobs[0]
        r = {"case": case, "device": dev, "dtype": str(dtype).replace("torch.", ""), "size": size, "steps": steps,
             "cycles": args.cycles, "window": list(job.conditions[0].window),
             "denoise_ops": {"plain": steps, "cow": sum(isinstance(o, Denoise) for o in job.program)},
             "plain_s": round(t_plain, 4), "cow_cached_s": round(t_cow, 4),
             "inversion_s": round(max(0.0, first - t_cow), 4), "ratio": round(t_cow / t_plain, 3),
             # the goal's figure: the first build (inversion + cycles) over plain; it includes the one-time
             # compile of SOW's flex kernel on CUDA, so it is an upper bound
             "first_build_ratio": round(first / t_plain, 3)}
        results.append(r)
        if os.environ.get("OUT"):  # after every case: a run cut short keeps what it measured
            Path(os.environ["OUT"], "bench_cow.json").write_text(json.dumps(results, indent=1))
        if not args.json:
            print(f"{case:5s} {size}² {steps} steps, {args.cycles} cycles in window {r['window']}: plain "
                  f"{t_plain:.3f} s, COW {t_cow:.3f} s ({r['ratio']:.2f}x; {r['denoise_ops']['cow']} vs {steps} "
                  f"denoise ops), inversion {r['inversion_s']:.3f} s once [{dev}, {r['dtype']}]")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
