"""The GPU suite: every CUDA check and benchmark of scenec in one run, within a fixed time budget.

Steps, in priority order (each in its own process with its own time limit; the run stops starting new
steps when the budget is spent, and always writes its results):

  check      FlexAttention vs SDPA through the runtime, every attention mode (bench/gpu_check.py)
  attention  regional attention with 4 entities vs plain, eager and per-block compiled, beside the
             anchor's processors; scenec's plain path vs diffusers' (bench/bench_attention.py)
  build      `scenec build` end to end on CUDA from a local random-weight diffusers directory with
             FLUX.1's transformer width: a regional, a coupled and a reference scene; then the regional
             one with --offload model, with --compile and with --quantize fp8 (each runs even if another failed)
  cow        COW (inversion + 10 cycles) vs plain, Flux-sized at 1024² (bench/bench_cow.py)
  coupled    a coupling group of 4 vs four plain images, beside the anchor (bench/bench_coupled.py)
  anchor     the anchor attention script itself, eager (when bench/anchor/ holds it)

Writes under OUT (default bench/results/<date>-<device>/): suite.json (every step's figures), summary.md
(the goal table) and suite.log (all output): three files, as a device call brings back at most eight.
Every benchmark rewrites its JSON after each case and the suite rewrites both files after each step,
so a run cut short keeps what it measured. On a device call give ``--budget`` about 60 s less than the
call's own time limit.
``--cpu-smoke`` runs every step at toy sizes on the CPU (CI runs it: tests/test_gpu_suite.py).

Usage: python bench/gpu_suite.py [--cpu-smoke] [--budget SECONDS] [--steps check,attention,...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable
SCENES = ["tests/scenes/regional.yaml", "tests/scenes/coupled.yaml", "tests/scenes/reference.yaml"]


def steps(smoke: bool, tmp: Path) -> list[tuple[str, list[list[str]], int]]:
    """(name, commands, time limit in seconds). Commands run from the checkout's root with OUT=tmp/NAME."""
    anchor_a, anchor_c = BENCH / "anchor" / "anchor_attention.py", BENCH / "anchor" / "anchor_coupled.py"
    aa = ["--anchor", str(anchor_a)] if anchor_a.is_file() else []
    ac = ["--anchor", str(anchor_c)] if anchor_c.is_file() else []
    model = tmp / "random-flux"
    cli = [PY, str(BENCH / "scenec_cli.py")]
    if smoke:
        return [
            ("check", [[PY, "bench/gpu_check.py", "--device", "cpu", "--dtypes", "fp32",
                        "--out", str(tmp / "check" / "check.json")]], 300),
            ("attention", [[PY, "bench/bench_attention.py", "--tiny", "--reps", "2", *aa]], 120),
            ("coupled", [[PY, "bench/bench_coupled.py", "--tiny", "--steps", "6", "--reps", "2", *ac]], 120),
            ("cow", [[PY, "bench/bench_cow.py", "--tiny", "--cases", "flux", "--steps", "4", "--cycles", "1",
                      "--reps", "1", "--json"]], 300),
            ("build", [[PY, "bench/make_random_model.py", str(model), "--small", "--device", "cpu"],
                       [*cli, "build", *SCENES[:1], "--model", str(model), "-o", str(tmp / "images"), "--device",
                        "cpu", "--json"]], 300),
            ("anchor", [[PY, str(anchor_a), "--tiny"]] if anchor_a.is_file() else [], 120),
        ]
    return [
        ("check", [[PY, "bench/gpu_check.py", "--device", "cuda", "--dtypes", "bf16",
                    "--out", str(tmp / "check" / "check.json")]], 100),
        ("attention", [[PY, "bench/bench_attention.py", "--reps", "5", "--compiled-cases", "base512,ours1024",
                        *aa]], 170),
        ("build", [[PY, "bench/make_random_model.py", str(model), "--device", "cuda"],
                   [*cli, "build", *SCENES, "--model", str(model), "-o", str(tmp / "images"), "--device", "cuda",
                    "--json"],
                   [*cli, "build", *SCENES[:1], "--model", str(model), "-o", str(tmp / "images-offload"),
                    "--device", "cuda", "--offload", "model", "--force", "--json"],
                   [*cli, "build", *SCENES[:1], "--model", str(model), "-o", str(tmp / "images-compiled"),
                    "--device", "cuda", "--compile", "--force", "--json"],
                   # torchao's fp8 weight-only (its wheel is carried; bitsandbytes' is too large to carry)
                   [*cli, "build", *SCENES[:1], "--model", str(model), "-o", str(tmp / "images-fp8"),
                    "--device", "cuda", "--quantize", "fp8", "--force", "--json"]], 130),
        ("cow", [[PY, "bench/bench_cow.py", "--cases", "flux", "--reps", "1", "--json"]], 120),
        ("coupled", [[PY, "bench/bench_coupled.py", "--reps", "5", *ac]], 70),
        ("anchor", [[PY, str(anchor_a), "--cases", "base512,flex1024,dense1024", "--reps", "5"]]
         if anchor_a.is_file() else [], 60),
    ]


def _json_tail(text: str):
    """The last JSON document a benchmark printed (an object or a list), or None."""
    for i in range(len(text) - 1, -1, -1):
        if text[i] in "{[" and (i == 0 or text[i - 1] == "\n"):
            try:
                return json.loads(text[i:])
            except ValueError:
                continue
    return None


def run_step(name: str, cmds: list[list[str]], limit: float, tmp: Path, log) -> dict:
    out_dir = tmp / name
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OUT": str(out_dir), "PYTHONUNBUFFERED": "1", "SCENEC_CACHE": str(tmp / "cache")}
    res: dict = {"commands": [" ".join(c) for c in cmds], "ok": True, "s": 0.0, "outputs": []}
    t0 = time.perf_counter()
    for cmd in cmds:
        left = limit - (time.perf_counter() - t0)
        if left <= 5:
            res.update(ok=False, error="time limit")
            break
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
            text = p.stdout + p.stderr
            rc = p.returncode
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            text += (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            rc = "timeout"
        log.write(text)
        log.flush()
        res["outputs"].append({"rc": rc, "json": _json_tail(p.stdout) if rc != "timeout" else None})
        if rc != 0:
            res.update(ok=False, error=f"exit {rc}" if "error" not in res else res["error"] + f"; exit {rc}")
            if rc == "timeout" or cmd is cmds[0]:  # later commands need the first (the model directory)
                break
    for f in sorted(out_dir.glob("*.json")):
        try:
            res.setdefault("files", {})[f.name] = json.loads(f.read_text())
        except ValueError:
            pass
    res["s"] = round(time.perf_counter() - t0, 1)
    return res


def _get(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def summary(results: dict) -> str:
    """The goal table (docs/benchmarks.md's GPU section) from the steps' figures."""
    rows = ["| step | ok | seconds |", "|---|---|---|"]
    rows += [f"| {n} | {'yes' if r.get('ok') else 'NO: ' + str(r.get('error'))} | {r.get('s')} |"
             for n, r in results["steps"].items()]
    lines = [f"# GPU suite, {results['when']}", "", f"{results['device']}; torch {results['torch']}", "", *rows, ""]
    att = _get(results, "steps", "attention", "outputs")
    att = att[-1]["json"]["results"] if att and att[-1].get("json") else {}
    if att:
        lines += ["## Attention (ms per forward, ratio to diffusers' plain 512-token forward)", "",
                  "| case | eager ms | × plain | compiled ms | × plain | peak GiB |", "|---|---|---|---|---|---|"]
        for case in sorted({k.split("@")[0] for k in att if "@" in k and not k.startswith("relerr")}):
            e, c = att.get(f"{case}@eager", {}), att.get(f"{case}@compiled", {})
            lines.append(f"| {case} | {e.get('ms', float('nan')):.1f} | {e.get('x_base', float('nan')):.3f} | "
                         f"{c.get('ms', float('nan')):.1f} | {c.get('x_base', float('nan')):.3f} | "
                         f"{e.get('peak_gib', float('nan')):.2f} |")
        lines.append("")
    chk = _get(results, "steps", "check", "files", "check.json", "cases") or {}
    if chk:
        lines += ["## Flex vs SDPA (relative L2 error of the final latents)", "", "| case | rel err | ok |",
                  "|---|---|---|"]
        lines += [f"| {k} | {v['rel_err']:.2e} | {v['ok']} |" for k, v in chk.items()]
        lines.append("")
    for name in ("coupled", "cow", "build", "anchor"):
        outs = _get(results, "steps", name, "outputs") or []
        js = [o["json"] for o in outs if o.get("json") is not None]
        files = _get(results, "steps", name, "files")
        if name == "build" and outs:  # one build per command (plain, offload, compiled, fp8): each its own
            cmds = _get(results, "steps", name, "commands") or []
            lines += ["## build", ""]
            for cmd, o in zip(cmds[1:], outs[1:]):
                lines += [f"`{cmd[-90:]}`: rc {o.get('rc')}", "", "```",
                          json.dumps(o.get("json"), indent=1)[:1500], "```", ""]
        elif js or files:
            lines += [f"## {name}", "", "```", json.dumps(files or js[-1], indent=1)[:4000], "```", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-smoke", action="store_true", help="every step at toy sizes on the CPU")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole suite (default: 520 on a GPU)")
    ap.add_argument("--steps", default="", help="a comma-separated subset of the steps")
    ap.add_argument("--out", default=None, help="where the three files go (default: $OUT, else bench/results/)")
    args = ap.parse_args()
    import torch

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device (use --cpu-smoke for the toy-size run)", file=sys.stderr)
        return 2
    budget = args.budget or (1800.0 if smoke else 520.0)
    dev = "cpu" if smoke else torch.cuda.get_device_name()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = Path(args.out or os.environ.get("OUT") or
               BENCH / "results" / f"{when[:10]}-{'cpu-smoke' if smoke else dev.split()[-1].lower()}")
    out.mkdir(parents=True, exist_ok=True)
    keep = set(filter(None, args.steps.split(",")))
    results = {"when": when, "device": dev, "torch": torch.__version__, "python": platform.python_version(),
               "smoke": smoke, "budget_s": budget, "steps": {}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as td, open(out / "suite.log", "w") as log:
        tmp = Path(td)
        for name, cmds, limit in steps(smoke, tmp):
            if (keep and name not in keep) or not cmds:
                continue
            left = budget - (time.perf_counter() - t0)
            if left < 20:
                results["steps"][name] = {"ok": False, "error": "suite budget spent", "s": 0.0}
                continue
            print(f"gpu_suite: {name} (limit {min(limit, left):.0f} s)", file=sys.stderr, flush=True)
            r = run_step(name, cmds, min(limit, left), tmp, log)
            results["steps"][name] = r
            print(f"gpu_suite: {name} {'ok' if r['ok'] else 'FAILED: ' + str(r.get('error'))} in {r['s']} s",
                  file=sys.stderr, flush=True)
            (out / "suite.json").write_text(json.dumps(results, indent=1, default=str))
            (out / "summary.md").write_text(summary(results))  # after every step: a cut run keeps its tables
    results["total_s"] = round(time.perf_counter() - t0, 1)
    (out / "suite.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "summary.md").write_text(summary(results))
    print((out / "summary.md").read_text())
    return 0 if all(r.get("ok") for r in results["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
