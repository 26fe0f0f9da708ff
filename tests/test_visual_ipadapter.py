"""`visual.mode: ip-adapter` on SD and SDXL: IP-Adapter weights in diffusers' checkpoint format (tiny ones
written here from diffusers' own ImageProjection / IPAdapterPlusImageProjection), loaded by the
visual-prompt method. With a whole-canvas region the UNet's output equals diffusers' own IP-Adapter path
(``load_ip_adapter`` + ``image_embeds``; SDXL's added conditions beside them) on both guidance branches;
with a region it acts only there; scale 0 is the scene without it. Flux: test_visual_ipadapter_flux.py."""

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from scenec.compiler import compile_scene
from scenec.compiler.check import validate_file
from scenec.runtime.methods.visual import VisualPrompts
from scenec.runtime.sampler import Run, run_job
from scenec.runtime.testing import tiny_sd_backend
from scenec.runtime.tiny import tiny_clip_vision

SCENE = """scenec: 1
model: tiny-sd
canvas: {{width: 128, height: 128}}
sampler: {{steps: 3, seed: 2}}
background: {{prompt: "a meadow"}}
entities:
  - id: fox
    prompt: "a red fox"
{shape}{visual}"""


def plus_checkpoint_names(state: dict) -> dict:
    """diffusers' IPAdapterPlusImageProjection state → the original Plus checkpoint's names (the inverse of
    ``UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers``' Plus branch: one `to_kv`, the
    resampler layers' `0.norm1`/`0.norm2`, `1.0`/`1.1`/`1.3` for the feed-forward)."""
    import re

    out = {}
    for k, v in state.items():
        m = re.match(r"layers\.(\d)\.(.*)", k)
        if m is None:
            out[k] = v
            continue
        i, rest = m.groups()
        if rest.startswith("attn.to_v"):
            continue
        if rest.startswith("attn.to_k"):
            out[f"layers.{i}.0.to_kv.weight"] = torch.cat([v, state[f"layers.{i}.attn.to_v.weight"]])
            continue
        for a, b in (("ln0", "0.norm1"), ("ln1", "0.norm2"), ("attn.to_q", "0.to_q"), ("attn.to_out.0", "0.to_out"),
                     ("ff.0", "1.0"), ("ff.1.net.0.proj", "1.1"), ("ff.1.net.2", "1.3")):
            if rest.startswith(a + "."):
                out[f"layers.{i}.{b}{rest[len(a):]}"] = v
                break
        else:
            raise AssertionError(k)
    return out


def write_ip_adapter(d, unet, seed=3, plus=False):
    """An IP-Adapter for this UNet (4 tokens, as diffusers reads `image_proj.proj.weight` checkpoints; or an
    IP-Adapter Plus: a Perceiver resampler over the encoder's grid, 4 layers of 64-wide heads as diffusers
    builds it), in the checkpoint format (`image_proj.*`, `ip_adapter.<2k+1>.to_{k,v}_ip.weight`), with its
    image encoder beside it as h94/IP-Adapter lays them out."""
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    enc, proc = tiny_clip_vision(projection=True)
    dim = unet.config.cross_attention_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if plus:
            proj = IPAdapterPlusImageProjection(embed_dims=enc.config.hidden_size, output_dims=dim, hidden_dims=64,
                                                heads=1, num_queries=4)
            state = {f"image_proj.{k}": v.contiguous() for k, v in plus_checkpoint_names(proj.state_dict()).items()}
        else:
            proj = ImageProjection(image_embed_dim=enc.config.projection_dim, cross_attention_dim=dim,
                                   num_image_text_embeds=4)
            # the checkpoint names ImageProjection's `image_embeds` layer `proj` (diffusers renames it on loading)
            state = {f"image_proj.{k.replace('image_embeds', 'proj')}": v.contiguous()
                     for k, v in proj.state_dict().items()}
    mods = dict(unet.named_modules())
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            inner = mods[name[: -len(".processor")]].to_k.out_features
            for kv in ("to_k_ip", "to_v_ip"):
                state[f"ip_adapter.{key}.{kv}.weight"] = torch.randn(inner, dim, generator=g) * 0.5
            key += 2
    save_file(state, str(d / "ip.safetensors"))
    enc.save_pretrained(d / "image_encoder", safe_serialization=True)
    proc.save_pretrained(d / "image_encoder")
    return enc, proc


def compile_(d, shape="", scale=0.6, visual=True, model="tiny-sd"):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(d / "obj.png")
    vis = "" if not visual else \
        f"    visual: {{image: obj.png, mode: ip-adapter, adapter: ip.safetensors, scale: {scale}}}\n"
    (d / "s.yaml").write_text(SCENE.format(shape=shape, visual=vis).replace("tiny-sd", model), encoding="utf-8")
    return compile_scene(d / "s.yaml")


def unet_setup(model):
    """(backend, a fresh copy of its pipeline's components, the pipeline class, the UNet's extra inputs for
    a batch of two: SDXL's pooled vector and size micro-conditioning)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from scenec.runtime.tiny_sd import build_tiny_sd
    from scenec.runtime.tiny_sdxl import build_tiny_sdxl

    if model == "tiny-sd":
        return tiny_sd_backend(), build_tiny_sd(), StableDiffusionPipeline, {}
    g = torch.Generator().manual_seed(1)
    added = {"text_embeds": torch.randn(2, 32, generator=g),
             "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]]).repeat(2, 1)}
    return sdxl_backend(), build_tiny_sdxl(), StableDiffusionXLPipeline, added


@functools.lru_cache(maxsize=None)
def sdxl_backend():
    from scenec.runtime.families import load_backend

    return load_backend("tiny-sdxl", device="cpu", dtype="fp32")


@pytest.mark.parametrize("model,plus", [("tiny-sd", False), ("tiny-sdxl", False), ("tiny-sd", True),
                                        ("tiny-sdxl", True)])
def test_whole_canvas_equals_diffusers_ip_adapter(tmp_path, model, plus):
    be, comps, pipeline, added = unet_setup(model)
    enc, proc = write_ip_adapter(tmp_path, be.unet, plus=plus)
    plan = compile_(tmp_path, model=model)
    (vp,) = plan.jobs[0].visuals
    assert vp.mode == "ip-adapter" and all((plan.mask(vp.masks, g) == 1).all() for g in vp.masks)  # whole canvas
    run = Run(be, [(plan, plan.jobs[0])])
    run.setup()
    method = next(m for m in run.methods if isinstance(m, VisualPrompts))

    pipe = pipeline(**{**comps, "image_encoder": enc, "feature_extractor": proc})
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip.safetensors", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.6)
    image = Image.fromarray(plan.tensor(vp.image))
    embeds = pipe.prepare_ip_adapter_image_embeds(image, None, torch.device("cpu"), 1, True)  # [neg; pos]

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 77, be.unet.config.cross_attention_dim, generator=g)
    t = torch.tensor(501)
    with torch.no_grad():
        ref = pipe.unet(x, t, encoder_hidden_states=text, added_cond_kwargs={**added, "image_embeds": embeds}).sample
        # scenec's UNet keeps its own processors and takes no image_embeds: the method attends itself
        plain = be.unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
        be.attn.set(method.modifiers(SimpleNamespace(level=0, negatives=[True, False])))
        try:
            ours = be.unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
        finally:
            be.attn.clear()
    assert float((ref - plain).abs().max()) > 1e-3  # the adapter does something
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_region_and_scale_zero(tmp_path, model):
    be = unet_setup(model)[0]
    write_ip_adapter(tmp_path, be.unet)
    box = "    shape: {box: [0.0, 0.0, 0.5, 0.5]}\n"
    bare = compile_(tmp_path, box, visual=False, model=model)
    plain = run_job(be, bare, bare.jobs[0], decode=False).latents
    zero = compile_(tmp_path, box, scale=0, model=model)
    assert torch.equal(run_job(be, zero, zero.jobs[0], decode=False).latents, plain)
    on = compile_(tmp_path, box, scale=1.0, model=model)
    be.attn.probe = []
    try:
        x = run_job(be, on, on.jobs[0], decode=False).latents
        recs = [r for r in be.attn.probe if r["kind"] == "extra-decoupled"]
    finally:
        be.attn.probe = None
    assert float((x - plain).abs().max()) > 1e-3 and recs
    fox = on.jobs[0].entities[0]
    for r in recs:
        grid = next(gn for gn, (h, w) in on.doc.grids.items() if h * w == r["n_q"])
        inside = torch.from_numpy(on.mask(fox.masks, grid).reshape(-1) > 0)
        assert torch.all(r["gain"][~inside] == 0) and torch.all(r["gain"][inside] == 1.0)


@pytest.mark.parametrize("model,error", [("tiny", "is an SD/SDXL IP-Adapter (h94"),
                                         ("sd15", "no `image_encoder` directory"),
                                         ("sdxl", "no `image_encoder` directory")])
def test_ip_adapter_refused_where_it_cannot_run(tmp_path, model, error):
    be = tiny_sd_backend()
    write_ip_adapter(tmp_path, be.unet)
    import shutil

    shutil.rmtree(tmp_path / "image_encoder")
    compile_(tmp_path, visual=False)
    text = (tmp_path / "s.yaml").read_text().replace("tiny-sd", model)
    (tmp_path / "s.yaml").write_text(text + "    visual: {image: obj.png, mode: ip-adapter, adapter: ip.safetensors}\n")
    _, diags = validate_file(tmp_path / "s.yaml")
    assert any(d.pos.line == 9 and error in d.message for d in diags if d.severity == "error"), \
        [d.message for d in diags]
