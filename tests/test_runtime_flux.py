"""The Flux backend's sampling loop: diffusers parity, true CFG with per-entity negatives, errors."""

import pytest
import torch

from scenec.runtime.sampler import job_spec, run_job
from scenec.runtime.testing import box, make_plan, tiny_backend
from scenec.spec.errors import ModelUnavailable, Unsupported

GRID = (16, 16)
ENTS = [{"id": "fox", "prompt": "a red fox", "negative": "blurry", "token": box(GRID, 2, 2, 9, 9)},
        {"id": "tree", "prompt": "a green tree", "token": box(GRID, 4, 8, 14, 15)}]


@pytest.fixture(scope="module")
def backend():
    return tiny_backend()


@pytest.fixture(scope="module")
def pipe():
    """A fresh diffusers FluxPipeline over a second build of the tiny model (same seeds, same bytes), with
    diffusers' stock attention processors: nothing of scenec's runtime takes part in the reference."""
    from diffusers import FluxPipeline
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from scenec.runtime.tiny import build_tiny_flux

    p = FluxPipeline(**build_tiny_flux().components())
    assert all(type(proc) is FluxAttnProcessor for proc in p.transformer.attn_processors.values())
    p.set_progress_bar_config(disable=True)
    return p


def reference(pipe, seed, **kw):
    return pipe("a meadow at sunset", height=256, width=256, num_inference_steps=4, guidance_scale=3.5,
                generator=torch.Generator().manual_seed(seed), output_type="latent", max_sequence_length=32,
                **kw).images


def test_no_entities_reproduces_flux_pipeline(backend, pipe):
    assert all(torch.equal(a, b) for a, b in zip(backend.transformer.state_dict().values(),
                                                 pipe.transformer.state_dict().values()))
    plan = make_plan(prompt="a meadow at sunset", seed=11)
    ours = run_job(backend, plan, plan.jobs[0], decode=False).latents
    assert torch.equal(ours, reference(pipe, 11))  # bit for bit


def test_no_entities_true_cfg_reproduces_flux_pipeline(backend, pipe):
    plan = make_plan(prompt="a meadow at sunset", negative="blurry, low quality", seed=3, true_cfg=2.5)
    ours = run_job(backend, plan, plan.jobs[0], decode=False).latents
    ref = reference(pipe, 3, negative_prompt="blurry, low quality", true_cfg_scale=2.5)
    assert torch.equal(ours, ref)  # bit for bit


def test_entities_change_the_image(backend):
    a = make_plan(seed=5)
    b = make_plan(seed=5, entities=ENTS)
    la = run_job(backend, a, a.jobs[0], decode=False).latents
    lb = run_job(backend, b, b.jobs[0], decode=False).latents
    assert (la - lb).abs().max() > 1e-3


def test_true_cfg_changes_result_and_equals_formula(backend):
    one = [{"op": "denoise", "from": 0, "to": 1, "regional": True, "theta": None, "eta": 0.0}]
    plain = make_plan(entities=ENTS, program=one, seed=2)
    cfg = make_plan(entities=ENTS, program=one, seed=2, true_cfg=3.0)
    job = cfg.jobs[0]
    assert job.entities[0].negative != job.entities[1].negative  # own vs background negative
    x_plain = run_job(backend, plain, plain.jobs[0], decode=False).latents
    x_cfg = run_job(backend, cfg, job, decode=False).latents
    assert (x_plain - x_cfg).abs().max() > 1e-4

    # the same step by hand: v = v_neg + s (v_pos − v_neg), both forwards regional
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    p = backend.pipe
    pos, neg = (backend.cond([(cfg, job_spec(job), n)]) for n in (False, True))
    assert pos.seq.shape[1] != neg.seq.shape[1]  # different texts, each with its own mask
    x, ids = p.prepare_latents(1, 16, 256, 256, torch.float32, "cpu", torch.Generator().manual_seed(2))
    p.scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=calculate_shift(x.shape[1]))
    sig, ts = p.scheduler.sigmas, p.scheduler.timesteps
    g = torch.full([1], 3.5)

    def v(c):
        backend.attn.set([c.mask("regional", "sdpa", "cpu", ["double", "single"])], n_img=x.shape[1])
        try:
            return p.transformer(hidden_states=x, timestep=ts[:1] / 1000, guidance=g, pooled_projections=c.pooled[0],
                                 encoder_hidden_states=c.seq, txt_ids=c.extra["txt_ids"], img_ids=ids,
                                 return_dict=False)[0]
        finally:
            backend.attn.clear()

    with torch.inference_mode():
        vp, vn = v(pos), v(neg)
    expected = x + (sig[1] - sig[0]) * (vn + 3.0 * (vp - vn))
    assert (x_cfg - expected).abs().max().item() <= 1e-5


def test_unsupported_ops_are_reported(backend):
    # renoise/paste: reference conditions (runtime/methods/oneway.py); fork and theta: coupling groups
    for op in ({"op": "warp"},):
        plan = make_plan(program=[op])
        with pytest.raises(Unsupported, match="not supported by this runtime yet"):
            run_job(backend, plan, "test-1", decode=False)
    assert issubclass(Unsupported, NotImplementedError)


def test_missing_weights_say_how_to_get_them(tmp_path):
    from scenec.runtime.families import as_model, flux, load_backend

    with pytest.raises(ModelUnavailable, match="local diffusers directory|model_index.json"):
        load_backend({"spec": str(tmp_path), "family": "flux", "repo": str(tmp_path)}, device="cpu")
    with pytest.raises(Unsupported, match="family"):
        flux.load(as_model({"spec": "sd15", "family": "sd", "repo": "x/y"}), device="cpu")


def test_non_square_canvas(backend, pipe):
    plan = make_plan(prompt="a meadow at sunset", seed=9, width=256, height=192)
    ours = run_job(backend, plan, plan.jobs[0], decode=False).latents
    ref = pipe("a meadow at sunset", height=192, width=256, num_inference_steps=4, guidance_scale=3.5,
               generator=torch.Generator().manual_seed(9), output_type="latent", max_sequence_length=32).images
    assert torch.equal(ours, ref)
    reg = make_plan(seed=9, width=256, height=192, entities=[
        {"id": "fox", "prompt": "a red fox", "token": box((12, 16), 1, 1, 6, 9)}])
    r = run_job(backend, reg, reg.jobs[0])
    assert r.image.size == (256, 192)


def test_decoded_image(backend):
    plan = make_plan(entities=ENTS)
    r = run_job(backend, plan, plan.jobs[0])
    assert r.image.size == (256, 256) and r.image.mode == "RGB"
    assert set(r.timings) == {"encode_s", "denoise_s", "decode_s", "total_s"}
