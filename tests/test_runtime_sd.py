"""The SD backend on tiny-sd: pipeline parity, regional cross-attention, negatives, inpainting, COW."""

import functools

import numpy as np
import pytest
import torch

from scenec.compiler.schedule import Cow, ProgramInputs, build_program
from scenec.runtime import inversion
from scenec.runtime.methods import oneway
from scenec.runtime.sampler import run_job
from scenec.runtime.testing import box, pool, sd_plan
from scenec.spec.errors import ModelUnavailable, Unsupported
from scenec.spec.plan import Plan

GRID = (16, 16)  # a16 on a 256² canvas
FOX = box(GRID, 2, 2, 8, 8)
TREE = box(GRID, 6, 8, 14, 15, value=0.5)
ENTS = [{"id": "fox", "prompt": "a red fox", "negative": "blurry", "token": FOX},
        {"id": "tree", "prompt": "a green tree", "token": TREE}]


@functools.lru_cache(maxsize=None)
def _backend():
    from scenec.runtime.families import load_backend

    return load_backend("tiny-sd", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def backend():
    return _backend()


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SCENEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inversion, "INVERSION_REFINE", 3)
    inversion.CACHE.clear()
    inversion.CACHE.stats.update(memory=0, disk=0, inverted=0)
    yield


def run(backend, plan):
    return run_job(backend, plan, plan.json["jobs"][0]["id"], decode=False).latents


def pipeline():
    """A fresh diffusers StableDiffusionPipeline over a second build of tiny-sd (same seeds, same bytes), with
    diffusers' stock attention processors: nothing of scenec's runtime takes part in the reference."""
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    from scenec.runtime.tiny_sd import build_tiny_sd

    p = StableDiffusionPipeline(**build_tiny_sd())
    assert all(type(proc) is AttnProcessor2_0 for proc in p.unet.attn_processors.values())
    p.set_progress_bar_config(disable=True)
    return p


def test_no_entities_reproduces_stable_diffusion_pipeline(backend):
    plan = sd_plan(prompt="a meadow at sunset", negative="blurry", seed=11)
    ours = run(backend, plan)
    ref = pipeline()("a meadow at sunset", negative_prompt="blurry", height=256, width=256,
                            num_inference_steps=4, guidance_scale=7.5, generator=torch.Generator().manual_seed(11),
                            output_type="latent").images
    assert torch.equal(ours, ref)  # bit for bit


def test_regional_probe_follows_the_regions_at_every_resolution(backend):
    plan = sd_plan(entities=ENTS, program=[{"op": "denoise", "from": 0, "to": 1, "regional": True, "theta": None,
                                            "eta": 0.0}])
    backend.attn.probe = []
    try:
        run(backend, plan)
        recs = backend.attn.probe
    finally:
        backend.attn.probe = None
    assert {r["n_q"] for r in recs} == {32 * 32, 16 * 16, 8 * 8, 4 * 4}  # latent, a16, a32, a64
    n_g = 77
    enc = backend.encode_entity
    n_pos = (enc("a red fox").shape[1], enc("a green tree").shape[1])
    n_neg = (enc("blurry").shape[1], enc("").shape[1])  # the tree has the background's negative
    assert n_g + sum(n_pos) != n_g + sum(n_neg)
    grids = {32 * 32: "latent", 16 * 16: "a16", 8 * 8: "a32", 4 * 4: "a64"}
    for r in recs:
        gname = grids[r["n_q"]]
        fox = torch.from_numpy(plan.tensors[f"region/fox/{gname}"].reshape(-1) > 0)
        tree = torch.from_numpy(plan.tensors[f"region/tree/{gname}"].reshape(-1) > 0)
        a = r["allow"]
        n_fox, n_tree = n_pos if a.shape[1] == n_g + sum(n_pos) else n_neg
        assert a.shape[1] == n_g + n_fox + n_tree
        first, second = slice(n_g, n_g + n_fox), slice(n_g + n_fox, a.shape[1])
        assert a[:, :n_g].all()  # global prompt: every query
        assert torch.equal(a[:, first], fox[:, None].expand(-1, n_fox))
        assert torch.equal(a[:, second], tree[:, None].expand(-1, n_tree))
        w = r["weights"][0]
        assert (w[:, ~fox][:, :, first] == 0).all() and (w[:, fox][:, :, first].sum() > 0)
        torch.testing.assert_close(r["out"], r["expected"], atol=1e-5, rtol=1e-4)


def test_entities_and_entity_negatives_change_the_image(backend):
    a = run(backend, sd_plan(seed=5))
    b = run(backend, sd_plan(seed=5, entities=ENTS))
    ents = [dict(e, negative=None) for e in ENTS]
    c = run(backend, sd_plan(seed=5, entities=ents))
    assert (a - b).abs().max() > 1e-3 and (b - c).abs().max() > 1e-4


def test_inpainting_keeps_the_outside_exactly(backend):
    init = (np.random.default_rng(0).uniform(0, 255, (256, 256, 3))).astype(np.uint8)
    plan = sd_plan(seed=2, entities=ENTS[:1], init_image=init)
    x = run(backend, plan)
    z0 = backend.encode_image(init)
    outside = torch.from_numpy(plan.tensors["inpaint/u/latent"] == 0)[None, None].expand_as(x)
    assert torch.equal(x[outside], z0[outside])
    assert (x[~outside] - z0[~outside]).abs().max() > 1e-2


def _with_reference(plan, window=(1, 3), cycles=2, preserve=None, eta=1.0, whole=False, program=None):
    from test_runtime_cow import reference_rgba

    token = np.ones(GRID, np.float32) if whole else FOX
    t = dict(plan.tensors)
    t["cond/r/rgba"] = reference_rgba(token)
    t["cond/r/latent"] = np.repeat(np.repeat(token, 2, 0), 2, 1)
    for job in plan.json["jobs"]:
        job["conditions"] = [{"entity": "fox", "image": "cond/r/rgba", "sha256": "x", "fit": "contain",
                              "window": list(window), "cycles": cycles, "preserve": preserve, "eta": eta,
                              "masks": None if whole else {"latent": "cond/r/latent"}, "related": None,
                              "modulation": False}]
        job["program"] = program or [op.model_dump(by_alias=True, mode="json") for op in build_program(ProgramInputs(
            plan.sampler.steps, conditions=[Cow(0, window[0], window[1], cycles, preserve, eta)]))]
    return Plan(plan.json, t)


def test_cow_on_sd_paste_renoise_preserve_and_cache(backend, monkeypatch):
    plain = run(backend, sd_plan(seed=3))
    assert torch.equal(plain, run(backend, _with_reference(sd_plan(seed=3), cycles=0)))
    seen = []
    orig = oneway.paste

    def spy(x, ref, m):
        out = orig(x, ref, m)
        seen.append((out, ref, m))
        return out

    monkeypatch.setattr(oneway, "paste", spy)
    seeded = []
    orig_op = oneway.OneWay.run_op

    def spy_op(self, n, op, x):
        out = orig_op(self, n, op, x)
        if op.op == "seed":
            seeded.append(out.clone())
        return out

    monkeypatch.setattr(oneway.OneWay, "run_op", spy_op)
    plan = _with_reference(sd_plan(seed=3), window=(1, 3), cycles=2, preserve=3)
    a = run(backend, plan)
    # every window level, its end included, in both cycles; the preserve level is the window's end
    assert len(seen) == 6 and inversion.CACHE.stats["inverted"] == 1  # the canvas is the reference's own image
    for out, ref, m in seen:
        inside = (m == 1).expand_as(out)
        assert torch.equal(out[inside], ref[inside])
    # the seed: the canvas inverted (DDIM inversion with the sampler's CFG) to the window's end, by hand
    from scenec.runtime.sampler import Run

    p0 = sd_plan(seed=3)
    r = Run(backend, [(p0, p0.jobs[0])])
    r.setup()
    canvas = plan.tensors["cond/r/rgba"][..., :3].copy()
    x_end = inversion.invert(r.solver, r.predict_plain, backend.encode_image(canvas), [3])[3]
    assert len(seeded) == 1
    torch.testing.assert_close(seeded[0], x_end, atol=1e-6, rtol=0)
    b = run(backend, plan)
    assert inversion.CACHE.stats["inverted"] == 1  # cache hit
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # measured ≤ 1e-6 (oneDNN first-call kernels)


def test_ddim_inversion_reconstructs_the_reference(backend, monkeypatch):
    """Invert to level 8 of 10, paste over the whole canvas, sample deterministically (no CFG)."""
    monkeypatch.setattr(inversion, "INVERSION_REFINE", 20)
    steps, k = 10, 8
    program = [{"op": "denoise", "from": i, "to": i + 1, "regional": True, "theta": None, "eta": 0.0}
               for i in range(steps)]
    program.insert(k, {"op": "paste", "condition": 0, "at": k})
    plan = _with_reference(sd_plan(seed=1, steps=steps, guidance=1.0), whole=True, cycles=0, program=program)
    x = run(backend, plan)
    z = backend.encode_image(plan.tensors["cond/r/rgba"][..., :3].copy())
    err = ((x - z).abs().max() / z.abs().max()).item()
    print(f"SD DDIM inversion from level {k} of {steps}: relative error {err:.2e}")
    assert err < 1e-3  # measured 1.3e-5 (level 7), 2.9e-5 (level 5); with CFG 7.5: 1.8e-2 (level 7)


def test_sd_load_errors(tmp_path):
    from scenec.runtime.families import as_model, flux, load_backend

    with pytest.raises(ModelUnavailable, match="model_index.json"):
        load_backend({"spec": str(tmp_path), "family": "sd", "repo": str(tmp_path)}, device="cpu")
    with pytest.raises(Unsupported, match="family"):
        flux.load(as_model({"spec": "sd15", "family": "sd", "repo": "x/y"}), device="cpu")
    assert type(load_backend("tiny-sd", device="cpu")).__name__ == "SDBackend"


# --- SOW on SD: the bias on the UNet's self-attention (attn1) at every resolution ------------------

SOW_MOD = {"suppress": 0.8, "enhance": 0.6, "decay": 0.8, "distance": 1.0, "threshold": 1.0}
RELATED = box(GRID, 10, 2, 16, 14)
SD_GRIDS = {32 * 32: "latent", 16 * 16: "a16", 8 * 8: "a32", 4 * 4: "a64"}


def _with_sow(plan, modulation=SOW_MOD, related=RELATED, **kw):
    """_with_reference plus the condition's and related region's masks on every SD grid and a modulation."""
    plan = _with_reference(plan, **kw)
    t = dict(plan.tensors)
    masks, rel = {}, {}
    for name, m, out in (("cond/r", FOX, masks), ("rel/r", related, rel)):
        if m is None:
            continue
        t[f"{name}/latent"] = np.repeat(np.repeat(m, 2, 0), 2, 1)
        t[f"{name}/a16"], t[f"{name}/a32"], t[f"{name}/a64"] = m, pool(m, 2), pool(m, 4)
        out.update({g: f"{name}/{g}" for g in ("latent", "a16", "a32", "a64")})
    for job in plan.json["jobs"]:
        job["conditions"][0].update(masks=masks, related=rel or None, modulation=modulation)
    return Plan(plan.json, t)


def _fall(m: np.ndarray, distance: float) -> np.ndarray:
    """The SOW fall-off, written out: exp(−distance·|p − centre|/diagonal), centre = coverage centroid."""
    h, w = m.shape
    ys, xs = np.mgrid[0:h, 0:w]
    cy, cx = (ys * m).sum() / m.sum(), (xs * m).sum() / m.sum()
    return np.exp(-distance * np.hypot(ys - cy, xs - cx) / np.hypot(h, w))


def _sow_probe(backend, modulation, seed=2):
    """One denoise op inside the cycles (paste at 1, denoise 1 → 2) with the probe on; the op's indicator."""
    plan = _with_sow(sd_plan(seed=seed), modulation, program=[
        {"op": "paste", "condition": 0, "at": 1},
        {"op": "denoise", "from": 1, "to": 2, "regional": True, "theta": None, "eta": 0.0}])
    hist = []
    orig = oneway.Sow.measure

    def spy(self, *a):
        orig(self, *a)
        hist.append(dict(self.history[-1]))

    oneway.Sow.measure = spy
    backend.attn.probe = []
    try:
        x = run(backend, plan)
        recs = backend.attn.probe
    finally:
        backend.attn.probe = None
        oneway.Sow.measure = orig
    return plan, x, recs, hist


def test_sow_modulation_on_sd_is_the_formula_at_every_resolution(backend):
    plan, _, recs, hist = _sow_probe(backend, SOW_MOD)
    sow = [r for r in recs if r.get("kind") == "sow"]
    assert len(sow) == 10  # every attn1 of the tiny UNet: 3 down, 1 mid, 6 up (CFG batched: one forward)
    assert {r["n_q"] for r in sow} == set(SD_GRIDS)
    g = max(0.0, (SOW_MOD["threshold"] - hist[0]["share"][0]) / SOW_MOD["threshold"])  # cycle 0, × φ(share)
    assert len(hist) == 1 and 0.0 < g < 1.0
    for r in sow:
        grid = SD_GRIDS[r["n_q"]]
        cm, rm = plan.tensors[f"cond/r/{grid}"], plan.tensors[f"rel/r/{grid}"]
        c, rel = torch.from_numpy(cm.reshape(-1) > 0), torch.from_numpy(rm.reshape(-1) > 0)
        f = torch.from_numpy(_fall(cm, SOW_MOD["distance"]).reshape(-1)).float()
        sup = c[:, None] & ~c[None, :]  # the condition region reading the outside
        enh = rel[:, None] & c[None, :]  # the related region reading the condition
        assert sup.any() and enh.any() and r["n_txt"] == 0 and r["allow"] is None
        torch.testing.assert_close(r["e"], g * SOW_MOD["enhance"] * enh.float() * f[:, None], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r["u"], g * SOW_MOD["suppress"] * sup.float() * f[None, :], atol=1e-6, rtol=1e-6)
        s = r["logits"]
        hi, lo = s.amax(-1, keepdim=True), s.amin(-1, keepdim=True)
        moved = s + r["e"] * (hi - s) - r["u"] * (s - lo)  # each query's scores stay within its own range
        torch.testing.assert_close(r["out"], torch.softmax(moved, -1) @ r["v"], atol=1e-5, rtol=1e-4)


def test_sd_modulation_false_is_bit_identical_to_stock_self_attention(backend):
    from diffusers.models.attention_processor import AttnProcessor2_0

    plan = _with_sow(sd_plan(seed=4), modulation=False)
    run(backend, plan)  # warm-up: the inversion (and oneDNN's first calls) out of the comparison
    x_off = run(backend, plan)
    procs = backend.unet.attn_processors
    attn1 = [n for n in procs if n.endswith("attn1.processor")]
    assert attn1 and all(type(procs[n]).__name__ == "SDProcessor" for n in attn1)
    backend.unet.set_attn_processor({n: AttnProcessor2_0() if n in attn1 else p for n, p in procs.items()})
    try:
        x_stock = run(backend, plan)  # no modulation code on the self-attention path at all
    finally:
        backend.unet.set_attn_processor(dict(procs))
    assert torch.equal(x_off, x_stock)
    _, x_zero, recs, _ = _sow_probe(backend, {**SOW_MOD, "suppress": 0.0, "enhance": 0.0})
    assert recs and all((r["e"] == 0).all() and (r["u"] == 0).all() for r in recs if r.get("kind") == "sow")
    _, x_plain, recs, _ = _sow_probe(backend, False)
    assert recs == []
    torch.testing.assert_close(x_zero, x_plain, atol=3e-5, rtol=0)  # the explicit kernel vs SDPA: rounding only


def test_sow_on_sd_decays_per_cycle_and_scales_with_the_indicator(backend, monkeypatch):
    hist = []
    orig = oneway.Sow.measure

    def spy(self, q, k, n_text, allow, rows):
        orig(self, q, k, n_text, allow, rows)
        hist.append(dict(self.history[-1], rows=rows, batch=q.shape[0]))

    monkeypatch.setattr(oneway.Sow, "measure", spy)
    run(backend, _with_sow(sd_plan(seed=3), window=(1, 3), cycles=3))
    assert [h["cycle"] for h in hist] == [0, 0, 1, 1, 2, 2]
    for h in hist:
        assert h["grid"] == 32 * 32  # the op's first self-attention: the latent grid
        assert h["batch"] == 2 and h["rows"] == slice(1, 2)  # CFG [negative, positive]: the positive row
        phi = (SOW_MOD["threshold"] - h["share"][0]) / SOW_MOD["threshold"]
        assert 0.0 < phi < 1.0 and h["gains"][0] == pytest.approx(0.8 ** h["cycle"] * phi)
    hist.clear()
    off = run(backend, _with_sow(sd_plan(seed=3), window=(1, 3), cycles=2, modulation=False))
    never = run(backend, _with_sow(sd_plan(seed=3), window=(1, 3), cycles=2, modulation={**SOW_MOD, "threshold": 0.0}))
    assert hist and all(h["gains"] == [0.0] for h in hist)  # threshold 0: φ = 0, nothing moves
    torch.testing.assert_close(off, never, atol=1e-5, rtol=0)


def test_sd_portrait_scene_builds_with_sow(tmp_path, monkeypatch):
    from pathlib import Path

    from scenec.build.driver import build_batch
    from scenec.build.options import BuildOptions

    hist = []
    orig = oneway.Sow.measure

    def spy(self, *a):
        orig(self, *a)
        hist.append(self.history[-1])

    monkeypatch.setattr(oneway.Sow, "measure", spy)
    monkeypatch.setenv("SCENEC_CACHE", str(tmp_path / "cache"))
    scene = Path(__file__).resolve().parents[1] / "scenes" / "sd-portrait.yaml"
    res = build_batch([scene], BuildOptions(out=tmp_path, device="cpu", dtype="fp32", quiet=True, force=True))
    assert res["built"] == 1 and res["failed"] == 0, res
    assert [h["cycle"] for h in hist] == [0, 1, 2]  # window 1 → 2: one modulated op per cycle


def test_inpainting_keeps_half_precision_latents():
    """fp16/bf16 (SD's default on CUDA): the float32 inpaint mask must not promote the latents to float32,
    or the UNet's next forward fails on mixed dtypes (bf16 on CPU stands in for fp16 on CUDA)."""
    from scenec.runtime.families import load_backend

    be = load_backend("tiny-sd", device="cpu", dtype="bf16")
    init = (np.random.default_rng(0).uniform(0, 255, (128, 128, 3))).astype(np.uint8)
    plan = sd_plan(seed=2, width=128, height=128, steps=2, guidance=1.0, init_image=init,
                   entities=[{"id": "fox", "prompt": "a red fox", "token": box((8, 8), 1, 1, 5, 5)}])
    x = run_job(be, plan, plan.jobs[0], decode=False).latents
    assert x.dtype == torch.bfloat16
    z0 = be.encode_image(init)
    outside = torch.from_numpy(plan.tensors["inpaint/u/latent"] == 0)[None, None].expand_as(x)
    assert torch.equal(x[outside], z0[outside])
