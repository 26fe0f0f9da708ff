"""ControlNet conditions on the tiny Flux (``control``, diffusers' ``FluxControlNetModel``): with no entities a job
reproduces ``FluxControlNetPipeline`` with the same ControlNet (several: ``FluxMultiControlNetModel``; a Union one
with its ``control_mode``; true CFG); the built-in ControlNet reads its image; scale 0 is the scene without it,
byte for byte; the window limits the steps; entities keep acting; a ControlNet for the other kind of model is one
located error (validate) and one sentence (run time), never a traceback inside diffusers."""

import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from scenec.compiler import compile_scene
from scenec.compiler.check import validate_file
from scenec.runtime.families import load_backend
from scenec.runtime.methods.control import load_controlnet
from scenec.runtime.methods.control_flux import tiny_flux_controlnet
from scenec.runtime.sampler import run_job

SCENE = """scenec: 1
model: {model}
canvas: {{width: 128, height: 128}}
sampler: {{steps: 3, seed: 7{cfg}}}
background: {{prompt: "a lighthouse on a cliff"{negative}}}
{entities}{control}"""
FOX = """entities:
  - id: fox
    prompt: "a red fox"
    shape: {box: [0.1, 0.4, 0.5, 0.9]}
"""
PROMPT = "a lighthouse on a cliff"


@pytest.fixture(scope="module")
def be():
    return load_backend("tiny", device="cpu", dtype="fp32")


def edges(path, step=9):
    a = np.zeros((128, 128, 3), np.uint8)
    a[::step] = 255
    a[:, 40:44] = 255
    Image.fromarray(a).save(path)


def control(scale=1.0, window="[1.0, 0.0]", image="edges.png", extra=""):
    return f"  - {{image: {image}, scale: {scale}, window: {window}{extra}}}\n"


def scene(tmp_path, name, controls=(), entities="", model="tiny", true_cfg=None):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    edges(d / "edges.png")
    edges(d / "dense.png", step=4)
    cfg = f", true_cfg: {true_cfg}" if true_cfg else ""
    neg = ', negative: "blurry"' if true_cfg else ""
    text = SCENE.format(model=model, cfg=cfg, negative=neg, entities=entities,
                        control="control:\n" + "".join(controls) if controls else "")
    (d / "s.yaml").write_text(text, encoding="utf-8")
    return d / "s.yaml"


BUILT: dict = {}  # scenes several tests build (their images are the same bytes): run once


def build(be, path):
    text = path.read_text(encoding="utf-8")
    if text not in BUILT or "model:" in text.split("control:")[-1]:  # a local ControlNet: its weights vary
        plan = compile_scene(path)
        BUILT[text] = plan, run_job(be, plan, plan.jobs[0], decode=False).latents
    return BUILT[text]


def save(net, path):
    net.save_pretrained(path, safe_serialization=True)
    return path


def other_net(be, seed=1, **config):
    """A second tiny Flux ControlNet: the built-in's weights, its output layers drawn again (and ``config``)."""
    from diffusers import FluxControlNetModel

    base = tiny_flux_controlnet(be.transformer)
    torch.manual_seed(seed)
    cfg = {k: v for k, v in base.config.items() if not k.startswith("_")}
    net = FluxControlNetModel.from_config({**cfg, **config})
    net.load_state_dict(base.state_dict(), strict=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*net.controlnet_blocks.parameters(), *net.controlnet_single_blocks.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def pipeline(be, plan, net, images, scale, **kw):
    """FluxControlNetPipeline on the backend's components, from scenec's own initial noise, its VAE encoding the
    control image by its mode (scenec's deterministic encoding; the pipeline samples with the generator)."""
    import diffusers.pipelines.flux.pipeline_flux_controlnet as pfc
    from diffusers import FluxControlNetPipeline

    p = be.pipe
    pipe = FluxControlNetPipeline(p.scheduler, p.vae, p.text_encoder, p.tokenizer, p.text_encoder_2, p.tokenizer_2,
                                  p.transformer, net)
    pipe.set_progress_bar_config(disable=True)
    latents, _ = be.prepare_latents(plan, 7)
    orig = pfc.retrieve_latents
    with mock.patch.object(pfc, "retrieve_latents", lambda e, generator=None: orig(e, generator, "argmax")):
        return pipe(PROMPT, control_image=images, height=128, width=128, num_inference_steps=3,
                    guidance_scale=plan.sampler.guidance, controlnet_conditioning_scale=scale, latents=latents,
                    generator=torch.Generator().manual_seed(7), output_type="latent",
                    max_sequence_length=plan.model.max_sequence_length or 512, **kw).images


def test_no_entities_reproduces_the_flux_controlnet_pipeline(tmp_path, be):
    plan, ours = build(be, scene(tmp_path, "c", [control(0.7)]))
    net = load_controlnet(be, None)
    ref = pipeline(be, plan, net, Image.open(tmp_path / "c" / "edges.png"), 0.7)
    assert float((ours - ref).abs().max()) <= 1e-5
    _, plain = build(be, scene(tmp_path, "p"))
    assert float((ours - plain).abs().max()) > 1e-2  # the control acts


def test_the_tiny_flux_controlnet_reads_its_image(tmp_path, be):
    """Its zero-initialised layers are seeded: two control images give two images, so the comparison with the
    pipeline checks the image's encoding too."""
    _, a = build(be, scene(tmp_path, "a", [control()]))
    _, b = build(be, scene(tmp_path, "b", [control(image="dense.png")]))
    assert float((a - b).abs().max()) > 1e-2


def test_scale_zero_window_and_entities(tmp_path, be):
    _, plain = build(be, scene(tmp_path, "plain"))
    _, zero = build(be, scene(tmp_path, "zero", [control(0.0)]))
    assert torch.equal(zero, plain)  # byte for byte
    plan, late = build(be, scene(tmp_path, "late", [control(1.0, "[0.5, 0.0]")]))
    assert plan.jobs[0].controls[0].window[0] > 0
    _, full = build(be, scene(tmp_path, "full", [control(1.0)]))
    assert float((late - plain).abs().max()) > 1e-3 and float((late - full).abs().max()) > 1e-3
    _, fox = build(be, scene(tmp_path, "fox", entities=FOX))
    _, fox_c = build(be, scene(tmp_path, "fox_c", [control(1.0)], entities=FOX))
    # the tiny Flux's entities act weakly (fox vs plain: max |Δ| 7e-3), and keep acting with the control
    assert float((fox_c - fox).abs().max()) > 1e-2 and float((fox_c - full).abs().max()) > 1e-3


def test_several_controls_equal_the_multi_controlnet(tmp_path, be):
    from diffusers import FluxMultiControlNetModel

    path = scene(tmp_path, "multi", [control(0.6), control(0.9, image="dense.png", extra=", model: cn")])
    save(other_net(be), tmp_path / "multi" / "cn")
    plan, ours = build(be, path)
    nets = [load_controlnet(be, c.model) for c in plan.jobs[0].controls]
    images = [Image.open(tmp_path / "multi" / n) for n in ("edges.png", "dense.png")]
    ref = pipeline(be, plan, FluxMultiControlNetModel(nets), images, [0.6, 0.9])
    assert float((ours - ref).abs().max()) <= 1e-5


def test_true_cfg_reuses_the_positive_residuals_as_the_pipeline(tmp_path, be):
    plan, ours = build(be, scene(tmp_path, "cfg", [control(0.7)], true_cfg=2.0))
    ref = pipeline(be, plan, load_controlnet(be, None), Image.open(tmp_path / "cfg" / "edges.png"), 0.7,
                   negative_prompt="blurry", true_cfg_scale=2.0)
    assert float((ours - ref).abs().max()) <= 1e-5


def test_a_union_controlnet_reads_its_mode(tmp_path, be):
    union = other_net(be, seed=2, num_mode=4)
    path = scene(tmp_path, "u", [control(0.7, extra=", model: cn, mode: 2")])
    save(union, tmp_path / "u" / "cn")
    plan, ours = build(be, path)
    ref = pipeline(be, plan, load_controlnet(be, plan.jobs[0].controls[0].model),
                   Image.open(tmp_path / "u" / "edges.png"), 0.7, control_mode=2)
    assert float((ours - ref).abs().max()) <= 1e-5
    path = scene(tmp_path, "u", [control(0.7, extra=", model: cn, mode: 0")])
    _, mode0 = build(be, path)
    assert float((ours - mode0).abs().max()) > 1e-3  # the mode acts
    # a Union ControlNet without `mode`, a mode it lacks, `mode` on a ControlNet without modes: located
    save(other_net(be), tmp_path / "u" / "plain")
    path.write_text(path.read_text().replace("  - {image: edges.png, scale: 0.7, window: [1.0, 0.0], model: cn, "
                                             "mode: 0}\n", control(extra=", model: cn") + control(extra=", model: cn, "
                                             "mode: 4") + control(extra=", model: plain, mode: 1")
                                             + control(extra=", mode: 1")))
    _, diags = validate_file(path)
    errs = sorted((d.pos.line, d.pos.col, d.message) for d in diags if d.severity == "error")
    assert [line for line, _, _ in errs] == [7, 8, 9, 10], errs
    assert "needs `mode`: its control type, 0..3" in errs[0][2] and "(got 4)" in errs[1][2]
    assert "this one is not" in errs[2][2] and "this one is not" in errs[3][2]


def test_an_xlabs_controlnet_reads_pixels_through_its_hint_block(tmp_path, be):
    """XLabs' kind (``conditioning_embedding_channels``: a convolutional hint block on the [-1, 1] pixels, residuals
    repeated over the transformer's blocks) equals the pipeline too; mixed with the other kind, one sentence."""
    from scenec.spec.errors import ModelUnavailable

    net = other_net(be, seed=3, conditioning_embedding_channels=16, patch_size=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.input_hint_block.parameters():  # its last convolution is zero-initialised
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = scene(tmp_path, "x", [control(0.7, extra=", model: cn")])
    save(net, tmp_path / "x" / "cn")
    plan, ours = build(be, path)
    ref = pipeline(be, plan, load_controlnet(be, plan.jobs[0].controls[0].model),
                   Image.open(tmp_path / "x" / "edges.png"), 0.7)
    assert float((ours - ref).abs().max()) <= 1e-5
    _, plain = build(be, scene(tmp_path, "plain"))
    assert float((ours - plain).abs().max()) > 1e-2
    path = scene(tmp_path, "x", [control(0.7, extra=", model: cn"), control()])
    _, diags = validate_file(path)
    errs = [d for d in diags if d.severity == "error"]
    assert len(errs) == 1 and errs[0].pos.line == 8 and "1 dual- and 1 single-stream residuals, control[0]'s 1 " \
        "dual- and 1 single-stream residuals (XLabs' kind, repeated)" in errs[0].message, errs
    from scenec.runtime.methods.control_flux import check_together

    with pytest.raises(ModelUnavailable, match="cannot be combined: .*XLabs, repeated.*must match"):
        check_together([net, load_controlnet(be, None)], ["cn", "(built-in)"])  # the runtime's own: one sentence


def test_a_controlnet_for_the_other_kind_of_model_is_one_error(tmp_path, be):
    from scenec.runtime.methods.control import tiny_controlnet
    from scenec.runtime.tiny_sd import build_tiny_sd
    from scenec.spec.errors import ModelUnavailable

    # an SD ControlNet on Flux: located by validate (exit 2, no traceback), one sentence at run time
    path = scene(tmp_path, "sd_on_flux", [control(extra=", model: cn")])
    save(tiny_controlnet(build_tiny_sd()["unet"]), tmp_path / "sd_on_flux" / "cn")
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", str(path)], capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out and "s.yaml:7:" in out, out
    assert "is a ControlNetModel; `tiny` needs a FluxControlNetModel" in out
    with pytest.raises(ModelUnavailable, match="is not for tiny: it is a ControlNetModel"):
        load_controlnet(be, str(tmp_path / "sd_on_flux" / "cn"))
    # a Flux ControlNet on SD, and `mode` on SD
    path = scene(tmp_path, "flux_on_sd", [control(extra=", model: cn, mode: 1")], model="tiny-sd")
    save(tiny_flux_controlnet(be.transformer), tmp_path / "flux_on_sd" / "cn")
    _, diags = validate_file(path)
    errs = sorted((d.pos.line, d.message) for d in diags if d.severity == "error")
    assert len(errs) == 2 and "is a FluxControlNetModel; `tiny-sd` needs a ControlNetModel" in errs[0][1] + \
        errs[1][1] and "SD and SDXL ControlNets have none" in errs[0][1] + errs[1][1], errs
    # a Flux ControlNet of another width: one sentence at run time
    from diffusers import FluxControlNetModel

    wide = FluxControlNetModel(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                               guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    save(wide, tmp_path / "wide")
    with pytest.raises(ModelUnavailable, match="is not for tiny: its hidden width is 16, the transformer's 32"):
        load_controlnet(be, str(tmp_path / "wide"))


def test_a_coupling_group_shares_its_prefix_with_a_control(tmp_path, be):
    """The ControlNet reads the global slot (the background prompt while θ < 1) and the same image in every
    variant: a group's shared θ = 0 prefix stays exact with a control (shared = each variant run alone)."""
    from test_runtime_coupled import SCENE as COUPLED
    from test_runtime_coupled import compile_text, run

    (tmp_path / "scene").mkdir()
    edges(tmp_path / "scene" / "edges.png")
    text = COUPLED.format(steps=4, seeds=1, schedule="{values: [0, 0, 0.5, 1]}")
    plan = compile_text(tmp_path, text + "control:\n" + control(0.8))
    assert plan.json["groups"][0]["shared_prefix"] == 2 and plan.jobs[0].controls
    shared, alone = run(be, plan, share=True), run(be, plan, share=False)
    assert all(torch.equal(shared[k].latents, alone[k].latents) for k in alone)
    (tmp_path / "plain").mkdir()
    plain = run(be, compile_text(tmp_path, text, "plain"))
    assert all(float((plain[k.replace("scene-", "plain-")].latents - alone[k].latents).abs().max()) > 1e-2
               for k in alone)  # the control acts in every variant


def test_a_16_bit_control_image_is_scaled_not_clipped(tmp_path):
    """A depth map saved as a 16-bit grayscale PNG (Pillow's ``I;16``) is the 8-bit image it scales to (v / 257);
    Pillow's ``convert("RGB")`` clipped it at 255, so nearly every pixel became white."""
    path = scene(tmp_path, "d16", [control(image="depth16.png")])
    ramp = np.tile(np.linspace(0, 255, 128).round().astype(np.uint16), (128, 1))
    Image.fromarray(ramp * 257).save(path.parent / "depth16.png")
    assert Image.open(path.parent / "depth16.png").mode.startswith("I")
    got = compile_scene(path).tensor("control/0/image")
    Image.fromarray(ramp.astype(np.uint8)).save(path.parent / "edges.png")  # the same depth map in 8 bits
    path.write_text(path.read_text().replace("depth16.png", "edges.png"))
    want = compile_scene(path).tensor("control/0/image")
    assert np.array_equal(np.asarray(got), np.asarray(want)) and int(np.asarray(got).max()) == 255


def test_a_tiled_decode_before_leaves_the_control_encoding_alone(tmp_path, be, monkeypatch):
    """A canvas above 1024² px decodes with the VAE tiled; the flag stayed on, so the next plan's control image (wider
    than the tiny VAE's 256 px tile) was VAE-encoded tiled: its image depended on what the process built before.
    (The threshold lowered here so that a small decode tiles: a real 1024² one takes half a minute on a CPU.)"""
    from scenec.runtime import memory

    d = tmp_path / "tile"
    d.mkdir()
    a = np.zeros((256, 384, 3), np.uint8)
    a[::9] = 255
    a[:, 40:44] = 255
    Image.fromarray(a).save(d / "edges.png")
    text = SCENE.format(model="tiny", cfg="", negative="", entities="", control="control:\n" + control())
    (d / "s.yaml").write_text(text.replace("{width: 128, height: 128}", "{width: 384, height: 256}"))
    plan = compile_scene(d / "s.yaml")
    alone = run_job(be, plan, plan.jobs[0], decode=False).latents
    monkeypatch.setattr(memory, "TILE_ABOVE", 256 * 256)
    be.decode(alone, plan)  # tiled
    assert torch.equal(run_job(be, plan, plan.jobs[0], decode=False).latents, alone)


def test_a_window_ending_before_the_first_step_that_runs_is_a_warning(tmp_path):
    """With `background.strength` only the last steps run, with references seeded (`init: seed`) the steps from
    their window on: a control whose window ends before them does nothing (the image is the scene without it),
    which `validate` says at the window; one reaching them is fine."""
    d = tmp_path / "i2i"
    d.mkdir()
    edges(d / "edges.png")
    for window, warned in (("[1.0, 0.7]", True), ("[1.0, 0.0]", False)):
        text = SCENE.format(model="tiny", cfg="", negative=", image: edges.png, strength: 0.5", entities="",
                            control="control:\n" + control(window=window))
        (d / "s.yaml").write_text(text)
        _, diags = validate_file(d / "s.yaml")
        warns = [(x.pos.line, x.message) for x in diags if x.severity == "warning" and "control window" in x.message]
        errs = [x for x in diags if x.severity == "error"]
        assert not errs and bool(warns) == warned, (window, warns, errs)
        if warned:
            assert warns[0][0] == 7 and "`background.strength: 0.5` runs the last 1 of 3" in warns[0][1], warns

    # references cycling from the seed (init: seed) start the image at their window: the steps before never run
    ref = FOX + "    reference: {image: edges.png, window: [0.75, 0.5], cycles: 1}\n"
    for window, warned in (("[1.0, 0.8]", True), ("[1.0, 0.6]", False)):
        (d / "s.yaml").write_text(SCENE.format(model="tiny", cfg="", negative="", entities=ref,
                                               control="control:\n" + control(window=window)))
        _, diags = validate_file(d / "s.yaml")
        warns = [x.message for x in diags if x.severity == "warning" and "control window" in x.message]
        assert bool(warns) == warned and not [x for x in diags if x.severity == "error"], (window, warns)
        assert not warned or "the references' seed initialisation starts at step 1 of 3" in warns[0], warns
