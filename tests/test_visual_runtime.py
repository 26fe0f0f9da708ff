"""Object-level visual prompts (arXiv 2501.01424) on the tiny models: scale 0 is the scene without the
visual prompt byte for byte, the tokens reach only the image queries of their entity's region (probed
through the real processors), several entities each with their own, the window, and adapters loaded
from safetensors (the same bytes as the built-in tiny adapter give the same image)."""

import numpy as np
import pytest
import torch
from PIL import Image

from scenec.compiler import compile_scene
from scenec.runtime.attention import CROSS, Attention, ExtraKV, attend
from scenec.runtime.methods import visual as vis
from scenec.runtime.sampler import run_job
from scenec.runtime.testing import tiny_backend, tiny_sd_backend
from scenec.spec.errors import PlanError

SCENE = """scenec: 1
model: {model}
canvas: {{width: 128, height: 128}}
sampler: {{steps: 3, seed: 5}}
background: {{prompt: "a meadow"}}
entities:
  - id: fox
    prompt: "a red fox"
    shape: {{box: [0.0, 0.5, 0.5, 1.0]}}
{fox}  - id: cat
    prompt: "a cat"
    shape: {{box: [0.5, 0.0, 1.0, 0.5]}}
{cat}"""

def tiny_sdxl_backend(_cache={}):
    from scenec.runtime.families import load_backend

    if not _cache:
        _cache["be"] = load_backend("tiny-sdxl", device="cpu", dtype="fp32")
    return _cache["be"]


BACKENDS = {"tiny": tiny_backend, "tiny-sd": tiny_sd_backend, "tiny-sdxl": tiny_sdxl_backend}


def compile_(tmp_path, name, model="tiny", fox="", cat=""):
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / "fox.png")
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(d / "cat.png")
    (d / "s.yaml").write_text(SCENE.format(model=model, fox=fox, cat=cat), encoding="utf-8")
    return compile_scene(d / "s.yaml")


def latents(model, plan):
    return run_job(BACKENDS[model](), plan, plan.jobs[0], decode=False).latents


@pytest.mark.parametrize("model", ["tiny", "tiny-sd", "tiny-sdxl"])
def test_scale_zero_is_the_scene_without_the_visual_prompt(tmp_path, model):
    plain = latents(model, compile_(tmp_path, "plain", model))
    zero = latents(model, compile_(tmp_path, "zero", model, fox="    visual: {image: fox.png, scale: 0}\n"))
    assert torch.equal(zero, plain)  # byte for byte
    on = latents(model, compile_(tmp_path, "on", model, fox="    visual: {image: fox.png, scale: 1.0}\n"))
    assert float((on - plain).abs().max()) > 1e-3  # the visual prompt changes the image
    other = latents(model, compile_(tmp_path, "other", model, fox="    visual: {image: cat.png, scale: 1.0}\n"))
    assert float((on - other).abs().max()) > 1e-4  # and which image it is matters


def probe(model, plan):
    be = BACKENDS[model]()
    be.attn.probe = []
    try:
        run_job(be, plan, plan.jobs[0], decode=False)
        return be.attn.probe
    finally:
        be.attn.probe = None


def region_queries(plan, entity, n_img):
    """Bool [n_img]: the image tokens of the entity's region on the grid with n_img tokens."""
    e = next(e for e in plan.jobs[0].entities if e.id == entity)
    grid = next(g for g, (h, w) in plan.doc.grids.items() if h * w == n_img)
    return torch.from_numpy(plan.mask(e.masks, grid).reshape(-1) > 0)


def test_flux_visual_tokens_reach_only_their_regions_image_queries(tmp_path):
    """Joint attention with two entities' visual tokens: each column block is exactly 0 for every query
    outside its entity's region (text queries and the other entity's image tokens), > 0 inside."""
    plan = compile_(tmp_path, "two", fox="    visual: {image: fox.png, scale: 2.0}\n",
                    cat="    visual: {image: cat.png, scale: 0.5}\n")
    recs = [r for r in probe("tiny", plan) if r["kind"] == "extra"]
    assert len(recs) == 3 * 4  # every step, every block (2 double + 2 single)
    M = 4  # tokens per visual prompt (the tiny adapter)
    for r in recs:
        w, n_k, n_q = r["weights"], r["n_k"], r["n_q"]
        assert w.shape[-1] == n_k + 2 * M
        n_img = 64
        for j, ent in enumerate(("fox", "cat")):
            inside = torch.zeros(n_q, dtype=torch.bool)
            inside[n_q - n_img:] = region_queries(plan, ent, n_img)
            cols = w[..., n_k + j * M: n_k + (j + 1) * M]
            assert torch.all(cols[..., ~inside, :] == 0)
            assert torch.all(cols[..., inside, :].sum(-1) > 0)
        torch.testing.assert_close(r["out"], r["expected"], atol=1e-4, rtol=1e-4)


def test_sd_decoupled_cross_attention_is_zero_outside_the_region(tmp_path):
    plan = compile_(tmp_path, "sd", "tiny-sd", fox="    visual: {image: fox.png, scale: 0.75}\n",
                    cat="    visual: {image: cat.png, scale: 1.5}\n")
    recs = [r for r in probe("tiny-sd", plan) if r["kind"] == "extra-decoupled"]
    assert recs and {r["n_q"] for r in recs} <= {h * w for h, w in plan.doc.grids.values()}
    by_gain = {}
    for r in recs:
        g = r["gain"]
        assert set(torch.unique(g).tolist()) <= {0.0, 0.75, 1.5}
        by_gain.setdefault(float(g.max()), []).append(r)
        inside = region_queries(plan, "fox" if float(g.max()) == 0.75 else "cat", r["n_q"])
        assert torch.all(g[~inside] == 0) and torch.all(g[inside] > 0)
    assert set(by_gain) == {0.75, 1.5}  # both entities, each with its own scale


def test_decoupled_extra_tokens_are_ip_adapters_formula():
    g = torch.Generator().manual_seed(0)
    n_img, n_txt, m, d = 16, 5, 3, 8
    q = torch.randn(2, 2, n_img, d, generator=g)
    k, v = (torch.randn(2, 2, n_txt, d, generator=g) for _ in range(2))
    ek, ev = (torch.randn(2, 2, m, d, generator=g) for _ in range(2))
    visible = {n_img: torch.arange(n_img) % 3 == 0}
    extra = ExtraKV(None, None, visible, 0.6, frozenset({"cross"}), project=lambda mod: (ek, ev), decoupled=True)
    out = attend(Attention("sdpa"), CROSS, q, k, v, [extra])
    base = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, -1) @ v
    ip = torch.softmax(q @ ek.transpose(-1, -2) / d ** 0.5, -1) @ ev
    expected = base + 0.6 * visible[n_img].float()[None, None, :, None] * ip
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    kernel = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # outside: the call's own kernel, exactly
    torch.testing.assert_close(out[:, :, ~visible[n_img]], kernel[:, :, ~visible[n_img]], atol=0, rtol=0)


def test_window_limits_the_steps(tmp_path, monkeypatch):
    seen = []
    orig = vis.VisualPrompts.modifiers

    def spy(self, call):
        out = orig(self, call)
        seen.append((call.level, len(out)))
        return out

    monkeypatch.setattr(vis.VisualPrompts, "modifiers", spy)
    plan = compile_(tmp_path, "win", fox="    visual: {image: fox.png, window: [1.0, 0.5]}\n")
    w = plan.jobs[0].visuals[0].window
    assert 0 < w[1] < 3
    latents("tiny", plan)
    assert seen == [(s, 1 if s < w[1] else 0) for s in range(3)]


@pytest.mark.parametrize("model", ["tiny", "tiny-sd"])
def test_adapter_from_safetensors(tmp_path, model):
    """The tiny adapter and image encoder written to files and named by `adapter:` give the built-in's
    image byte for byte; an adapter changed after compiling fails the job."""
    from scenec.runtime.tiny import tiny_clip_vision

    be = BACKENDS[model]()
    denoiser = getattr(be, "transformer", None) or be.unet
    layers = vis.attention_layers(denoiser, {s.name for s in be.sites if s.text})
    enc, _ = tiny_clip_vision()
    d = tmp_path / "file"  # the scene's directory: adapters lie under the project root like every file
    d.mkdir()
    enc.save_pretrained(d / "encoder", safe_serialization=True)
    vis.save_adapter(vis.tiny_adapter(layers, enc.config.hidden_size), d / "a.safetensors", str(d / "encoder"))
    built_in = latents(model, compile_(tmp_path, "builtin", model, fox="    visual: {image: fox.png}\n"))
    plan = compile_(tmp_path, "file", model, fox="    visual: {image: fox.png, adapter: a.safetensors}\n")
    assert torch.equal(latents(model, plan), built_in)
    (d / "a.safetensors").write_bytes((d / "a.safetensors").read_bytes() + b" ")
    with pytest.raises(PlanError, match="changed since the plan was compiled"):
        latents(model, plan)


def test_adapter_for_another_model_is_refused(tmp_path):
    be = tiny_backend()
    layers = vis.attention_layers(be.transformer, {"double", "single"})
    first = dict(list(layers.items())[:1])
    d = tmp_path / "x"
    d.mkdir()
    vis.save_adapter(vis.tiny_adapter(first, 32), d / "a.safetensors", str(d))
    from scenec.spec.fsio import sha256_file

    with pytest.raises(PlanError, match="made for another model"):
        vis.load_adapter(str(d / "a.safetensors"), sha256_file(d / "a.safetensors"), layers)


def test_sd_negative_branch_sees_the_no_image_tokens_in_a_batched_call(tmp_path, monkeypatch):
    """After `until`, SD runs both guidance branches as one UNet call (equal text lengths, no mask): its
    negative row must get the no-image tokens, as IP-Adapter's unconditional branch (the positive's were
    reused there before)."""
    compile_(tmp_path, "cfg", "tiny-sd", fox="    negative: \"a blue dog\"\n    visual: {image: fox.png}\n",
             cat="    negative: \"a dog\"\n")
    scene = tmp_path / "cfg" / "s.yaml"  # after `until`, branches of equal text lengths fit one UNet call
    scene.write_text(scene.read_text().replace("sampler:", "attention: {until: 0.5}\nsampler:"))
    plan = compile_scene(scene)
    seen = []
    orig = vis.VisualPrompt.project

    def spy(self, negatives, module):
        seen.append(negatives)
        return orig(self, negatives, module)

    monkeypatch.setattr(vis.VisualPrompt, "project", spy)
    latents("tiny-sd", plan)
    assert (True, False) in seen  # the batched calls after `until` (regional steps run a branch at a time)
    assert set(seen) <= {(True, False), (False,), (True,)}
