"""`sampler.solver` on SD/SDXL: DPM-Solver++(2M) (arXiv 2211.01095) on the model's spacing and on Karras' σ
(arXiv 2206.00364). The compiler's noise levels are diffusers' timesteps; with no entities a job reproduces
StableDiffusionPipeline / StableDiffusionXLPipeline with DPMSolverMultistepScheduler; located errors where it
cannot run; a group's images equal with and without prefix sharing; the solver is in the job hash."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from scenec.compiler import compile_scene
from scenec.compiler.check import validate_file
from scenec.compiler.solvers import alphas_cumprod, dpm_timesteps
from scenec.runtime.families import load_backend
from scenec.runtime.sampler import run_group, run_job
from scenec.runtime.testing import box, sd_plan

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' own

CFG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
       "steps_offset": 1}


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("karras", [False, True])
def test_compiler_timesteps_are_diffusers(spacing, karras):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cfg = {**CFG, "timestep_spacing": spacing}
    base = DDIMScheduler(**cfg)
    np.testing.assert_allclose(alphas_cumprod(cfg), base.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    for n in (1, 2, 3, 4, 7, 10, 25, 28, 30, 50):
        s = DPMSolverMultistepScheduler.from_config(base.config, use_karras_sigmas=karras)
        s.set_timesteps(n)
        assert np.array_equal(dpm_timesteps(n, cfg, karras), s.timesteps.numpy()), n


def with_solver(kind, family="sd"):
    def edit(doc, tensors):
        doc["sampler"]["kind"] = kind
        if family == "sdxl":
            doc["model"] = {"spec": "tiny-sdxl", "family": "sdxl", "repo": None, "max_sequence_length": 77}
    return edit


@pytest.fixture(scope="module")
def sd():
    return load_backend("tiny-sd", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def sdxl():
    return load_backend("tiny-sdxl", device="cpu", dtype="fp32")


def dpm(pipe, kind):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                   solver_order=2, use_karras_sigmas=kind.endswith("karras"))


@pytest.mark.parametrize("kind", ["dpm++2m", "dpm++2m-karras"])
def test_no_entities_reproduces_the_sd_pipeline_with_dpm_solver(sd, kind):
    from diffusers import StableDiffusionPipeline

    from scenec.runtime.tiny_sd import build_tiny_sd

    plan = sd_plan(prompt="a meadow at sunset", negative="blurry", seed=11, steps=6, edit=with_solver(kind))
    ours = run_job(sd, plan, plan.jobs[0], decode=False).latents
    pipe = StableDiffusionPipeline(**build_tiny_sd())
    pipe.scheduler = dpm(pipe, kind)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a meadow at sunset", negative_prompt="blurry", height=256, width=256, num_inference_steps=6,
               guidance_scale=7.5, generator=torch.Generator().manual_seed(11), output_type="latent").images
    assert torch.equal(ours, ref)  # bit for bit
    ddim = sd_plan(prompt="a meadow at sunset", negative="blurry", seed=11, steps=6)
    assert float((run_job(sd, ddim, ddim.jobs[0], decode=False).latents - ours).abs().max()) > 1e-3


def test_no_entities_reproduces_the_sdxl_pipeline_with_dpm_solver(sdxl):
    from diffusers import StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline(**{k: getattr(sdxl.pipe, k) for k in (
        "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")},
        image_encoder=None, feature_extractor=None)
    p.scheduler = dpm(p, "dpm++2m-karras")
    p.set_progress_bar_config(disable=True)
    plan = sd_plan(prompt="a meadow at sunset", seed=11, steps=5, edit=with_solver("dpm++2m-karras", "sdxl"))
    ours = run_job(sdxl, plan, plan.jobs[0], decode=False).latents
    ref = p("a meadow at sunset", height=256, width=256, num_inference_steps=5, guidance_scale=7.5,
            generator=torch.Generator().manual_seed(11), output_type="latent").images
    assert float((ours - ref).abs().max()) <= 1e-5


def test_regional_entities_run_under_dpm_solver(sd):
    ents = [{"id": "fox", "prompt": "a red fox", "token": box((16, 16), 2, 2, 8, 8)}]
    plain = sd_plan(seed=3, steps=5, edit=with_solver("dpm++2m"))
    regional = sd_plan(entities=ents, seed=3, steps=5, edit=with_solver("dpm++2m"))
    a = run_job(sd, plain, plain.jobs[0], decode=False).latents
    b = run_job(sd, regional, regional.jobs[0], decode=False).latents
    assert torch.isfinite(b).all() and float((a - b).abs().max()) > 1e-3


SCENE = """scenec: 1
model: {model}
canvas: {{width: 128, height: 128}}
sampler: {{steps: 5, seed: 2{solver}}}
background: {{prompt: "a misty forest"}}
entities:
  - id: stag
    prompt: "a stag"
    shape: {{box: [0.1, 0.3, 0.6, 0.9]}}
{extra}"""
GROUP = """groups:
  - id: g
    schedule: {values: [0, 0, 0.5, 1, 1]}
    variants:
      - {id: fox, prompt: "a red fox running"}
      - {id: stag, entities: [stag]}
"""


def write(tmp_path, model="tiny-sd", solver="", extra="", name="s"):
    p = tmp_path / f"{name}.yaml"
    p.write_text(SCENE.format(model=model, solver=solver and f", solver: {solver}", extra=extra), encoding="utf-8")
    return p


def test_a_group_under_dpm_solver_is_the_same_with_and_without_prefix_sharing(tmp_path, sd):
    plan = compile_scene(write(tmp_path, solver="dpm++2m-karras", extra=GROUP))
    assert plan.sampler.kind == "dpm++2m-karras"
    shared = {j.id: r for j, r in run_group(sd, plan, plan.groups[0], plan.jobs, share=True, decode=False)}
    alone = {j.id: r for j, r in run_group(sd, plan, plan.groups[0], plan.jobs, share=False, decode=False)}
    assert len(shared) == 2
    for job, r in shared.items():
        assert "shared_prefix_s" not in r.timings  # its multistep history would not carry over
        assert torch.equal(r.latents, alone[job].latents)


def test_the_solver_is_in_the_plan_the_ir_and_the_job_hash(tmp_path):
    ddim = compile_scene(write(tmp_path, name="a"))
    karras = compile_scene(write(tmp_path, solver="dpm++2m-karras", name="b"))
    assert (ddim.sampler.kind, karras.sampler.kind) == ("ddim", "dpm++2m-karras")
    assert ddim.jobs[0].job_hash != karras.jobs[0].job_hash
    r = subprocess.run([sys.executable, "-m", "scenec", "explain", str(tmp_path / "b.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "sampler dpm++2m-karras steps=5" in r.stdout, r.stdout + r.stderr


def test_where_a_solver_cannot_run_is_located(tmp_path):
    p = write(tmp_path, model="tiny", solver="dpm++2m")
    _, diags = validate_file(p)
    errs = [d for d in diags if d.severity == "error"]
    assert len(errs) == 1 and errs[0].pos.line == 4 and "does not run flux models" in errs[0].message
    assert "flow-euler" in errs[0].hint
    ref = "    reference: {image: ref.png}\n"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ref.png")
    p = write(tmp_path, solver="dpm++2m", extra=ref, name="r")
    _, diags = validate_file(p)
    errs = [d for d in diags if d.severity == "error"]
    assert len(errs) == 1 and (errs[0].pos.line, errs[0].pos.col) == (10, 5)
    assert "`reference` needs `solver: ddim`" in errs[0].message
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", str(write(tmp_path, solver="dpm3", name="x"))],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "x.yaml:4:" in r.stdout + r.stderr and "Traceback" not in r.stderr


def test_img2img_under_dpm_solver_starts_mid_table(tmp_path, sd):
    """background.strength: the run starts at a later level (the scheduler's begin index), first-order there
    as diffusers' img2img pipelines start it."""
    check_img2img_starts_mid_table(tmp_path, sd, "dpm++2m")


def check_img2img_starts_mid_table(tmp_path, sd, solver: str) -> None:
    """img2img at strengths 0.4 and 0.8 under ``solver``: the program starts at step 5 − int(5·s), the latents are
    finite, and the strength changes them (the solver tests of every family call this)."""
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    out = {}
    for s in (0.4, 0.8):
        p = write(tmp_path, solver=solver, name=f"s{s}")
        p.write_text(p.read_text().replace('background: {prompt: "a misty forest"}',
                                           f'background: {{prompt: "a misty forest", image: i.png, strength: {s}}}'))
        plan = compile_scene(p)
        assert plan.jobs[0].program[0].from_ == 5 - int(5 * s)
        out[s] = run_job(sd, plan, plan.jobs[0], decode=False).latents
        assert torch.isfinite(out[s]).all()
    assert float((out[0.4] - out[0.8]).abs().max()) > 1e-3


def test_explain_says_a_groups_prefix_is_not_shared_under_a_multistep_solver(tmp_path):
    for solver, want in (("", "shared_prefix = 2 steps (saves 2 of 10 job-steps)"),
                         ("dpm++2m", "shared_prefix = 2 steps (not shared: dpm++2m is multistep)")):
        p = write(tmp_path, solver=solver, extra=GROUP, name=f"g{solver}")
        r = subprocess.run([sys.executable, "-m", "scenec", "explain", str(p)], capture_output=True, text=True)
        assert r.returncode == 0 and want in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("extra", [{"beta_schedule": "squaredcos_cap_v2"},
                                   {"trained_betas": np.linspace(0.0002, 0.03, 1000).tolist()}])
def test_karras_levels_of_the_other_beta_schedules_are_diffusers(extra, tmp_path):
    """A model whose scheduler has a cosine schedule or trained betas: the compiler's Karras levels are
    diffusers' (not an internal error on the cosine schedule, nor scaled_linear's ᾱ for trained betas)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cfg = {**CFG, "timestep_spacing": "leading", **extra}
    cfg.pop("beta_schedule") if "trained_betas" in extra else None
    base = DDIMScheduler(**cfg)
    np.testing.assert_allclose(alphas_cumprod(cfg), base.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    for n in (1, 4, 10, 25, 50):
        s = DPMSolverMultistepScheduler.from_config(base.config, use_karras_sigmas=True)
        s.set_timesteps(n)
        ours = dpm_timesteps(n, cfg, True)
        if "trained_betas" in extra:
            assert np.array_equal(ours, s.timesteps.numpy()), n
        else:  # truncated, not rounded: an integer t may come out 1 lower in diffusers (float32 σ's last bit)
            assert np.abs(ours - s.timesteps.numpy()).max() <= 1, n
    model = tmp_path / "m"
    (model / "scheduler").mkdir(parents=True)
    (model / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    p = write(tmp_path, model=str(model), solver="dpm++2m-karras", extra="    visual: {image: v.png}\n")
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "v.png")
    from scenec.compiler.levels import noise_levels
    from scenec.compiler.resolve import resolve_model
    from scenec.spec.diagnostics import Diagnostics
    from scenec.spec.load import load_scene

    ls = load_scene(p)
    _, info = resolve_model(ls, None, Diagnostics())
    assert np.array_equal(noise_levels(info, (128, 128), 10, "dpm++2m-karras")[:-1] * 1000,
                          dpm_timesteps(10, cfg, True))
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", str(p)], capture_output=True, text=True)
    assert "internal error" not in r.stderr + r.stdout, r.stderr


def test_a_models_own_dpm_settings_do_not_change_the_solver(sd):
    """A model that ships a DPMSolverMultistepScheduler config (its keys survive DDIMScheduler.from_config):
    dpm++2m is still DPM-Solver++(2M) on the model's spacing — the compiler's levels, σ_N = 0, the midpoint
    update — not Lu's λ spacing, exponential σ, a clipped λ, σ_min at the end or a final Euler step."""
    from diffusers import DDIMScheduler

    from scenec.compiler.caps import ALIASES
    from scenec.compiler.levels import noise_levels
    from scenec.runtime.solvers import ddpm_solver

    own = {"use_lu_lambdas": True, "use_exponential_sigmas": True, "lambda_min_clipped": -2.0, "solver_type": "heun",
           "final_sigmas_type": "sigma_min", "euler_at_final": True, "lower_order_final": False}
    sched = DDIMScheduler.from_config({**sd.pipe.scheduler.config, **own})
    for kind in ("dpm++2m", "dpm++2m-karras"):
        s = ddpm_solver(kind, sched, 10, "cpu")
        want = noise_levels(ALIASES["tiny-sd"], (128, 128), 10, kind)[:-1] * 1000
        assert np.array_equal(np.asarray(s._t), want.round().astype(np.int64)), kind
        assert s.alpha(10) == 1.0 and s.scheduler.config.solver_type == "midpoint"
        assert not s.scheduler.config.euler_at_final and s.scheduler.config.lower_order_final
