"""Images that rebuild themselves (issue 15, item 4): a built PNG carries its resolved scene and settings;
`scenec show` prints them; `scenec build --from` rebuilds the image byte-identical, from a copy too."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

LIB = """\
scenec: 1
defs:
  entities:
    fox: {prompt: "a red fox", shape: {box: [0.1, 0.5, 0.5, 0.9]}}
"""

SCENE = """\
scenec: 1
include: [lib/animals.yaml]
model: tiny
canvas: {width: 64, height: 64}
sampler: {steps: 3, seed: [1, 2]}
background: {prompt: "a meadow", image: refs/meadow.png}
entities:
  - {id: fox, use: fox, reference: {image: refs/fox.png, cycles: 1}}
  - {id: owl, prompt: "an owl", shape: {box: [0.6, 0.1, 0.9, 0.4]}}
groups:
  - id: pair
    variants:
      - {id: fox, entities: [fox]}
      - {id: owl, entities: [owl]}
"""


def scenec(*args, cwd):
    return subprocess.run([sys.executable, "-m", "scenec", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def _image(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A project built once: (project dir, a PNG copied out of it, the PNG's metadata)."""
    root = tmp_path_factory.mktemp("proj")
    (root / "scenec.toml").write_text("[project]\n")
    (root / "lib").mkdir()
    (root / "lib" / "animals.yaml").write_text(LIB)
    (root / "refs").mkdir()
    _image(root / "refs" / "fox.png", 1)
    _image(root / "refs" / "meadow.png", 2)
    (root / "scenes").mkdir()
    (root / "scenes" / "farm.yaml").write_text(SCENE.replace("refs/", "../refs/").replace("lib/", "../lib/"))
    r = scenec("build", "scenes/farm.yaml", "-o", "out", "--steps", "2", "--select", "seed:2", "-q", cwd=root)
    assert r.returncode == 0, r.stderr
    pngs = sorted((root / "out").glob("*.png"))
    assert [p.name for p in pngs] == ["farm-pair-fox-2.png", "farm-pair-owl-2.png"]
    away = tmp_path_factory.mktemp("elsewhere") / "copy.png"
    shutil.copyfile(pngs[1], away)
    return root, away


def test_show_round_trips_the_chunks(built):
    root, png = built
    r = scenec("show", png, "--json", cwd=png.parent)
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout)
    with Image.open(png) as im:
        chunks = {k[len("scenec:"):]: v for k, v in im.text.items() if k.startswith("scenec:")}
    assert set(meta) == set(chunks) and meta["job"] == chunks["job"] and meta["scene.yaml"] == chunks["scene.yaml"]
    assert meta["sampler"] == {"seed": 2, "steps": 2, "guidance": meta["sampler"]["guidance"], "true_cfg": 1.0,
                               "kind": meta["sampler"]["kind"], "group": "pair", "variant": "owl"}
    assert meta["model"] == "tiny" and meta["version"] and meta["overrides"] == "--steps 2" and meta["loras"] == []
    scene = yaml.safe_load(meta["scene.yaml"])
    # resolved: the include and `use` applied, the override in, paths relative to the project root
    assert "include" not in scene and "defs" not in scene and "use" not in scene["entities"][0]
    assert scene["entities"][0]["prompt"] == "a red fox" and scene["sampler"]["steps"] == 2
    assert scene["background"]["image"] == "refs/meadow.png"
    assert scene["entities"][0]["reference"]["image"] == "refs/fox.png" and scene["name"] == "farm"
    digest = hashlib.sha256((root / "refs" / "fox.png").read_bytes()).hexdigest()
    assert meta["files"] == {"refs/fox.png": digest,
                             "refs/meadow.png": hashlib.sha256((root / "refs/meadow.png").read_bytes()).hexdigest()}
    human = scenec("show", png, cwd=png.parent)
    assert human.returncode == 0 and "variant owl" in human.stdout and "seed 2, steps 2" in human.stdout
    assert "refs/fox.png" in human.stdout and "name: farm" in human.stdout


def test_build_from_a_copied_png_is_byte_identical(built, tmp_path):
    root, png = built
    r = scenec("build", "--from", png, "-o", tmp_path / "again", cwd=root)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "again" / "farm-pair-owl-2.png"
    assert out.read_bytes() == png.read_bytes() and "byte-identical" in r.stderr
    assert [p.name for p in (tmp_path / "again").glob("*.png")] == [out.name]  # that image only
    assert not list(root.glob(".scenec-from-*"))  # the scene written into the project is gone
    # from outside the project, with --project
    r = scenec("build", "--from", png, "-o", tmp_path / "third", "--project", root, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["identical"] is True


def test_build_from_with_a_changed_or_missing_file_fails_located(built, tmp_path):
    root, png = built
    proj = tmp_path / "proj"
    shutil.copytree(root, proj, ignore=shutil.ignore_patterns("out"))
    _image(proj / "refs" / "fox.png", 99)  # changed
    r = scenec("build", "--from", png, "-o", tmp_path / "o", cwd=proj)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "`refs/fox.png`" in r.stderr and "differs" in r.stderr and "Traceback" not in r.stderr
    (proj / "refs" / "fox.png").unlink()
    r = scenec("build", "--from", png, "-o", tmp_path / "o", cwd=proj)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "`refs/fox.png`" in r.stderr and "not found" in r.stderr and str(proj) in r.stderr
    assert not (tmp_path / "o").exists()


def _edited(png, out, edit):
    from PIL.PngImagePlugin import PngInfo

    with Image.open(png) as im:
        info = PngInfo()
        for k, v in im.text.items():
            info.add_text(k, edit(v) if k == "scenec:scene.yaml" else v)
        im.save(out, pnginfo=info)
    return out


def test_build_from_an_edited_embedded_scene_is_bad_input(built, tmp_path):
    root, png = built
    # not YAML: it was an internal error (exit 1, a YAML parser's message of many lines)
    bad = _edited(png, tmp_path / "yaml.png", lambda v: "scenec: [broken")
    r = scenec("build", "--from", bad, "-o", tmp_path / "o", cwd=root)
    assert r.returncode == 2 and "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [f"scenec: {bad}: scenec:scene.yaml is not valid YAML (was the image "
                                             "edited?): expected ',' or ']', but got '<stream end>' at line 1, "
                                             "column 16"]
    # YAML, but not a valid scene: located in the chunk, not in the temporary file that is gone by then
    bad = _edited(png, tmp_path / "key.png", lambda v: v.replace("scenec: 1\n", "scenec: 1\ncolour: red\n"))
    r = scenec("build", "--from", bad, "-o", tmp_path / "o", cwd=root)
    assert r.returncode == 2 and f"{bad}[scenec:scene.yaml]:2:1: error: unknown key `colour`" in r.stderr, r.stderr
    assert ".scenec-from-" not in r.stderr and not (tmp_path / "o").exists()


def test_build_from_refuses_flags_that_would_change_the_image(built, tmp_path):
    root, png = built
    r = scenec("build", "--from", png, "-o", tmp_path / "o", "--lora", "x.safetensors:0.3", "--seed", "3",
               "--offload", "model", cwd=root)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[0] == ("scenec: --from rebuilds the image as it was made; --lora, --offload, --seed "
                                        "cannot be combined with it (to change it, build its scene: `scenec show "
                                        "IMAGE.png` prints it)")
    assert not (tmp_path / "o").exists()


def test_png_without_metadata_exits_2(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    for args in (["show", "plain.png"], ["build", "--from", "plain.png", "-o", "o"]):
        r = scenec(*args, cwd=tmp_path)
        assert r.returncode == 2 and "no scenec metadata" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "x.txt").write_text("not an image")
    r = scenec("show", "x.txt", cwd=tmp_path)
    assert r.returncode == 2 and "not a readable image" in r.stderr
    r = scenec("build", "--from", "plain.png", "scene.yaml", "-o", "o", cwd=tmp_path)
    assert r.returncode == 2 and "not both" in r.stderr


def test_show_does_not_import_torch(built):
    _, png = built
    code = (f"import sys\nsys.argv = ['scenec', 'show', {str(png)!r}]\nfrom scenec.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'show imported torch'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_loras_travel_with_the_image(tmp_path):
    """A scene's entity LoRA and a --lora flag: both in the embedded scene, by digest; the rebuild is identical."""
    root = tmp_path / "p"
    (root / "loras").mkdir(parents=True)
    (root / "scenec.toml").write_text("[project]\n")
    shutil.copyfile(REPO / "scenes" / "loras" / "fox-style.safetensors", root / "loras" / "fox.safetensors")
    (root / "s.yaml").write_text(
        "scenec: 1\nmodel: tiny\ncanvas: {width: 64, height: 64}\nsampler: {steps: 2, seed: 3}\n"
        "entities:\n  - {id: fox, prompt: a fox, shape: {box: [0.1, 0.1, 0.6, 0.6]},\n"
        "     lora: [{file: loras/fox.safetensors, scale: 0.8}]}\n")
    r = scenec("build", "s.yaml", "-o", "out", "--lora", "loras/fox.safetensors:0.5", "-q", cwd=root)
    assert r.returncode == 0, r.stderr
    [built] = (root / "out").glob("*.png")
    png = tmp_path / "copy.png"
    shutil.copyfile(built, png)
    meta = json.loads(scenec("show", png, "--json", cwd=tmp_path).stdout)
    digest = hashlib.sha256((root / "loras" / "fox.safetensors").read_bytes()).hexdigest()
    assert meta["files"] == {"loras/fox.safetensors": digest}
    assert [(lo["sha256"], lo["scale"]) for lo in meta["loras"]] == [(digest, 0.5)]
    scene = yaml.safe_load(meta["scene.yaml"])
    assert scene["model"] == {"id": "tiny", "lora": [{"file": "loras/fox.safetensors", "scale": 0.5}]}
    assert scene["entities"][0]["lora"] == [{"file": "loras/fox.safetensors", "scale": 0.8}]
    r = scenec("build", "--from", png, "-o", tmp_path / "again", cwd=root)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "again" / built.name).read_bytes() == png.read_bytes()


def test_hub_and_outside_loras_travel_with_the_image(tmp_path):
    """A whole-image `repo:` LoRA travels as its repo (the hub cache is no project path), a `--lora` outside the
    project by its absolute path; `--from` rebuilds the image byte for byte with both."""
    import os

    cache = tmp_path / "hub"
    snap = cache / "models--someone--style-lora" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (cache / "models--someone--style-lora" / "refs").mkdir()
    (cache / "models--someone--style-lora" / "refs" / "main").write_text("abc123")
    shutil.copyfile(REPO / "scenes" / "loras" / "fox-style.safetensors", snap / "style.safetensors")
    shutil.copyfile(REPO / "scenes" / "loras" / "fox-style.safetensors", tmp_path / "outside.safetensors")
    root = tmp_path / "p"
    root.mkdir()
    (root / "scenec.toml").write_text("[project]\n")
    (root / "s.yaml").write_text(
        "scenec: 1\nmodel: {id: tiny, lora: [{repo: someone/style-lora, weight_name: style.safetensors, "
        "scale: 0.4}]}\ncanvas: {width: 64, height: 64}\nsampler: {steps: 2, seed: 3}\n"
        "entities:\n  - {id: fox, prompt: a fox, shape: {box: [0.1, 0.1, 0.6, 0.6]}}\n")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "scenec", *map(str, args)], capture_output=True, text=True,
                              cwd=root, timeout=600, env=env)

    r = run("build", "s.yaml", "-o", "out", "--lora", f"{tmp_path / 'outside.safetensors'}:0.5", "-q")
    assert r.returncode == 0, r.stderr
    [built] = (root / "out").glob("*.png")
    scene = yaml.safe_load(json.loads(run("show", built, "--json").stdout)["scene.yaml"])
    assert scene["model"]["lora"] == [
        {"repo": "someone/style-lora", "weight_name": "style.safetensors", "scale": 0.4},
        {"file": str((tmp_path / "outside.safetensors").resolve()), "scale": 0.5}]
    r = run("build", "--from", built, "-o", tmp_path / "again")
    assert r.returncode == 0 and "byte-identical" in r.stderr, r.stderr
    assert (tmp_path / "again" / built.name).read_bytes() == built.read_bytes()


def test_show_names_the_options_that_change_every_pixel():
    """`show` names what the embedded scene sets besides the sampler line (A1111's infotext names them too): the
    VAE, clip skip, embeddings, prompt syntax, tiling; a scene without them gets no such line."""
    from scenec.rebuild import describe

    scene = ("scenec: 1\nmodel: {id: sd15, vae: vae/ft-mse.safetensors, clip_skip: 1, embeddings: [{file: "
             "emb/bad.safetensors}, {file: emb/x.safetensors, token: xtok}]}\nprompt_syntax: a1111\n"
             "canvas: {width: 512, height: 512, tiling: x}\n")
    text = describe("a.png", {"scenec:scene.yaml": scene, "scenec:job": "a"})
    assert "\n  options   vae vae/ft-mse.safetensors, clip_skip 1, embeddings bad, xtok, prompt_syntax a1111, " \
           "tiling x\n" in text, text
    plain = describe("a.png", {"scenec:scene.yaml": "scenec: 1\nmodel: sd15\ncanvas: {width: 512, height: 512}\n"})
    assert "options" not in plain
