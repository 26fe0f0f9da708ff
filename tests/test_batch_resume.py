"""Resumability: SIGKILL a build mid-batch, rerun, and get exactly the uninterrupted result."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scenec.spec.fsio import sha256_file

N_SCENES = 12


def make_project(d: Path) -> None:
    d.mkdir(parents=True)
    (d.parent / "scenec.toml").write_text("[project]\n")  # the project root holds scenes/ and out/
    for i in range(N_SCENES):
        (d / f"s{i:02d}.yaml").write_text(
            "scenec: 1\nmodel: tiny\ncanvas: {width: 64, height: 64}\n"
            "sampler: {steps: 2, seed: [1, 2]}\n"
            f"background: {{prompt: \"scene number {i}\"}}\n"
            "entities:\n  - {id: fox, prompt: \"a fox\", shape: {box: [0.1, 0.5, 0.5, 0.9]}}\n"
            "output: {dir: ../out}\n")


def build_cmd(d: Path) -> list[str]:
    return [sys.executable, "-m", "scenec", "build", str(d), "--json"]


def images(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(out.glob("*.png"))}


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_batch_then_resume_is_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same float reduction order in every process
    ref, run = tmp_path / "ref", tmp_path / "run"
    make_project(ref / "scenes")
    make_project(run / "scenes")
    r = subprocess.run(build_cmd(ref / "scenes"), capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    want = images(ref / "out")
    assert len(want) == 2 * N_SCENES

    out = run / "out"
    p = subprocess.Popen(build_cmd(run / "scenes"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (out.is_dir() and any(out.glob("*.png"))):
            assert p.poll() is None, "the build ended before any output appeared"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    got_early = images(out)
    mpath = out / "scenec-manifest.json"
    recorded = json.loads(mpath.read_text())["outputs"] if mpath.exists() else {}  # the manifest is never partial
    assert set(recorded) <= {n[:-4] for n in got_early}  # it names only complete images
    assert 0 < len(got_early) < 2 * N_SCENES, "killed too late to test anything"
    # whatever is there is complete: an image is either absent or the final one
    for name, h in got_early.items():
        assert h == want[name]
    # a temp file as an atomic write interrupted by the kill leaves it
    (out / ".s05-1.png.k1ll3d_x.tmp").write_bytes(b"\x89PNG partial")

    r = subprocess.run(build_cmd(run / "scenes"), capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.splitlines()[-1])
    assert summary["failed"] == 0 and summary["built"] + summary["cached"] == 2 * N_SCENES
    assert summary["cached"] == len(recorded)  # what was recorded before the kill is not rebuilt
    assert images(out) == want
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    man = json.loads((out / "scenec-manifest.json").read_text())
    ref_man = json.loads((ref / "out" / "scenec-manifest.json").read_text())
    assert set(man["outputs"]) == set(ref_man["outputs"]) == {n[:-4] for n in want}
    for name, e in man["outputs"].items():
        assert e["sha256"] == want[name + ".png"] and e["key"] == ref_man["outputs"][name]["key"]
        assert (out / e["sidecar"]).is_file()
    r = subprocess.run(build_cmd(run / "scenes"), capture_output=True, text=True, env=env, timeout=300)
    assert json.loads(r.stdout.splitlines()[-1])["cached"] == 2 * N_SCENES
