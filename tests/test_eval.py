"""scenec eval: BgSim on synthetic outputs with a known answer, CLIPScore with a tiny random CLIP, the CLI."""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scenec.compiler import compile_scene
from scenec.clip import ClipScorer, tiny_clip
from scenec.eval import evaluate_dir, evaluate_group, find_outputs, locate_scene
from scenec.metrics import EvalError, bg_similarity, combined, parse_weights, upsample_mask
from scenec.spec.plan import write_plan

ROOT = Path(__file__).resolve().parents[1]

SCENE = """\
scenec: 1
model: tiny
canvas: {width: 64, height: 64}
sampler: {steps: 4, seed: [1, 2]}
background: {prompt: "a misty forest"}
entities:
  - {id: stag, prompt: "a stag", shape: {box: [0.0, 0.0, 0.25, 0.5]}}
  - {id: fox, prompt: "a red fox", shape: {box: [0.5, 0.5, 1.0, 1.0]}}
groups:
  - id: pair
    variants:
      - {id: stag, entities: [stag]}
      - {id: fox, entities: [fox]}
%s
output: {dir: out}
"""

PROMPT_GROUP = """\
  - id: loose
    variants:
      - {id: stag, entities: [stag]}
      - {id: owl, prompt: "an owl"}
"""


@pytest.fixture
def project(tmp_path):
    (tmp_path / "scenec.toml").write_text("[project]\n")
    (tmp_path / "pair.yaml").write_text(SCENE % PROMPT_GROUP)
    return tmp_path


def _joint(h=64, w=64):
    """The union of the two boxes on a 64×64 canvas (cells of 8 px align with the boxes)."""
    m = np.zeros((h, w), bool)
    m[0:32, 0:16] = True
    m[32:64, 32:64] = True
    return m


DELTA = 10  # variant fox differs by 10/255 in every channel outside the regions


def _write_outputs(project, plan, delta=DELTA):
    """Images of group `pair`: per seed a random background shared by both variants, random inside the
    regions, and +delta on the fox variant outside the joint region; sidecars as the runtime writes them."""
    out = project / "out"
    out.mkdir()
    inside = _joint()
    for j in plan.json["jobs"]:
        if j["group"] != "pair":
            continue
        rng = np.random.default_rng(j["seed"])
        img = rng.integers(0, 200, (64, 64, 3)).astype(np.uint8)
        noise = np.random.default_rng(zlib.crc32(j["id"].encode())).integers(0, 255, (64, 64, 3)).astype(np.uint8)
        img[inside] = noise[inside]
        if j["variant"] == "fox":
            img[~inside] += delta
        Image.fromarray(img).save(out / f"{j['name']}.png")
        side = {"scenec:job": j["id"], "scenec:scene": plan.json["scene"]["name"], "scenec:seed": str(j["seed"]),
                "scenec:plan_hash": plan.plan_hash, "image": f"{j['name']}.png"}
        (out / f"{j['name']}.json").write_text(json.dumps(side))
    return out


def test_bg_similarity_formula():
    a = np.zeros((4, 4, 3))
    b = np.zeros((4, 4, 3))
    b[..., 0] = 0.3
    b[..., 1] = 0.4  # squared distance per pixel 0.25: per channel 0.25 / 3
    inside = np.zeros((4, 4), bool)
    inside[:, :2] = True  # half the canvas is entity: ρ = 0.5
    r = bg_similarity([a, b], inside)
    assert r["mean_sq"] == pytest.approx(0.25 / 3) and r["validity"] == pytest.approx(0.5)
    assert r["bgsim"] == pytest.approx(-0.5 * 0.25 / 3)
    b[:, :2] = 1.0  # inside the entity region: not counted
    assert bg_similarity([a, b], inside)["bgsim"] == pytest.approx(-0.5 * 0.25 / 3)
    # three images: the mean over the three pairs
    c = a.copy()
    r3 = bg_similarity([a, b, c], inside)
    assert r3["mean_sq"] == pytest.approx((0.25 + 0.0 + 0.25) / 3 / 3)
    assert bg_similarity([a], inside)["bgsim"] is None
    assert bg_similarity([a, b], np.ones((4, 4), bool))["bgsim"] == 0.0


def test_upsample_mask_and_weights():
    m = np.zeros((2, 2))
    m[0, 1] = 0.2  # partial coverage counts as entity
    up = upsample_mask(m, (4, 4))
    assert up[:2, 2:].all() and up.sum() == 4
    assert parse_weights("1, 0.5") == (1.0, 0.5)
    with pytest.raises(EvalError, match="two numbers"):
        parse_weights("1")
    assert combined(-0.1, 0.8, (1, 2)) == pytest.approx(1.5)
    assert combined(-0.1, None, (1, 0)) == pytest.approx(-0.1)
    assert combined(None, 0.5, (1, 1)) is None


def test_group_bgsim_known_value(project):
    plan = compile_scene(project / "pair.yaml")
    out = _write_outputs(project, plan)
    images = {o.job: Image.open(o.image) for o in find_outputs(out)}
    ge = evaluate_group(plan, "pair", images, weights=(1.0, 0.0))
    rho = 1 - _joint().mean()  # (64·64 − 16·32 − 32·32) / 64² = 0.625
    sq = (DELTA / 255) ** 2  # every channel differs by DELTA outside the regions
    assert ge.validity == pytest.approx(rho)
    assert ge.mean_sq == pytest.approx(sq, rel=1e-9)
    assert ge.bgsim == pytest.approx(-rho * sq, rel=1e-9)
    assert ge.combined == pytest.approx(ge.bgsim) and ge.clipscore is None
    assert ge.images == 4 and ge.seeds == [1, 2] and ge.masking == "regions" and not ge.warnings


def test_identical_backgrounds_score_zero(project):
    plan = compile_scene(project / "pair.yaml")
    out = _write_outputs(project, plan, delta=0)
    ge = evaluate_group(plan, "pair", {o.job: Image.open(o.image) for o in find_outputs(out)}, weights=(1, 0))
    assert ge.bgsim == pytest.approx(0.0, abs=1e-12)


def test_prompt_variant_warns_then_uses_the_segmentation_hook(project):
    plan = compile_scene(project / "pair.yaml")
    jobs = [j for j in plan.json["jobs"] if j["group"] == "loose" and j["seed"] == 1]
    rng = np.random.default_rng(0)
    base = rng.random((64, 64, 3))
    owl = base.copy()
    owl[40:60, 40:60] = 1.0  # the owl, somewhere no region says
    images = {jobs[0]["id"]: base, jobs[1]["id"]: owl}
    ge = evaluate_group(plan, "loose", images, weights=(1, 0))
    assert ge.masking == "partial" and "owl" in ge.warnings[0] and "not masked out" in ge.warnings[0]
    assert ge.bgsim < 0

    seen = []

    def seg(img, text):
        seen.append(text)
        m = np.zeros(img.shape[:2], bool)
        m[40:60, 40:60] = True
        return m

    ge2 = evaluate_group(plan, "loose", images, weights=(1, 0), segmenter=seg)
    assert seen == ["an owl"] and ge2.masking == "regions+segmentation" and not ge2.warnings
    assert ge2.bgsim == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


def test_clip_score_is_100_cos_of_the_models_own_embeddings(clip):
    """CLIPScore = max(100·cos, 0) of CLIP's projected embeddings, checked against transformers' own
    CLIPImageProcessor and get_image_features / get_text_features (not against scenec's code path)."""
    import torch
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor  # the PIL backend: no torchvision

    rng = np.random.default_rng(1)
    imgs = [rng.random((48, 80, 3)), rng.random((64, 40, 3))]
    texts = ["a red fox", "a cat in a meadow"]
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                              image_mean=list(clip.mean.ravel()), image_std=list(clip.std.ravel()))
    u8 = [Image.fromarray(np.round(x * 255).astype(np.uint8)) for x in imgs]
    pix = proc(images=u8, return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(np.stack([clip.preprocess(x) for x in imgs]), pix.numpy(), atol=1e-5)
    tok = clip.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ie = clip.model.get_image_features(pixel_values=pix).pooler_output  # the projected embeddings
        te = clip.model.get_text_features(input_ids=tok["input_ids"],
                                          attention_mask=tok["attention_mask"]).pooler_output
    cos = torch.nn.functional.cosine_similarity(ie, te, dim=-1).numpy()
    np.testing.assert_allclose(clip.score(imgs, texts), np.maximum(100 * cos, 0), rtol=1e-4, atol=1e-4)
    assert np.abs(cos).max() > 0.01  # the random model's cosines are not all 0: the check has teeth


def test_clip_from_a_local_directory_and_missing_model(clip, tmp_path, monkeypatch):
    d = tmp_path / "clip"
    clip.model.save_pretrained(d)
    clip.tokenizer.save_pretrained(d)
    loaded = ClipScorer.load(str(d), device="cpu")
    img = np.random.default_rng(2).random((32, 32, 3))
    assert np.allclose(loaded.score([img], ["a fox"]), clip.score([img], ["a fox"]), atol=1e-6)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvalError) as e:
        ClipScorer.load(str(tmp_path / "no-such-clip"))
    msg = str(e.value)
    assert msg.startswith("CLIP model `") and "--clip" in msg and "\n" not in msg and e.value.exit_code == 1


def test_evaluate_dir_finds_the_scene(project, clip):
    plan = compile_scene(project / "pair.yaml")
    out = _write_outputs(project, plan)
    assert locate_scene(out, "pair") == project / "pair.yaml"
    rep = evaluate_dir(out, clip=clip, weights=(1.0, 2.0))
    (g,) = rep["groups"]
    assert g["group"] == "pair" and g["images"] == 4 and not rep["warnings"]
    assert g["combined"] == pytest.approx(g["bgsim"] + 2 * g["clipscore"])
    assert len(g["per_image"]) == 4 and all(0 <= r["clipscore"] <= 100 for r in g["per_image"])
    json.dumps(rep)  # serialisable


def test_evaluate_dir_warns_on_plan_hash_mismatch(project):
    plan = compile_scene(project / "pair.yaml")
    out = _write_outputs(project, plan)
    (project / "pair.yaml").write_text((SCENE % PROMPT_GROUP).replace("a misty forest", "a foggy forest"))
    rep = evaluate_dir(out, weights=(1, 0))
    assert any("another plan" in w for w in rep["warnings"])


def _tiny_lora(path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": rng.standard_normal((2, 32), np.float32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": rng.standard_normal((32, 2), np.float32)},
              str(path))
    return path


def test_evaluate_dir_with_the_builds_lora(project):
    """Images built with `--lora` are today's plan only when eval is given the same `--lora`."""
    lora = str(_tiny_lora(project / "style.safetensors"))
    out = _write_outputs(project, compile_scene(project / "pair.yaml", lora=[f"{lora}:0.5"]))
    assert not evaluate_dir(out, weights=(1, 0), lora=[f"{lora}:0.5"])["warnings"]
    assert any("another plan" in w and "--lora" in w for w in evaluate_dir(out, weights=(1, 0))["warnings"])
    r = subprocess.run([sys.executable, "-m", "scenec", "eval", str(out), "--clip", "none", "--weights", "1,0",
                        "--json", "--lora", f"{lora}:0.5"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    plan = compile_scene(project / "pair.yaml", lora=[f"{lora}:0.5"])
    plan.write(project / "plan")
    rep = evaluate_dir(out, plan_dirs=[project / "plan"], weights=(1, 0), lora=[f"{lora}:0.5"])
    assert any("not to the --plan directories" in w for w in rep["warnings"])


def test_evaluate_dir_errors(tmp_path):
    with pytest.raises(EvalError, match="no built images"):
        evaluate_dir(tmp_path)
    (tmp_path / "x.json").write_text(json.dumps({"scenec:job": "j", "scenec:scene": "ghost", "image": "x.png"}))
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(EvalError, match="--scene"):
        evaluate_dir(tmp_path)


def test_cli_eval_table_and_json(project):
    plan = compile_scene(project / "pair.yaml")
    out = _write_outputs(project, plan)
    r = subprocess.run([sys.executable, "-m", "scenec", "eval", str(out), "--clip", "none", "--weights", "1,0",
                        "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["groups"][0]["bgsim"] == pytest.approx(-(1 - _joint().mean()) * (DELTA / 255) ** 2)
    r = subprocess.run([sys.executable, "-m", "scenec", "eval", str(out), "--clip", "none", "--weights", "1,0"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert "BgSim" in r.stdout and "pair" in r.stdout
    r = subprocess.run([sys.executable, "-m", "scenec", "eval", str(out), "--weights", "x"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--weights" in r.stderr


def test_a_plan_that_is_no_plan_is_bad_input(project, tmp_path):
    # --plan DIR without plan.json, or with damaged tensors, exited 1 ("a model is missing or a build failed");
    # damaged tensors were an "internal error"
    plan = compile_scene(project / "pair.yaml")
    out = _write_outputs(project, plan)
    with pytest.raises(EvalError, match=r"--plan .*nope: no plan.json") as e:
        evaluate_dir(out, plan_dirs=[tmp_path / "nope"])
    assert e.value.exit_code == 2
    bad = tmp_path / "bad"
    write_plan(plan, bad)
    (bad / "tensors.safetensors").write_bytes(b"garbage")
    r = subprocess.run([sys.executable, "-m", "scenec", "eval", str(out), "--clip", "none", "--plan", str(bad)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "not a readable safetensors file" in r.stderr and "internal error" not in r.stderr, \
        r.stderr


def test_a_missing_clip_model_is_no_error_at_weight_zero(project, monkeypatch):
    # docs: "a term whose weight is 0 may be missing"; `--weights 1,0` without the default CLIP downloaded
    # exited 1 ("CLIP model … is not available here")
    import scenec.eval as ev

    def missing(spec, device=None):
        raise EvalError(f"CLIP model `{spec}` is not available here (OSError)", exit_code=1)

    monkeypatch.setattr(ev, "load_clip", missing)
    plan = compile_scene(project / "pair.yaml")
    out = _write_outputs(project, plan)
    rep = evaluate_dir(out, clip="openai/clip-vit-large-patch14", weights=(1.0, 0.0))
    assert rep["groups"][0]["clipscore"] is None and rep["groups"][0]["bgsim"] is not None
    assert any("CLIPScore left out" in w for w in rep["warnings"])
    with pytest.raises(EvalError, match="not available") as e:  # it counts: still an error
        evaluate_dir(out, clip="openai/clip-vit-large-patch14", weights=(1.0, 1.0))
    assert e.value.exit_code == 1


def test_a_damaged_image_is_skipped_with_a_warning(project):
    # a PNG that does not decode was an "internal error" (exit 1) that hid every other group's numbers
    plan = compile_scene(project / "pair.yaml")
    out = _write_outputs(project, plan)
    victim = sorted(out.glob("*.png"))[0]
    victim.write_bytes(b"not a png")
    rep = evaluate_dir(out)
    assert any(w.startswith(f"{victim.name}: not a readable image") for w in rep["warnings"]), rep["warnings"]
    assert rep["groups"][0]["images"] == len(list(out.glob("*.png"))) - 1


def test_a_damaged_sidecar_is_a_warning_not_silence(project):
    # its image was left out of the numbers without a word
    plan = compile_scene(project / "pair.yaml")
    out = _write_outputs(project, plan)
    side = sorted(out.glob("*.json"))[0]
    side.write_text("{broken")
    rep = evaluate_dir(out)
    assert f"{side.name}: sidecar does not parse; {side.stem}.png skipped" in rep["warnings"], rep["warnings"]
