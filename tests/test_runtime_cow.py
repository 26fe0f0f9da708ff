"""COW (cyclic one-way diffusion) and SOW modulation on the tiny Flux: ops, inversion, cache, probe."""

import math

import numpy as np
import pytest
import torch

from scenec.compiler.schedule import Cow, ProgramInputs, build_program
from scenec.runtime import inversion, solvers
from scenec.runtime.attention import DOUBLE, Attention, attend
from scenec.runtime.methods import oneway
from scenec.runtime.sampler import run_job
from scenec.runtime.testing import box, make_plan, tiny_backend, token_to_latent
from scenec.spec.plan import Plan

GRID = (16, 16)
FACE = box(GRID, 3, 4, 10, 11)
RELATED = box(GRID, 10, 2, 16, 14)
MOD = {"suppress": 2.0, "enhance": 2.0, "decay": 0.8, "distance": 1.0, "threshold": 2.0}  # threshold>1: always on


@pytest.fixture(scope="module")
def backend():
    return tiny_backend()


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SCENEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inversion, "INVERSION_REFINE", 3)  # speed; the reconstruction test sets its own
    inversion.CACHE.clear()
    inversion.CACHE.stats.update(memory=0, disk=0, inverted=0)
    yield tmp_path / "cache"
    inversion.CACHE.clear()


def reference_rgba(token=FACE, size=256, seed=0) -> np.ndarray:
    """A placed reference: a smooth coloured pattern inside the region on grey, alpha = region."""
    rng = np.random.default_rng(seed)
    px = np.repeat(np.repeat(token > 0, size // token.shape[0], 0), size // token.shape[1], 1)
    yy, xx = np.mgrid[0:size, 0:size] / size
    col = np.stack([np.sin(6 * xx + c) * 0.5 + 0.5 for c in rng.uniform(0, 6, 3)], -1) * 255
    rgb = np.where(px[..., None], col, 128).astype(np.uint8)
    return np.dstack([rgb, (px * 255).astype(np.uint8)])


def with_reference(plan, window=(1, 3), cycles=2, preserve=None, eta=1.0, token=FACE, related=RELATED,
                   modulation=MOD, program=None):
    """Add one reference condition (plan-format CONDITION) and the compiler's COW program to each job."""
    steps = plan.sampler.steps
    t = dict(plan.tensors)
    t["cond/face/rgba"] = reference_rgba(token if token is not None else np.ones(GRID, np.float32))
    masks = None
    if token is not None:
        t["cond/face/token"], t["cond/face/latent"] = token, token_to_latent(token)
        masks = {"latent": "cond/face/latent", "token": "cond/face/token"}
    rel = None
    if related is not None:
        t["rel/face/token"], t["rel/face/latent"] = related, token_to_latent(related)
        rel = {"latent": "rel/face/latent", "token": "rel/face/token"}
    doc = plan.json
    for job in doc["jobs"]:
        job["conditions"] = [{"entity": "face", "image": "cond/face/rgba", "sha256": "x", "fit": "contain",
                              "window": list(window), "cycles": cycles, "preserve": preserve, "eta": eta,
                              "masks": masks, "related": rel, "modulation": modulation}]
        ops = build_program(ProgramInputs(steps, conditions=[Cow(0, window[0], window[1], cycles, preserve, eta)]))
        job["program"] = program if program is not None else [op.model_dump(by_alias=True, mode="json") for op in ops]
    return Plan(doc, t)


def run(backend, plan, **kw):
    return run_job(backend, plan, plan.json["jobs"][0]["id"], decode=False, **kw).latents


def test_every_paste_puts_the_inverted_reference_in_the_region(backend, monkeypatch):
    plan = with_reference(make_plan(seed=4), window=(1, 3), cycles=3, preserve=3)
    seen = []
    orig = oneway.OneWay.run_op

    def spy(self, n, op, latents):
        out = orig(self, n, op, latents)
        if op.op == "paste":
            seen.append((op.at, out.clone(), self.refs[op.condition][op.at], self.masks[op.condition]))
        return out

    monkeypatch.setattr(oneway.OneWay, "run_op", spy)
    run(backend, plan)
    assert [a for a, *_ in seen] == [1, 2, 1, 2, 1, 2, 3]
    for at, x, ref, m in seen:
        inside = m == 1
        assert inside.any() and (~inside).any()
        assert torch.equal(x[inside], ref[inside])  # exactly the stored inverted latent
        assert not torch.equal(x[~inside], ref[~inside])  # the outside is the sample's own


def test_zero_cycles_without_preserve_is_the_scene_without_the_reference(backend):
    plain = make_plan(seed=6)
    ref = with_reference(make_plan(seed=6), cycles=0, preserve=None)
    assert all(op.op == "denoise" for op in ref.jobs[0].program)
    assert torch.equal(run(backend, plain), run(backend, ref))
    assert inversion.CACHE.stats["inverted"] == 0  # nothing pasted: nothing inverted


def test_reference_changes_the_image_and_is_deterministic(backend):
    plain = run(backend, make_plan(seed=6))
    a = run(backend, with_reference(make_plan(seed=6)))
    b = run(backend, with_reference(make_plan(seed=6)))
    assert (a - plain).abs().max() > 1e-2
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["flow", "ddpm"])
def test_renoise_matches_the_closed_form_mean_and_variance(kind):
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.linspace(-2, 2, 8)
    if kind == "flow":
        sa, sb = 0.3, 0.7
        x_a = (1 - sa) * x0 + sa * torch.randn(n, 8, generator=g)
        x_b = solvers.renoise_flow(x_a, sa, sb, torch.randn(n, 8, generator=g))
        mean, std = (1 - sb) * x0, sb  # level b's marginal given x0
        c = (1 - sb) / (1 - sa)
        cond_std = math.sqrt(sb ** 2 - (c * sa) ** 2)
    else:
        ar, ab = 0.8, 0.3
        x_a = math.sqrt(ar) * x0 + math.sqrt(1 - ar) * torch.randn(n, 8, generator=g)
        x_b = solvers.renoise_ddpm(x_a, ar, ab, torch.randn(n, 8, generator=g))
        mean, std = math.sqrt(ab) * x0, math.sqrt(1 - ab)
        c, cond_std = math.sqrt(ab / ar), math.sqrt(1 - ab / ar)
    tol = 4 * std / math.sqrt(n)
    assert (x_b.mean(0) - mean).abs().max() < tol
    assert (x_b.std(0) - std).abs().max() < 0.01
    # the transition itself: x_b − c·x_a is pure noise of the closed-form std
    resid = x_b - c * x_a
    assert resid.mean().abs() < 4 * cond_std / math.sqrt(n * 8)
    assert abs(resid.std().item() - cond_std) < 0.005


def test_eta_step_endpoints():
    g = torch.Generator().manual_seed(1)
    x, v, xi = (torch.randn(4, 16, generator=g) for _ in range(3))
    euler = x + (0.4 - 0.7) * v
    torch.testing.assert_close(solvers.flow_step_eta(x, v, 0.7, 0.4, 0.0, xi), euler)
    full = solvers.flow_step_eta(x, v, 0.7, 0.4, 1.0, xi)
    torch.testing.assert_close(full, 0.6 * (x - 0.7 * v) + 0.4 * xi)  # x̂₀ re-noised with fresh noise only


def _sow_probe(backend, modulation, related=RELATED):
    """One denoise op inside the cycles (program: paste, denoise 1→2) with the probe on."""
    plan = with_reference(make_plan(seed=2), window=(1, 3), cycles=2, related=related, modulation=modulation,
                          program=[{"op": "paste", "condition": 0, "at": 1},
                                   {"op": "denoise", "from": 1, "to": 2, "regional": True, "theta": None,
                                    "eta": 0.0}])
    backend.attn.probe = []
    try:
        x = run(backend, plan)
        recs = backend.attn.probe
    finally:
        backend.attn.probe = None
    return x, recs


def test_sow_modulation_changes_exactly_the_intended_logits(backend):
    _, recs = _sow_probe(backend, MOD)
    assert len(recs) == 4 and all(r["kind"] == "sow" for r in recs)
    cond, rel = FACE.reshape(-1) > 0, RELATED.reshape(-1) > 0
    cond_t, rel_t = torch.from_numpy(cond), torch.from_numpy(rel)
    term = oneway.sow_term(FACE, RELATED, MOD)
    for r in recs:
        n_txt, bias = r["n_txt"], r["bias"]
        assert (bias[:n_txt] == 0).all() and (bias[:, :n_txt] == 0).all()  # text never biased
        b = bias[n_txt:, n_txt:]
        sup = cond_t[:, None] & ~cond_t[None, :]
        enh = rel_t[:, None] & cond_t[None, :]
        assert (b[sup] < 0).all() and (b[enh] > 0).all() and (b[~(sup | enh)] == 0).all()
        # cycle 0: gain decay^0 = 1, suppress·f(key), enhance·f(query)
        expect = -2.0 * sup.float() * term.fall[None, :] + 2.0 * enh.float() * term.fall[:, None]
        torch.testing.assert_close(b, expect)
        torch.testing.assert_close(r["out"], r["expected"], atol=1e-5, rtol=1e-4)


def test_modulation_false_changes_nothing(backend):
    x_off, recs = _sow_probe(backend, False)
    assert recs == []  # no entities, no modulation: diffusers' own processor ran
    x_zero, recs0 = _sow_probe(backend, {**MOD, "suppress": 0.0, "enhance": 0.0})
    assert recs0 and all((r["bias"] == 0).all() for r in recs0)
    torch.testing.assert_close(x_off, x_zero, atol=1e-5, rtol=0)
    x_on, _ = _sow_probe(backend, MOD)
    assert (x_on - x_off).abs().max() > 1e-4


def test_sow_gain_decays_per_cycle_and_indicator_switches_it_off(backend, monkeypatch):
    hist = []
    orig = oneway.Sow.measure

    def spy(self, *a, **k):
        orig(self, *a, **k)
        hist.append(dict(self.history[-1]))

    monkeypatch.setattr(oneway.Sow, "measure", spy)
    run(backend, with_reference(make_plan(seed=3), window=(1, 3), cycles=3))
    assert [h["cycle"] for h in hist] == [0, 0, 1, 1, 2, 2]
    for h in hist:
        assert 0.0 <= h["spread"][0] <= 1.0
        assert h["gains"][0] == pytest.approx(0.8 ** h["cycle"])
    hist.clear()
    run(backend, with_reference(make_plan(seed=3), window=(1, 3), cycles=2, modulation={**MOD, "threshold": 0.0}))
    assert hist and all(h["gains"] == [0.0] for h in hist)  # spread ≥ 0 = threshold: never applied


def test_inversion_then_sampling_reconstructs_the_reference(backend, monkeypatch, refine=20, tol=1e-3):
    """Invert to level k, paste over the whole canvas at k, sample deterministically to the end."""
    monkeypatch.setattr(inversion, "INVERSION_REFINE", refine)
    steps = 8
    for k in (5, 0):
        program = [{"op": "denoise", "from": i, "to": i + 1, "regional": True, "theta": None, "eta": 0.0}
                   for i in range(steps)]
        program.insert(k, {"op": "paste", "condition": 0, "at": k})
        plan = with_reference(make_plan(seed=1, steps=steps), token=None, related=None, modulation=False,
                              cycles=0, program=program)
        x = run(backend, plan)
        z_ref = backend.encode_image(plan.tensor(plan.jobs[0].conditions[0].image)[..., :3].copy())
        err = (x - z_ref).abs().max().item() / z_ref.abs().max().item()
        print(f"refine={refine}, inversion from level {k}: max abs error / max |z| = {err:.2e}")
        # random tiny weights: plain reverse Euler is far off (measured 0.47–0.75), the refined
        # (exactly inverted) steps reconstruct to ≈ 1e-4 relative (8 steps)
        assert err < tol, (k, err)


def test_second_build_skips_inversion(backend, cache_dir):
    plan = with_reference(make_plan(seed=8))
    a = run(backend, plan)
    assert inversion.CACHE.stats["inverted"] == 1
    files = list(cache_dir.glob("inversion/*.safetensors"))
    assert len(files) == 1
    b = run(backend, plan)  # memory hit
    inversion.CACHE.clear()  # a new process: only the disk cache
    c = run(backend, plan)
    assert inversion.CACHE.stats["inverted"] == 1 and inversion.CACHE.stats["disk"] >= 1
    assert torch.equal(a, b) and torch.equal(a, c)
    # another prompt is another trajectory: inverted again
    other = with_reference(make_plan(prompt="a dark forest", seed=8))
    run(backend, other)
    assert inversion.CACHE.stats["inverted"] == 2


def test_bad_cow_ops_are_plan_errors(backend):
    from scenec.spec.errors import PlanError

    for op in ({"op": "paste", "condition": 3, "at": 1}, {"op": "renoise", "from": 1, "to": 2},
               {"op": "denoise", "from": 0, "to": 1, "regional": True, "theta": None, "eta": 1.5}):
        plan = with_reference(make_plan(), program=[op])
        with pytest.raises(PlanError):
            run(backend, plan)


def test_inversion_evaluates_the_model_at_the_samplers_timesteps():
    """The refined inversion inverts the sampler's own step, so the model must see the sampler's timestep
    (bf16(σ·1000)/1000, as flux.run_job passes it), not bf16(σ): 0.6211 vs 0.625 in bf16."""
    from scenec.runtime.families import load_backend

    be = load_backend("tiny", device="cpu", dtype="bf16")
    seen = []
    hook = be.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(float(kw["timestep"][0])), with_kwargs=True)
    try:
        plain = make_plan(seed=4)
        run_job(be, plain, plain.jobs[0], decode=False)
        sampled = set(seen)
        seen.clear()
        plan = with_reference(make_plan(seed=4), window=(1, 3), cycles=2, modulation=False)
        run_job(be, plan, plan.jobs[0], decode=False)
    finally:
        hook.remove()
    assert inversion.CACHE.stats["inverted"] == 1
    assert set(seen) - {0.0} <= sampled, (sorted(set(seen)), sorted(sampled))  # 0: the first guess at σ_N


def test_sow_attention_calls_do_not_read_the_device():
    """Every block of every modulated step calls attend: deciding on/off must not sync (.item(), bool())
    with the device. Meta tensors have no values, so any read-back raises."""
    term = oneway.sow_term(FACE, RELATED, MOD)
    sow = oneway.Sow({256: [term]}, [0], "meta", frozenset({"double"}))
    ctl = Attention("sdpa")
    q = k = v = torch.empty(1, 2, 8 + 256, 16, device="meta")
    for inside in ([True], [False]):
        sow.begin_step(1, inside)
        sow.pending = False  # the indicator (once per step) reads its spread back by design
        ctl.set([sow], n_img=256)
        assert attend(ctl, DOUBLE, q, k, v, [sow]).shape == q.shape
