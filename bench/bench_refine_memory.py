"""Memory of ``visual.refine`` (arXiv 2501.01424, §3.4) with and without gradient checkpointing (Chen et al.
2016, arXiv 1604.06174) of the denoiser and the VAE, on the tiny models (CPU, fp32, one thread).

Each configuration runs in a fresh process: the backend is loaded and a plain job warms it up; then one job
with ``refine: {steps: 1, at: [1.0]}`` (one forward + backward through denoiser, VAE decode and CLIP, one
more forward) and, for comparison, the plain job again. Reported: the bytes of tensors held for backward
during the refinement's forward (``saved_tensors_hooks``, distinct storages; inside checkpointed blocks
only their inputs are held), and the process's peak resident memory above what it held before the job
(``/proc/self/status`` VmHWM after resetting it through ``/proc/self/clear_refs``; Linux only, includes the
allocator's slack). GPU memory is not measured here.

Usage: python bench/bench_refine_memory.py [--models tiny,tiny-sd] [--canvases 256,512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from bench_refine import SCENE, plan_for  # noqa: F401  (the same scene as the timing bench)


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def one(model: str, canvas: int, ckpt: bool) -> dict:
    import torch

    from scenec.runtime import sampler
    from scenec.runtime.families import load_backend
    from scenec.runtime.methods import visual_refine

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    import bench_refine

    bench_refine.SCENE = SCENE.replace("width: 128, height: 128", f"width: {canvas}, height: {canvas}")
    be = load_backend(model, device="cpu", dtype="fp32")
    plain = plan_for(tmp / "plain", model, "")
    refined = plan_for(tmp / "refine", model, ", refine: {steps: 1, lr: 0.05, at: [1.0]}")
    if not ckpt:
        visual_refine.checkpointed = lambda *a, **k: nullcontext()
    sampler.run_job(be, plain, plain.jobs[0], decode=False)
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        return t

    orig = visual_refine.refine

    def counted(*a, **k):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return orig(*a, **k)

    visual_refine.refine = counted
    out = {"model": model, "canvas": canvas, "checkpointing": ckpt}
    for name, plan in (("refine_job", refined), ("plain_job", plain)):
        Path("/proc/self/clear_refs").write_text("5")
        base = rss_kb("VmRSS")
        t0 = time.perf_counter()
        r = sampler.run_job(be, plan, plan.jobs[0], decode=False)
        out[name + "_s"] = round(time.perf_counter() - t0, 3)
        out[name + "_peak_mb"] = round((rss_kb("VmHWM") - base) / 1024, 1)
        if name == "refine_job":
            out["loss"] = [r.diagnostics["visual_refine"][0][k] for k in ("loss_before", "loss_after")]
    out["saved_for_backward_mb"] = round(sum(saved.values()) / 2 ** 20, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,tiny-sd")
    ap.add_argument("--canvases", default="256,512")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        model, canvas, ckpt = a.one.split(":")
        print(json.dumps(one(model, int(canvas), ckpt == "1")))
        return
    for model in a.models.split(","):
        for canvas in map(int, a.canvases.split(",")):
            for ckpt in (False, True):
                p = subprocess.run([sys.executable, __file__, "--one", f"{model}:{canvas}:{int(ckpt)}"],
                                   capture_output=True, text=True, cwd=Path(__file__).parent, check=True)
                print(p.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
