"""`build --masks` without rebuilding (canvas-size masks from the geometry), `preview --on IMAGE`, `watch`
(issue 15, items 5 and 6)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import scenec.build.pool as pool
from scenec.build.driver import build_batch
from scenec.build.options import BuildOptions

ROOT = Path(__file__).resolve().parents[1]

SCENE = """\
scenec: 1
model: tiny
canvas: {width: 96, height: 64}
sampler: {steps: 2, seed: 3}
background: {prompt: "a meadow"}
entities:
  - {id: fox, prompt: "a fox", shape: {box: [0.0, 0.5, 0.5, 1.0]}, z: 2}
  - {id: owl, prompt: "an owl", shape: {box: [0.25, 0.0, 1.0, 0.75]}}
"""


@pytest.fixture(scope="module")
def tiny():
    from scenec.runtime.testing import tiny_backend

    return tiny_backend()


@pytest.fixture
def project(tmp_path, monkeypatch, tiny):
    (tmp_path / "scenec.toml").write_text("[project]\ndefault_model = \"tiny\"\n")
    (tmp_path / "s.yaml").write_text(SCENE)
    loads = []
    monkeypatch.setattr(pool, "load_model", lambda m, **kw: loads.append(m) or tiny)
    monkeypatch.chdir(tmp_path)
    return tmp_path, loads


def run(targets, **kw):
    kw.setdefault("quiet", True)
    return build_batch(targets, BuildOptions(**kw))


def _fail_load(*a, **kw):
    raise AssertionError("the model was loaded")


def test_masks_over_up_to_date_images_do_not_rebuild_or_load(project, monkeypatch):
    d, loads = project
    s = run(["s.yaml"])
    assert s["built"] == 1 and len(loads) == 1
    img = d / "out" / "s-3.png"
    before = (img.read_bytes(), img.stat().st_mtime_ns)
    assert not list((d / "out").glob("*.mask-*.png"))
    monkeypatch.setattr(pool, "load_model", _fail_load)
    s = run(["s.yaml"], masks=True)
    assert s["built"] == 0 and s["cached"] == 1 and s["failed"] == 0
    assert (img.read_bytes(), img.stat().st_mtime_ns) == before  # not regenerated
    fox = Image.open(d / "out" / "s-3.mask-fox.png")
    owl = Image.open(d / "out" / "s-3.mask-owl.png")
    assert fox.size == owl.size == (96, 64) and fox.mode == "L"  # canvas size, not the token grid
    f, o = np.asarray(fox), np.asarray(owl)
    assert f[60, 10] == 255 and f[10, 80] == 0
    assert o[40, 30] == 0 and f[40, 30] == 255  # occluded by the fox (z 2)
    assert o[10, 80] == 255
    man = json.loads((d / "out" / "scenec-manifest.json").read_text())
    assert sorted(man["outputs"]["s-3"]["masks"]) == ["s-3.mask-fox.png", "s-3.mask-owl.png"]
    # masks are not part of what makes an output stale: a later plain build is cached too
    assert run(["s.yaml"])["cached"] == 1


def test_masks_with_a_stale_image_build_it_then_write_canvas_masks(project):
    d, loads = project
    s = run(["s.yaml"], masks=True)
    assert s["built"] == 1 and len(loads) == 1
    assert Image.open(d / "out" / "s-3.mask-fox.png").size == (96, 64)
    (d / "s.yaml").write_text(SCENE.replace("a meadow", "a forest"))
    s = run(["s.yaml"], masks=True)
    assert s["built"] == 1 and len(loads) == 2


# --- preview --on IMAGE ---------------------------------------------------------------------------

def cli(*args):
    from typer.testing import CliRunner

    from scenec.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_preview_on_a_built_image_draws_regions_over_it(project):
    d, _ = project
    run(["s.yaml"])
    img = d / "out" / "s-3.png"
    r = cli("preview", "s.yaml", "--on", img, "-o", d / "over.png")
    assert r.exit_code == 0, r.output
    over = np.asarray(Image.open(d / "over.png").convert("RGB")).astype(int)
    base = np.asarray(Image.open(img).convert("RGB")).astype(int)
    assert over.shape == base.shape == (64, 96, 3)  # at the image's size
    assert np.abs(over - base).sum(axis=2)[48, 5] > 0  # fox region tinted
    # found by name too, when the PNG's metadata and sidecar are gone
    bare = d / "s-3.png"
    Image.open(img).convert("RGB").save(bare)
    assert not Image.open(bare).text
    r = cli("preview", "s.yaml", "--on", bare, "-o", d / "over2.png")
    assert r.exit_code == 0, r.output
    assert (d / "over2.png").is_file()


def test_preview_on_an_image_of_another_scene_or_size_exits_2(project):
    d, _ = project
    run(["s.yaml"])
    (d / "t.yaml").write_text(SCENE.replace("a meadow", "a beach"))
    r = cli("preview", "t.yaml", "--on", d / "out" / "s-3.png", "-o", d / "x.png")
    assert r.exit_code == 2 and "built from scene `s`, not from `t`" in r.output
    Image.new("RGB", (64, 64)).save(d / "s-3.png")  # right name, wrong size
    r = cli("preview", "s.yaml", "--on", d / "s-3.png", "-o", d / "x.png")
    assert r.exit_code == 2 and "64x64" in r.output and "96x64" in r.output
    Image.new("RGB", (96, 64)).save(d / "other.png")
    r = cli("preview", "s.yaml", "--on", d / "other.png", "-o", d / "x.png")
    assert r.exit_code == 2 and "not an image of scene `s`" in r.output
    r = cli("preview", "s.yaml", "--on", d / "nosuch.png", "-o", d / "x.png")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert not (d / "x.png").exists()


# --- watch ----------------------------------------------------------------------------------------

def _wait(cond, what: str, log: Path, timeout: float = 60.0):
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; log:\n{log.read_text()}")


def test_watch_previews_on_save_reports_located_errors_and_stops_cleanly(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "scenec.toml").write_text("[project]\ndefault_model = \"tiny\"\n")
    scene = tmp_path / "s.yaml"
    scene.write_text(SCENE)
    prev = tmp_path / "s.preview.png"
    log = tmp_path / "log.txt"
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "scenec", "watch", "s.yaml", "--interval", "0.1",
                              "--max-cycles", "3000"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)

    def save(text):  # as editors that write a temp file and rename it: a save is never seen half-written
        tmp = tmp_path / ".s.yaml.swp"
        tmp.write_text(text)
        os.replace(tmp, scene)

    try:
        _wait(prev.is_file, "the first preview", log)
        first = prev.read_bytes()
        time.sleep(0.05)
        save(SCENE.replace("[0.0, 0.5, 0.5, 1.0]", "[0.5, 0.0, 1.0, 0.5]"))  # the fox moves
        _wait(lambda: prev.read_bytes() != first, "a new preview", log)
        save(SCENE.replace("shape: {box: [0.25", "shape: {box: [1.5"))  # an invalid edit, line 8
        _wait(lambda: "error" in log.read_text(), "the error", log)
        text = log.read_text()
        assert "s.yaml:8:" in text and "1 error" in text and "Traceback" not in text
        assert p.poll() is None  # still watching
        save(SCENE)  # fixed again: previews again
        _wait(lambda: text.count("preview written") < log.read_text().count("preview written"), "recovery", log)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
    assert "watch stopped" in log.read_text()


def test_watch_max_cycles_and_build(project):
    d, loads = project
    r = cli("watch", "s.yaml", "--build", "--max-cycles", "1", "-o", d / "previews")
    assert r.exit_code == 0, r.output
    assert (d / "previews" / "s.preview.png").is_file()
    assert (d / "out" / "s-3.png").is_file() and len(loads) == 1
    r = cli("watch", "nosuch.yaml", "--max-cycles", "1")
    assert r.exit_code == 2
    # a directory was "no such scene file", as if it did not exist
    r = cli("watch", ".", "--max-cycles", "1")
    assert r.exit_code == 2 and "is a directory (watch takes scene files" in r.output, r.output


def test_z_ranks_put_the_higher_z_on_top_and_the_later_on_ties():
    from scenec.compiler.geometry import Region
    from scenec.compiler.preview import z_ranks

    regs = [("a", Region("a", None, 0, 0.0)), ("b", Region("b", None, 0, 0.0)), ("c", Region("c", None, 0, 5.0))]
    assert z_ranks(regs) == {"c": 1, "b": 2, "a": 3}
