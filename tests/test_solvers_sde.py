"""`sampler.solver: dpm++2m-sde | dpm++2m-sde-karras` on SD/SDXL: SDE-DPM-Solver++(2M) (arXiv 2211.01095, §5) as
diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2[, use_karras_sigmas]),
A1111's "DPM++ 2M SDE (Karras)". The compiler's levels are its timesteps (DPM-Solver++'s); with no entities a job
reproduces the pipelines with it given the same noise draws (the job's own noise stream); multistep and
stochastic: no references, never batched, a group's θ = 0 prefix not shared (and its images still identical)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from test_solvers import CFG, GROUP, with_solver, write  # the tests directory is on sys.path (pytest rootdir)

from scenec.compiler import compile_scene
from scenec.compiler.caps import ALIASES
from scenec.compiler.check import validate_file
from scenec.compiler.levels import noise_levels
from scenec.compiler.solvers import dpm_timesteps
from scenec.runtime.families import load_backend
from scenec.runtime.sampler import noise_generator, run_group, run_job
from scenec.runtime.testing import sd_plan

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' own

KINDS = ["dpm++2m-sde", "dpm++2m-sde-karras"]


def sde(config, kind):
    """What diffusers' docs map A1111's "DPM++ 2M SDE (Karras)" to."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="sde-dpmsolver++", solver_order=2,
                                                   use_karras_sigmas=kind.endswith("karras"))


def same_noise(monkeypatch, seed, shape):
    """diffusers' SDE step draws its fresh noise through ``randn_tensor``: hand it the job's noise stream's draws
    (one per step, as the runtime draws; the last, into σ = 0, has coefficient 0)."""
    from diffusers.schedulers import scheduling_dpmsolver_multistep as mod

    gen = noise_generator(seed)
    monkeypatch.setattr(mod, "randn_tensor", lambda *a, **k: torch.randn(shape, generator=gen, dtype=torch.float32))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("kind", KINDS)
def test_compiler_levels_are_the_sde_schedulers_timesteps(spacing, kind):
    from diffusers import DDIMScheduler

    base = DDIMScheduler(**{**CFG, "timestep_spacing": spacing})
    for n in (1, 2, 3, 4, 7, 10, 20, 28, 50):
        s = sde(base.config, kind)
        s.set_timesteps(n)
        assert np.array_equal(dpm_timesteps(n, {**CFG, "timestep_spacing": spacing}, kind.endswith("karras")),
                              s.timesteps.numpy()), n
    info = ALIASES["tiny-sd"]
    ode = kind.replace("-sde", "")
    assert np.array_equal(noise_levels(info, (128, 128), 9, kind), noise_levels(info, (128, 128), 9, ode))


@pytest.fixture(scope="module")
def sd():
    return load_backend("tiny-sd", device="cpu", dtype="fp32")


def latents(sd, kind, seed=11, steps=5):
    plan = sd_plan(prompt="a meadow at sunset", negative="blurry", seed=seed, steps=steps, width=128, height=128,
                   edit=with_solver(kind))
    return run_job(sd, plan, plan.jobs[0], decode=False).latents


@pytest.mark.parametrize("kind", KINDS)
def test_no_entities_reproduces_the_sd_pipeline_with_the_sde_solver(sd, kind, monkeypatch):
    from diffusers import StableDiffusionPipeline

    ours = latents(sd, kind)
    pipe = StableDiffusionPipeline(**{k: getattr(sd.pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet")},
                                   scheduler=sde(sd.pipe.scheduler.config, kind), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    same_noise(monkeypatch, 11, ours.shape)
    ref = pipe("a meadow at sunset", negative_prompt="blurry", height=128, width=128, num_inference_steps=5,
               guidance_scale=7.5, generator=torch.Generator().manual_seed(11), output_type="latent").images
    assert torch.equal(ours, ref), float((ours - ref).abs().max())  # bit for bit
    # the fresh noise takes part: not DPM-Solver++(2M)'s ODE image, and another seed's stream gives another image
    assert float((latents(sd, kind.replace("-sde", "")) - ours).abs().max()) > 1e-2
    assert float((latents(sd, kind, seed=12) - ours).abs().max()) > 1e-2


def test_no_entities_reproduces_the_sdxl_pipeline_with_the_sde_solver(monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    sdxl = load_backend("tiny-sdxl", device="cpu", dtype="fp32")
    p = StableDiffusionXLPipeline(**{k: getattr(sdxl.pipe, k) for k in (
        "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")},
        image_encoder=None, feature_extractor=None)
    p.scheduler = sde(p.scheduler.config, "dpm++2m-sde-karras")
    p.set_progress_bar_config(disable=True)
    plan = sd_plan(prompt="a meadow at sunset", seed=11, steps=4, width=128, height=128,
                   edit=with_solver("dpm++2m-sde-karras", "sdxl"))
    ours = run_job(sdxl, plan, plan.jobs[0], decode=False).latents
    same_noise(monkeypatch, 11, ours.shape)
    ref = p("a meadow at sunset", height=128, width=128, num_inference_steps=4, guidance_scale=7.5,
            generator=torch.Generator().manual_seed(11), output_type="latent").images
    assert float((ours - ref).abs().max()) <= 1e-5, float((ours - ref).abs().max())  # as the DPM/UniPC tests


def test_a_models_own_dpm_settings_do_not_change_the_sde_solver(sd):
    """A model that ships a DPMSolverMultistepScheduler config of its own (ODE, heun, λ spacing, σ_min end): the
    pinned keys still make it SDE-DPM-Solver++(2M), midpoint, on the compiler's levels, σ_N = 0."""
    from diffusers import DDIMScheduler

    from scenec.runtime.solvers import DPMSolverSDE, ddpm_solver

    own = {"algorithm_type": "dpmsolver++", "solver_type": "heun", "use_lu_lambdas": True,
           "final_sigmas_type": "sigma_min", "euler_at_final": True, "solver_order": 3}
    base = DDIMScheduler.from_config({**sd.pipe.scheduler.config, **own})
    for kind in KINDS:
        s = ddpm_solver(kind, base, 10, "cpu")
        c = s.scheduler.config
        assert isinstance(s, DPMSolverSDE) and c.algorithm_type == "sde-dpmsolver++" and c.solver_order == 2
        assert c.solver_type == "midpoint" and not c.use_lu_lambdas and not c.euler_at_final
        want = noise_levels(ALIASES["tiny-sd"], (128, 128), 10, kind)[:-1] * 1000
        assert np.array_equal(s._t, want.round().astype(int)) and s._sigma[-1] == 0.0, kind


SHARED = GROUP.replace("[0, 0, 0.5, 1, 1]", "[0, 0, 0, 0, 0]")


def test_theta_zero_makes_a_groups_images_identical_and_its_prefix_is_not_shared(tmp_path, sd):
    plan = compile_scene(write(tmp_path, solver="dpm++2m-sde", extra=SHARED))
    assert plan.sampler.kind == "dpm++2m-sde" and plan.json["groups"][0]["shared_prefix"] == 5
    out = {j.variant: r for j, r in run_group(sd, plan, plan.groups[0], plan.jobs, share=True, decode=False)}
    assert len(out) == 2 and torch.equal(out["fox"].latents, out["stag"].latents)  # the background, same stream
    for r in out.values():
        assert "shared_prefix_s" not in r.timings  # each ran alone: a resumed run would lose history and stream


def test_explain_batching_and_hash_know_the_sde_solver(tmp_path):
    from scenec.runtime.batching import batch_key

    p = write(tmp_path, solver="dpm++2m-sde-karras", extra=GROUP, name="g")
    r = subprocess.run([sys.executable, "-m", "scenec", "explain", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sampler dpm++2m-sde-karras steps=5" in r.stdout
    assert ("shared_prefix = 2 steps (not shared: dpm++2m-sde-karras is multistep and draws fresh noise at every "
            "step)") in r.stdout
    plans = {k: compile_scene(write(tmp_path, solver=k, name=f"b{k}")) for k in ("dpm++2m-karras", *KINDS)}
    assert batch_key(plans["dpm++2m-karras"].json, plans["dpm++2m-karras"].json["jobs"][0]) is not None
    for k in KINDS:  # each step draws the job's own noise stream: never a batch row
        assert batch_key(plans[k].json, plans[k].json["jobs"][0]) is None
    assert len({p.jobs[0].job_hash for p in plans.values()}) == 3


def test_references_are_refused_at_the_reference(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ref.png")
    for kind in KINDS:
        p = write(tmp_path, solver=kind, extra="    reference: {image: ref.png}\n", name=f"r{kind}")
        _, diags = validate_file(p)
        errs = [d for d in diags if d.severity == "error"]
        assert len(errs) == 1 and (errs[0].pos.line, errs[0].pos.col) == (10, 5), errs
        assert "`reference` needs `solver: ddim`" in errs[0].message and "multistep" in errs[0].message
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", str(p)], capture_output=True, text=True)
    assert r.returncode == 2 and f"r{kind}.yaml:10:5" in r.stdout + r.stderr and "Traceback" not in r.stderr
    _, diags = validate_file(write(tmp_path, model="tiny", solver="dpm++2m-sde", name="flux"))
    errs = [d for d in diags if d.severity == "error"]
    assert len(errs) == 1 and errs[0].pos.line == 4 and "does not run flux models" in errs[0].message


def test_img2img_under_the_sde_solver_starts_mid_table(tmp_path, sd):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    p = write(tmp_path, solver="dpm++2m-sde", name="i")
    p.write_text(p.read_text().replace('background: {prompt: "a misty forest"}',
                                       'background: {prompt: "a misty forest", image: i.png, strength: 0.6}'))
    plan = compile_scene(p)
    assert plan.jobs[0].program[0].from_ == 2
    a, b = (run_job(sd, plan, plan.jobs[0], decode=False).latents for _ in range(2))
    assert torch.isfinite(a).all() and torch.equal(a, b)  # the job's seed alone decides its noise
