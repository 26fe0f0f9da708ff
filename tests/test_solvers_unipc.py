"""`sampler.solver: unipc | unipc-karras` on SD/SDXL: UniPC (arXiv 2302.04867, UniP-2 predictor + UniC corrector,
bh2) as diffusers' UniPCMultistepScheduler, the scheduler diffusers' ControlNet docs sample with. The compiler's
levels are its timesteps; with no entities a job reproduces the pipelines with it; multistep: no references, a
group's θ = 0 prefix not shared (the images equal sharing off)."""

import numpy as np
import pytest
import torch
from test_solvers import CFG, GROUP, with_solver, write  # the tests directory is on sys.path (pytest rootdir)

from scenec.compiler import compile_scene
from scenec.compiler.check import validate_file
from scenec.compiler.solvers import dpm_timesteps
from scenec.runtime.families import load_backend
from scenec.runtime.sampler import run_group, run_job
from scenec.runtime.testing import sd_plan

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' own


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("karras", [False, True])
def test_compiler_timesteps_are_unipcs(spacing, karras):
    from diffusers import DDIMScheduler, UniPCMultistepScheduler

    base = DDIMScheduler(**{**CFG, "timestep_spacing": spacing})
    for n in (1, 2, 3, 4, 7, 10, 20, 28, 50):
        s = UniPCMultistepScheduler.from_config(base.config, use_karras_sigmas=karras)
        s.set_timesteps(n)
        assert np.array_equal(dpm_timesteps(n, {**CFG, "timestep_spacing": spacing}, karras), s.timesteps.numpy()), n


@pytest.fixture(scope="module")
def sd():
    return load_backend("tiny-sd", device="cpu", dtype="fp32")


@pytest.mark.parametrize("kind", ["unipc", "unipc-karras"])
def test_no_entities_reproduces_the_sd_pipeline_with_unipc(sd, kind):
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

    from scenec.runtime.tiny_sd import build_tiny_sd

    plan = sd_plan(prompt="a meadow at sunset", negative="blurry", seed=11, steps=6, edit=with_solver(kind))
    ours = run_job(sd, plan, plan.jobs[0], decode=False).latents
    pipe = StableDiffusionPipeline(**build_tiny_sd())
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=kind != "unipc")
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a meadow at sunset", negative_prompt="blurry", height=256, width=256, num_inference_steps=6,
               guidance_scale=7.5, generator=torch.Generator().manual_seed(11), output_type="latent").images
    assert torch.equal(ours, ref)  # bit for bit
    dpm = sd_plan(prompt="a meadow at sunset", negative="blurry", seed=11, steps=6, edit=with_solver("dpm++2m"))
    assert float((run_job(sd, dpm, dpm.jobs[0], decode=False).latents - ours).abs().max()) > 1e-4  # not DPM's


def test_no_entities_reproduces_the_sdxl_pipeline_with_unipc():
    from diffusers import StableDiffusionXLPipeline, UniPCMultistepScheduler

    sdxl = load_backend("tiny-sdxl", device="cpu", dtype="fp32")
    p = StableDiffusionXLPipeline(**{k: getattr(sdxl.pipe, k) for k in (
        "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")},
        image_encoder=None, feature_extractor=None)
    p.scheduler = UniPCMultistepScheduler.from_config(p.scheduler.config)
    p.set_progress_bar_config(disable=True)
    plan = sd_plan(prompt="a meadow at sunset", seed=11, steps=5, edit=with_solver("unipc", "sdxl"))
    ours = run_job(sdxl, plan, plan.jobs[0], decode=False).latents
    ref = p("a meadow at sunset", height=256, width=256, num_inference_steps=5, guidance_scale=7.5,
            generator=torch.Generator().manual_seed(11), output_type="latent").images
    assert float((ours - ref).abs().max()) <= 1e-5


def test_a_group_under_unipc_is_the_same_with_and_without_prefix_sharing_and_refuses_references(tmp_path, sd):
    plan = compile_scene(write(tmp_path, solver="unipc", extra=GROUP))
    assert plan.sampler.kind == "unipc"
    shared = {j.id: r for j, r in run_group(sd, plan, plan.groups[0], plan.jobs, share=True, decode=False)}
    alone = {j.id: r for j, r in run_group(sd, plan, plan.groups[0], plan.jobs, share=False, decode=False)}
    assert len(shared) == 2
    for job, r in shared.items():
        assert "shared_prefix_s" not in r.timings and torch.equal(r.latents, alone[job].latents)
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ref.png")
    _, diags = validate_file(write(tmp_path, solver="unipc-karras", extra="    reference: {image: ref.png}\n",
                                   name="r"))
    errs = [d for d in diags if d.severity == "error"]
    assert len(errs) == 1 and (errs[0].pos.line, errs[0].pos.col) == (10, 5)
    assert "`reference` needs `solver: ddim`" in errs[0].message and "multistep" in errs[0].message
