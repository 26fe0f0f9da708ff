"""LoRAs at run time on the tiny models, against diffusers' own LoRA loading and against exact invariants.

- A LoRA at scale 0, global or per entity, is the model's own computation: byte-identical latents.
- A global LoRA gives the latents diffusers gives after ``load_lora_weights`` + ``fuse_lora`` (Flux in
  diffusers', xlabs' and kohya's naming, SD in kohya's, SDXL in diffusers'). Where diffusers' kohya-Flux
  converter drops a layer (the top-level `img_in`), scenec applies it as the same LoRA in diffusers' naming.
- A LoRA in DiffSynth-Studio's naming (EliGen's) maps to the very layers and deltas of the same LoRA in
  diffusers' naming: identical latents.
- An entity's LoRA changes, at the first layers (Flux: the image and text embedders, whose outputs enter
  the first block; SD and SDXL: the first attention's input projection), exactly the rows of its region's
  image tokens and of its prompt's tokens; every other row is byte-identical to the base model's. Covering the
  whole canvas, it equals the global LoRA on layers that see image tokens only; covering nothing, it is
  no LoRA there.
"""

import pytest
import torch

from scenec.runtime.methods.lora import Lora
from scenec.runtime.sampler import run_job
from scenec.runtime.testing import (
    box,
    lora_entry,
    lora_file,
    lora_layers,
    make_plan,
    sd_plan,
    tiny_backend,
    tiny_sd_backend,
    with_lora,
)

STEPS = 2
FOX = box((16, 16), 2, 2, 9, 9)


def linears(denoiser, *prefixes):
    return [n for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefixes)]


def latents(backend, plan):
    return run_job(backend, plan, plan.jobs[0].id, decode=False).latents


def plan_with(entries, entity=None, entities=None, steps=STEPS):
    return make_plan(steps=steps, entities=entities, edit=lambda d, t: with_lora(d, entries, entity))


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux-lora")
    be = tiny_backend()
    mods = linears(be.denoiser, "transformer_blocks.0.", "single_transformer_blocks.0.", "x_embedder",
                   "context_embedder", "proj_out", "norm_out.")
    layers = lora_layers(be.denoiser, mods)
    lora_file(layers, d / "diffusers.safetensors")
    lora_file(layers, d / "diffsynth.safetensors", naming="diffsynth")
    image_only = [n for n in linears(be.denoiser, "transformer_blocks.0.attn.to_", "transformer_blocks.0.ff.",
                                     "x_embedder") if be.token_kind(n) == "image"]
    assert len(image_only) == 7
    lora_file(lora_layers(be.denoiser, image_only, seed=1), d / "image-only.safetensors")
    lora_file(lora_layers(be.denoiser, ["x_embedder", "context_embedder"], seed=2), d / "embedders.safetensors")
    return d


def test_scale_zero_is_no_lora(flux_files):
    be = tiny_backend()
    base = latents(be, make_plan(steps=STEPS))
    zero = latents(be, plan_with([lora_entry(flux_files / "diffusers.safetensors", 0.0)]))
    assert torch.equal(base, zero)
    ents = [{"id": "fox", "prompt": "a red fox", "token": FOX}]
    base_e = latents(be, make_plan(steps=STEPS, entities=ents))
    zero_e = latents(be, plan_with([lora_entry(flux_files / "diffusers.safetensors", 0.0)], "fox", ents))
    assert torch.equal(base_e, zero_e)
    assert not [h for m in be.denoiser.modules() for h in m._forward_hooks.values()]  # nothing left behind


def test_global_lora_matches_diffusers_fuse_on_flux(flux_files):
    from diffusers import FluxPipeline

    from scenec.runtime.families.flux import FluxBackend
    from scenec.runtime.tiny import build_tiny_flux

    be = tiny_backend()
    base = latents(be, make_plan(steps=STEPS))
    ours = latents(be, plan_with([lora_entry(flux_files / "diffusers.safetensors", 0.7)]))
    pipe = FluxPipeline(**build_tiny_flux(dtype=torch.float32, device="cpu").components())
    pipe.load_lora_weights(str(flux_files / "diffusers.safetensors"))
    pipe.fuse_lora(lora_scale=0.7)
    ref = latents(FluxBackend(pipe, "tiny", torch.device("cpu"), torch.float32), make_plan(steps=STEPS))
    assert (ours - base).abs().max() > 0.1  # the LoRA does something
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5)


def test_diffsynth_naming_maps_to_the_same_lora(flux_files):
    be = tiny_backend()
    from scenec.runtime.lora import read_adapter
    from scenec.spec.plan import Lora as PlanLora

    a = read_adapter(PlanLora(**lora_entry(flux_files / "diffusers.safetensors")), be)
    b = read_adapter(PlanLora(**lora_entry(flux_files / "diffsynth.safetensors", fmt="diffsynth")), be)
    assert a.layers.keys() == b.layers.keys() and len(a.layers) > 20
    x = torch.randn(3, 64)
    mods = dict(be.denoiser.named_modules())
    for name in a.layers:
        m = mods[name]
        xi = torch.randn(3, m.in_features) if m.in_features != 64 else x
        assert torch.equal(a.layers[name].delta(m, xi), b.layers[name].delta(m, xi)), name
    ours = latents(be, plan_with([lora_entry(flux_files / "diffusers.safetensors", 0.5)]))
    ds = latents(be, plan_with([lora_entry(flux_files / "diffsynth.safetensors", 0.5, "diffsynth")]))
    assert torch.equal(ours, ds)


class Inputs:
    """Captures what the first transformer block receives (the embedders' outputs: image and text rows)."""

    def __init__(self, be):
        self.got = []
        self.h = be.denoiser.transformer_blocks[0].register_forward_pre_hook(self.pre, with_kwargs=True)

    def pre(self, module, args, kwargs):
        self.got.append((kwargs["hidden_states"].clone(), kwargs["encoder_hidden_states"].clone()))

    def close(self):
        self.h.remove()


def test_entity_lora_acts_on_its_tokens_only(flux_files):
    be = tiny_backend()
    ents = [{"id": "fox", "prompt": "a red fox", "token": FOX}, {"id": "cat", "prompt": "a cat sitting",
                                                                  "token": box((16, 16), 10, 10, 16, 16)}]
    runs = {}
    for key, entries in (("base", []), ("fox", [lora_entry(flux_files / "embedders.safetensors", 0.8)])):
        cap = Inputs(be)
        try:
            latents(be, plan_with(entries, "fox", ents, steps=1) if entries else make_plan(steps=1, entities=ents))
        finally:
            cap.close()
        runs[key] = cap.got[0]
    (img0, txt0), (img1, txt1) = runs["base"], runs["fox"]
    inside = torch.from_numpy(FOX.reshape(-1) > 0)
    changed_img = (img1 != img0).any(-1)[0]
    assert changed_img[inside].all() and not changed_img[~inside].any()
    # text: [global prompt | fox's prompt | cat's prompt | padding]; only the fox's rows change
    changed_txt = (txt1 != txt0).any(-1)[0]
    rows = changed_txt.nonzero().flatten().tolist()
    assert rows and rows == list(range(rows[0], rows[-1] + 1))  # one contiguous run: the fox's prompt
    assert rows[0] > 0 and changed_txt.sum() < changed_txt.numel() // 2


def test_entity_lora_whole_canvas_equals_global_on_image_layers(flux_files):
    be = tiny_backend()
    f = flux_files / "image-only.safetensors"
    whole = [{"id": "fox", "prompt": "a red fox", "token": box((16, 16), 0, 0, 16, 16)}]
    glob = latents(be, make_plan(steps=STEPS, entities=whole, edit=lambda d, t: with_lora(d, [lora_entry(f, 0.6)])))
    ent = latents(be, plan_with([lora_entry(f, 0.6)], "fox", whole))
    torch.testing.assert_close(ent, glob, rtol=0, atol=1e-6)
    nothing = [{"id": "fox", "prompt": "a red fox", "token": box((16, 16), 0, 0, 0, 0)}]
    base = latents(be, make_plan(steps=STEPS, entities=nothing))
    assert torch.equal(latents(be, plan_with([lora_entry(f, 0.6)], "fox", nothing)), base)


def _unet_reference(family: str, path, scale: float, plan):
    """Latents of ``plan`` on a fresh tiny UNet pipeline with diffusers' load_lora_weights + fuse_lora."""
    if family == "sd":
        from diffusers import StableDiffusionPipeline

        from scenec.runtime.families.sd import SDBackend
        from scenec.runtime.tiny_sd import build_tiny_sd

        pipe = StableDiffusionPipeline(**build_tiny_sd(dtype=torch.float32, device=torch.device("cpu")))
        cls = SDBackend
    else:
        from diffusers import StableDiffusionXLPipeline

        from scenec.runtime.families.sdxl import SDXLBackend
        from scenec.runtime.tiny_sdxl import build_tiny_sdxl

        pipe = StableDiffusionXLPipeline(**build_tiny_sdxl(dtype=torch.float32, device=torch.device("cpu")))
        cls = SDXLBackend
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=scale)
    return latents(cls(pipe, f"tiny-{family}", torch.device("cpu"), torch.float32), plan)


def test_global_kohya_lora_matches_diffusers_fuse_on_sd(tmp_path):
    be = tiny_sd_backend()
    mods = linears(be.denoiser, "down_blocks.0.attentions.0.", "mid_block.attentions.0.")
    lora_file(lora_layers(be.denoiser, mods, seed=3), tmp_path / "kohya.safetensors", naming="kohya", alpha=2.0)
    entry = lora_entry(tmp_path / "kohya.safetensors", 0.9, "kohya")
    base = latents(be, sd_plan(steps=STEPS))
    ours = latents(be, _sd_with(entry))
    ref = _unet_reference("sd", tmp_path / "kohya.safetensors", 0.9, sd_plan(steps=STEPS))
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-5)  # fused weights round differently


def test_global_lora_matches_diffusers_fuse_on_sdxl(tmp_path):
    from scenec.runtime.families import load_backend

    be = load_backend("tiny-sdxl", device="cpu", dtype="fp32")
    mods = linears(be.denoiser, "down_blocks.1.attentions.0.", "add_embedding.")
    lora_file(lora_layers(be.denoiser, mods, seed=5), tmp_path / "xl.safetensors", prefix="unet")
    entry = lora_entry(tmp_path / "xl.safetensors", 1.2)

    def xl(edit=None):
        def to_xl(d, t):
            d["model"] = {**d["model"], "spec": "tiny-sdxl", "family": "sdxl"}
            if edit:
                edit(d, t)
        return sd_plan(steps=STEPS, edit=to_xl)

    base = latents(be, xl())
    ours = latents(be, xl(lambda d, t: with_lora(d, [entry])))
    ref = _unet_reference("sdxl", tmp_path / "xl.safetensors", 1.2, xl())
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-5)


def _sd_with(entry, entity=None, entities=None):
    return sd_plan(steps=STEPS, entities=entities, edit=lambda d, t: with_lora(d, [entry], entity))


def _unet_plan(family, steps=STEPS, entities=None, edit=None):
    def to(d, t):
        if family == "sdxl":
            d["model"] = {**d["model"], "spec": "tiny-sdxl", "family": "sdxl"}
        if edit:
            edit(d, t)
    return sd_plan(steps=steps, entities=entities, edit=to)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_unet_entity_lora_scale_zero_and_region(tmp_path, family):
    import numpy as np
    from safetensors.numpy import save_file

    from scenec.runtime.families import load_backend

    be = tiny_sd_backend() if family == "sd" else load_backend("tiny-sdxl", device="cpu", dtype="fp32")
    mods = linears(be.denoiser, "down_blocks.", "up_blocks.", "mid_block.")
    lora_file(lora_layers(be.denoiser, mods, seed=4), tmp_path / "sd.safetensors", prefix="unet")
    ents = [{"id": "fox", "prompt": "a red fox", "token": FOX}]
    base = latents(be, _unet_plan(family, entities=ents))

    def with_(entry, steps=STEPS):
        return _unet_plan(family, steps=steps, entities=ents, edit=lambda d, t: with_lora(d, [entry], "fox"))

    assert torch.equal(latents(be, with_(lora_entry(tmp_path / "sd.safetensors", 0.0))), base)
    on = latents(be, with_(lora_entry(tmp_path / "sd.safetensors", 1.0)))
    assert (on - base).abs().max() > 1e-3
    # a LoRA on the first attention's input projection (SD: a 1×1 convolution, SDXL: a linear layer): it
    # changes exactly the image rows of the fox's region (on that attention's grid) that the first
    # transformer block receives (SD: the latent grid; the tiny SDXL has no attention in its first down block)
    i = next(i for i, b in enumerate(be.denoiser.down_blocks) if getattr(b, "attentions", None))
    grid = "latent" if i == 0 else f"a{8 << i}"
    conv = dict(be.denoiser.named_modules())[f"down_blocks.{i}.attentions.0.proj_in"]
    rng = np.random.default_rng(6)
    lin = isinstance(conv, torch.nn.Linear)  # SDXL projects linearly
    a_shape = (2, conv.in_features) if lin else (2, conv.in_channels, 1, 1)
    b_shape = (conv.out_features, 2) if lin else (conv.out_channels, 2, 1, 1)
    save_file({f"unet.down_blocks.{i}.attentions.0.proj_in.lora_A.weight":
               rng.standard_normal(a_shape).astype(np.float32),
               f"unet.down_blocks.{i}.attentions.0.proj_in.lora_B.weight":
               rng.standard_normal(b_shape).astype(np.float32)},
              str(tmp_path / "conv.safetensors"))
    block = be.denoiser.down_blocks[i].attentions[0].transformer_blocks[0]
    got = []
    h = block.register_forward_pre_hook(lambda m, args, kw: got.append((args[0] if args else kw["hidden_states"])
                                                                      .clone()), with_kwargs=True)
    try:
        latents(be, _unet_plan(family, steps=1, entities=ents))
        latents(be, with_(lora_entry(tmp_path / "conv.safetensors", 1.0), steps=1))
    finally:
        h.remove()
    n = len(got) // 2
    plan = _unet_plan(family, steps=1, entities=ents)
    inside = torch.from_numpy(plan.tensors[f"region/fox/{grid}"].reshape(-1) > 0)
    for b0, b1 in zip(got[:n], got[n:]):
        changed = (b1 != b0).any(-1)
        assert changed[:, inside].all() and not changed[:, ~inside].any()


def test_lora_for_another_model_is_one_sentence(tmp_path):
    from scenec.runtime.lora import LoraError

    be = tiny_backend()
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.zeros((2, 3072), np.float32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": np.zeros((3072, 2), np.float32)},
              str(tmp_path / "big.safetensors"))
    with pytest.raises(LoraError, match=r"takes A \[2, 32\].*a LoRA for another model"):
        latents(be, plan_with([lora_entry(tmp_path / "big.safetensors", 1.0)]))
    assert Lora.name == "lora"


def _flux_reference(path, scale):
    from diffusers import FluxPipeline

    from scenec.runtime.families.flux import FluxBackend
    from scenec.runtime.tiny import build_tiny_flux

    pipe = FluxPipeline(**build_tiny_flux(dtype=torch.float32, device="cpu").components())
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=scale)
    return latents(FluxBackend(pipe, "tiny", torch.device("cpu"), torch.float32), make_plan(steps=STEPS))


def _save(path, pairs: dict, down="lora_down", up="lora_up", alpha=None):
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    sd = {}
    for key, (n_in, n_out) in pairs.items():
        sd[f"{key}.{down}.weight"] = (0.3 * rng.standard_normal((4, n_in))).astype(np.float32)
        sd[f"{key}.{up}.weight"] = (0.3 * rng.standard_normal((n_out, 4))).astype(np.float32)
        if alpha is not None:
            sd[f"{key}.alpha"] = np.asarray(alpha, np.float32)
    save_file(sd, str(path))


# the tiny Flux: width 32, MLP 128, 64 latent channels. Fused q|k|v layers are one file entry that diffusers
# splits: the split is part of what these tests check. (kohya's single-block `linear1`, q|k|v|MLP-in, is left
# out: diffusers' converter hard-codes FLUX.1's widths [3072, 3072, 3072, 12288] for it; `img_in` has its own
# test below.)
XLABS_KEYS = {"double_blocks.0.processor.qkv_lora1": (32, 96), "double_blocks.0.processor.proj_lora1": (32, 32),
              "double_blocks.1.processor.qkv_lora2": (32, 96), "double_blocks.1.processor.proj_lora2": (32, 32),
              "single_blocks.1.processor.qkv_lora": (32, 96), "single_blocks.1.processor.proj_lora": (160, 32)}
KOHYA_FLUX_KEYS = {"lora_unet_double_blocks_0_img_attn_qkv": (32, 96),
                   "lora_unet_double_blocks_1_txt_mlp_0": (32, 128),
                   "lora_unet_double_blocks_1_img_mod_lin": (32, 192),
                   "lora_unet_single_blocks_0_modulation_lin": (32, 96),
                   "lora_unet_single_blocks_0_linear2": (160, 32)}


@pytest.mark.parametrize("fmt", ["xlabs", "kohya"])
def test_global_flux_lora_in_xlabs_and_kohya_naming_matches_diffusers_fuse(tmp_path, fmt):
    from scenec.compiler.lora import inspect_file

    path = tmp_path / f"{fmt}.safetensors"
    if fmt == "xlabs":
        _save(path, XLABS_KEYS, down="down", up="up")
    else:
        _save(path, KOHYA_FLUX_KEYS, alpha=2.0)
    info = inspect_file(path)
    keys = XLABS_KEYS if fmt == "xlabs" else KOHYA_FLUX_KEYS
    assert (info.format, info.kind, info.layers, info.problems) == (fmt, "flux", len(keys), ())
    be = tiny_backend()
    base = latents(be, make_plan(steps=STEPS))
    ours = latents(be, plan_with([lora_entry(path, 0.8, fmt)]))
    assert (ours - base).abs().max() > 1e-2  # the LoRA does something
    torch.testing.assert_close(ours, _flux_reference(path, 0.8), rtol=1e-5, atol=2e-5)


def test_kohya_flux_img_in_is_applied_as_x_embedder(tmp_path):
    """diffusers' kohya converter names the top-level layers without the `transformer.` prefix, so
    ``load_lora_weights`` silently loads none of them (only a warning); scenec applies them: a kohya
    `img_in` LoRA is the same LoRA on `x_embedder` in diffusers' naming (alpha = rank: scale 1)."""
    from safetensors.torch import load_file, save_file

    _save(tmp_path / "k.safetensors", {"lora_unet_img_in": (64, 32)}, alpha=4.0)
    k = load_file(str(tmp_path / "k.safetensors"))
    save_file({"transformer.x_embedder.lora_A.weight": k["lora_unet_img_in.lora_down.weight"],
               "transformer.x_embedder.lora_B.weight": k["lora_unet_img_in.lora_up.weight"]},
              str(tmp_path / "d.safetensors"))
    be = tiny_backend()
    kohya = latents(be, plan_with([lora_entry(tmp_path / "k.safetensors", 0.8, "kohya")]))
    assert (kohya - latents(be, make_plan(steps=STEPS))).abs().max() > 1e-2
    assert torch.equal(kohya, latents(be, plan_with([lora_entry(tmp_path / "d.safetensors", 0.8)])))


def test_lora_copies_made_under_inference_mode_are_not_kept_for_gradients():
    """A caller's inference_mode (or any earlier run) must not leave a LoRA's device copies as inference
    tensors: visual.refine's backward saves them (the copies are per device and dtype, so fp32 → bf16)."""
    from scenec.runtime.lora import Layer

    layer = Layer(torch.randn(2, 8), torch.randn(8, 2), 0.5)
    lin = torch.nn.Linear(8, 8).to(torch.bfloat16)
    with torch.inference_mode():
        layer.delta(lin, torch.randn(3, 8, dtype=torch.bfloat16))
    x = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    layer.delta(lin, x).sum().backward()  # "Inference tensors cannot be saved for backward" before
    assert x.grad is not None and not layer.tensors(x)[0].is_inference()
