"""Cost of ``visual.refine`` (arXiv 2501.01424, §3.4) and of the sampler's ``no_grad`` entry points on the
tiny models (CPU, one thread): the sampler ran under ``torch.inference_mode()``; refinement needs
gradients mid-run, so ``run_job``/``run_batch`` run under ``torch.no_grad()`` (runtime/sampler.py).

Per model: one 128² job, 3 steps, one entity with a visual prompt, timed (median of ``--reps``, the
two modes interleaved) under inference_mode and under no_grad, and the same job with
``refine: {steps: 3, at: [1.0]}`` (one refined op: 3 forward+backward passes and one more forward).

Usage: python bench/bench_refine.py [--reps N] [--models tiny,tiny-sd,tiny-sdxl]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SCENE = """scenec: 1
model: {model}
canvas: {{width: 128, height: 128}}
sampler: {{steps: 3, seed: 5}}
background: {{prompt: "a meadow"}}
entities:
  - id: fox
    prompt: "a red fox"
    shape: {{box: [0.0, 0.5, 0.5, 1.0]}}
    visual: {{image: fox.png{refine}}}
"""


def plan_for(d: Path, model: str, refine: str):
    from scenec.compiler import compile_scene

    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / "fox.png")
    (d / "s.yaml").write_text(SCENE.format(model=model, refine=refine), encoding="utf-8")
    return compile_scene(d / "s.yaml")


def main() -> None:
    from scenec.runtime import sampler
    from scenec.runtime.families import load_backend

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--models", default="tiny,tiny-sd,tiny-sdxl")
    a = ap.parse_args()
    torch.set_num_threads(1)
    inner = sampler.run_job.__wrapped__  # run_job without its no_grad decorator
    tmp = Path(tempfile.mkdtemp())
    for model in a.models.split(","):
        be = load_backend(model, device="cpu", dtype="fp32")
        plain = plan_for(tmp / model / "plain", model, "")
        refined = plan_for(tmp / model / "refine", model, ", refine: {steps: 3, lr: 0.05, at: [1.0]}")

        def once(ctx, plan):
            with ctx():
                t0 = time.perf_counter()
                r = inner(be, plan, plan.jobs[0])
                return time.perf_counter() - t0, r

        once(torch.no_grad, plain)
        once(torch.no_grad, refined)
        times = {"inference_mode": [], "no_grad": [], "refine": []}
        for _ in range(a.reps):
            times["inference_mode"].append(once(torch.inference_mode, plain)[0])
            times["no_grad"].append(once(torch.no_grad, plain)[0])
        for _ in range(max(3, a.reps // 3)):
            t, r = once(torch.no_grad, refined)
            times["refine"].append(t)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        note = r.diagnostics["visual_refine"][0]
        print(f"{model:10s} plain job: inference_mode {med['inference_mode']:6.1f} ms, "
              f"no_grad {med['no_grad']:6.1f} ms "
              f"({med['no_grad'] / med['inference_mode']:.2f}x); with refine {med['refine']:6.1f} ms; "
              f"loss {note['loss_before']:.4f} -> {note['loss_after']:.4f}")


if __name__ == "__main__":
    main()
