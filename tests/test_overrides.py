"""Command-line overrides (--seed, --steps, --guidance, --set): parsed, checked against the schema with
errors at the flag, part of the cache key and of the images' metadata."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scenec.spec.overrides import OverrideError, from_flags, parse_seeds, parse_set, parse_value

ROOT = Path(__file__).resolve().parents[1]


def scenec(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "scenec", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


def scene(d: Path, name="s", extra="") -> Path:
    (d / "scenec.toml").write_text("[project]\n")
    p = d / f"{name}.yaml"
    p.write_text("scenec: 1\nmodel: tiny\ncanvas: {width: 64, height: 64}\nsampler: {steps: 2, seed: 1}\n"
                 "background: {prompt: \"a meadow\"}\n"
                 "entities:\n  - {id: fox, prompt: \"a fox\", shape: {box: [0.1, 0.5, 0.5, 0.9]}}\n" + extra)
    return p


def test_seed_forms():
    assert parse_seeds("7") == 7
    assert parse_seeds("3..5") == [3, 4, 5]
    assert parse_seeds("1,4,9") == [1, 4, 9]
    for bad in ("x", "5..3", "1..", "-1", "0..100000"):
        with pytest.raises(OverrideError, match="--seed"):
            parse_seeds(bad)


@pytest.mark.parametrize("bad,message", [
    ("5..3", "--seed 5..3: the range ends before it starts"),
    ("0..-1", "--seed 0..-1: the range ends before it starts"),
    ("0..100000", "--seed 0..100000: 100001 seeds, over the limit of 10000"),
    (",".join(map(str, range(10001))), "10001 seeds, over the limit of 10000"),
])
def test_seed_range_problems_say_what_is_wrong(bad, message):
    # they all said "expected N, A..B or A,B,C": the specific error was swallowed by the parser's own
    # `except ValueError` (OverrideError is one)
    with pytest.raises(OverrideError) as e:
        parse_seeds(bad)
    assert message in str(e.value) and "expected N" not in str(e.value)


def test_set_values_are_yaml_but_prompts_stay_text():
    assert parse_set("sampler.steps=8").value == 8
    assert parse_set("sampler.seed=[1, 2]").value == [1, 2]
    assert parse_set("background.prompt=a cat: sitting, at dusk").value == "a cat: sitting, at dusk"
    assert parse_value("") == ""
    assert parse_set("entities.fox.shape={box: [0, 0, 1, 1]}").value == {"box": [0, 0, 1, 1]}
    for bad in ("nokey", "=3", "a..b=1"):
        with pytest.raises(OverrideError, match="--set"):
            parse_set(bad)
    assert [o.flag for o in from_flags("1", "4", None, ["name=x"])] == ["--seed 1", "--steps 4", "--set name=x"]


def test_bad_overrides_are_reported_at_the_flag_all_at_once(tmp_path):
    f = scene(tmp_path)
    r = scenec("validate", f, "--steps", "abc", "--guidance", "-1", "--set", "sampler.stpes=3",
               "--set", "entities.wolf.prompt=x", "--set", "entities.3.prompt=x", "--set", "model.vae=v")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    err = r.stderr
    assert "--steps abc: error: `sampler.steps` must be an integer, found string `abc`" in err
    assert "--guidance -1: error: `sampler.guidance` must be greater than or equal to 0" in err
    assert "--set sampler.stpes=3: error: unknown key `stpes`" in err and "did you mean `steps`?" in err
    assert "--set entities.wolf.prompt=x: error: `entities.wolf`: no element with id `wolf`" in err
    assert "ids here: fox" in err
    assert "--set entities.3.prompt=x: error: `entities.3`: no element 3" in err
    # `model: tiny` is a string: the hint writes the mapping it becomes
    assert "--set model.vae=v: error: `model` is not a mapping" in err and "--set 'model={id: tiny, vae: v}'" in err
    r = scenec("build", f, "--seed", "x")
    assert r.returncode == 2 and "scenec: --seed x: expected N, A..B or A,B,C" in r.stderr
    assert "0 built" in r.stderr  # a build always ends with its summary line


def test_overrides_change_the_images_the_key_and_the_metadata(tmp_path):
    from PIL import Image

    f = scene(tmp_path)
    out = tmp_path / "out"
    r = scenec("build", f, "-o", out, "--seed", "3..4", "--steps", "1", "--set", "entities.fox.prompt=a wolf",
               "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["built"] == 2
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["s-3.png", "s-4.png"]
    meta = Image.open(out / "s-3.png").text
    assert meta["scenec:overrides"] == "--seed 3..4 --steps 1 --set entities.fox.prompt=a wolf"
    assert meta["scenec:seed"] == "3"
    side = json.loads((out / "s-3.json").read_text())
    assert side["scenec:overrides"] == meta["scenec:overrides"]
    # the same overrides: up to date; another step count: the key changed, rebuilt
    r = scenec("build", f, "-o", out, "--seed", "3..4", "--steps", "1", "--set", "entities.fox.prompt=a wolf",
               "--json")
    assert json.loads(r.stdout)["cached"] == 2, r.stderr
    r = scenec("status", f, "-o", out, "--seed", "3..4", "--steps", "1", "--set", "entities.fox.prompt=a wolf")
    assert "2 up to date, 0 to build" in r.stdout
    r = scenec("status", f, "-o", out, "--seed", "3..4", "--steps", "1")
    assert "0 up to date, 2 to build" in r.stdout and "changed" in r.stdout
    r = scenec("build", f, "-o", out, "--seed", "3", "--steps", "2", "--json")
    assert json.loads(r.stdout)["built"] == 1
    assert "scenec:overrides" in Image.open(out / "s-3.png").text


def test_seed_override_replaces_a_matrix_seed(tmp_path):
    f = scene(tmp_path, extra="matrix: {seed: [1, 2], style: [oil]}\noutput: {name: \"{scene}-{style}-{seed}\"}\n")
    r = scenec("build", f, "-o", tmp_path / "out", "--seed", "9", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "s-oil-9.png" in r.stdout and "s-oil-1.png" not in r.stdout


def test_setting_a_shape_kind_replaces_the_shape(tmp_path):
    """A shape has one kind: `--set entities.fox.shape.ellipse=…` on a box entity makes it an ellipse (it merged
    into the mapping: "a shape needs exactly one of", reported at the scene, not the flag)."""
    import numpy as np

    from scenec.compiler import compile_scene
    from scenec.spec.overrides import from_flags

    f = scene(tmp_path)
    ell = "entities.fox.shape.ellipse={center: [0.3, 0.7], radii: [0.2, 0.2]}"
    r = scenec("validate", f, "--set", ell)
    assert r.returncode == 0, r.stdout + r.stderr
    box = compile_scene(f)
    got = compile_scene(f, overrides=from_flags(sets=[ell]))
    f.write_text(f.read_text().replace("shape: {box: [0.1, 0.5, 0.5, 0.9]}",
                                       "shape: {ellipse: {center: [0.3, 0.7], radii: [0.2, 0.2]}}"))
    want = compile_scene(f)
    names = sorted(want.tensors)
    assert names == sorted(got.tensors) and any("fox" in n for n in names)
    assert all(np.array_equal(np.asarray(got.tensor(n)), np.asarray(want.tensor(n))) for n in names)
    assert any(not np.array_equal(np.asarray(box.tensor(n)), np.asarray(want.tensor(n))) for n in names)
