"""A local diffusers model directory is known by what it is, not by where the project lies: one inside the project
by its path from the project root, one outside by no path at all (the build's cache key digests its files either
way, scenec/build/keys.py). A copy of the project, or a fresh checkout at another path (CI), keeps every job_hash and
cache key, so nothing is rebuilt and `build --from` rebuilds an image there byte-identical; aliases and hub ids keep
the hashes they had before (golden values)."""

import json
import shutil
from pathlib import Path

import pytest

from scenec.compiler import compile_scene

SCENE = """\
scenec: 1
model: MODEL
canvas: {width: 64, height: 64}
sampler: {steps: 2, seed: 1}
background: {prompt: "a meadow"}
entities:
  - {id: fox, prompt: "a fox", shape: {box: [0.1, 0.5, 0.5, 0.9]}}
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The offline tiny SD pipeline saved as a diffusers directory (save_pretrained, safetensors)."""
    from diffusers import StableDiffusionPipeline

    from scenec.runtime.tiny_sd import build_tiny_sd

    d = tmp_path_factory.mktemp("pool") / "m"
    StableDiffusionPipeline(**build_tiny_sd()).save_pretrained(d, safe_serialization=True)
    return d


def project(root: Path, model_dir: Path | None, model: str = "../models/m") -> Path:
    """A project at ``root``: scenec.toml, ``scenes/s.yaml`` naming ``model`` (relative to scenes/), and the model
    directory copied to ``models/m`` when given."""
    (root / "scenes").mkdir(parents=True)
    (root / "scenec.toml").write_text("[project]\n")
    if model_dir is not None:
        shutil.copytree(model_dir, root / "models" / "m")
    (root / "scenes" / "s.yaml").write_text(SCENE.replace("MODEL", model))
    return root / "scenes" / "s.yaml"


def fresh_copy(src: Path, dst: Path) -> Path:
    """``src`` copied as a fresh checkout is: same bytes, new modification times."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    return dst


def hashes(path, **kw) -> list[str]:
    return [j.job_hash for j in compile_scene(path, **kw).jobs]


def test_a_model_directory_in_the_project_is_its_path_from_the_root(tiny_dir, tmp_path):
    scene = project(tmp_path / "a", tiny_dir)
    plan = compile_scene(scene)
    resolved = plan.json["scene"]["resolved"]
    # the embedded scene names it from the root, where `--from` compiles it (not `../models/m`, the scene's spelling)
    assert "\nmodel: models/m\n" in resolved and str(tmp_path) not in resolved, resolved
    assert plan.json["model"]["repo"] == str((tmp_path / "a" / "models" / "m").resolve())  # what the runtime loads
    # a copy elsewhere: the scene, and the embedded scene written at the copy's root, compile to the same jobs
    copy = fresh_copy(tmp_path / "a", tmp_path / "elsewhere" / "b")
    (copy / "embedded.yaml").write_text(resolved)
    assert hashes(copy / "scenes" / "s.yaml") == hashes(copy / "embedded.yaml") == hashes(scene)
    # named by scenec.toml or by --model (made absolute, as the CLI does): the same directory, the same jobs
    (copy / "scenes" / "t.yaml").write_text(SCENE.replace("model: MODEL\n", ""))
    (copy / "scenec.toml").write_text('[project]\ndefault_model = "models/m"\n')
    assert hashes(copy / "scenes" / "t.yaml") == hashes(scene)
    assert hashes(copy / "scenes" / "t.yaml", model=str((copy / "models" / "m").resolve())) == hashes(scene)
    # another directory of the project is another model, even with the same files
    shutil.copytree(copy / "models" / "m", copy / "models" / "n")
    assert hashes(copy / "scenes" / "t.yaml", model=str(copy / "models" / "n")) != hashes(scene)


def test_a_model_directory_outside_the_project_is_its_files(tiny_dir, tmp_path):
    from scenec.build.keys import model_identity

    outside = tiny_dir.resolve()
    scene = project(tmp_path / "a", None, model=str(outside))
    plan = compile_scene(scene)
    assert f"\nmodel: {outside}\n" in plan.json["scene"]["resolved"]  # nothing better than where it is
    copy = fresh_copy(tmp_path / "a", tmp_path / "b")
    assert hashes(copy / "scenes" / "s.yaml") == hashes(scene)
    # the same files elsewhere (another machine's path): the same job; what tells weights apart is the cache key's
    # digest of the files, which a copy keeps (`content`) and a changed file moves
    moved = fresh_copy(outside, tmp_path / "models" / "m")
    other = compile_scene(scene, model=str(moved))
    assert [j.job_hash for j in other.jobs] == hashes(scene)
    ident = model_identity(plan.json["model"], "content")
    assert model_identity(other.json["model"], "content") == ident
    (moved / "unet" / "config.json").write_text((moved / "unet" / "config.json").read_text() + " ")
    assert model_identity(other.json["model"], "content") != ident


# job hashes of these scenes before model directories were known by their path from the root: an alias or a hub id
# must keep them (a changed hash rebuilds every image a user built)
GOLDEN = {
    "tiny": "02ed1e488f03ca291a9eaf4e091e26b854139e4a4fa359b4bee7776a86fcd183",
    "tiny-sd": "db2b18004d8d77d6c4555edf5aab4ad0ff6447937cc367ab7a835844d53a63d6",
    "sd15": "7b7ee138e4f079b535a88aee95755a04b229f62d861b42de6b184a76b0bba67d",
    "sdxl": "ade85b3744050030e38a9c9555874fbf932b43dbaee6d720a2f8aafccdf58ba6",
    "flux-dev": "eb678c4e39a8bd3fe62898db2d6dd459d76644b6ae2c8548817fb648d9e6d041",
    "stabilityai/stable-diffusion-2-1-base": "50585a117d4a61f9582e6b6337c8b04db0f2e61ca301e7f85ca8df2f556f9059",
    "black-forest-labs/FLUX.1-schnell": "ee91f07b32ea4c510df79a8fbc96f000ab73b321079e5b3d1867d246b98e917a",
}


def test_aliases_and_hub_ids_keep_their_job_hashes(tmp_path):
    (tmp_path / "scenec.toml").write_text("[project]\n")
    got = {}
    for model in GOLDEN:
        (tmp_path / "s.yaml").write_text(SCENE.replace("MODEL", model).replace("64", "512"))
        got[model] = hashes(tmp_path / "s.yaml")[0]
    assert got == GOLDEN


def cli(*args):
    from typer.testing import CliRunner

    from scenec.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_fresh_checkout_elsewhere_rebuilds_nothing_and_rebuilds_an_image_byte_identical(tiny_dir, tmp_path):
    """CI: the project checked out at another path each run (new mtimes), `out/` kept between runs."""
    from scenec.rebuild import describe, read_metadata

    scene = project(tmp_path / "run1" / "proj", tiny_dir)
    root = scene.parents[1]
    r = cli("build", scene, "-o", root / "out", "--weights-hash", "content", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["built"] == 1
    png = root / "out" / "s-1.png"
    copy = fresh_copy(root, tmp_path / "run2" / "proj")
    r = cli("build", copy / "scenes" / "s.yaml", "-o", copy / "out", "--weights-hash", "content", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert (summary["built"], summary["cached"]) == (0, 1), summary
    # the image rebuilt from its own metadata in the copy (the original project may be gone)
    shutil.rmtree(root)
    r = cli("build", "--from", copy / "out" / "s-1.png", "-o", tmp_path / "again", "--project", copy)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again" / "s-1.png").read_bytes() == (copy / "out" / "s-1.png").read_bytes()
    assert "byte-identical" in r.output
    # `show`: the model as the embedded scene names it (from the root), and where it was loaded from
    text = describe(png.name, read_metadata(copy / "out" / "s-1.png"))
    assert f"model     models/m (loaded from {(root / 'models' / 'm').resolve()})" in text, text
    assert "\nmodel: models/m\n" in text


@pytest.mark.parametrize("named, loaded, row", [
    ("models/m", "/home/a/proj/models/m", "models/m (loaded from /home/a/proj/models/m)"),  # a project directory
    ("/srv/models/m", "/srv/models/m", "/srv/models/m"),  # outside the project: where it is
    ("sd15", "org/sd-1-5", "sd15 (loaded from org/sd-1-5)"),  # an alias: its hub id
    ("tiny", "tiny", "tiny"),
    ("ckpt/m.safetensors", "../ckpt/m.safetensors", "ckpt/m.safetensors"),  # not the scene's own spelling
])
def test_show_prints_the_model_as_the_embedded_scene_names_it(named, loaded, row):
    from scenec.rebuild import describe

    meta = {"scenec:model": loaded, "scenec:scene.yaml": f"scenec: 1\nmodel: {named}\n", "scenec:job": "j"}
    assert f"\n  model     {row}\n" in describe("x.png", meta)


def test_the_project_file_sets_the_weights_hash_for_ci(tiny_dir, tmp_path, monkeypatch):
    """`weights_hash = "content"` in scenec.toml's `[project]` does what `--weights-hash content` does on every build
    run in the project (a fresh checkout's new modification times do not read as new weights); a bad value is one
    line at its line of scenec.toml, exit 2."""
    scene = project(tmp_path / "run1" / "proj", tiny_dir)
    root = scene.parents[1]
    (root / "scenec.toml").write_text('[project]\nweights_hash = "content"\n')
    monkeypatch.chdir(root)
    r = cli("build", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["built"] == 1, r.output
    copy = fresh_copy(root, tmp_path / "run2" / "proj")
    monkeypatch.chdir(copy)
    summary = json.loads(cli("build", "--json").stdout)
    assert (summary["built"], summary["cached"]) == (0, 1), summary
    (copy / "scenec.toml").write_text('[project]\nweights_hash = "contents"\n')
    r = cli("status")
    assert r.exit_code == 2 and 'scenec.toml:2:1: error: `weights_hash` must be "stat" or "content"' in r.output
