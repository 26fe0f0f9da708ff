"""CUDA correctness: FlexAttention against SDPA for every attention mode, through the real runtime.

Each case runs the same plan on two tiny Flux backends on one device, ``attn_impl="flex"`` (BlockMask,
compiled FlexAttention on CUDA, text padded to a bucket) and ``attn_impl="sdpa"`` (dense boolean mask,
no padding), and compares the final latents (relative L2 error). Cases: regional open and restricted
image self-attention, masks in double / single blocks only, ``until`` < 1 (unmasked steps after), prompt
padding, two batch rows of different text lengths, a coupling group (θ schedule), a reference with COW
cycles and SOW modulation, visual prompts with a refinement step, a visual prompt in a coupling group,
and one beside SOW's modulation. Runs in fp32 (the tolerance then tests the mask logic, not bf16 rounding) and in bf16 (reported
against bf16's own tolerance).

Usage: python bench/gpu_check.py [--device cuda|cpu] [--dtypes fp32,bf16] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from common import use_checkout

ROOT = Path(__file__).resolve().parent.parent
TOL = {"fp32": 2e-3, "bf16": 5e-2}  # relative L2 error of the final latent


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def cases():
    """(name, callable(backend) → list of final latents)."""
    from scenec.compiler import compile_scene
    from scenec.runtime.sampler import run_batch, run_group, run_job
    from scenec.runtime.testing import box, make_plan

    grid = (16, 16)
    ents = [{"id": "fox", "prompt": "a red fox running", "token": box(grid, 2, 2, 8, 8)},
            {"id": "bird", "prompt": "a small blue bird flying over the trees", "token": box(grid, 6, 6, 12, 12)}]

    def program(steps: int, until: int | None = None):
        return [{"op": "denoise", "from": i, "to": i + 1, "regional": until is None or i < until, "theta": None,
                 "eta": 0.0} for i in range(steps)]

    def plan_case(**kw):
        def run(be):
            p = make_plan(entities=ents, **kw)
            return [run_job(be, p, p.jobs[0], decode=False).latents]
        return run

    def scene_case(path: Path):
        def run(be):
            plan = compile_scene(path)
            out = []
            groups = {g.id for g in plan.groups}
            for g in plan.groups:
                members = [j for j in plan.jobs if j.group == g.id]
                out += [r.latents for _, r in run_group(be, plan, g, members, decode=False)]
            out += [run_job(be, plan, j, decode=False).latents for j in plan.jobs if j.group not in groups]
            return out
        return run

    def batch_rows(be):
        a = make_plan(entities=ents, program=program(3))
        b = make_plan(prompt="an old lighthouse on a cliff above a stormy sea at dusk", entities=ents[:1],
                      program=program(3), seed=5)
        return [r.latents for r in run_batch(be, [(a, a.jobs[0]), (b, b.jobs[0])])]

    scenes = ROOT / "tests" / "scenes"
    return [
        ("regional_open", plan_case(program=program(3))),
        ("regional_restricted", plan_case(program=program(3), image_self="restricted")),
        ("blocks_double", plan_case(program=program(3), blocks="double")),
        ("blocks_single", plan_case(program=program(3), blocks="single")),
        ("until_0.5", plan_case(program=program(4, until=2))),
        ("pad_prompts", plan_case(program=program(3), pad_prompts=48)),
        ("batch_rows", batch_rows),
        ("coupling_group", scene_case(scenes / "coupled.yaml")),
        ("cow_sow", scene_case(scenes / "reference.yaml")),
        # visual prompts: flex merges the extra tokens by log-sum-exp, SDPA uses a dense bias; the scene's
        # refine step takes gradients through the (compiled, on CUDA) kernel
        ("visual_refine", scene_case(ROOT / "scenes" / "visual-fox.yaml")),
        ("visual_coupled", scene_case(scenes / "visual-coupled.yaml")),
        ("visual_sow", scene_case(scenes / "visual-sow.yaml")),  # extra tokens in SOW's modulated softmax
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--cases", default="")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    use_checkout()
    from scenec.runtime.families import load_backend

    torch._dynamo.config.recompile_limit = 64  # one kernel meets every case's shapes: never fall back to eager
    results, ok = {"device": args.device, "torch": torch.__version__, "cases": {}}, True
    keep = set(filter(None, args.cases.split(",")))

    def save():
        if args.out:  # after every case: a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(results, indent=1))

    for dt in args.dtypes.split(","):
        bes = {impl: load_backend("tiny", device=args.device, dtype=dt, attn_impl=impl) for impl in ("sdpa", "flex")}
        for name, run in cases():
            if keep and name not in keep:
                continue
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    outs = {impl: run(be) for impl, be in bes.items()}
            except Exception as e:  # noqa: BLE001 - one case's crash must not lose the others
                ok = False
                results["cases"][f"{name}@{dt}"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                print(f"{name:22s} {dt:5s} ERROR {type(e).__name__}: {e}", flush=True)
                save()
                continue
            errs = [_rel(f, s) for f, s in zip(outs["flex"], outs["sdpa"])]
            worst = max(errs) if errs else float("inf")
            good = len(outs["flex"]) == len(outs["sdpa"]) > 0 and worst <= TOL[dt]
            ok &= good
            results["cases"][f"{name}@{dt}"] = {"rel_err": worst, "images": len(errs), "tol": TOL[dt],
                                                "ok": good, "s": round(time.perf_counter() - t0, 2)}
            print(f"{name:22s} {dt:5s} flex vs sdpa rel err {worst:.2e} over {len(errs)} image(s) "
                  f"{'ok' if good else 'FAIL'} ({time.perf_counter() - t0:.1f}s)", flush=True)
            save()
    results["ok"] = ok
    save()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
