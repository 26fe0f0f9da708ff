"""Plans: deterministic bytes, hashes that move only when something that matters moves."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from scenec.compiler import compile_scene

SCENES = Path(__file__).parent / "scenes"


def copy_scenes(tmp_path):
    dst = tmp_path / "scenes"
    shutil.copytree(SCENES, dst)
    return dst


def test_same_scene_same_bytes(tmp_path):
    a = compile_scene(SCENES / "regional.yaml").write(tmp_path / "a")
    b = compile_scene(SCENES / "regional.yaml").write(tmp_path / "b")
    for f in ("plan.json", "tensors.safetensors"):
        assert (a / f).read_bytes() == (b / f).read_bytes()


def test_plan_contents_follow_the_format():
    plan = compile_scene(SCENES / "regional.yaml")
    doc = plan.json
    assert doc["format"] == "scenec-plan/1"
    assert doc["grids"] == {"latent": [24, 32], "token": [12, 16]}
    assert doc["sampler"] == {"kind": "flow-euler", "steps": 4, "guidance": 3.5, "true_cfg": 1.0}
    assert [j["seed"] for j in doc["jobs"]] == [1, 2]
    job = doc["jobs"][0]
    assert doc["prompts"][job["global"]["prompt"]] == "a meadow"
    ents = {e["id"]: e for e in job["entities"]}
    assert doc["prompts"][ents["eagle"]["negative"]] == "cage"
    assert doc["prompts"][ents["fox"]["negative"]] == "blurry"  # falls back to the background negative
    fox = plan.tensors[ents["fox"]["masks"]["token"]]
    assert fox.shape == (12, 16) and fox.dtype == np.float32
    assert 0.0 <= fox.min() and fox.max() <= 1.0
    # both seeds point at the same region tensors
    assert doc["jobs"][1]["entities"][0]["masks"] == job["entities"][0]["masks"]
    assert len(job["program"]) == 4


def test_written_plan_roundtrips(tmp_path):
    plan = compile_scene(SCENES / "coupled.yaml")
    d = plan.write(tmp_path / "p")
    doc = json.loads((d / "plan.json").read_text())
    tensors = load_file(str(d / "tensors.safetensors"))
    assert doc == plan.json
    assert set(tensors) == set(plan.tensors)
    for k in tensors:
        assert np.array_equal(tensors[k], plan.tensors[k])


@pytest.mark.parametrize("edit,job0_changes,plan_changes", [
    (lambda t: t.replace('prompt: "a red fox"', 'prompt: "a grey fox"'), True, True),
    (lambda t: t.replace("feather: 0.05", "feather: 0.06"), True, True),
    (lambda t: t.replace("seed: [1, 2]", "seed: [1, 3]"), False, True),  # job 0 (seed 1) is unchanged
    (lambda t: t.replace("# yaml-language-server", "# a comment\n# yaml-language-server"), False, False),
])
def test_hashes_move_only_with_what_matters(tmp_path, edit, job0_changes, plan_changes):
    d = copy_scenes(tmp_path)
    before = compile_scene(d / "regional.yaml").json
    f = d / "regional.yaml"
    f.write_text(edit(f.read_text()))
    after = compile_scene(f).json
    assert (before["jobs"][0]["job_hash"] != after["jobs"][0]["job_hash"]) == job0_changes
    assert (before["plan_hash"] != after["plan_hash"]) == plan_changes


def test_reference_is_placed_on_grey_with_region_alpha():
    plan = compile_scene(SCENES / "reference.yaml")
    cond = plan.json["jobs"][0]["conditions"][0]
    rgba = plan.tensors[cond["image"]]
    assert rgba.shape == (256, 256, 4) and rgba.dtype == np.uint8
    assert (rgba[0, 0] == [128, 128, 128, 0]).all()  # outside: neutral grey, transparent
    assert rgba[102, 128, 3] == 255  # the ellipse's centre is opaque
    # tiny at 256², 10 steps: σ = 1, .937, .868, .794, .712, .622, .524, .414, .292, .155, 0 (the nearest steps)
    assert cond["window"] == [4, 6] and cond["preserve"] == 8 and cond["cycles"] == 2
    assert cond["related"] is not None


def test_job_hash_does_not_depend_on_other_jobs_regions(tmp_path):
    # region tensors are numbered plan-wide (r.fox, r.fox.1): another group's occlusion of `fox`
    # renamed this job's mask tensors and moved its job_hash, though its image is the same
    head = ("scenec: 1\nmodel: tiny\ncanvas: {width: 256, height: 256}\nbackground: {prompt: bg}\n"
            "entities:\n  - {id: fox, prompt: fox, shape: {box: [0, 0, 0.6, 0.6]}}\n"
            "  - {id: eagle, prompt: eagle, shape: {box: [0.4, 0.4, 1, 1]}}\ngroups:\n")
    both = "  - {id: a, variants: [{id: both, entities: [fox, eagle]}]}\n"
    alone = "  - {id: b, variants: [{id: fox, entities: [fox]}]}\n"
    (tmp_path / "one.yaml").write_text(head + both + alone)
    (tmp_path / "two.yaml").write_text(head + alone)
    one = {j["id"]: j for j in compile_scene(tmp_path / "one.yaml").json["jobs"]}
    two = {j["id"]: j for j in compile_scene(tmp_path / "two.yaml").json["jobs"]}
    assert one["one-b-fox-0"]["entities"][0]["masks"] != two["two-b-fox-0"]["entities"][0]["masks"]  # names differ
    assert one["one-b-fox-0"]["job_hash"] == two["two-b-fox-0"]["job_hash"]
    assert one["one-a-both-0"]["job_hash"] != one["one-b-fox-0"]["job_hash"]


def test_scene_without_background_compiles(tmp_path):
    # background prompt and negative default to "": one text, used as both by the global stream
    (tmp_path / "a.yaml").write_text("scenec: 1\nmodel: tiny\ncanvas: {width: 256, height: 256}\n"
                                     "entities: [{id: a, prompt: a}]\n")
    doc = compile_scene(tmp_path / "a.yaml").json
    g = doc["jobs"][0]["global"]
    assert doc["prompts"][g["prompt"]] == "" and g["negative"] == g["prompt"]
    assert doc["prompts"][doc["jobs"][0]["entities"][0]["negative"]] == ""
