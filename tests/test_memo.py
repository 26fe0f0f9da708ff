"""Partial compiles (scenec/build/memo.py): an unchanged scene is replayed, anything it read changing compiles it."""

import json

import numpy as np
import pytest
from PIL import Image

import scenec.build.planning as planning
import scenec.build.pool as pool
from scenec.build import memo
from scenec.build.driver import build_batch
from scenec.build.options import BuildOptions
from scenec.build.reporting import status

SCENE = ("scenec: 1\nmodel: tiny\ncanvas: {{width: 64, height: 64}}\nsampler: {{steps: 2, seed: [1, 2]}}\n"
         "background: {{prompt: \"{prompt}\"{image}}}\n"
         "entities:\n  - {{id: fox, prompt: \"a fox\", shape: {{box: [0.1, 0.5, 0.5, 0.9]}}}}\n")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """Two scenes (one includes a file, one reads an image); compiles and model loads counted."""
    from scenec.runtime.testing import tiny_backend

    monkeypatch.setenv("SCENEC_CACHE", str(tmp_path / "cache"))
    (tmp_path / "scenec.toml").write_text("[project]\n")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "ents.yaml").write_text("scenec: 1\ndefs:\n  entities:\n    fox: {prompt: \"a red fox\"}\n")
    (tmp_path / "a.yaml").write_text(
        "scenec: 1\nmodel: tiny\ncanvas: {width: 64, height: 64}\nsampler: {steps: 2, seed: 1}\n"
        "include: [lib/ents.yaml]\nbackground: {prompt: \"a meadow\"}\n"
        "entities:\n  - {id: fox, use: fox, shape: {box: [0.1, 0.1, 0.5, 0.5]}}\n")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "init.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text(SCENE.format(prompt="a forest", image=", image: ../init.png"))
    compiled: list[str] = []
    real = planning.compile_file
    monkeypatch.setattr(planning, "compile_file", lambda f, m, *a: compiled.append(f.name) or real(f, m, *a))
    be = tiny_backend()
    monkeypatch.setattr(pool, "load_model", lambda m, **kw: be)
    monkeypatch.chdir(tmp_path)
    return tmp_path, compiled


def run(**kw):
    return build_batch(["."], BuildOptions(quiet=True, **kw))


def test_a_noop_build_replays_every_scene_without_compiling(project):
    d, compiled = project
    s = run()
    assert s["built"] == 3 and sorted(compiled) == ["a.yaml", "b.yaml"]
    assert len(list((d / "cache" / "compile").glob("*.json"))) == 2
    compiled.clear()
    s = run()
    assert (s["built"], s["cached"]) == (0, 3) and compiled == []
    # what a replayed item carries is what the build reports
    assert sorted(o["name"] for o in s["outputs"]) == ["a-1", "b-1", "b-2"]
    st = status(["."])
    assert st["counts"] == {"cached": 3} and compiled == []


@pytest.mark.parametrize("change", ["scene", "include", "image", "nearer-toml", "code"])
def test_anything_the_compile_read_changing_compiles_again(project, change, monkeypatch):
    d, compiled = project
    run()
    compiled.clear()
    if change == "scene":
        (d / "a.yaml").write_text((d / "a.yaml").read_text().replace("a meadow", "a meadow at noon"))
    elif change == "include":
        (d / "lib" / "ents.yaml").write_text((d / "lib" / "ents.yaml").read_text().replace("red", "grey"))
    elif change == "image":
        Image.fromarray(np.full((64, 64, 3), 91, np.uint8)).save(d / "init.png")
    elif change == "nearer-toml":  # sub/ becomes its own project: b.yaml's ../init.png leaves its root
        (d / "sub" / "scenec.toml").write_text("[project]\n")
    else:
        monkeypatch.setattr(memo, "_code", "another scenec")
    s = run()
    expect = {"scene": ["a.yaml"], "include": ["a.yaml"], "image": ["b.yaml"], "nearer-toml": ["b.yaml"],
              "code": ["a.yaml", "b.yaml"]}[change]
    assert sorted(compiled) == expect
    if change == "nearer-toml":
        assert s["invalid"] == 1 and any("outside the project root" in str(x) for x in s["diagnostics"].items)
    elif change != "code":
        assert s["built"] >= 1


def test_a_replayed_scene_with_work_to_do_is_compiled_and_built(project):
    d, compiled = project
    run()
    compiled.clear()
    (d / "sub" / "out" / "b-2.png").unlink()
    s = run()
    assert compiled == ["b.yaml"] and (s["built"], s["cached"]) == (1, 2)
    assert [o["name"] for o in s["outputs"] if o["status"] == "built"] == ["b-2"]
    compiled.clear()
    s = run(force=True, select=["a"])
    assert compiled == ["a.yaml"] and s["built"] == 1


def test_replayed_scenes_keep_their_warnings(project):
    d, compiled = project
    (d / "w.yaml").write_text(SCENE.format(prompt="a lake", image="").replace(
        "entities:\n", "groups:\n  - id: g\n    variants: [{id: v, prompt: \"a swan\"}]\nentities:\n"))
    first = run()
    warn = [x.format() for x in first["diagnostics"].warnings]
    assert warn, "the scene should warn (entity fox is in no variant)"
    compiled.clear()
    again = run()
    assert compiled == [] and [x.format() for x in again["diagnostics"].warnings] == warn


def test_bad_memos_and_the_switch_compile(project, monkeypatch):
    d, compiled = project
    run()
    for f in (d / "cache" / "compile").glob("*.json"):
        f.write_text(f.read_text()[:40])  # torn
    compiled.clear()
    assert run()["cached"] == 3 and sorted(compiled) == ["a.yaml", "b.yaml"]
    compiled.clear()
    monkeypatch.setenv("SCENEC_PARTIAL_COMPILE", "0")
    assert run()["cached"] == 3 and sorted(compiled) == ["a.yaml", "b.yaml"]
    doc = json.loads(next((d / "cache" / "compile").glob("*.json")).read_text())
    deps = [p for p, _ in doc["deps"]]
    assert any(p.endswith("scenec.toml") for p in deps)
