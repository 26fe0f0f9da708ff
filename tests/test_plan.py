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
    assert cond["window"] == [3, 5] and cond["preserve"] == 7 and cond["cycles"] == 2
    assert cond["related"] is not None
