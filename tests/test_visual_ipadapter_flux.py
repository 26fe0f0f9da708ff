"""`visual.mode: ip-adapter` on Flux: XLabs' FLUX IP-Adapter key format (a tiny one written here from
diffusers' own ImageProjection for the tiny Flux), loaded by the visual-prompt method. With a whole-canvas
region the transformer's output equals diffusers' own path (``FluxPipeline.load_ip_adapter`` →
``FluxIPAdapterAttnProcessor`` on the dual-stream blocks, ``ip_adapter_image_embeds``) for the image and for
the all-black negative image; with a region only the region's image queries get the adapter's attention;
scale 0 is the scene without it; an SD adapter on Flux and a Flux one on SD are refused at the key."""

import numpy as np
import pytest
import torch
from PIL import Image

from scenec.compiler import compile_scene
from scenec.compiler.check import validate_file
from scenec.runtime.methods.visual import VisualPrompts
from scenec.runtime.sampler import Run, run_job
from scenec.runtime.testing import tiny_backend
from scenec.runtime.tiny import tiny_clip_vision

SCENE = """scenec: 1
model: tiny
canvas: {{width: 128, height: 128}}
sampler: {{steps: 3, seed: 2{cfg}}}
background: {{prompt: "a meadow"}}
entities:
  - id: fox
    prompt: "a red fox"
{shape}{visual}"""


def write_flux_ip_adapter(d, transformer, seed=5):
    """An XLabs-format FLUX IP-Adapter for this transformer (`ip_adapter_proj_model.*`: diffusers'
    ImageProjection with 4 tokens, as its Flux loader reads `proj.weight`; `double_blocks.<i>.processor.
    ip_adapter_double_stream_{k,v}_proj.{weight,bias}` per dual-stream block), its image encoder beside it."""
    from diffusers.models.embeddings import ImageProjection
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    enc, proc = tiny_clip_vision(projection=True)
    dim, inner = transformer.config.joint_attention_dim, transformer.inner_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proj = ImageProjection(image_embed_dim=enc.config.projection_dim, cross_attention_dim=dim,
                               num_image_text_embeds=4)
    state = {f"ip_adapter_proj_model.{k.replace('image_embeds', 'proj')}": v.contiguous()
             for k, v in proj.state_dict().items()}
    for i in range(len(transformer.transformer_blocks)):
        for kv in ("k", "v"):
            pre = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            state[f"{pre}.weight"] = torch.randn(inner, dim, generator=g) * 0.5
            state[f"{pre}.bias"] = torch.randn(inner, generator=g) * 0.5
    save_file(state, str(d / "ip.safetensors"))
    enc.save_pretrained(d / "image_encoder", safe_serialization=True)
    proc.save_pretrained(d / "image_encoder")
    return enc, proc


def compile_(d, shape="", scale=0.6, visual=True, cfg=""):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(d / "obj.png")
    vis = "" if not visual else \
        f"    visual: {{image: obj.png, mode: ip-adapter, adapter: ip.safetensors, scale: {scale}}}\n"
    (d / "s.yaml").write_text(SCENE.format(shape=shape, visual=vis, cfg=cfg), encoding="utf-8")
    return compile_scene(d / "s.yaml")


def forward(transformer, x, text, img_ids, **kw):
    return transformer(hidden_states=x, timestep=torch.tensor([0.6]), guidance=torch.tensor([3.5]),
                       pooled_projections=torch.ones(1, 32) * 0.1, encoder_hidden_states=text,
                       txt_ids=torch.zeros(text.shape[1], 3), img_ids=img_ids, return_dict=False, **kw)[0]


class _Call:
    def __init__(self, negative):
        self.level, self.negatives = 0, [negative]


def test_whole_canvas_equals_diffusers_flux_ip_adapter(tmp_path):
    from diffusers import FluxPipeline

    from scenec.runtime.tiny import build_tiny_flux

    be = tiny_backend()
    enc, proc = write_flux_ip_adapter(tmp_path, be.transformer)
    plan = compile_(tmp_path)
    (vp,) = plan.jobs[0].visuals
    assert vp.mode == "ip-adapter" and (plan.mask(vp.masks, "token") == 1).all()  # whole canvas
    run = Run(be, [(plan, plan.jobs[0])])
    run.setup()
    method = next(m for m in run.methods if isinstance(m, VisualPrompts))

    pipe = FluxPipeline(**build_tiny_flux().components(), image_encoder=enc, feature_extractor=proc)
    pipe.load_ip_adapter(str(tmp_path), weight_name="ip.safetensors",
                         image_encoder_pretrained_model_name_or_path=None)
    pipe.set_ip_adapter_scale(0.6)
    image = Image.fromarray(plan.tensor(vp.image))
    cpu = torch.device("cpu")
    embeds = pipe.prepare_ip_adapter_image_embeds(image, None, cpu, 1)
    # FluxPipeline's negative_ip_adapter_image when none is given: an all-black image of the canvas
    black = pipe.prepare_ip_adapter_image_embeds(np.zeros((128, 128, 3), dtype=np.uint8), None, cpu, 1)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 64, generator=g)
    text = torch.randn(1, 12, 32, generator=g)
    ids = pipe._prepare_latent_image_ids(1, 8, 8, cpu, torch.float32)
    for negative, emb in ((False, embeds), (True, black)):
        with torch.no_grad():
            ref = forward(pipe.transformer, x, text, ids, joint_attention_kwargs={"ip_adapter_image_embeds": emb})
            plain = forward(be.transformer, x, text, ids)
            be.attn.set(method.modifiers(_Call(negative)), n_img=x.shape[1])
            try:
                ours = forward(be.transformer, x, text, ids)
            finally:
                be.attn.clear()
        assert float((ref - plain).abs().max()) > 1e-3  # the adapter does something
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", ["", ", true_cfg: 2.0"])
def test_region_and_scale_zero(tmp_path, cfg):
    be = tiny_backend()
    write_flux_ip_adapter(tmp_path, be.transformer)
    box = "    shape: {box: [0.0, 0.0, 0.5, 0.5]}\n"
    bare = compile_(tmp_path, box, visual=False, cfg=cfg)
    plain = run_job(be, bare, bare.jobs[0], decode=False).latents
    zero = compile_(tmp_path, box, scale=0, cfg=cfg)
    assert torch.equal(run_job(be, zero, zero.jobs[0], decode=False).latents, plain)
    on = compile_(tmp_path, box, scale=1.0, cfg=cfg)
    be.attn.probe = []
    try:
        x = run_job(be, on, on.jobs[0], decode=False).latents
        recs = [r for r in be.attn.probe if r["kind"] == "extra-residual"]
    finally:
        be.attn.probe = None
    assert float((x - plain).abs().max()) > 1e-3
    # one record per dual-stream block and model call (two calls a step with true CFG), none elsewhere
    calls = 3 * (2 if cfg else 1)
    assert len(recs) == calls * len(be.transformer.transformer_blocks) and {r["site"] for r in recs} == {"double"}
    inside = torch.from_numpy(on.mask(on.jobs[0].entities[0].masks, "token").reshape(-1) > 0)
    assert 0 < int(inside.sum()) < inside.numel()
    for r in recs:
        assert torch.all(r["gain"][~inside] == 0) and torch.all(r["gain"][inside] == 1.0)


def test_outside_tokens_equal_no_adapter_in_the_first_block(tmp_path):
    """The first dual-stream block's image output outside the region is the block's output without the
    adapter, exactly; inside it differs (the adapter's attention joins the residual stream there only)."""
    be = tiny_backend()
    write_flux_ip_adapter(tmp_path, be.transformer)
    on = compile_(tmp_path, "    shape: {box: [0.0, 0.0, 0.5, 0.5]}\n", scale=1.0)
    run = Run(be, [(on, on.jobs[0])])
    run.setup()
    method = next(m for m in run.methods if isinstance(m, VisualPrompts))
    inside = torch.from_numpy(on.mask(on.jobs[0].entities[0].masks, "token").reshape(-1) > 0)
    block = be.transformer.transformer_blocks[0]
    g = torch.Generator().manual_seed(4)
    h, e, temb = (torch.randn(*s, generator=g) for s in ((1, 64, 32), (1, 12, 32), (1, 32)))
    ids = be.pipe._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)
    rope = be.transformer.pos_embed(torch.cat([torch.zeros(12, 3), ids]))
    outs = []
    for mods in ([], method.modifiers(_Call(False))):
        be.attn.set(mods, n_img=64)
        try:
            with torch.no_grad():
                outs.append(block(h, e, temb, image_rotary_emb=rope)[1])
        finally:
            be.attn.clear()
    base, with_ip = outs
    assert torch.equal(with_ip[:, ~inside], base[:, ~inside])
    assert float((with_ip[:, inside] - base[:, inside]).abs().min()) > 0


@pytest.mark.parametrize("model,writer,error", [
    ("tiny", "sd", "is an SD/SDXL IP-Adapter"), ("tiny-sd", "flux", "is a Flux IP-Adapter"),
    ("tiny-sdxl", "flux", "is a Flux IP-Adapter")])
def test_adapter_of_another_family_refused_at_the_key(tmp_path, model, writer, error):
    from safetensors.torch import save_file

    if writer == "flux":
        write_flux_ip_adapter(tmp_path, tiny_backend().transformer)
    else:  # the names of h94/IP-Adapter's SD checkpoints (the check reads the header only)
        save_file({"image_proj.proj.weight": torch.zeros(128, 32), "ip_adapter.1.to_k_ip.weight": torch.zeros(32, 32)},
                  str(tmp_path / "ip.safetensors"))
        tiny_clip_vision(projection=True)[0].save_pretrained(tmp_path / "image_encoder", safe_serialization=True)
    compile_(tmp_path, visual=False)
    text = (tmp_path / "s.yaml").read_text().replace("model: tiny", f"model: {model}")
    (tmp_path / "s.yaml").write_text(text + "    visual: {image: obj.png, mode: ip-adapter, adapter: ip.safetensors}\n")
    _, diags = validate_file(tmp_path / "s.yaml")
    errs = [d for d in diags if d.severity == "error"]
    assert any(d.pos.line == 9 and d.pos.col > 1 and error in d.message for d in errs), [d.message for d in errs]


@pytest.mark.parametrize("width", [32, 16])
def test_encoder_directory_may_be_a_whole_clip_model(tmp_path, width):
    """openai/clip-vit-large-patch14 (Flux IP-Adapter's encoder) is a whole CLIPModel directory: its vision
    tower and projection are what the adapter reads; an encoder of another width is a plan error."""
    import shutil

    from transformers import CLIPConfig, CLIPModel

    from scenec.spec.errors import PlanError

    be = tiny_backend()
    write_flux_ip_adapter(tmp_path, be.transformer)
    shutil.rmtree(tmp_path / "image_encoder")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)
        clip = CLIPModel(CLIPConfig(
            text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                             num_attention_heads=4),
            vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8), projection_dim=width)).eval()
    clip.save_pretrained(tmp_path / "image_encoder", safe_serialization=True)
    plan = compile_(tmp_path)
    run = Run(be, [(plan, plan.jobs[0])])
    if width != 32:
        with pytest.raises(PlanError, match="does not fit its image projection"):
            run.setup()
        return
    run.setup()
    (adapter, encoder, _, _), = [v for k, v in be.visual_models.items() if k[2] == str(tmp_path / "ip.safetensors")]
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = clip.get_image_features(pixel_values=x)
        torch.testing.assert_close(encoder(pixel_values=x).image_embeds, getattr(feats, "pooler_output", feats))


def test_kv_mixed_and_ip_adapter_prompts_in_one_image(tmp_path):
    """Two entities, one kv-mixed (the tiny built-in adapter: in the joint softmax of every block) and one
    IP-Adapter (handed to the dual-stream blocks): each acts in its own region."""
    be = tiny_backend()
    write_flux_ip_adapter(tmp_path, be.transformer)
    compile_(tmp_path, "    shape: {box: [0.0, 0.0, 0.5, 0.5]}\n", scale=1.0)
    owl = "  - id: owl\n    prompt: an owl\n    shape: {box: [0.5, 0.5, 1.0, 1.0]}\n    visual: {image: obj.png}\n"
    (tmp_path / "s.yaml").write_text((tmp_path / "s.yaml").read_text() + owl)
    plan = compile_scene(tmp_path / "s.yaml")
    be.attn.probe = []
    try:
        run_job(be, plan, plan.jobs[0], decode=False)
        recs = be.attn.probe
    finally:
        be.attn.probe = None
    fox, owl = (torch.from_numpy(plan.mask(e.masks, "token").reshape(-1) > 0) for e in plan.jobs[0].entities)
    residual = [r for r in recs if r["kind"] == "extra-residual"]
    joint = [r for r in recs if r["kind"] == "extra"]
    assert residual and joint and {r["site"] for r in joint} == {"double", "single"}
    for r in residual:
        assert torch.all(r["gain"][~fox] == 0) and torch.all(r["gain"][fox] == 1.0)
    for r in joint:  # the owl's tokens (the last 4 keys): weight only from the owl's image queries
        w = r["weights"][..., -4:].sum(-1)[0, 0]
        n_txt = r["n_q"] - owl.numel()
        assert torch.all(w[:n_txt] == 0) and torch.all(w[n_txt:][~owl] == 0) and torch.all(w[n_txt:][owl] > 0)
