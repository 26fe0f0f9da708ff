"""The GPU suite's toy-size run (bench/gpu_suite.py --cpu-smoke): every step of the suite runs, so the one
command a GPU session runs has run here first. Figures from it are CPU timings of toy models: meaningless
for the goals, but each step's own checks (flex vs SDPA, ours vs the anchor) must hold."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_suite_cpu_smoke_runs_every_step(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCENEC_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "bench/gpu_suite.py", "--cpu-smoke", "--out", str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    res = json.loads((tmp_path / "suite.json").read_text())
    assert p.returncode == 0, (p.stderr[-3000:], {k: v.get("error") for k, v in res["steps"].items()})
    assert {"check", "attention", "coupled", "cow", "build"} <= set(res["steps"])
    assert all(s["ok"] for s in res["steps"].values())
    cases = res["steps"]["check"]["files"]["check.json"]["cases"]
    assert len(cases) == 12 and all(c["rel_err"] <= c["tol"] for c in cases.values())
    assert any(name.startswith("visual_refine@") for name in cases)
    built = res["steps"]["build"]["outputs"][-1]["json"]
    assert built["built"] >= 1 and built["failed"] == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| check | yes |" in summary and "ours1024" in summary
