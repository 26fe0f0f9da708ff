"""Object-level visual prompts in the language and the plan: located errors (all at once, exit 2), the
image and adapter resolved under the project root and checked like every image, the plan's visual
prompts (image, region masks, window, adapter digest) and the job hash."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from scenec.compiler import compile_scene
from scenec.compiler.check import validate_file

SCENE = """scenec: 1
model: {model}
canvas: {{width: 128, height: 128}}
background: {{prompt: "a meadow"}}
entities:
  - id: fox
    prompt: "a red fox"
    shape: {{box: [0.1, 0.4, 0.5, 0.9]}}
{visual}  - id: cat
    prompt: "a cat"
    shape: {{box: [0.6, 0.1, 0.9, 0.5]}}
"""


def write(tmp_path, visual: str, model: str = "tiny", name: str = "s"):
    Image.fromarray(np.arange(64 * 48 * 3, dtype=np.uint8).reshape(48, 64, 3) % 251).save(tmp_path / "obj.png")
    p = tmp_path / f"{name}.yaml"
    p.write_text(SCENE.format(model=model, visual=visual), encoding="utf-8")
    return p


def test_visual_prompt_lowered_with_the_entitys_region(tmp_path):
    plan = compile_scene(write(tmp_path, "    visual: {image: obj.png, scale: 0.7, window: [1.0, 0.4]}\n"))
    job = plan.jobs[0]
    (vp,) = job.visuals
    assert (vp.entity, vp.mode, vp.scale, vp.adapter, vp.adapter_sha256) == ("fox", "kv-mixed", 0.7, None, None)
    fox = next(e for e in job.entities if e.id == "fox")
    assert vp.masks == fox.masks  # the entity's own region on every grid
    img = plan.tensor(vp.image)
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)  # kv-mixed: centred in a gray square
    np.testing.assert_array_equal(img[8:56], np.asarray(Image.open(tmp_path / "obj.png").convert("RGB")))
    assert (img[:8] == 128).all() and (img[56:] == 128).all()
    from scenec.compiler.caps import ALIASES
    from scenec.compiler.levels import level_index, noise_levels

    table = noise_levels(ALIASES["tiny"], (128, 128), 4)
    assert vp.window == (0, level_index(0.4, table)) and 0 < vp.window[1] < 4
    # jobs without visual prompts keep their plan text (no `visuals` key)
    plain = compile_scene(write(tmp_path, "", name="plain"))
    assert "visuals" not in plain.json["jobs"][0]


def test_large_images_are_scaled_to_the_plans_limit(tmp_path):
    p = write(tmp_path, "    visual: {image: big.png}\n")
    Image.new("RGB", (1200, 600), (10, 200, 30)).save(tmp_path / "big.png")
    img = compile_scene(p).tensor("visual/fox/image")
    assert img.shape == (512, 512, 3) and (img[256, 100] == (10, 200, 30)).all()  # padded, then scaled
    assert (img[:100] == 128).all() and (img[-100:] == 128).all()


def test_transparent_cutouts_are_on_gray_and_kv_mixed_images_square(tmp_path):
    """A non-square RGBA cut-out: alpha 0 becomes gray 128 (not the black RGB under it); kv-mixed pads it to a
    centred gray square, as the trainer's crops; ip-adapter keeps its shape (diffusers' preprocessing)."""
    from scenec.compiler.visual import prepare_image

    rgba = np.zeros((20, 40, 4), np.uint8)  # black, transparent
    rgba[5:15, 10:30] = (200, 30, 40, 255)  # an opaque red box
    im = Image.fromarray(rgba, "RGBA")
    sq = prepare_image(im, "kv-mixed")
    assert sq.shape == (40, 40, 3)
    assert (sq[:10] == 128).all() and (sq[30:] == 128).all()  # the padding
    assert (sq[10:30, :10] == 128).all() and (sq[15:25, 10:30] == (200, 30, 40)).all()  # alpha 0 → gray
    ip = prepare_image(im, "ip-adapter")
    assert ip.shape == (20, 40, 3) and (ip[0, 0] == 128).all() and (ip[5, 10] == (200, 30, 40)).all()
    # through the compiler: the plan's image is this one
    p = write(tmp_path, "    visual: {image: cut.png}\n")
    im.save(tmp_path / "cut.png")
    np.testing.assert_array_equal(compile_scene(p).tensor("visual/fox/image"), sq)


def kv_meta(layers=("transformer_blocks.0.attn",), encoder="enc"):
    """A kv-mixed adapter's metadata (format, config, image encoder beside it)."""
    return {"format": "scenec-kv-mixed/1", "config": json.dumps({"layers": {n: 32 for n in layers}}),
            "image_encoder": encoder}


def test_job_hash_follows_the_visual_prompt_and_the_adapters_content(tmp_path):
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text("{}")
    from safetensors.numpy import save_file

    def adapter(name, value):
        save_file({"w": np.full(3, value, np.float32)}, str(tmp_path / name), metadata=kv_meta())

    adapter("a.safetensors", 1.0)
    shutil.copyfile(tmp_path / "a.safetensors", tmp_path / "b.safetensors")  # the same bytes under another name
    adapter("c.safetensors", 2.0)
    h = {}
    for key, vis in [("none", ""), ("s1", "    visual: {image: obj.png}\n"),
                     ("s2", "    visual: {image: obj.png, scale: 0.5}\n"),
                     ("a", "    visual: {image: obj.png, adapter: a.safetensors}\n"),
                     ("b", "    visual: {image: obj.png, adapter: b.safetensors}\n"),
                     ("c", "    visual: {image: obj.png, adapter: c.safetensors}\n")]:
        plan = compile_scene(write(tmp_path, vis, name=key))
        h[key] = plan.jobs[0].job_hash
        if key == "a":
            vp = plan.jobs[0].visuals[0]
            assert vp.adapter == str((tmp_path / "a.safetensors").resolve()) and len(vp.adapter_sha256) == 64
    assert len({h["none"], h["s1"], h["s2"], h["a"], h["c"]}) == 5
    assert h["a"] == h["b"]  # an adapter is its content, not its file name


def test_every_problem_located_at_once(tmp_path):
    (tmp_path / "not.safetensors").write_bytes(b"\x00" * 4)
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "plain.safetensors"))
    text = SCENE.format(model="flux-dev", visual="    visual: {image: missing.png}\n")
    text += ("    visual: {image: obj.png, adapter: not.safetensors, window: [0.2, 0.6]}\n"
             "  - id: owl\n    prompt: an owl\n"
             "    visual: {image: obj.png, mode: ip-adapter, adapter: plain.safetensors}\n"
             "  - id: dog\n    prompt: a dog\n    visual: {image: ../outside.png, adapter: plain.safetensors}\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "obj.png")
    (tmp_path / "s.yaml").write_text(text, encoding="utf-8")
    _, diags = validate_file(tmp_path / "s.yaml")
    errs = {(d.pos.line, d.pos.col): d.message for d in diags if d.severity == "error"}
    lines = text.splitlines()

    def at(line, key):
        return (line, lines[line - 1].index(key) + 1)

    assert "needs `adapter`" in errs[(9, 13)]
    assert "`missing.png` not found" in errs[at(9, "missing.png")]
    assert "is not a safetensors file" in errs[at(13, "not.safetensors")]
    assert "must go from a higher noise level" in errs[at(13, "[0.2")]
    assert at(16, "mode") not in errs  # Flux runs IP-Adapters (XLabs' format)
    assert "is not an IP-Adapter; flux models load a Flux IP-Adapter" in errs[at(16, "plain.safetensors")]
    assert "is not a kv-mixed adapter" in errs[at(19, "plain.safetensors")]
    assert "outside" in errs[at(19, "../outside.png")] or "project" in errs[at(19, "../outside.png")]


def test_cli_exit_2_with_every_error_and_no_traceback(tmp_path):
    import subprocess
    import sys

    p = write(tmp_path, "    visual: {image: nope.png, mode: kv-mixed, scale: 0.5}\n  - id: owl\n    prompt: owl\n"
              "    visual: {image: obj.png, mode: ip-adapter}\n", model="tiny")
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", str(p)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    out = r.stdout + r.stderr
    assert f"{p.name}:9:" in out and "nope.png" in out
    assert f"{p.name}:12:" in out and "`mode: ip-adapter` needs" in out
    bad = write(tmp_path, "    visual: {image: obj.png, mode: kv-mix}\n", name="bad")
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "bad.yaml:9:" in r.stdout + r.stderr and "kv-mixed, ip-adapter" in r.stdout + r.stderr


@pytest.mark.parametrize("model", ["tiny", "tiny-sd"])
def test_visual_prompts_and_their_refinement_in_groups_where_theta_is_above_0(tmp_path, model):
    p = write(tmp_path, "    visual: {image: obj.png}\n", model=model)
    p.write_text(p.read_text() + "groups:\n  - id: g\n    schedule: {values: [0, 0.5, 1, 1]}\n    variants:\n"
                 "      - {id: a, entities: [fox]}\n")
    _, diags = validate_file(p)
    assert not [d for d in diags if d.severity == "error"]
    p.write_text(p.read_text().replace("visual: {image: obj.png}", "visual: {image: obj.png, refine: {at: [0.5]}}"))
    _, diags = validate_file(p)
    assert not [d for d in diags if d.severity == "error"]  # step 2: θ = 1
    p.write_text(p.read_text().replace("at: [0.5]", "at: [0.5, 1.0]"))
    _, diags = validate_file(p)
    errs = [d for d in diags if d.severity == "error"]
    assert len(errs) == 1 and errs[0].pos.line == 9 and "where θ of group `g` is 0" in errs[0].message
    assert errs[0].pos.col > p.read_text().splitlines()[8].index("1.0") - 2  # at the level, not the key


def test_schema_has_the_visual_key():
    from pathlib import Path

    schema = json.loads((Path(__file__).parents[1] / "schemas" / "scene.schema.json").read_text())
    vis = schema["$defs"]["Visual"]
    assert vis["properties"]["mode"]["enum"] == ["kv-mixed", "ip-adapter"] and vis["required"] == ["image"]


def test_a_kv_mixed_adapters_header_is_checked_against_the_model(tmp_path):
    """What the adapter's header tells is located at `adapter`: a configuration that is not JSON, layers of
    another model kind, an image encoder directory that is not there."""
    from safetensors.numpy import save_file

    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text("{}")
    w = {"w": np.zeros(2, np.float32)}
    save_file(w, str(tmp_path / "noconfig.safetensors"), metadata={**kv_meta(), "config": "{layers"})
    save_file(w, str(tmp_path / "unet.safetensors"), metadata=kv_meta(("down_blocks.0.attentions.0.attn2",)))
    save_file(w, str(tmp_path / "lone.safetensors"), metadata=kv_meta(encoder="gone"))
    save_file(w, str(tmp_path / "ok.safetensors"), metadata=kv_meta())
    for name, says in [("noconfig", "has no valid `config` in its metadata"),
                       ("unet", "was made for a UNet model (SD, SDXL) (its `config.layers`); this scene's model "
                                "is flux"),
                       ("lone", "names its image encoder `gone`, which is no CLIP vision directory"), ("ok", None)]:
        p = write(tmp_path, f"    visual: {{image: obj.png, adapter: {name}.safetensors}}\n", name=name)
        _, diags = validate_file(p)
        errs = [d for d in diags if d.severity == "error"]
        if says is None:
            assert not errs, errs
        else:
            assert len(errs) == 1 and errs[0].pos.line == 9 and says in errs[0].message, errs


def test_a_changed_image_encoder_rebuilds_its_images(tmp_path):
    """The adapter's image encoder is not in the job hash (a path), but its files are in the build's cache
    key, as a local model directory's: changing them makes the image stale."""
    import subprocess
    import sys

    from safetensors.numpy import save_file

    from scenec.runtime.methods import visual as vis
    from scenec.runtime.testing import tiny_backend
    from scenec.runtime.tiny import tiny_clip_vision

    be = tiny_backend()
    layers = vis.attention_layers(be.transformer, {s.name for s in be.sites if s.text})
    encoder, proc = tiny_clip_vision()
    encoder.save_pretrained(tmp_path / "enc")
    proc.save_pretrained(tmp_path / "enc")
    vis.save_adapter(vis.tiny_adapter(layers, encoder.config.hidden_size), tmp_path / "a.safetensors", "enc")
    (tmp_path / "scenec.toml").write_text("[project]\n")
    p = write(tmp_path, "    visual: {image: obj.png, adapter: a.safetensors}\n")
    plan = compile_scene(p)
    assert plan.jobs[0].visuals[0].encoder == str((tmp_path / "enc").resolve())

    def scenec(*args):
        return subprocess.run([sys.executable, "-m", "scenec", *map(str, args)], capture_output=True, text=True,
                              cwd=tmp_path, timeout=600)

    r = scenec("build", p, "-o", "out", "-q", "--steps", "1")
    assert r.returncode == 0, r.stderr
    assert "0 to build" in scenec("status", p, "-o", "out", "--steps", "1").stdout
    save_file({"w": np.zeros(1, np.float32)}, str(tmp_path / "enc" / "extra.safetensors"))  # the encoder changes
    assert compile_scene(p).jobs[0].job_hash == plan.jobs[0].job_hash
    r = scenec("status", p, "-o", "out", "--steps", "1")
    assert "1 to build" in r.stdout, r.stdout


def test_a_visual_window_ending_before_the_steps_that_run_is_a_warning(tmp_path):
    """img2img (`background.strength`) runs only the last steps: a visual prompt whose window ends before them
    does nothing, which `validate` says at its window (as for a control's window); one reaching them is fine."""
    Image.new("RGB", (64, 64), (90, 120, 60)).save(tmp_path / "bg.png")
    for window, warned in (("[1.0, 0.7]", True), ("[1.0, 0.0]", False)):
        p = write(tmp_path, f"    visual: {{image: obj.png, window: {window}}}\n")
        p.write_text(p.read_text().replace('background: {prompt: "a meadow"}',
                                           "sampler: {steps: 4}\nbackground: {prompt: \"a meadow\", image: bg.png, "
                                           "strength: 0.5}"))
        _, diags = validate_file(p)
        warns = [(d.pos.line, d.message) for d in diags if d.severity == "warning" and "visual window" in d.message]
        assert not [d for d in diags if d.severity == "error"] and bool(warns) == warned, (window, warns)
        if warned:
            assert warns[0][0] == 10 and "`background.strength: 0.5` runs the last 2 of 4" in warns[0][1]


def test_an_unknown_model_is_one_error_not_a_flux_adapters_too(tmp_path):
    """A checkpoint path with a typo is one error at `model`; `visual` said it "needs `adapter`" as the stand-in
    flux-dev would (a Flux adapter, for what may be an SD file)."""
    p = write(tmp_path, "    visual: {image: obj.png}\n", model="models/typo.safetensors")
    _, d = validate_file(p)
    assert [(x.pos.line, x.pos.col) for x in d.errors] == [(2, 8)], [x.format() for x in d.errors]
