"""Cost of COW reference conditions (cyclic one-way diffusion, arXiv 2306.08247) against the plain scene.

One job, batch 1, random weights (same arithmetic as real ones), COW's setting: window 0.7 → 0.5 of
the schedule, 10 cycles, η = 1 inside the cycles, SOW modulation on. Cases:

  flux   Flux-sized DiT (FLUX.1's default transformer config) at 1024², 28 steps
  sd     SD-2.1-sized UNet at 512², DDIM, 50 steps (CFG: two UNet passes per step)

Each case reports: plain job, COW job with the inversion cached (the steady state of a rebuild),
the inversion alone (first build), and the ratio COW/plain. The text encoders and VAE are the tiny
ones (they are not what COW costs); ``--tiny`` runs both cases with the tiny models at 256² on CPU.

Usage: python bench/bench_cow.py [--tiny] [--cases flux,sd] [--steps N] [--cycles K] [--reps R] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _plan(family: str, size: int, steps: int, cycles: int, guidance: float):
    """A hand-built plan (docs/plan-format.md) with one reference condition, or without (plain)."""
    from scenec.compiler.schedule import Cow, ProgramInputs, build_program, level_to_index
    from scenec.runtime.testing import make_plan

    plan = make_plan(prompt="a portrait in a studio", width=size, height=size, steps=steps, guidance=guidance)
    lat, tok = size // 8, size // 16
    if family == "sd":
        plan.json["model"] = {"spec": "bench-sd", "family": "sd", "repo": None, "max_sequence_length": 77}
        plan.json["grids"] = {"latent": [lat, lat], "a16": [tok, tok], "a32": [size // 32] * 2, "a64": [size // 64] * 2}
        plan.json["sampler"] = {"kind": "ddim", "steps": steps, "guidance": guidance, "true_cfg": 1.0}
    cm = np.zeros((tok, tok), np.float32)
    cm[tok // 4: 3 * tok // 4, tok // 4: 3 * tok // 4] = 1
    rel = np.zeros((tok, tok), np.float32)
    rel[3 * tok // 4:, :] = 1
    px = np.repeat(np.repeat(cm, 16, 0), 16, 1)
    rgb = np.where(px[..., None] > 0, np.random.default_rng(0).integers(0, 255, (size, size, 3)), 128)
    plan.tensors.update({"cond/rgba": np.dstack([rgb, px * 255]).astype(np.uint8),
                         "cond/latent": np.repeat(np.repeat(cm, 2, 0), 2, 1), "cond/token": cm,
                         "rel/token": rel, "rel/latent": np.repeat(np.repeat(rel, 2, 0), 2, 1)})
    start, end = level_to_index(0.7, steps), level_to_index(0.5, steps)
    cond = {"entity": "face", "image": "cond/rgba", "sha256": "bench", "fit": "contain", "window": [start, end],
            "cycles": cycles, "preserve": None, "eta": 1.0,
            "masks": {"latent": "cond/latent", "token": "cond/token"},
            "related": {"latent": "rel/latent", "token": "rel/token"},
            "modulation": {"suppress": 2.0, "enhance": 2.0, "decay": 0.8, "distance": 1.0, "threshold": 0.5}}
    ref = json.loads(json.dumps(plan.json))
    from scenec.runtime.plan import Plan

    ref_plan = Plan(ref, dict(plan.tensors))
    ref_plan.jobs[0]["conditions"] = [cond]
    ref_plan.jobs[0]["program"] = [op.model_dump(by_alias=True, mode="json") for op in
                                   build_program(ProgramInputs(steps, conditions=[Cow(0, start, end, cycles, None, 1.0)]))]
    return plan, ref_plan


def _flux_backend(tiny: bool, dev, dtype):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from scenec.runtime.flux import FluxBackend
    from scenec.runtime.tiny import build_tiny_flux

    parts = build_tiny_flux(dtype=dtype, device=dev).components()
    if not tiny:  # FLUX.1's transformer config; text projections from the tiny encoders' width
        torch.manual_seed(0)
        with torch.device(dev):
            parts["transformer"] = FluxTransformer2DModel(guidance_embeds=True, joint_attention_dim=32,
                                                          pooled_projection_dim=32).to(dtype).eval().requires_grad_(False)
    pipe = FluxPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return FluxBackend(pipe, "bench-flux" + ("-tiny" if tiny else ""), torch.device(dev), dtype)


def _sd_backend(tiny: bool, dev, dtype):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from scenec.runtime.sd import SDBackend
    from scenec.runtime.tiny_sd import build_tiny_sd

    parts = build_tiny_sd(dtype=dtype, device=dev)
    if not tiny:  # stable-diffusion-2-1-base's UNet config (cross-attention width from the tiny encoder)
        torch.manual_seed(0)
        with torch.device(dev):
            parts["unet"] = UNet2DConditionModel(
                sample_size=64, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True, cross_attention_dim=32, layers_per_block=2,
            ).to(dtype).eval().requires_grad_(False)
    pipe = StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return SDBackend(pipe, "bench-sd" + ("-tiny" if tiny else ""), torch.device(dev), dtype)


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

    from scenec.runtime import cow

    cow.CACHE.disk = False  # the bench measures inversion explicitly; leave the user's cache alone
    results = []
    for case in [c for c in args.cases.split(",") if c]:
        if case == "flux":
            be = _flux_backend(args.tiny, dev, dtype)
            size, steps, guidance = (256, args.steps or 10, 3.5) if args.tiny else (1024, args.steps or 28, 3.5)
        elif case == "sd":
            be = _sd_backend(args.tiny, dev, dtype)
            size, steps, guidance = (256, args.steps or 10, 7.5) if args.tiny else (512, args.steps or 50, 7.5)
        else:
            raise SystemExit(f"unknown case {case!r} (flux, sd)")
        plain, ref = _plan(case, size, steps, args.cycles, guidance)
        run = lambda p: be.run_job(p, p.jobs[0], decode=False)  # noqa: E731
        run(plain)  # warm-up
        cow.CACHE.clear()
        t0 = time.perf_counter()
        run(ref)  # first build: includes the inversion
        sync()
        first = time.perf_counter() - t0
        t_plain = _time(lambda: run(plain), reps, sync)
        t_cow = _time(lambda: run(ref), reps, sync)  # inversion cached
        ops = ref.jobs[0]["program"]
        r = {"case": case, "device": dev, "dtype": str(dtype).replace("torch.", ""), "size": size, "steps": steps,
             "cycles": args.cycles, "window": ref.jobs[0]["conditions"][0]["window"],
             "denoise_ops": {"plain": steps, "cow": sum(o["op"] == "denoise" for o in ops)},
             "plain_s": round(t_plain, 4), "cow_cached_s": round(t_cow, 4),
             "inversion_s": round(max(0.0, first - t_cow), 4), "ratio": round(t_cow / t_plain, 3)}
        results.append(r)
        if not args.json:
            print(f"{case:5s} {size}² {steps} steps, {args.cycles} cycles in window {r['window']}: plain "
                  f"{t_plain:.3f} s, COW {t_cow:.3f} s ({r['ratio']:.2f}x; {r['denoise_ops']['cow']} vs {steps} "
                  f"denoise ops), inversion {r['inversion_s']:.3f} s once [{dev}, {r['dtype']}]")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
