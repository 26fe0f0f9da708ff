"""Batch builds on `tiny`: cold, no-op, one scene edited, and Ray vs the local executor.

    .venv/bin/python bench/bench_batch.py [--scenes 200] [--no-ray] [--keep DIR] [--batch-sizes 4 8]

Each phase runs `scenec build DIR --json` as a fresh process, as CI would, and reports its wall time
(process start and imports included). Scenes: 256x256, 4 steps, one entity, one seed each.
Goals: no-op < 5% of cold; an edit rebuilds exactly one job. The no-op replays compile memos
(scenec/build/memo.py); the phase after it compiles every scene again (SCENEC_PARTIAL_COMPILE=0). Forced rebuilds with --batch-size N
show what running the (all compatible) scenes' jobs N at a time saves.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCENE = """\
scenec: 1
model: {model}
canvas: {{width: 256, height: 256}}
sampler: {{steps: 4, seed: {seed}}}
background: {{prompt: "a meadow under a clear sky, variant {i}"}}
entities:
  - {{id: fox, prompt: "a red fox number {i}", shape: {{box: [0.1, 0.5, 0.5, 0.95]}}}}
output: {{dir: ../out}}
"""


def build(scenes: Path, *extra: str) -> tuple[float, dict]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "scenec", "build", str(scenes), "--json", *extra],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"build failed ({r.returncode}):\n{r.stderr[-3000:]}")
    s = json.loads(r.stdout.strip().splitlines()[-1])
    return wall, {k: s[k] for k in ("built", "cached", "failed")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--model", default="tiny", help="tiny (Flux) or tiny-sd")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--keep", type=Path, default=None, help="build here instead of a temp dir (kept)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every build (default: unset)")
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[4, 8],
                    help="also time forced builds with these --batch-size values (cross-scene batching)")
    a = ap.parse_args()
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)

    root = a.keep or Path(tempfile.mkdtemp(prefix="scenec-bench-batch-"))
    scenes = root / "scenes"
    if scenes.exists():
        shutil.rmtree(root / "out", ignore_errors=True)
    scenes.mkdir(parents=True, exist_ok=True)
    # compile memos (scenec/build/memo.py) of this run only: the cold build starts without any
    os.environ["SCENEC_CACHE"] = str(root / "cache")
    shutil.rmtree(root / "cache", ignore_errors=True)
    (root / "scenec.toml").write_text("[project]\n")
    for i in range(a.scenes):
        (scenes / f"s{i:03d}.yaml").write_text(SCENE.format(i=i, seed=i, model=a.model))
    n = a.scenes
    print(f"{n} {a.model} scenes (256x256, 4 steps, 1 job each) in {root}; {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {os.getloadavg()[0]:.1f}")
    rows = []

    cold, s = build(scenes)
    rows.append(("cold build", cold, s))
    noop, s = build(scenes)
    rows.append(("no-op rebuild", noop, s))
    os.environ["SCENEC_PARTIAL_COMPILE"] = "0"
    full, s = build(scenes)
    rows.append(("no-op, every scene compiled", full, s))
    del os.environ["SCENEC_PARTIAL_COMPILE"]
    (scenes / "s007.yaml").write_text(SCENE.format(i="7 edited", seed=7, model=a.model))
    edit, s = build(scenes)
    rows.append(("one scene edited", edit, s))
    status_t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "scenec", "status", str(scenes), "--exit-code"], capture_output=True)
    rows.append(("scenec status", time.perf_counter() - status_t, {}))
    local, s = build(scenes, "--force")
    rows.append(("forced, local executor", local, s))
    batched = []
    for bs in a.batch_sizes:
        t, s = build(scenes, "--force", "--batch-size", str(bs))
        rows.append((f"forced, local, --batch-size {bs}", t, s))
        batched.append((bs, t))
    ray_t = None
    if not a.no_ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("ray is not installed: skipping the Ray comparison (pip install 'scenec[ray]')")
        else:
            ray1, s = build(scenes, "--force", "--executor", "ray", "--workers", "1")
            rows.append(("forced, ray (1 local worker)", ray1, s))
            ray_t, s = build(scenes, "--force", "--executor", "ray", "--workers", "2")
            rows.append(("forced, ray (2 local workers)", ray_t, s))

    print(f"\n{'phase':<32}{'wall s':>9}{'per image ms':>15}  result")
    for name, t, s in rows:
        print(f"{name:<32}{t:>9.2f}{1000 * t / n:>15.1f}  {s}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes on this machine skew the figures)")
    print(f"\nno-op / cold = {100 * noop / cold:.1f}% (goal < 5%)")
    print(f"no-op without partial compiles (SCENEC_PARTIAL_COMPILE=0) / cold = {100 * full / cold:.1f}%")
    print(f"edit rebuilt {rows[3][2]['built']} job(s) (goal: 1)")
    for bs, t in batched:
        print(f"--batch-size {bs} vs 1: {t / local:.2f}x the time ({1000 * (t - local) / n:+.1f} ms per image)")
    if ray_t is not None:
        print(f"ray, 1 worker vs local: {1000 * (ray1 - local) / n:+.1f} ms per image (the executor's overhead; "
              f"Ray start-up included)")
        print(f"ray, 2 workers vs local: {1000 * (ray_t - local) / n:+.1f} ms per image "
              f"({ray_t:.2f} s vs {local:.2f} s for {n} images)")
    if a.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
