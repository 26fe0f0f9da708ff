"""`sampler.solver` euler, euler-karras, euler-a on SD/SDXL (Karras et al. 2022, arXiv 2206.00364, Eq. 4–5;
diffusers' EulerDiscreteScheduler / EulerAncestralDiscreteScheduler). The compiler's noise levels are
diffusers' timesteps; with no entities a job reproduces StableDiffusionPipeline / StableDiffusionXLPipeline
with that scheduler (the ancestral one given the same noise draws) up to float rounding; references are
refused at the reference; a group's θ = 0 invariant holds, and its prefix is shared under euler, not euler-a."""

import subprocess
import sys

import numpy as np
import pytest
import torch

# the tests directory is on sys.path (pytest rootdir)
from test_solvers import CFG, check_img2img_starts_mid_table, with_solver, write

from scenec.compiler import compile_scene
from scenec.compiler.check import validate_file
from scenec.compiler.solvers import euler_timesteps
from scenec.runtime.families import load_backend
from scenec.runtime.sampler import noise_generator, run_group, run_job
from scenec.runtime.testing import sd_plan

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' own

# diffusers' own pipeline moves its final latent by 4.7e-5 (of max 23, tiny-sd, euler) and 1.5e-4 (of max 70,
# tiny-sdxl, trailing euler-a) when its initial noise is scaled by one float32 ulp: the tiny random UNets
# amplify rounding. The VP ↔ σ-space conversions are rounding of that order: bound relative to the latent.
REL = 5e-6


def close(ours, ref):
    return float((ours - ref).abs().max()) <= REL * float(ref.abs().max())


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("kind", ["euler", "euler-karras", "euler-a"])
def test_compiler_timesteps_are_diffusers(spacing, kind):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    base = DDIMScheduler(**CFG, timestep_spacing=spacing)
    for n in (1, 2, 3, 4, 7, 10, 25, 28, 30, 50):
        if kind == "euler-a":
            s = EulerAncestralDiscreteScheduler.from_config(base.config)
        else:
            s = EulerDiscreteScheduler.from_config(base.config, use_karras_sigmas=kind == "euler-karras")
        s.set_timesteps(n)
        ours = euler_timesteps(n, {**CFG, "timestep_spacing": spacing}, kind == "euler-karras")
        np.testing.assert_allclose(ours, s.timesteps.numpy(), rtol=1e-6, atol=0, err_msg=str(n))


@pytest.fixture(scope="module")
def sd():
    return load_backend("tiny-sd", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def sdxl():
    return load_backend("tiny-sdxl", device="cpu", dtype="fp32")


def scheduler(config, kind, **kw):
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    if kind == "euler-a":
        return EulerAncestralDiscreteScheduler.from_config(config, **kw)
    return EulerDiscreteScheduler.from_config(config, use_karras_sigmas=kind == "euler-karras", **kw)


def same_noise(monkeypatch, kind, seed, shape):
    """diffusers' ancestral step draws through ``randn_tensor``: hand it the job's own noise stream's draws."""
    if kind != "euler-a":
        return
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as mod

    gen = noise_generator(seed)
    monkeypatch.setattr(mod, "randn_tensor", lambda *a, **k: torch.randn(shape, generator=gen, dtype=torch.float32))


def sdxl_pipe(sdxl):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**{k: getattr(sdxl.pipe, k) for k in (
        "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")},
        image_encoder=None, feature_extractor=None)


@pytest.mark.parametrize("kind", ["euler", "euler-karras", "euler-a"])
def test_no_entities_reproduces_the_sd_pipeline_with_euler(sd, kind, monkeypatch):
    from diffusers import StableDiffusionPipeline

    plan = sd_plan(prompt="a meadow at sunset", negative="blurry", seed=11, steps=5, width=128, height=128,
                   edit=with_solver(kind))
    ours = run_job(sd, plan, plan.jobs[0], decode=False).latents
    pipe = StableDiffusionPipeline(**{k: getattr(sd.pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet")},
                                   scheduler=scheduler(sd.pipe.scheduler.config, kind), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    same_noise(monkeypatch, kind, 11, ours.shape)
    ref = pipe("a meadow at sunset", negative_prompt="blurry", height=128, width=128, num_inference_steps=5,
               guidance_scale=7.5, generator=torch.Generator().manual_seed(11), output_type="latent").images
    assert close(ours, ref), float((ours - ref).abs().max())
    ddim = sd_plan(prompt="a meadow at sunset", negative="blurry", seed=11, steps=5, width=128, height=128)
    assert float((run_job(sd, ddim, ddim.jobs[0], decode=False).latents - ours).abs().max()) > 1e-2


@pytest.mark.parametrize("kind,spacing", [("euler", None), ("euler-karras", None), ("euler-a", "trailing")])
def test_no_entities_reproduces_the_sdxl_pipeline_with_euler(sdxl, kind, spacing, monkeypatch):
    """SDXL's own default scheduler is EulerDiscreteScheduler; sdxl-turbo's EulerAncestralDiscreteScheduler on
    trailing spacing, which starts at σ_max·ε, not √(σ_max² + 1)·ε (diffusers' init_noise_sigma)."""
    from diffusers import DDIMScheduler

    kept = sdxl.pipe.scheduler
    if spacing:
        sdxl.pipe.scheduler = DDIMScheduler.from_config(kept.config, timestep_spacing=spacing)
    try:
        plan = sd_plan(prompt="a meadow at sunset", seed=11, steps=4, width=128, height=128,
                       edit=with_solver(kind, "sdxl"))
        ours = run_job(sdxl, plan, plan.jobs[0], decode=False).latents
        if spacing:
            assert sdxl.solver(plan).start_scale < 0.999
        p = sdxl_pipe(sdxl)
        p.scheduler = scheduler(sdxl.pipe.scheduler.config, kind)
    finally:
        sdxl.pipe.scheduler = kept
    p.set_progress_bar_config(disable=True)
    same_noise(monkeypatch, kind, 11, ours.shape)
    ref = p("a meadow at sunset", height=128, width=128, num_inference_steps=4, guidance_scale=7.5,
            generator=torch.Generator().manual_seed(11), output_type="latent").images
    assert close(ours, ref), float((ours - ref).abs().max())


def test_noised_levels_are_diffusers_add_noise_in_vp(sd):
    """img2img and inpainting write q(x_ℓ | x₀) in VP; diffusers' Euler add_noise writes x₀ + σ ε: the same
    latent times √(1 + σ²), at every level (Karras' fractional timesteps included)."""
    from scenec.runtime.euler import euler_solver

    z0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for kind in ("euler", "euler-karras", "euler-a"):
        s = euler_solver(kind, sd.pipe.scheduler.config, 7, "cpu")
        for lv in range(7):
            want = s.scheduler.add_noise(z0, eps, s.timesteps[lv:lv + 1])
            got = s.noised(z0, eps, lv) * (1 + s._sigma[lv] ** 2) ** 0.5
            assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), (kind, lv)


def test_a_models_own_euler_settings_do_not_change_the_solver(sd):
    """A model that ships an EulerDiscreteScheduler config with other settings (its keys survive
    DDIMScheduler.from_config): euler is still Euler on the compiler's levels, σ_N = 0."""
    from diffusers import DDIMScheduler

    from scenec.compiler.caps import ALIASES
    from scenec.compiler.levels import noise_levels
    from scenec.runtime.euler import euler_solver

    own = {"interpolation_type": "log_linear", "use_exponential_sigmas": True, "final_sigmas_type": "sigma_min",
           "timestep_type": "continuous", "sigma_max": 3.0}
    config = DDIMScheduler.from_config({**sd.pipe.scheduler.config, **own}).config
    for kind in ("euler", "euler-karras", "euler-a"):
        s = euler_solver(kind, config, 10, "cpu")
        want = noise_levels(ALIASES["tiny-sd"], (128, 128), 10, kind)[:-1] * 1000
        np.testing.assert_allclose(s._t, want, rtol=1e-6, err_msg=kind)
        assert s._sigma[-1] == 0.0 and s.alpha(10) == 1.0


GROUP = """groups:
  - id: g
    schedule: {{values: {values}}}
    variants:
      - {{id: fox, prompt: "a red fox running"}}
      - {{id: stag, entities: [stag]}}
"""


def group(sd, plan, share):
    out = {}
    for j, r in run_group(sd, plan, plan.groups[0], plan.jobs, share=share, decode=False):
        assert not isinstance(r, Exception), r
        out[j.variant] = r
    return out


def test_theta_zero_makes_an_euler_a_group_identical_and_its_prefix_is_not_shared(tmp_path, sd):
    plan = compile_scene(write(tmp_path, solver="euler-a", extra=GROUP.format(values="[0, 0, 0, 0, 0]")))
    assert plan.sampler.kind == "euler-a" and plan.json["groups"][0]["shared_prefix"] == 5
    on = group(sd, plan, True)
    assert torch.equal(on["fox"].latents, on["stag"].latents)  # θ ≡ 0: the background alone, same noise stream
    for r in on.values():
        assert "shared_prefix_s" not in r.timings  # each runs alone: a resumed run would redraw the noise stream


def test_an_euler_groups_prefix_is_shared_and_changes_nothing(tmp_path, sd):
    plan = compile_scene(write(tmp_path, solver="euler-karras", extra=GROUP.format(values="[0, 0, 0.5, 1, 1]")))
    on, off = group(sd, plan, True), group(sd, plan, False)
    for v, r in on.items():
        assert r.timings.get("shared_prefix_steps") == 2
        assert torch.equal(r.latents, off[v].latents)


def test_explain_and_batching_know_what_euler_a_cannot_share(tmp_path):
    from scenec.runtime.batching import batch_key

    for solver, want in (("euler", "shared_prefix = 2 steps (saves 2 of 10 job-steps)"),
                         ("euler-a", "shared_prefix = 2 steps (not shared: euler-a draws fresh noise at every step)")):
        p = write(tmp_path, solver=solver, extra=GROUP.format(values="[0, 0, 0.5, 1, 1]"), name=f"g{solver}")
        r = subprocess.run([sys.executable, "-m", "scenec", "explain", str(p)], capture_output=True, text=True)
        assert r.returncode == 0 and want in r.stdout, r.stdout + r.stderr
        assert f"sampler {solver} steps=5" in r.stdout
    keys = {}
    for solver in ("euler", "euler-a"):
        plan = compile_scene(write(tmp_path, solver=solver, name=f"b{solver}"))
        keys[solver] = batch_key(plan.json, plan.json["jobs"][0])
        assert plan.sampler.kind == solver
    assert keys["euler"] is not None and keys["euler-a"] is None  # ancestral rows draw their own noise stream
    assert compile_scene(tmp_path / "beuler.yaml").jobs[0].job_hash != \
        compile_scene(tmp_path / "beuler-a.yaml").jobs[0].job_hash


def test_references_are_refused_at_the_reference(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ref.png")
    ref = "    reference: {image: ref.png}\n"
    for solver in ("euler", "euler-karras", "euler-a"):
        p = write(tmp_path, solver=solver, extra=ref, name=f"r{solver}")
        _, diags = validate_file(p)
        errs = [d for d in diags if d.severity == "error"]
        assert len(errs) == 1 and (errs[0].pos.line, errs[0].pos.col) == (10, 5), errs
        assert "`reference` needs `solver: ddim`" in errs[0].message and "DDIM's inversion" in errs[0].message
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", str(p)], capture_output=True, text=True)
    assert r.returncode == 2 and "reuler-a.yaml:10:5" in r.stdout + r.stderr and "Traceback" not in r.stderr
    _, diags = validate_file(write(tmp_path, model="tiny", solver="euler-a", name="flux"))
    errs = [d for d in diags if d.severity == "error"]
    assert len(errs) == 1 and errs[0].pos.line == 4 and "does not run flux models" in errs[0].message


def test_img2img_under_euler_a_starts_mid_table(tmp_path, sd):
    check_img2img_starts_mid_table(tmp_path, sd, "euler-a")
