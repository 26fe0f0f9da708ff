"""A whole-image LoRA's text-encoder layers on SD and SDXL, as diffusers' ``load_lora_weights`` + ``fuse_lora``
applies them (and A1111 does): kohya's ``lora_te_`` (SD) and ``lora_te1_``/``lora_te2_`` (SDXL) names with the
UNet's. The text cache does not leak LoRA'd encodings into later runs; entity LoRAs and Flux leave them out
with a warning; plans of LoRAs without them keep their hashes."""

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from scenec.runtime.families import load_backend
from scenec.runtime.sampler import run_job
from scenec.runtime.testing import lora_entry, lora_layers, sd_plan, tiny_sd_backend, with_lora

STEPS = 2


def kohya(name: str, pairs: dict, prefix: str, alpha=None) -> dict:
    """kohya keys for ``pairs`` (module → (A, B)) under ``prefix`` (``lora_unet``, ``lora_te``, ``lora_te1``…)."""
    out = {}
    for m, (a, b) in pairs.items():
        k = f"{prefix}_" + m.replace(".", "_")
        out[k + ".lora_down.weight"], out[k + ".lora_up.weight"] = a, b
        out[k + ".alpha"] = np.asarray(a.shape[0] if alpha is None else alpha, np.float32)
    return out


def te_pairs(encoder, layer: int, seed: int, std: float = 0.4) -> dict:
    mods = [n for n, m in encoder.named_modules() if isinstance(m, torch.nn.Linear) and f"layers.{layer}." in n]
    return lora_layers(encoder, mods, seed=seed, std=std)


def unet_pairs(unet, seed: int) -> dict:
    mods = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)
            and n.startswith("down_blocks.1.attentions.0.")][:6]
    return lora_layers(unet, mods, seed=seed)


def latents(be, plan):
    return run_job(be, plan, plan.jobs[0], decode=False).latents


def xl(edit=None):
    def to_xl(d, t):
        d["model"] = {**d["model"], "spec": "tiny-sdxl", "family": "sdxl"}
        if edit:
            edit(d, t)
    return to_xl


def reference(family: str, path, scale: float, plan):
    """Latents of ``plan`` on a fresh tiny pipeline after diffusers' load_lora_weights + fuse_lora (UNet and
    text encoders), no LoRA of scenec's taking part."""
    if family == "sd":
        from diffusers import StableDiffusionPipeline

        from scenec.runtime.families.sd import SDBackend as cls
        from scenec.runtime.tiny_sd import build_tiny_sd as build

        pipe = StableDiffusionPipeline(**build(dtype=torch.float32, device=torch.device("cpu")))
    else:
        from diffusers import StableDiffusionXLPipeline

        from scenec.runtime.families.sdxl import SDXLBackend as cls
        from scenec.runtime.tiny_sdxl import build_tiny_sdxl as build

        pipe = StableDiffusionXLPipeline(**build(dtype=torch.float32, device=torch.device("cpu")))
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=scale)
    return latents(cls(pipe, f"tiny-{family}", torch.device("cpu"), torch.float32), plan)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_text_encoder_layers_match_diffusers_load_lora_weights(tmp_path, family):
    be = tiny_sd_backend() if family == "sd" else load_backend("tiny-sdxl", device="cpu", dtype="fp32")
    sd = kohya("u", unet_pairs(be.denoiser, 1), "lora_unet")
    if family == "sd":
        sd.update(kohya("t", te_pairs(be.pipe.text_encoder, 0, 2), "lora_te", alpha=2.0))  # scale α/r = 0.5
    else:
        sd.update(kohya("t", te_pairs(be.pipe.text_encoder, 0, 2), "lora_te1"))
        sd.update(kohya("t", te_pairs(be.pipe.text_encoder_2, 1, 3), "lora_te2"))
    path = tmp_path / "te.safetensors"
    save_file(sd, str(path))
    with_te = {**lora_entry(path, 0.8, "kohya"), "text_encoder": True}
    unet_only = lora_entry(path, 0.8, "kohya")
    edit = (lambda f: f) if family == "sd" else xl
    plain = latents(be, sd_plan(steps=STEPS, prompt="a red fox", edit=edit(None)))
    ours = latents(be, sd_plan(steps=STEPS, prompt="a red fox", edit=edit(lambda d, t: with_lora(d, [with_te]))))
    ref = reference(family, path, 0.8, sd_plan(steps=STEPS, prompt="a red fox", edit=edit(None)))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=5e-5)  # fused weights round differently
    without = latents(be, sd_plan(steps=STEPS, prompt="a red fox", edit=edit(lambda d, t: with_lora(d, [unet_only]))))
    assert (ours - without).abs().max() > 1e-3  # the text layers act
    # the text cache kept no encoding made under the LoRA: the plain job is what it was
    assert torch.equal(latents(be, sd_plan(steps=STEPS, prompt="a red fox", edit=edit(None))), plain)


SCENE = """scenec: 1
model: tiny-sd
canvas: {{width: 128, height: 128}}
background: {{prompt: "a meadow"}}
{model_lora}entities:
  - id: fox
    prompt: "a red fox"
    shape: {{box: [0.1, 0.4, 0.5, 0.9]}}
{entity_lora}"""


def test_the_compiler_asks_for_text_layers_only_where_they_act(tmp_path):
    from scenec.compiler import compile_scene
    from scenec.compiler.check import validate_file

    be = tiny_sd_backend()
    sd = kohya("u", unet_pairs(be.denoiser, 1), "lora_unet")
    save_file(sd, str(tmp_path / "unet.safetensors"))
    sd.update(kohya("t", te_pairs(be.pipe.text_encoder, 0, 2), "lora_te"))
    save_file(sd, str(tmp_path / "te.safetensors"))
    whole = "model: {id: tiny-sd, lora: [{file: te.safetensors}]}\n"
    p = tmp_path / "s.yaml"
    p.write_text(SCENE.format(model_lora=whole, entity_lora="").replace("model: tiny-sd\n", ""))
    plan = compile_scene(p)
    assert plan.json["model"]["lora"][0]["text_encoder"] is True
    _, diags = validate_file(p)
    assert not [d for d in diags if "text-encoder" in d.message]
    p.write_text(SCENE.format(model_lora="", entity_lora="    lora: [{file: te.safetensors}]\n"))
    _, diags = validate_file(p)
    warn = [d for d in diags if "text-encoder" in d.message]
    assert len(warn) == 1 and warn[0].severity == "warning" and "entity's LoRA" in warn[0].message
    assert "text_encoder" not in compile_scene(p).json["jobs"][0]["entities"][0]["lora"][0]
    p.write_text(SCENE.format(model_lora=whole.replace("te.safetensors", "unet.safetensors"), entity_lora="")
                 .replace("model: tiny-sd\n", ""))
    assert "text_encoder" not in compile_scene(p).json["model"]["lora"][0]  # its plan and hash as before


def test_a_lora_with_only_text_encoder_layers(tmp_path):
    """A LoRA with text-encoder layers only acts through them as a whole-image LoRA (diffusers loads it too);
    as an entity's LoRA nothing of it would act: a located error, not a failure at run time."""
    from scenec.compiler import compile_scene
    from scenec.compiler.check import validate_file

    be = tiny_sd_backend()
    path = tmp_path / "te.safetensors"
    save_file(kohya("t", te_pairs(be.pipe.text_encoder, 0, 2), "lora_te"), str(path))
    entry = {**lora_entry(path, 0.8, "kohya"), "text_encoder": True}
    ours = latents(be, sd_plan(steps=STEPS, prompt="a red fox", edit=lambda d, t: with_lora(d, [entry])))
    ref = reference("sd", path, 0.8, sd_plan(steps=STEPS, prompt="a red fox"))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=5e-5)
    assert (ours - latents(be, sd_plan(steps=STEPS, prompt="a red fox"))).abs().max() > 1e-3
    p = tmp_path / "s.yaml"
    p.write_text(SCENE.format(model_lora="", entity_lora="    lora: [{file: te.safetensors}]\n"))
    _, diags = validate_file(p)
    errs = [d for d in diags if d.severity == "error"]
    assert len(errs) == 1 and errs[0].pos.line == 9 and "only text-encoder layers" in errs[0].message
    whole = "model: {id: tiny-sd, lora: [{file: te.safetensors}]}\n"
    p.write_text(SCENE.format(model_lora=whole, entity_lora="").replace("model: tiny-sd\n", ""))
    assert compile_scene(p).json["model"]["lora"][0]["text_encoder"] is True


def test_show_says_when_a_loras_text_encoder_layers_acted(tmp_path):
    """The image's metadata marks a LoRA whose text-encoder layers acted (absent otherwise: other images keep
    their bytes), and `scenec show` says so."""
    import json

    from scenec.rebuild import describe
    from scenec.runtime.outputs import metadata

    be = tiny_sd_backend()
    path = tmp_path / "te.safetensors"
    save_file(kohya("t", te_pairs(be.pipe.text_encoder, 0, 2), "lora_te"), str(path))
    for te in (True, False):
        entry = {**lora_entry(path, 0.8, "kohya"), **({"text_encoder": True} if te else {})}
        plan = sd_plan(steps=STEPS, prompt="a red fox", edit=lambda d, t: with_lora(d, [entry]))
        meta = metadata(plan, plan.jobs[0], be)
        assert ("text_encoder" in json.loads(meta["scenec:loras"])[0]) is te
        assert ("text encoders too" in describe("x.png", meta)) is te
