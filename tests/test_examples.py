"""Every example in scenes/ validates, compiles, previews and builds on the offline tiny models.

The examples are the documentation users copy from; CI proves each one works end to end.
`meadow-flux.yaml` names flux-dev (weights CI cannot download), so it is built with `--model tiny`.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCENES = sorted(p for p in (ROOT / "scenes").glob("*.yaml") if "canvas" in yaml.safe_load(p.read_text()))


def scenec(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "scenec", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=1200)


def test_there_are_enough_examples():
    assert len(SCENES) >= 6


@pytest.mark.parametrize("scene", SCENES, ids=[p.stem for p in SCENES])
def test_example_validates_compiles_and_previews(scene, tmp_path):
    r = scenec("validate", scene)
    assert r.returncode == 0, r.stderr
    assert ": error:" not in r.stderr
    r = scenec("compile", scene, "-o", tmp_path / "plan")
    assert r.returncode == 0, r.stderr
    r = scenec("preview", scene, "-o", tmp_path / "p.png")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "p.png").size[0] > 100


def test_every_example_builds_on_tiny(tmp_path):
    out = tmp_path / "out"
    r = scenec("build", ROOT / "scenes", "-o", out, "--exclude", "meadow-animals", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["failed"] == 0 and summary["built"] > 0, summary
    # true_cfg 1: one model call per step; 2 COW cycles instead of 10: the dancer's face, as fast as CI needs
    r = scenec("build", ROOT / "scenes" / "meadow-flux.yaml", "--model", "tiny", "--set", "sampler.true_cfg=1",
               "--set", "entities.face.reference.cycles=2", "-o", out / "flux", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    flux = json.loads(r.stdout.strip().splitlines()[-1])
    assert flux["failed"] == 0 and flux["built"] == 6, flux
    pngs = list(out.rglob("*.png"))
    assert len(pngs) == summary["built"] + flux["built"]
    for p in pngs:
        im = Image.open(p)
        assert im.text["scenec:model"] in ("tiny", "tiny-sd")
    # a rebuild of the same examples is a no-op
    r = scenec("build", ROOT / "scenes", "-o", out, "--exclude", "meadow-animals", "--json")
    again = json.loads(r.stdout.strip().splitlines()[-1])
    assert again["built"] == 0 and again["cached"] == summary["built"], again
