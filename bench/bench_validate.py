"""Validation speed (the compile side's goals, on this 2-core machine):

- `scenec validate FILE`, cold process: <= 0.5 s
- 1000 scenes validated in one process: <= 10 s

Usage: python bench/bench_validate.py [--scene scenes/eagle-fox-meadow.yaml] [--n 1000]
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scene", default=str(ROOT / "tests" / "scenes" / "regional.yaml"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--cold-reps", type=int, default=5)
    args = ap.parse_args()

    cold = []
    for _ in range(args.cold_reps):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "scenec", "validate", args.scene], capture_output=True)
        cold.append(time.perf_counter() - t0)
        assert r.returncode == 0, r.stderr.decode()
    print(f"cold `scenec validate` (median of {args.cold_reps}): {statistics.median(cold):.3f} s  (goal <= 0.5 s)")

    from scenec.compiler.check import check_scene
    from scenec.compiler.resolve import resolve_model
    from scenec.spec.diagnostics import Diagnostics
    from scenec.spec.load import load_scene

    t0 = time.perf_counter()
    for _ in range(args.n):
        d = Diagnostics()
        ls = load_scene(args.scene, d)
        _, info = resolve_model(ls, None, d)
        check_scene(ls, info, d)
        assert not d.has_errors()
    dt = time.perf_counter() - t0
    print(f"{args.n} validations in one process: {dt:.2f} s ({1000 * dt / args.n:.2f} ms each)  (goal <= 10 s)")


if __name__ == "__main__":
    main()
