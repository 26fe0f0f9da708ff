"""LoRA costs on the tiny models: a job with no LoRA, a global LoRA, an entity LoRA (region-masked), and
diffusers' fused LoRA (load_lora_weights + fuse_lora: the base model's cost) for reference.

    python bench/bench_lora.py [--family flux|sd] [--rank 16] [--steps 8] [--repeat 5] [--size 512]

Prints the median seconds per job and the ratio to no LoRA. Every Linear layer of the denoiser is
adapted. On a CPU with the tiny model these ratios only show that the paths run and what the hooks
add around small matmuls; the GPU figures are the ones that matter (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="flux", choices=("flux", "sd"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--size", type=int, default=512)
    a = ap.parse_args()

    import torch

    from scenec.runtime.sampler import run_job
    from scenec.runtime.testing import (
        box,
        lora_entry,
        lora_file,
        lora_layers,
        make_plan,
        sd_plan,
        tiny_backend,
        tiny_sd_backend,
        with_lora,
    )

    be = tiny_backend() if a.family == "flux" else tiny_sd_backend()
    maker = make_plan if a.family == "flux" else sd_plan
    t = a.size // 16
    ents = [{"id": "fox", "prompt": "a red fox", "token": box((t, t), 0, 0, t // 2, t // 2)},
            {"id": "cat", "prompt": "a cat sitting", "token": box((t, t), t // 2, t // 2, t, t)}]
    names = [n for n, m in be.denoiser.named_modules() if isinstance(m, torch.nn.Linear)]
    tmp = Path(tempfile.mkdtemp())
    path = tmp / "l.safetensors"
    prefix = "transformer" if a.family == "flux" else "unet"
    lora_file(lora_layers(be.denoiser, names, rank=a.rank), path, prefix=prefix)
    entry = lora_entry(path, 0.8)

    def plan(edit=None):
        return maker(steps=a.steps, entities=ents, width=a.size, height=a.size, edit=edit)

    cases = {"none": plan(), "global": plan(lambda d, _: with_lora(d, [entry])),
             "entity": plan(lambda d, _: with_lora(d, [entry], "fox"))}

    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(a.repeat + 1):  # round-robin, so a busy spell of the machine hits every case alike
        for k, p in cases.items():
            t0 = time.perf_counter()
            run_job(be, p, p.jobs[0].id, decode=False)
            if r:  # the first round warms up
                times[k].append(time.perf_counter() - t0)
    res = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.family} tiny, {a.size}², {a.steps} steps, rank {a.rank}, {len(names)} adapted layers, "
          f"{torch.get_num_threads()} threads")
    for k, v in res.items():
        print(f"  {k:<7} {v:.3f} s/job  {v / res['none']:.2f}×")


if __name__ == "__main__":
    main()
