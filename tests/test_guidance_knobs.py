"""The SD family's guidance knobs (``sampler.cfg_rescale``, ``sampler.freeu``) and zero-terminal-SNR schedules.

Without entities a job equals diffusers' own pipeline called with ``guidance_rescale=R`` or after
``pipe.unet.enable_freeu(...)``, on a second build of tiny-sd / tiny-sdxl (nothing of scenec's runtime in it); the
knobs change the image; a plan without FreeU after one with it runs on the UNet as loaded, bit for bit; the knobs
are absent from a plan that does not use them (old plans keep their hashes); out-of-range values and Flux are
located errors from ``scenec validate``. A scheduler config with ``rescale_betas_zero_snr`` gives the compiler the
noise levels diffusers' schedulers have."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from scenec.runtime.families import load_backend
from scenec.runtime.sampler import run_batch, run_job
from scenec.runtime.testing import sd_plan, tiny_sd_backend

STEPS = 2
PROMPT, NEGATIVE = "a fox in a meadow", "blurry"
FREEU = {"s1": 0.9, "s2": 0.2, "b1": 1.5, "b2": 1.6}  # diffusers' FreeU docs: SD 1.5's values


def backend(family):
    return tiny_sd_backend() if family == "sd" else load_backend("tiny-sdxl", device="cpu", dtype="fp32")


def plan(family, rescale=0.0, freeu=None, seeds=None, **kw):
    def edit(d, t):
        if family == "sdxl":
            d["model"] = {**d["model"], "spec": "tiny-sdxl", "family": "sdxl"}
        if rescale:
            d["sampler"]["cfg_rescale"] = rescale
        if freeu is not None:
            d["sampler"]["freeu"] = freeu
    return sd_plan(steps=STEPS, edit=edit, seed=5, seeds=seeds, width=128, height=128, prompt=PROMPT,
                   negative=NEGATIVE, **kw)


def latents(be, p, job=0):
    return run_job(be, p, p.jobs[job], decode=False).latents


def pipeline(family):
    """diffusers' own pipeline over a second build of the tiny model: nothing of scenec's runtime takes part."""
    if family == "sd":
        from diffusers import StableDiffusionPipeline

        from scenec.runtime.tiny_sd import build_tiny_sd

        pipe = StableDiffusionPipeline(**build_tiny_sd())
    else:
        from diffusers import StableDiffusionXLPipeline

        from scenec.runtime.tiny_sdxl import build_tiny_sdxl

        parts = build_tiny_sdxl()
        parts["tokenizer_2"] = copy.deepcopy(parts["tokenizer"])
        pipe = StableDiffusionXLPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, seed=5, **kw):
    return pipe(PROMPT, negative_prompt=NEGATIVE, height=128, width=128, num_inference_steps=STEPS,
                guidance_scale=7.5, generator=torch.Generator().manual_seed(seed), output_type="latent", **kw).images


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_cfg_rescale_and_freeu_match_the_pipeline(family):
    be, ref = backend(family), pipeline(family)
    plain = latents(be, plan(family))
    rescaled = latents(be, plan(family, rescale=0.7))
    d = float((rescaled - call(ref, guidance_rescale=0.7)).abs().max())
    print(f"{family} cfg_rescale 0.7: max |Δ| vs diffusers' guidance_rescale = {d:.3g}")
    assert d <= 1e-5
    assert float((rescaled - plain).abs().max()) > 1e-3  # it acts

    freeu = latents(be, plan(family, freeu=FREEU))
    ref.unet.enable_freeu(**FREEU)
    d = float((freeu - call(ref)).abs().max())
    print(f"{family} freeu: max |Δ| vs diffusers' enable_freeu = {d:.3g}")
    assert d <= 1e-5
    assert float((freeu - plain).abs().max()) > 1e-3
    both = latents(be, plan(family, rescale=0.7, freeu=FREEU))
    assert float((both - call(ref, guidance_rescale=0.7)).abs().max()) <= 1e-5
    # the backend is reused across plans: one without FreeU runs on the UNet as loaded, bit for bit
    assert torch.equal(latents(be, plan(family)), plain)
    ref.unet.disable_freeu()
    assert float((plain - call(ref)).abs().max()) <= 1e-5


def test_cfg_rescale_acts_on_each_batch_row_alone():
    """Batch rows ([negatives | positives] in one forward): each row rescaled by its own standard deviations, the
    rows as the jobs alone."""
    be = tiny_sd_backend()
    p = plan("sd", rescale=0.7, freeu=FREEU, seeds=[5, 6])
    alone = [latents(be, p, i) for i in range(2)]
    rows = run_batch(be, [(p, p.jobs[0]), (p, p.jobs[1])])
    for a, r in zip(alone, rows):
        assert float((a - r.latents).abs().max()) <= 1e-5
    ref = pipeline("sd")
    ref.unet.enable_freeu(**FREEU)
    assert float((alone[1] - call(ref, seed=6, guidance_rescale=0.7)).abs().max()) <= 1e-5
    latents(be, plan("sd"))  # the shared backend as loaded again


def test_the_knobs_enter_the_plan_only_when_on(tmp_path):
    from scenec.compiler import compile_scene

    base = ("scenec: 1\nmodel: tiny-sd\ncanvas: {width: 128, height: 128}\nsampler: {steps: 2%s}\n"
            "background: {prompt: \"a meadow\", negative: \"bad\"}\n")
    docs = {}
    for name, extra in (("off", ""), ("zero", ", cfg_rescale: 0"), ("rescale", ", cfg_rescale: 0.7"),
                        ("freeu", ", freeu: {s1: 0.9, s2: 0.2, b1: 1.5, b2: 1.6}")):
        (tmp_path / f"{name}.yaml").write_text(base % extra)
        docs[name] = compile_scene(tmp_path / f"{name}.yaml").json
    assert "cfg_rescale" not in docs["off"]["sampler"] and "freeu" not in docs["off"]["sampler"]
    assert docs["rescale"]["sampler"]["cfg_rescale"] == 0.7
    assert docs["freeu"]["sampler"]["freeu"] == FREEU
    h = {k: d["jobs"][0]["job_hash"] for k, d in docs.items()}
    assert h["off"] == h["zero"] and len({h["off"], h["rescale"], h["freeu"]}) == 3


SCENE = """scenec: 1
model: {model}
canvas: {{width: 128, height: 128}}
sampler:
  steps: 2
  guidance: {guidance}
  cfg_rescale: {rescale}
  freeu: {{s1: {s1}, s2: 0.2, b1: 1.5, b2: 1.6}}
background: {{prompt: "a meadow"}}
"""


def test_bad_values_and_flux_are_located_errors(tmp_path):
    from scenec.compiler.check import validate_file

    p = tmp_path / "s.yaml"
    p.write_text(SCENE.format(model="tiny-sd", guidance=7.5, rescale=1.5, s1=-0.5))
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", str(p)], capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out
    assert "s.yaml:7:16: error: `sampler.cfg_rescale` must be less than or equal to 1" in out, out
    assert "s.yaml:8:15: error: `sampler.freeu.s1` must be greater than or equal to 0" in out, out

    p.write_text(SCENE.format(model="tiny", guidance=3.5, rescale=0.5, s1=0.9))  # Flux: refused at the keys
    _, diags = validate_file(p)
    errs = [(d.pos.line, d.pos.col, d.message, d.hint) for d in diags if d.severity == "error"]
    assert [(line, col) for line, col, *_ in errs] == [(7, 16), (8, 3)], errs
    assert all("Flux" in m and h for *_, m, h in errs)

    p.write_text(SCENE.format(model="tiny-sd", guidance=1, rescale=0.5, s1=0.9))  # CFG off: nothing to rescale
    _, diags = validate_file(p)
    assert not [d for d in diags if d.severity == "error"]
    warns = [(d.pos.line, d.message) for d in diags if d.severity == "warning" and "cfg_rescale" in d.message]
    assert warns == [(7, "`cfg_rescale` has no effect: classifier-free guidance is off at `sampler.guidance: 1` "
                          "(nothing to rescale)")]


def test_a_flux_plan_with_the_knobs_fails_in_the_runtime():
    from scenec.runtime.testing import make_plan
    from scenec.spec.errors import Unsupported

    def edit(d, t):
        d["sampler"]["cfg_rescale"] = 0.5

    p = make_plan(steps=1, width=64, height=64, edit=edit)
    be = load_backend("tiny", device="cpu", dtype="fp32")
    with pytest.raises(Unsupported, match="cfg_rescale"):
        run_job(be, p, p.jobs[0], decode=False)


# --- zero terminal SNR (rescale_betas_zero_snr) ---------------------------------------------------------------

def zero_snr_model(tmp_path, prediction="v_prediction"):
    """A local model directory whose scheduler has zero terminal SNR, trailing spacing (Lin et al. 2023, §3.1-3.3)."""
    import json

    from scenec.runtime.tiny_sd import SD_SCHEDULER_CONFIG

    config = {**SD_SCHEDULER_CONFIG, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
              "prediction_type": prediction}
    d = tmp_path / f"zsnr-{prediction}"
    (d / "scheduler").mkdir(parents=True)
    (d / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return d, config


def test_zero_terminal_snr_levels_are_the_schedulers(tmp_path):
    """ᾱ of the rescaled β (diffusers' ``rescale_zero_terminal_snr``; ≤ 3e-7: torch's vectorised float32 √ is not
    numpy's in the last bit on every CPU) and, for every solver, the compiler's levels = the timesteps the runtime's
    diffusers scheduler runs (Karras' σ from σ_max ≈ 4096, the 2⁻²⁴ diffusers puts in place of ᾱ_T = 0)."""
    from diffusers import DDIMScheduler

    from scenec.compiler.caps import DDPM_SOLVERS, model_info
    from scenec.compiler.levels import noise_levels, scheduler_config
    from scenec.compiler.solvers import alphas_cumprod
    from scenec.runtime.euler import euler_solver
    from scenec.runtime.solvers import ddpm_solver

    d, config = zero_snr_model(tmp_path)
    info = model_info(str(d))
    ours, want = alphas_cumprod(scheduler_config(info)), DDIMScheduler(**config).alphas_cumprod.numpy()
    assert ours[-1] == want[-1] == 0 and float(np.abs(ours - want).max()) <= 3e-7
    for kind in DDPM_SOLVERS:
        if kind.startswith("euler"):
            s = euler_solver(kind, DDIMScheduler(**config).config, 10, "cpu")
        else:
            s = ddpm_solver(kind, DDIMScheduler(**config), 10, "cpu")
        np.testing.assert_allclose(noise_levels(info, (128, 128), 10, kind)[:-1] * 1000, s._t, rtol=1e-6,
                                   err_msg=kind)


def test_zero_terminal_snr_runs_as_the_pipeline_and_refuses_epsilon(tmp_path):
    """v-prediction on a zero-SNR schedule, the paper's recipe with CFG rescale: ᾱ = 0 at the first timestep (999)
    runs as diffusers' pipeline does. An ε-prediction model on it is refused at the model (DDIM would divide by
    √ᾱ_T = 0)."""
    from diffusers import DDIMScheduler

    from scenec.compiler.check import validate_file

    _, config = zero_snr_model(tmp_path)
    be = load_backend("tiny-sd", device="cpu", dtype="fp32")  # its own: the shared one keeps its scheduler
    be.pipe.scheduler = DDIMScheduler(**config)
    ours = latents(be, plan("sd", rescale=0.7))
    assert be.solver(plan("sd"))._t[0] == 999 and torch.isfinite(ours).all()
    ref = pipeline("sd")
    ref.scheduler = DDIMScheduler(**config)
    d = float((ours - call(ref, guidance_rescale=0.7)).abs().max())
    print(f"zero SNR, v-prediction, cfg_rescale 0.7: max |Δ| vs diffusers = {d:.3g}")
    assert d <= 1e-5

    d, _ = zero_snr_model(tmp_path, "epsilon")
    p = tmp_path / "s.yaml"
    p.write_text(f"scenec: 1\nmodel: {d}\ncanvas: {{width: 128, height: 128}}\nbackground: {{prompt: \"a meadow\"}}\n")
    _, diags = validate_file(p)
    errs = [(x.pos.line, x.message) for x in diags if x.severity == "error"]
    assert len(errs) == 1 and errs[0][0] == 2 and "zero terminal SNR" in errs[0][1] and "epsilon" in errs[0][1]


def test_the_png_metadata_names_the_knobs_only_when_on():
    import json

    from scenec.rebuild import describe
    from scenec.runtime.outputs import metadata

    be = tiny_sd_backend()
    off, on = plan("sd"), plan("sd", rescale=0.7, freeu=FREEU)
    assert set(json.loads(metadata(off, off.jobs[0], be)["scenec:sampler"])).isdisjoint({"cfg_rescale", "freeu"})
    meta = metadata(on, on.jobs[0], be)
    got = json.loads(meta["scenec:sampler"])
    assert got["cfg_rescale"] == 0.7 and got["freeu"] == FREEU
    text = describe("x.png", meta)
    assert "cfg_rescale 0.7" in text and "freeu     s1 0.9, s2 0.2, b1 1.5, b2 1.6" in text, text


def test_cfg_rescale_acts_on_the_combined_prediction_of_a_regional_job():
    """With entities (regional masks: one forward per branch) the rescale acts on each row's combined output: at
    R = 1 its standard deviation over all but the batch dim is the positive branch's (Eq. 15)."""
    from scenec.runtime.families.sd import SDBackend
    from scenec.runtime.testing import box

    be = tiny_sd_backend()
    ents = [{"id": "fox", "prompt": "a red fox", "token": box((8, 8), 1, 1, 5, 5)}]
    seen = []

    def spy(plan, e_u, e_c):
        out = SDBackend.cfg(plan, e_u, e_c)
        seen.append((e_c.std(dim=(1, 2, 3)), out.std(dim=(1, 2, 3))))
        return out

    be.cfg = spy
    try:
        full = latents(be, plan("sd", rescale=1.0, entities=ents))
    finally:
        del be.cfg
    assert len(seen) == STEPS and all(torch.allclose(c, o, rtol=1e-5) for c, o in seen)
    assert float((full - latents(be, plan("sd", entities=ents))).abs().max()) > 1e-3
