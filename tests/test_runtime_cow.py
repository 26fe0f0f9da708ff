"""COW (cyclic one-way diffusion) and SOW modulation on the tiny Flux: the ops as COW's official pipeline
runs them (seed initialisation, pastes at every window level, η), inversion (under true CFG too), cache,
and SOW's modulation against its formula."""

import math

import numpy as np
import pytest
import torch

from scenec.compiler.schedule import Cow, ProgramInputs, build_program
from scenec.runtime import inversion, solvers
from scenec.runtime.attention import DOUBLE, Attention, attend, modulated_dense, modulated_flex
from scenec.runtime.methods import oneway, sow
from scenec.runtime.sampler import Run, noise_generator, run_job
from scenec.runtime.testing import box, make_plan, tiny_backend, token_to_latent
from scenec.spec.plan import Plan, Renoise, Seed

GRID = (16, 16)
FACE = box(GRID, 3, 4, 10, 11)
RELATED = box(GRID, 10, 2, 16, 14)
MOD = {"suppress": 0.8, "enhance": 0.6, "decay": 0.8, "distance": 1.0, "threshold": 1.0}


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
                   modulation=MOD, program=None, init="seed", eta_after=0.0):
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
        ops = build_program(ProgramInputs(steps, conditions=[Cow(0, window[0], window[1], cycles, preserve, eta,
                                                                  eta_after, init)]))
        job["program"] = program if program is not None else [op.model_dump(by_alias=True, mode="json") for op in ops]
    return Plan(doc, t)


def run(backend, plan, **kw):
    return run_job(backend, plan, plan.json["jobs"][0]["id"], decode=False, **kw).latents


def spy_ops(monkeypatch, kinds=("paste", "renoise", "seed")):
    """Record (op index, op, latent after it) for the one-way method's ops."""
    seen = []
    orig = oneway.OneWay.run_op

    def spy(self, n, op, x):
        out = orig(self, n, op, x)
        if op.op in kinds:
            seen.append((n, op, out.clone(), self))
        return out

    monkeypatch.setattr(oneway.OneWay, "run_op", spy)
    return seen


def test_every_paste_puts_the_inverted_reference_in_the_region_the_windows_end_included(backend, monkeypatch):
    plan = with_reference(make_plan(seed=4), window=(1, 3), cycles=3, preserve=3)
    seen = spy_ops(monkeypatch, ("paste",))
    run(backend, plan)
    # COW's official pipeline pastes at every level of the window, its end included, in every cycle; the
    # preserve level 3 is the window's end: the last cycle's paste there is that replacement (not twice)
    assert [op.at for _, op, _, _ in seen] == [1, 2, 3] * 3
    for _, op, x, me in seen:
        ref, m = me.refs[op.condition][op.at], me.masks[op.condition]
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


def test_seed_initialisation_starts_the_window_from_the_renoised_inversion_of_the_canvas(backend, monkeypatch):
    """The window-start latent of the first cycle is the placed canvas inverted to the window's end, then
    re-noised in closed form to the window's start with the job's first noise draw: nothing comes down
    from noise (COW's official pipeline, measured op trace)."""
    plan = with_reference(make_plan(seed=5), window=(1, 3), cycles=2, modulation=False)
    ops = plan.jobs[0].program
    assert ops[:2] == [Seed(at=3, conditions=[0]), Renoise(from_=3, to=1)]
    assert [op.from_ for op in ops if op.op == "denoise"] == [1, 2, 1, 2, 3]  # no step above the window
    seen = spy_ops(monkeypatch, ("seed", "renoise"))
    run(backend, plan)
    assert [n for n, *_ in seen] == [0, 1, 7]
    # by hand: the canvas (the reference in its region on grey) inverted with a plain run of the prompt
    canvas = plan.tensors["cond/face/rgba"][..., :3].copy()  # alpha is 0 or 255: the composite is its RGB
    plain = make_plan(seed=5)
    r = Run(backend, [(plain, plain.jobs[0])])
    r.setup()
    x_end = inversion.invert(r.solver, r.predict_plain, backend.encode_image(canvas), [3])[3]
    assert torch.equal(seen[0][2], x_end)
    xi = torch.randn(x_end.shape, generator=noise_generator(5))
    expect = solvers.renoise_flow(x_end, r.solver.sig[3], r.solver.sig[1], xi)
    assert torch.equal(seen[1][2], expect)
    assert inversion.CACHE.stats["inverted"] == 1  # one reference: its own image is the canvas, inverted once


def test_two_references_share_one_seed_canvas(backend, monkeypatch):
    """With several references the seed canvas holds all of them; each is also inverted alone for its pastes."""
    other = box(GRID, 11, 9, 15, 15)

    def edit(doc, t):
        t["cond/face/rgba"] = reference_rgba(FACE, seed=0)
        t["cond/b/rgba"] = reference_rgba(other, seed=1)
        t["cond/b/token"], t["cond/b/latent"] = other, token_to_latent(other)
        c0 = {"entity": "face", "image": "cond/face/rgba", "sha256": "x", "fit": "contain", "window": [1, 3],
              "cycles": 1, "preserve": None, "eta": 1.0, "masks": {"latent": "cond/face/latent",
                                                                    "token": "cond/face/token"},
              "related": None, "modulation": False}
        t["cond/face/token"], t["cond/face/latent"] = FACE, token_to_latent(FACE)
        c1 = {**c0, "entity": "b", "image": "cond/b/rgba",
              "masks": {"latent": "cond/b/latent", "token": "cond/b/token"}}
        job = doc["jobs"][0]
        job["conditions"] = [c0, c1]
        job["program"] = [op.model_dump(by_alias=True, mode="json") for op in build_program(ProgramInputs(
            4, conditions=[Cow(0, 1, 3, 1, None, 1.0), Cow(1, 1, 3, 1, None, 1.0)]))]

    plan = make_plan(seed=7, edit=edit)
    assert plan.jobs[0].program[0] == Seed(at=3, conditions=[0, 1])
    images = []
    orig = oneway.OneWay._inverted

    def spy(self, rgb, levels):
        images.append((rgb.copy(), levels))
        return orig(self, rgb, levels)

    monkeypatch.setattr(oneway.OneWay, "_inverted", spy)
    seen = spy_ops(monkeypatch, ("seed",))
    run(backend, plan)
    a, b = plan.tensors["cond/face/rgba"], plan.tensors["cond/b/rgba"]
    both = np.where(b[..., 3:] > 0, b[..., :3], a[..., :3])  # the two regions do not overlap
    assert len(images) == 3
    assert np.array_equal(images[0][0], a[..., :3]) and images[0][1] == [1, 2, 3]
    assert np.array_equal(images[1][0], b[..., :3]) and images[1][1] == [1, 2, 3]
    assert np.array_equal(images[2][0], both) and images[2][1] == [3]
    assert torch.equal(seen[0][2], seen[0][3].seeds[(0, 1)][3])


def test_noise_initialisation_samples_down_to_the_window_first(backend):
    plan = with_reference(make_plan(seed=5), window=(1, 3), cycles=2, modulation=False, init="noise")
    kinds = [(op.op, getattr(op, "from_", getattr(op, "at", None))) for op in plan.jobs[0].program]
    assert kinds == [("denoise", 0), ("paste", 1), ("denoise", 1), ("paste", 2), ("denoise", 2), ("paste", 3),
                     ("renoise", 3), ("paste", 1), ("denoise", 1), ("paste", 2), ("denoise", 2), ("paste", 3),
                     ("denoise", 3)]
    a, b = run(backend, plan), run(backend, plan)
    assert torch.equal(a, b)  # the job's own noise stream: the same image every run


def test_eta_after_the_cycles_is_on_the_steps_after_the_window():
    ops = build_program(ProgramInputs(10, conditions=[Cow(0, 3, 5, 2, 6, 1.0, 0.1)]))
    etas = {(op.from_, op.eta) for op in ops if op.op == "denoise"}
    assert etas == {(3, 1.0), (4, 1.0)} | {(i, 0.1) for i in range(5, 10)}


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


def test_flow_eta_is_ddims_eta_on_a_ddpm_schedule():
    """The flow step with η is DDIM's step (diffusers' DDIMScheduler, SD's 10-step schedule) on the same
    state written as a rectified flow: x_flow = x / (√ᾱ + √(1−ᾱ)), σ = √(1−ᾱ) / (√ᾱ + √(1−ᾱ)), v = ε − x₀.
    So η's share of fresh noise is DDIM's (≈ 0.7 of the noise std on these steps), not all of it."""
    from diffusers import DDIMScheduler

    from scenec.runtime.tiny_sd import SD_SCHEDULER_CONFIG

    sched = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    sched.set_timesteps(10)
    ts = [int(t) for t in sched.timesteps]
    g = torch.Generator().manual_seed(3)
    x0, eps, xi = (torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    shares = []
    for i in (1, 2, 3, 4, 5):
        a_i, a_j = (float(sched.alphas_cumprod[t]) for t in (ts[i], ts[i + 1]))
        c_i, c_j = (math.sqrt(a) + math.sqrt(1 - a) for a in (a_i, a_j))
        s_i, s_j = math.sqrt(1 - a_i) / c_i, math.sqrt(1 - a_j) / c_j
        x_i = math.sqrt(a_i) * x0 + math.sqrt(1 - a_i) * eps
        for eta in (1.0, 0.5, 0.0):
            ddim = sched.step(eps, ts[i], x_i, eta=eta, variance_noise=xi).prev_sample
            flow = solvers.flow_step_eta(x_i / c_i, eps - x0, s_i, s_j, eta, xi.float()).double()
            torch.testing.assert_close(flow, ddim / c_j, atol=2e-5, rtol=1e-5)
        ddim_share = math.sqrt(sched._get_variance(ts[i], ts[i + 1]).item() / (1 - a_j))
        assert solvers.fresh_noise_share(s_i, s_j, 1.0) == pytest.approx(ddim_share, rel=1e-5)
        shares.append(ddim_share)
    assert all(0.65 < s < 0.8 for s in shares), shares  # the DDPM posterior: 0.69–0.76 of the noise std


def test_eta_step_endpoints():
    g = torch.Generator().manual_seed(1)
    x, v, xi = (torch.randn(4, 16, generator=g) for _ in range(3))
    euler = x + (0.4 - 0.7) * v
    torch.testing.assert_close(solvers.flow_step_eta(x, v, 0.7, 0.4, 0.0, xi), euler)
    # from pure noise (σ_i = 1, SNR 0) DDIM's η = 1 posterior keeps nothing of ε̂: x̂₀ re-noised with ξ only
    full = solvers.flow_step_eta(x, v, 1.0, 0.4, 1.0, xi)
    torch.testing.assert_close(full, 0.6 * (x - 1.0 * v) + 0.4 * xi)
    assert solvers.fresh_noise_share(0.7, 0.4, 1.0) == pytest.approx(math.sqrt(1 - (0.3 / 0.7) ** 2 / (0.6 / 0.4) ** 2))


# --- SOW --------------------------------------------------------------------------------------------

ONE_OP = [{"op": "paste", "condition": 0, "at": 1},
          {"op": "denoise", "from": 1, "to": 2, "regional": True, "theta": None, "eta": 0.0}]


def _sow_probe(backend, monkeypatch, modulation, related=RELATED):
    """One denoise op inside the cycles (paste at 1, denoise 1 → 2) with the probe on; the op's indicator."""
    plan = with_reference(make_plan(seed=2), window=(1, 3), cycles=2, related=related, modulation=modulation,
                          program=ONE_OP)
    hist = []
    orig = sow.Sow.measure

    def spy(self, *a, **k):
        orig(self, *a, **k)
        hist.append(dict(self.history[-1]))

    monkeypatch.setattr(sow.Sow, "measure", spy)
    backend.attn.probe = []
    try:
        x = run(backend, plan)
        recs = backend.attn.probe
    finally:
        backend.attn.probe = None
    monkeypatch.setattr(sow.Sow, "measure", orig)
    return x, recs, hist


def moved_by_hand(logits, e, u, n_txt, allow):
    """SOW's modulation written out: image rows' scores pulled within their [min, max] over allowed image keys."""
    img = logits[..., n_txt:, n_txt:]
    a = None if allow is None else allow[n_txt:, n_txt:]
    hi = (img if a is None else img.masked_fill(~a, -math.inf)).amax(-1, keepdim=True)
    lo = (img if a is None else img.masked_fill(~a, math.inf)).amin(-1, keepdim=True)
    out = logits.clone()
    out[..., n_txt:, n_txt:] = img + e * (hi - img) - u * (img - lo)
    return out, hi, lo


def test_sow_modulation_is_the_formula(backend, monkeypatch):
    _, recs, hist = _sow_probe(backend, monkeypatch, MOD)
    assert len(recs) == 4 and all(r["kind"] == "sow" for r in recs) and len(hist) == 1
    term = sow.sow_term(FACE, RELATED, MOD)
    s = hist[0]["share"][0]
    g = max(0.0, (MOD["threshold"] - s) / MOD["threshold"])  # cycle 0: decay^0 = 1, × φ(share)
    assert 0.0 < g < 1.0 and hist[0]["gains"][0] == pytest.approx(g)
    cond, rel = torch.from_numpy(FACE.reshape(-1) > 0), torch.from_numpy(RELATED.reshape(-1) > 0)
    e_hand = g * MOD["enhance"] * (rel[:, None] & cond[None, :]).float() * term.fall[:, None]
    u_hand = g * MOD["suppress"] * (cond[:, None] & ~cond[None, :]).float() * term.fall[None, :]
    for r in recs:
        torch.testing.assert_close(r["e"], e_hand)
        torch.testing.assert_close(r["u"], u_hand)
        n_txt, logits = r["n_txt"], r["logits"]
        moved, hi, lo = moved_by_hand(logits, r["e"], r["u"], n_txt, r["allow"])
        assert torch.equal(moved[..., :n_txt, :], logits[..., :n_txt, :])  # text rows and columns untouched
        assert torch.equal(moved[..., :, :n_txt], logits[..., :, :n_txt])
        img, img0 = moved[..., n_txt:, n_txt:], logits[..., n_txt:, n_txt:]
        assert (img <= hi + 1e-5).all() and (img >= lo - 1e-5).all()  # every score stays in its row's range
        enh, sup = r["e"] > 0, r["u"] > 0
        assert (img[..., enh] >= img0[..., enh]).all() and (img[..., sup] <= img0[..., sup]).all()
        assert (img[..., ~(enh | sup)] == img0[..., ~(enh | sup)]).all()
        expected = torch.softmax(moved, -1) @ r["v"]
        torch.testing.assert_close(r["out"], expected, atol=1e-5, rtol=1e-4)


def test_sow_indicator_is_the_normalised_share_of_the_closest_fifth():
    # 2 × 2 grid: C = {0}; the guiding box R = {1, 2, 3}; its closest fifth to C's centre: one point, token 1
    t = sow.sow_term(np.array([[1, 0], [0, 0]], np.float32), np.array([[0, 1], [1, 1]], np.float32),
                     {"threshold": 0.8})
    assert t.probe.tolist() == [1]
    q = torch.zeros(1, 1, 4, 1)
    q[0, 0, 1, 0] = 1.0
    k = torch.tensor([3.0, 1.0, 0.0, 2.0]).view(1, 1, 4, 1)
    # scores of token 1: [3, 1, 0, 2] → min–max normalised [1, 1/3, 0, 2/3]: share on C = 1 / 2
    assert sow.sow_share(t, q, k) == pytest.approx(0.5)
    assert sow.indicator_factor(0.5, 0.8) == pytest.approx(0.375)
    assert sow.indicator_factor(0.9, 0.8) == 0.0 and sow.indicator_factor(0.0, 0.8) == 1.0
    # keys the query may not see are outside the range and the share: drop token 0 (the condition)
    allow = torch.ones(4, 4, dtype=torch.bool)
    allow[1, 0] = False
    assert sow.sow_share(t, q, k, allow=allow[t.probe]) == 0.0


def test_sow_probe_points_are_the_closest_fifth_of_the_guiding_box():
    t = sow.sow_term(FACE, RELATED, MOD)
    pool = np.flatnonzero((RELATED > 0) & ~(FACE > 0))
    probe = t.probe.numpy()
    assert len(probe) == math.ceil(0.2 * len(pool)) and set(probe) <= set(pool)
    ys, xs = np.divmod(np.arange(256), 16)
    cy, cx = np.mean(np.nonzero(FACE)[0]), np.mean(np.nonzero(FACE)[1])
    d = np.hypot(ys - cy, xs - cx)
    assert d[probe].max() <= d[np.setdiff1d(pool, probe)].min()
    no_box = sow.sow_term(FACE, None, MOD)  # no guiding box: the closest fifth of the outside
    assert len(no_box.probe) == math.ceil(0.2 * (256 - int((FACE > 0).sum())))


def test_sow_gain_decays_per_cycle_and_scales_with_the_indicator(backend, monkeypatch):
    hist = []
    orig = sow.Sow.measure

    def spy(self, *a, **k):
        orig(self, *a, **k)
        hist.append(dict(self.history[-1]))

    monkeypatch.setattr(sow.Sow, "measure", spy)
    run(backend, with_reference(make_plan(seed=3), window=(1, 3), cycles=3))
    assert [h["cycle"] for h in hist] == [0, 0, 1, 1, 2, 2]
    for h in hist:
        phi = max(0.0, (MOD["threshold"] - h["share"][0]) / MOD["threshold"])
        assert h["factor"][0] == pytest.approx(phi) and 0.0 < phi < 1.0
        assert h["gains"][0] == pytest.approx(0.8 ** h["cycle"] * phi)


def test_sow_threshold_scales_the_modulation_between_off_and_full(backend, monkeypatch):
    """The indicator's share s of the op is measured on unmodulated scores, so it does not depend on the
    threshold: τ = 2s halves the gain, τ just below s turns the op's modulation off entirely."""
    x_plain, _, _ = _sow_probe(backend, monkeypatch, False)
    _, _, hist = _sow_probe(backend, monkeypatch, MOD)
    s = hist[0]["share"][0]
    _, recs, h2 = _sow_probe(backend, monkeypatch, {**MOD, "threshold": 2 * s})
    assert h2[0]["share"][0] == pytest.approx(s) and h2[0]["gains"][0] == pytest.approx(0.5)
    assert all(r["e"].max() <= 0.5 * MOD["enhance"] + 1e-6 for r in recs)
    x_off, recs, h3 = _sow_probe(backend, monkeypatch, {**MOD, "threshold": 0.99 * s})
    assert h3[0]["gains"] == [0.0] and recs == []  # nothing moves: the plain kernel
    torch.testing.assert_close(x_off, x_plain, atol=1e-6, rtol=0)


def test_modulation_false_changes_nothing(backend, monkeypatch):
    x_off, recs, _ = _sow_probe(backend, monkeypatch, False)
    assert recs == []  # no entities, no modulation: diffusers' own processor ran
    x_zero, recs0, _ = _sow_probe(backend, monkeypatch, {**MOD, "suppress": 0.0, "enhance": 0.0})
    assert recs0 and all((r["e"] == 0).all() and (r["u"] == 0).all() for r in recs0)
    torch.testing.assert_close(x_off, x_zero, atol=1e-5, rtol=0)  # the explicit kernel is SDPA's arithmetic


@pytest.mark.parametrize("threshold", [0.05, 0.9])
def test_sow_indicator_on_the_device_path_gives_the_host_paths_gains(threshold):
    """On a GPU φ and the gains stay on the device (no sync in the step loop); the same arithmetic, run
    here on CPU tensors, must give the host path's gains (φ = 0 at a low threshold, partial at a high one)."""
    term = sow.sow_term(FACE, RELATED, {**MOD, "threshold": threshold})
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 2, 8 + 256, 16, generator=g) for _ in range(2))

    def allow(qi):
        return None

    host = sow.Sow({256: [term]}, [0], "cpu", frozenset({"double"}))
    host.begin_step(2, [True])
    host.measure(q, k, 8, allow, slice(0, 1))
    dev = sow.Sow({256: [term]}, [0], "cpu", frozenset({"double"}))
    dev.begin_step(2, [True])
    dev.measure(q, k, 8, allow, slice(0, 1), on_device=True)
    assert dev.gains_t.tolist() == pytest.approx(host.gains, abs=1e-6)
    assert float(dev.history[-1]["share"][0]) == pytest.approx(host.history[-1]["share"][0], abs=1e-6)
    assert dev.active()  # decided before φ, on the host: the kernels then read the device gains


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_sow_flex_score_mod_equals_the_dense_modulation():
    """FlexAttention's path (CUDA) against the dense one, both on CPU (eager flex)."""
    term = sow.sow_term(FACE, RELATED, MOD)
    s = sow.Sow({256: [term]}, [0], "cpu", frozenset({"double"}))
    s.begin_step(1, [True])
    s.pending = False
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8 + 256, 16, generator=g) for _ in range(3))
    ctl = Attention("sdpa")
    dense = modulated_dense(ctl, DOUBLE, q, k, v, None, s.weights(256, "cpu"), 8, 256)
    flex = modulated_flex(q, k, v, None, s, 8, 256, chunk=100)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("image_self", ["open", "restricted"])
def test_sow_flex_under_a_region_mask_equals_the_dense_modulation(image_self):
    """With a regional BlockMask the flex path takes each chunk's rows of the allow-matrix (no N×N) and
    still computes the dense path's attention under the SDPA mask of the same layout."""
    from scenec.runtime.layout import RegionalLayout, build_mask, region_membership

    term = sow.sow_term(FACE, RELATED, MOD)
    s = sow.Sow({256: [term]}, [0], "cpu", frozenset({"double"}))
    s.begin_step(1, [True])
    s.pending = False
    lay = RegionalLayout([8, 6], region_membership([FACE], (16, 16)), image_self, pad_multiple=128)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, lay.N, 16, generator=g) for _ in range(3))
    n_text = lay.n_text
    ctl = Attention("sdpa")
    dense = modulated_dense(ctl, DOUBLE, q, k, v, build_mask(lay, "sdpa", "cpu"), s.weights(256, "cpu"), n_text, 256)
    flex = modulated_flex(q, k, v, build_mask(lay, "flex", "cpu"), s, n_text, 256, chunk=100)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-4)


def test_inversion_under_true_cfg_inverts_the_samplers_own_step(backend, monkeypatch):
    """With true_cfg > 1 the sampler's step is v_neg + s·(v_pos − v_neg): the inversion must invert that
    step. The velocity here is built by hand from two plain runs (the prompt; the negative as a prompt)."""
    monkeypatch.setattr(inversion, "INVERSION_REFINE", 20)
    plan = make_plan(prompt="a meadow", negative="blurry, low quality", seed=2, true_cfg=2.5)
    r = Run(backend, [(plan, plan.jobs[0])])
    r.setup()
    z = backend.encode_image(reference_rgba(FACE)[..., :3].copy())
    lat = inversion.invert(r.solver, r.predict_plain, z, [2, 3])

    def v_of(prompt):
        p = make_plan(prompt=prompt, seed=2)
        rr = Run(backend, [(p, p.jobs[0])])
        rr.setup()
        return rr.predict_plain(lat[2], 2)

    v_pos, v_neg = v_of("a meadow"), v_of("blurry, low quality")
    sig = r.solver.sig

    def err(v):
        return ((lat[2] + (sig[3] - sig[2]) * v - lat[3]).abs().max() / lat[3].abs().max()).item()

    e_cfg, e_pos = err(v_neg + 2.5 * (v_pos - v_neg)), err(v_pos)
    print(f"true CFG 2.5: the step from the inverted level 2 lands on level 3 within {e_cfg:.1e} "
          f"(positive pass only: {e_pos:.1e})")
    assert e_cfg < 1e-4 and e_pos > 100 * e_cfg


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
               {"op": "denoise", "from": 0, "to": 1, "regional": True, "theta": None, "eta": 1.5},
               {"op": "seed", "at": 2, "conditions": [0, 4]}, {"op": "seed", "at": 9, "conditions": [0]}):
        plan = with_reference(make_plan(), program=[op])
        with pytest.raises(PlanError):
            run(backend, plan)


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
    term = sow.sow_term(FACE, RELATED, MOD)
    s = sow.Sow({256: [term]}, [0], "meta", frozenset({"double"}))
    ctl = Attention("sdpa")
    q = k = v = torch.empty(1, 2, 8 + 256, 16, device="meta")
    for inside in ([True], [False]):
        s.begin_step(1, inside)
        s.pending = False  # the indicator (once per step) reads its share back by design
        ctl.set([s], n_img=256)
        assert attend(ctl, DOUBLE, q, k, v, [s]).shape == q.shape


def test_inversion_tolerance_and_passes_follow_the_dtype(monkeypatch):
    """bf16's ulp (2⁻⁷) is far above 1e-5: its tolerance is the dtype's and its passes capped, so an
    inversion cannot spend 20 forwards per step on rounding noise; fp32 keeps the tight setting."""
    monkeypatch.setattr(inversion, "INVERSION_REFINE", 20)
    assert inversion.inversion_tol(torch.float32) == inversion.INVERSION_TOL
    assert inversion.inversion_tol(torch.bfloat16) == pytest.approx(4 * 2 ** -7)
    assert inversion.refine_cap(torch.float32) == inversion.INVERSION_REFINE
    assert inversion.refine_cap(torch.bfloat16) == inversion.refine_cap(torch.float16) < inversion.INVERSION_REFINE
    calls = []

    def step(y):  # a contraction whose fixed point bf16 cannot resolve below its ulp
        calls.append(1)
        return (0.5 * y + 0.3).to(torch.bfloat16)

    x_next = torch.full((64,), 0.9, dtype=torch.bfloat16)
    x = inversion.refine_step(x_next, x_next.clone(), step, inversion.refine_cap(torch.bfloat16),
                              inversion.inversion_tol(torch.bfloat16), check_every=1)
    assert len(calls) < inversion.refine_cap(torch.bfloat16)  # met the bf16 tolerance, stopped early
    assert (step(x) - x_next).abs().max() <= inversion.inversion_tol(torch.bfloat16)


def test_an_inversion_is_not_reused_under_another_prompt_syntax(backend):
    """The backend is shared across prompt syntaxes (scenec/build/pool.py), so the inversion cache's key holds the
    syntax: `(meadow:1.6)` read as A1111 weights guides another trajectory than the plain text. Without it the
    A1111 plan reused the plain plan's inversion (memory and disk cache): its latents moved by 0.12."""
    def plan(syntax):
        def edit(d, t):
            d["model"]["prompt_syntax"] = syntax
        return with_reference(make_plan(prompt="a (meadow:1.6) at dusk", steps=4, edit=edit))

    run(backend, plan("plain"))
    after_plain = inversion.CACHE.stats["inverted"]
    x = run(backend, plan("a1111"))
    assert inversion.CACHE.stats["inverted"] == after_plain + 1
    inversion.CACHE.clear()
    assert torch.equal(x, run(backend, plan("a1111")))
