"""ControlNet conditions (``control``, arXiv 2302.05543) on the tiny SD and SDXL models: with no entities a job
reproduces diffusers' ControlNet pipelines with the same ControlNet; scale 0 is the scene without it, byte for
byte; the window limits the steps; entities keep their regional prompts; located errors, exit 2; a changed
ControlNet rebuilds its images. (Flux: tests/test_controlnet_flux.py.)"""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from scenec.compiler import compile_scene
from scenec.compiler.check import validate_file
from scenec.runtime.families import load_backend
from scenec.runtime.methods.control import load_controlnet
from scenec.runtime.sampler import run_job

SCENE = """scenec: 1
model: {model}
canvas: {{width: 128, height: 128}}
sampler: {{steps: 3, seed: 7}}
background: {{prompt: "a lighthouse on a cliff", negative: "blurry"}}
{entities}{control}"""
FOX = """entities:
  - id: fox
    prompt: "a red fox"
    shape: {box: [0.1, 0.4, 0.5, 0.9]}
"""


@pytest.fixture(scope="module")
def backends():
    return {m: load_backend(m, device="cpu", dtype="fp32") for m in ("tiny-sd", "tiny-sdxl")}


def edges(path, size=(128, 128)):
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[::9] = 255
    a[:, 40:44] = 255
    Image.fromarray(a).save(path)


def build(tmp_path, backends, name, model="tiny-sd", control="", entities=""):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    edges(d / "edges.png")
    (d / "s.yaml").write_text(SCENE.format(model=model, control=control, entities=entities), encoding="utf-8")
    plan = compile_scene(d / "s.yaml")
    return plan, run_job(backends[model], plan, plan.jobs[0], decode=False).latents


def control(scale=1.0, window="[1.0, 0.0]"):
    return f"control:\n  - {{image: edges.png, scale: {scale}, window: {window}}}\n"


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_no_entities_reproduces_the_controlnet_pipeline(tmp_path, backends, model):
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    be = backends[model]
    _, ours = build(tmp_path, backends, "c", model, control(0.7))
    net = load_controlnet(be, None)
    p = be.pipe
    if model == "tiny-sd":
        pipe = StableDiffusionControlNetPipeline(p.vae, p.text_encoder, p.tokenizer, p.unet, net, p.scheduler,
                                                 None, None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLControlNetPipeline(p.vae, p.text_encoder, p.text_encoder_2, p.tokenizer,
                                                   p.tokenizer_2, p.unet, net, p.scheduler)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a lighthouse on a cliff", image=Image.open(tmp_path / "c" / "edges.png"), negative_prompt="blurry",
               height=128, width=128, num_inference_steps=3, guidance_scale=be_guidance(model),
               controlnet_conditioning_scale=0.7, generator=torch.Generator().manual_seed(7),
               output_type="latent").images
    assert float((ours - ref).abs().max()) <= 1e-5
    _, plain = build(tmp_path, backends, "p", model)
    assert float((ours - plain).abs().max()) > 1e-3  # the control acts


def sd_reference(be, net, scheduler, image, guidance: float):
    """diffusers' StableDiffusionControlNetPipeline on the scenes' prompt, negative, 3 steps, seed 7 and scale 0.7,
    with ``net`` and ``scheduler``: its final latents, the reference the SD tests compare with."""
    from diffusers import StableDiffusionControlNetPipeline

    p = be.pipe
    pipe = StableDiffusionControlNetPipeline(p.vae, p.text_encoder, p.tokenizer, p.unet, net, scheduler, None, None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe("a lighthouse on a cliff", image=Image.open(image), negative_prompt="blurry", height=128, width=128,
                num_inference_steps=3, guidance_scale=guidance, controlnet_conditioning_scale=0.7,
                generator=torch.Generator().manual_seed(7), output_type="latent").images


def be_guidance(model):
    from scenec.compiler.caps import ALIASES

    return ALIASES[model].guidance


def test_scale_zero_window_and_entities(tmp_path, backends):
    _, plain = build(tmp_path, backends, "plain")
    _, zero = build(tmp_path, backends, "zero", control=control(0.0))
    assert torch.equal(zero, plain)  # byte for byte
    plan, late = build(tmp_path, backends, "late", control=control(1.0, "[0.5, 0.0]"))
    assert plan.jobs[0].controls[0].window[0] > 0
    _, full = build(tmp_path, backends, "full", control=control(1.0))
    assert float((late - plain).abs().max()) > 1e-4 and float((full - plain).abs().max()) > 1e-4
    assert float((late - full).abs().max()) > 1e-4  # fewer steps, another image
    _, fox = build(tmp_path, backends, "fox", entities=FOX)
    _, fox_c = build(tmp_path, backends, "fox_c", control=control(1.0), entities=FOX)
    assert float((fox_c - fox).abs().max()) > 1e-3 and float((fox_c - full).abs().max()) > 1e-3


def test_errors_are_located(tmp_path):
    edges(tmp_path / "edges.png")
    p = tmp_path / "s.yaml"
    p.write_text(SCENE.format(model="tiny-sd", entities="", control="control:\n  - {image: nope.png, window: "
                              "[0.2, 0.5]}\n  - {image: edges.png, model: nowhere/none}\n  - {image: edges.png, "
                              "model: ./edges.png}\n"))
    _, diags = validate_file(p)
    errs = sorted((d.pos.line, d.message) for d in diags if d.severity == "error")
    assert [line for line, _ in errs] == [7, 7, 8, 9], errs
    assert "nope.png" in errs[0][1] + errs[1][1] and "higher noise level" in errs[0][1] + errs[1][1]
    assert "hf download nowhere/none" in errs[2][1] and "not a diffusers ControlNetModel" in errs[3][1]
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", str(p)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "s.yaml:8:" in r.stdout + r.stderr
    p.write_text(SCENE.format(model="flux-dev", entities="", control=control()))
    _, diags = validate_file(p)
    errs = [d for d in diags if d.severity == "error"]  # Flux runs it (tests/test_controlnet_flux.py): needs a model
    assert len(errs) == 1 and errs[0].pos.line == 7 and "FluxControlNetModel" in errs[0].message, errs
    p.write_text(SCENE.format(model="sd15", entities="", control=control()))
    _, diags = validate_file(p)
    assert any("needs `model`" in d.message for d in diags if d.severity == "error")


def test_a_local_controlnet_directory_is_loaded_and_in_the_cache_key(tmp_path, backends):
    from scenec.runtime.methods.control import tiny_controlnet

    be = backends["tiny-sd"]
    cn = tmp_path / "local" / "cn"
    tiny_controlnet(be.unet).save_pretrained(cn, safe_serialization=True)
    plan, ours = build(tmp_path, backends, "local", control=control(0.7).replace("edges.png,", "edges.png, model: cn,"))
    assert plan.jobs[0].controls[0].model == str(cn.resolve())
    _, builtin = build(tmp_path, backends, "builtin", control=control(0.7))
    torch.testing.assert_close(ours, builtin, rtol=0, atol=1e-6)  # the same weights, saved and loaded
    from scenec.build.keys import job_identity

    job = plan.json["jobs"][0]
    before = job_identity({}, job, "content")
    w = next(cn.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:-8] + bytes(8))  # the ControlNet's weights changed: its images rebuild
    assert job_identity({}, job, "content") != before


def test_a_controlnet_for_another_base_model_fails_in_one_sentence(tmp_path, backends):
    """An SDXL ControlNet on an SD model (was a TypeError inside diffusers' ControlNet forward)."""
    from scenec.runtime.methods.control import tiny_controlnet
    from scenec.spec.errors import ModelUnavailable

    cn = tmp_path / "xl" / "cn"
    tiny_controlnet(backends["tiny-sdxl"].unet).save_pretrained(cn, safe_serialization=True)
    with pytest.raises(ModelUnavailable, match="is not for tiny-sd: its text width"):
        build(tmp_path, backends, "xl", control=control().replace("edges.png,", "edges.png, model: cn,"))


def test_a_window_covering_no_step_is_a_warning(tmp_path):
    edges(tmp_path / "edges.png")
    p = tmp_path / "s.yaml"
    p.write_text(SCENE.format(model="tiny-sd", entities="", control=control(1.0, "[0.5, 0.45]")))
    _, diags = validate_file(p)
    warn = [d for d in diags if "covers no sampler step" in d.message]
    assert len(warn) == 1 and warn[0].severity == "warning" and warn[0].pos.line == 7


def test_a_hub_controlnet_from_the_cache_needs_safetensors(tmp_path, backends, monkeypatch):
    from scenec.runtime.methods.control import tiny_controlnet

    snap = tmp_path / "hub" / "models--org--cn" / "snapshots" / "abc"
    tiny_controlnet(backends["tiny-sd"].unet).save_pretrained(snap, safe_serialization=True)
    (tmp_path / "hub" / "models--org--cn" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--cn" / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    edges(tmp_path / "edges.png")
    p = tmp_path / "s.yaml"
    p.write_text(SCENE.format(model="tiny-sd", entities="", control=control().replace("edges.png,",
                                                                                      "edges.png, model: org/cn,")))
    _, diags = validate_file(p)
    assert not [d for d in diags if d.severity == "error"]
    for w in snap.glob("*.safetensors"):
        w.rename(w.with_suffix(".bin"))
    _, diags = validate_file(p)
    errs = [d for d in diags if d.severity == "error"]
    assert len(errs) == 1 and errs[0].pos.line == 7 and "no .safetensors" in errs[0].message


def test_a_pooled_condition_controlnet_runs_as_diffusers_guess_mode(tmp_path, backends):
    """A ControlNet with ``global_pool_conditions`` (e.g. lllyasviel's shuffle): diffusers' pipeline runs it in
    guess mode, on the conditional branch only (zeros on the unconditional one); so do we."""

    from scenec.runtime.methods.control import tiny_controlnet

    be = backends["tiny-sd"]
    net = tiny_controlnet(be.unet)
    net.register_to_config(global_pool_conditions=True)
    net.save_pretrained(tmp_path / "pool" / "cn", safe_serialization=True)
    plan, ours = build(tmp_path, backends, "pool", control=control(0.7).replace("edges.png,", "edges.png, model: cn,"))
    net = load_controlnet(be, plan.jobs[0].controls[0].model)
    ref = sd_reference(be, net, be.pipe.scheduler, tmp_path / "pool" / "edges.png", be_guidance("tiny-sd"))
    assert float((ours - ref).abs().max()) <= 1e-5


def test_the_tiny_controlnet_reads_its_image(tmp_path, backends):
    """The built-in ControlNet acts through its control image (its image encoder's last convolution is not left
    at zero), so the pipeline comparisons above check the image's preprocessing too."""
    _, ours = build(tmp_path, backends, "edges", control=control())
    d = tmp_path / "blank"
    d.mkdir()
    (d / "s.yaml").write_text(SCENE.format(model="tiny-sd", entities="", control=control()), encoding="utf-8")
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(d / "edges.png")
    plan = compile_scene(d / "s.yaml")
    blank = run_job(backends["tiny-sd"], plan, plan.jobs[0], decode=False).latents
    assert float((ours - blank).abs().max()) > 1e-2


def test_a_changed_controlnet_directory_is_read_again(tmp_path, backends):
    """A backend kept across builds (tune, the Python API) does not serve a ControlNet's old weights."""
    import os

    from scenec.runtime.methods.control import tiny_controlnet

    be = backends["tiny-sd"]
    cn = tmp_path / "cn"
    net = tiny_controlnet(be.unet)
    net.save_pretrained(cn, safe_serialization=True)
    first = load_controlnet(be, str(cn))
    with torch.no_grad():
        net.controlnet_mid_block.weight.mul_(2.0)
    net.save_pretrained(cn, safe_serialization=True)
    w = next(cn.glob("*.safetensors"))
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))  # a later mtime even on coarse clocks
    again = load_controlnet(be, str(cn))
    assert again is not first
    torch.testing.assert_close(again.controlnet_mid_block.weight, 2 * first.controlnet_mid_block.weight)
    assert load_controlnet(be, str(cn)) is again  # unchanged: kept


@pytest.mark.parametrize("kind", ["euler", "euler-karras"])
def test_a_control_with_an_euler_solver_reproduces_the_controlnet_pipeline(tmp_path, backends, kind):
    """The ControlNet reads the UNet's input, which Euler scales (``scale_model_input``) in diffusers' pipeline:
    scenec's VP latents are that input, so a control under `solver: euler` equals the pipeline with
    EulerDiscreteScheduler (the bound of tests/test_solvers_euler.py: float rounding of the σ conversion)."""
    from diffusers import EulerDiscreteScheduler

    be = backends["tiny-sd"]
    d = tmp_path / kind
    d.mkdir()
    edges(d / "edges.png")
    text = SCENE.format(model="tiny-sd", control=control(0.7), entities="")
    (d / "s.yaml").write_text(text.replace("seed: 7}", f"seed: 7, solver: {kind}}}"), encoding="utf-8")
    plan = compile_scene(d / "s.yaml")
    ours = run_job(be, plan, plan.jobs[0], decode=False).latents
    sched = EulerDiscreteScheduler.from_config(be.pipe.scheduler.config, use_karras_sigmas=kind == "euler-karras")
    ref = sd_reference(be, load_controlnet(be, None), sched, d / "edges.png", plan.sampler.guidance)
    err, top = float((ours - ref).abs().max()), float(ref.abs().max())
    assert err <= 5e-6 * top, (err, top)  # measured max |Δ| 3.1e-5 (euler), 3.6e-5 (karras)


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_under_offload_the_controlnet_is_offloaded_as_diffusers_does(tmp_path, offload):
    """``--offload``: the ControlNet is not put on the device for good (a Flux one is ~6.6 GB): under ``model`` it
    gets its own offload hook, released when the run ends; under ``sequential`` its weights stream from the CPU
    (diffusers' enable_model/sequential_cpu_offload do the same to a pipeline's ControlNet). Same latents."""
    be = load_backend("tiny-sd", device="cpu", dtype="fp32")  # its own: the method's net is cached per backend
    _, plain = build(tmp_path, {"tiny-sd": be}, "n", control=control())
    be.__dict__.pop("controlnets")
    be.memory = {**be.memory, "offload": offload}
    calls = []
    if offload == "model":
        import accelerate.hooks

        real = accelerate.hooks.UserCpuOffloadHook.offload
        accelerate.hooks.UserCpuOffloadHook.offload = lambda self: calls.append(1) or real(self)
    try:
        p, ours = build(tmp_path, {"tiny-sd": be}, "o", control=control())
        if offload == "model":  # released once, when sampling ends: before the decode (which is inside the run)
            assert calls == [1]
            real_decode = be.decode
            be.decode = lambda *a, **k: calls.append("decode") or real_decode(*a, **k)
            run_job(be, p, p.jobs[0])
            assert calls == [1, 1, "decode"], calls
    finally:
        if offload == "model":
            accelerate.hooks.UserCpuOffloadHook.offload = real
    net = load_controlnet(be, None)
    assert hasattr(net, "_hf_hook") and torch.equal(ours, plain)
    if offload == "model":
        assert net._scenec_offload is not None
    else:
        assert {p.device.type for p in net.parameters()} == {"meta"}  # the weights live in the CPU offload map


def test_the_default_window_covers_every_karras_step(tmp_path, backends):
    """Karras' σ spacing ends on timestep 0 twice (the last step starts at level 0, as the end does): the default
    window [1, 0] ended at the first of them, so the last step ran without the ControlNet (and img2img's last steps
    were warned about as uncontrolled). Every step is controlled, as in diffusers' pipeline."""
    from diffusers import DPMSolverMultistepScheduler

    from scenec.runtime.solvers import DPM_PINNED

    be = backends["tiny-sd"]
    d = tmp_path / "k"
    d.mkdir()
    edges(d / "edges.png")
    f = d / "s.yaml"
    f.write_text(SCENE.format(model="tiny-sd", control=control(0.7), entities="")
                 .replace("seed: 7}", "seed: 7, solver: dpm++2m-karras}"))
    plan = compile_scene(f)
    ours = run_job(be, plan, plan.jobs[0], decode=False).latents
    assert plan.jobs[0].controls[0].window == (0, 3), plan.jobs[0].controls[0].window
    sched = DPMSolverMultistepScheduler.from_config(be.pipe.scheduler.config, **DPM_PINNED, use_karras_sigmas=True)
    ref = sd_reference(be, load_controlnet(be, None), sched, tmp_path / "k" / "edges.png", be_guidance("tiny-sd"))
    assert float((ours - ref).abs().max()) <= 1e-5
    # img2img runs the last step only: the default window still controls it
    f.write_text(f.read_text().replace('negative: "blurry"', 'negative: "blurry", image: edges.png, strength: 0.6'))
    assert not [d for d in validate_file(f)[1] if "control window" in d.message]


def test_an_unknown_model_is_one_error_not_a_flux_controlnets_too(tmp_path):
    """A checkpoint path with a typo is one error at `model`; `control` said it "needs `model`: a diffusers
    FluxControlNetModel" as the stand-in flux-dev would, for what may be an SD file."""
    edges(tmp_path / "edges.png")
    p = tmp_path / "s.yaml"
    p.write_text(SCENE.format(model="models/typo.safetensors", entities="", control=control()))
    _, d = validate_file(p)
    assert [(x.pos.line, x.pos.col) for x in d.errors] == [(2, 8)], [x.format() for x in d.errors]
