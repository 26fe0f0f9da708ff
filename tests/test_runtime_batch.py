"""Batched execution of compatible jobs from different plans (``scenec build --batch-size``).

A row of a batch must compute what its job computes alone: its own noise, text, regions and init
image, the padding masked out. Equal up to float rounding of batched kernels (fp32 on CPU).
"""

import numpy as np
import pytest
import torch

from scenec.runtime.batching import batch_key
from scenec.runtime.layout import BatchLayout, RegionalLayout
from scenec.runtime.sampler import run_batch, run_job
from scenec.runtime.testing import box, encode_init, make_plan, sd_plan, tiny_backend, tiny_sd_backend
from scenec.spec.errors import PlanError

TOL = 1e-5
# SD: CFG at guidance 7.5 multiplies the batched kernels' rounding (latents of magnitude ~5);
# measured 2.7e-5 to 4.5e-5 on tiny-sd (3e-6 without CFG)
SD_TOL = 1e-4
G = (8, 8)  # token grid of a 128×128 canvas


@pytest.fixture(scope="module")
def backend():
    return tiny_backend()


def plans(**kw):
    """Plans that differ in everything a batch may mix: prompts, entity count and lengths, seeds."""
    base = dict(width=128, height=128, steps=3, **kw)
    return [
        make_plan("a meadow at dawn", entities=[{"id": "fox", "prompt": "a red fox", "token": box(G, 4, 1, 8, 5)}],
                  seeds=[1, 2], **base),
        make_plan("a quiet forest with tall pine trees and fog", seed=5, **base),
        make_plan("a city", entities=[
            {"id": "car", "prompt": "a yellow taxi cab with a long description of many many words",
             "token": box(G, 0, 0, 4, 4), "negative": "blurry"},
            {"id": "dog", "prompt": "dog", "token": box(G, 5, 5, 8, 8)}], seed=7, **base),
    ]


def rows(ps):
    return [(p, j) for p in ps for j in p.jobs]


def assert_rows_equal_alone(backend, pj, tol=TOL):
    alone = [run_job(backend, p, j, decode=False).latents for p, j in pj]
    got = run_batch(backend, pj)
    assert len(got) == len(pj)
    for a, r in zip(alone, got):
        assert r.latents.shape == a.shape
        assert float((a - r.latents).abs().max()) <= tol
        assert r.timings["batch"] == len(pj)
    return alone, got


def test_rows_equal_their_jobs_alone(backend):
    alone, got = assert_rows_equal_alone(backend, rows(plans()))
    # and the rows really differ from each other (no row leaked into another)
    assert float((alone[0] - alone[1]).abs().max()) > 1e-2


def test_rows_without_entities_use_the_plain_path(backend):
    pj = rows([make_plan("a meadow", width=128, height=128, steps=2, seeds=[3, 4]),
               make_plan("a desert", width=128, height=128, steps=2, seed=9)])
    alone = [run_job(backend, p, j, decode=False).latents for p, j in pj]
    got = run_batch(backend, pj)
    for a, r in zip(alone, got):
        assert float((a - r.latents).abs().max()) <= TOL


def test_true_cfg_with_per_entity_negatives(backend):
    assert_rows_equal_alone(backend, rows(plans(true_cfg=2.0)))


def test_inpainting_rows_mix_with_plain_rows(backend):
    y, x = np.mgrid[0:128, 0:128]
    init = np.stack([x * 2, y * 2, x + y], -1).astype(np.uint8)
    ents = [{"id": "fox", "prompt": "a red fox", "token": box(G, 2, 2, 6, 6)}]
    inpaint = make_plan("a meadow", entities=ents, init_image=init, width=128, height=128, steps=3, seed=4)
    plain = make_plan("a meadow", entities=ents, width=128, height=128, steps=3, seed=4)
    pj = rows([inpaint, plain])
    alone, got = assert_rows_equal_alone(backend, pj)
    z0, m = encode_init(backend, inpaint, inpaint.jobs[0])
    out = m == 0
    assert torch.equal(got[0].latents[out], z0[out])  # fusion holds inside a batch: exactly the init outside
    assert float((got[1].latents[out] - z0[out]).abs().max()) > 1e-2  # the plain row was not fused


def test_batch_layout_rows_attend_as_alone():
    regions = torch.zeros(1, 64, dtype=torch.bool)
    regions[0, :10] = True
    a = RegionalLayout([5, 3], regions, "restricted", 1)
    b = RegionalLayout([5], torch.zeros(0, 64, dtype=torch.bool), "restricted", 1, n_text_to=a.n_text)
    lay = BatchLayout([a, b])
    d = lay.dense()
    assert d.shape == (2, a.N, a.N)
    assert torch.equal(d[0], a.dense())
    assert torch.equal(d[1], b.dense())
    pad = slice(5, 8)  # row b's padding: sees only padding, and nothing real sees it
    assert d[1, pad, pad].all() and not d[1, pad, :5].any() and not d[1, pad, 8:].any()
    assert not d[1, :5, pad].any() and not d[1, 8:, pad].any()
    # without entities the global prompt sees every image token and image attention is all open
    assert d[1, :5, 8:].all() and d[1, 8:, 8:].all()
    with pytest.raises(PlanError):
        RegionalLayout([5, 3], regions, "open", 1, n_text_to=4)  # does not fit
    with pytest.raises(PlanError):
        BatchLayout([a, RegionalLayout([5], torch.zeros(0, 64, dtype=torch.bool), "open", 1)])


def test_a_bad_row_fails_alone(backend):
    ps = plans()
    bad = make_plan("a meadow", entities=[{"id": "fox", "prompt": "a fox", "token": box(G, 0, 0, 2, 2)}],
                    width=128, height=128, steps=3, seed=3,
                    edit=lambda d, t: t.update({"region/fox/token": box((4, 4), 0, 0, 2, 2)}))  # the wrong grid
    pj = rows(ps[:1]) + [(bad, bad.json["jobs"][0])]
    got = run_batch(backend, pj)
    assert isinstance(got[2], PlanError) and "token grid" in str(got[2])
    alone = run_job(backend, *pj[0], decode=False).latents
    assert float((got[0].latents - alone).abs().max()) <= TOL


def test_run_batch_refuses_incompatible_jobs(backend):
    a = make_plan("a", width=128, height=128, steps=3)
    b = make_plan("b", width=128, height=128, steps=2)
    with pytest.raises(PlanError, match="batch-compatible"):
        run_batch(backend, [(a, a.jobs[0]), (b, b.jobs[0])])


def test_batch_key():
    p = make_plan("a", width=128, height=128, steps=3)
    j = p.json["jobs"][0]
    k = batch_key(p.json, j)
    assert k is not None
    assert batch_key(make_plan("another prompt", width=128, height=128, steps=3, seed=9).json, j) == k
    for other in (make_plan("a", width=128, height=64, steps=3), make_plan("a", width=128, height=128, steps=4),
                  make_plan("a", width=128, height=128, steps=3, true_cfg=2.0),
                  make_plan("a", width=128, height=128, steps=3, image_self="restricted"),
                  make_plan("a", width=128, height=128, steps=3, max_sequence_length=64)):
        assert batch_key(other.json, other.json["jobs"][0]) != k
    # per-job control flow runs alone: coupling θ, reference conditions, stochastic steps, groups
    coupled = dict(j, program=[dict(op, theta=0.5) for op in j["program"]])
    assert batch_key(p.json, coupled) is None
    assert batch_key(p.json, dict(j, conditions=[{"index": 0}])) is None
    assert batch_key(p.json, dict(j, program=[dict(op, eta=1.0) for op in j["program"]])) is None
    assert batch_key(p.json, dict(j, group="g")) is None
    assert batch_key(p.json, dict(j, program=j["program"] + [{"op": "renoise", "from": 3, "to": 1}])) is None
    assert batch_key({**p.json, "model": {**p.json["model"], "family": "sd"}}, j) not in (None, k)
    assert batch_key({**p.json, "model": {**p.json["model"], "family": "other"}}, j) is None
    # `attention.until` shows in the program: regional on some steps only
    until = dict(j, program=[dict(op, regional=op["from"] < 1) for op in j["program"]])
    assert batch_key(p.json, until) not in (None, k)


def test_text_cache_is_lru_and_counts(backend):
    from scenec.runtime.cache import TextCache

    c = TextCache(limit=2)
    c["a"], c["b"] = 1, 2
    assert "a" in c and c["a"] == 1  # a is now the most recent
    c["c"] = 3
    assert list(c) == ["a", "c"]
    assert (c.hits, c.misses) == (1, 0)


@pytest.mark.parametrize("mode", ["open", "restricted"])
def test_batched_flex_block_mask_equals_dense(mode):
    """The CUDA path: one BlockMask with a batch dimension, row b from row b's owners and bits."""
    import warnings

    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    regions = torch.zeros(2, 64, dtype=torch.bool)
    regions[0, :20], regions[1, 30:50] = True, True
    a = RegionalLayout([32, 5, 7], regions, mode, pad_multiple=128)
    b = RegionalLayout([32], torch.zeros(0, 64, dtype=torch.bool), mode, 128, n_text_to=a.n_text)
    lay = BatchLayout([a, b])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, lay.N, 16, generator=g) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=lay.dense()[:, None])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = flex_attention(q, k, v, block_mask=lay.block_mask("cpu"))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    alone = F.scaled_dot_product_attention(q[1:], k[1:], v[1:], attn_mask=b.dense()[None, None])
    torch.testing.assert_close(flex[1:], alone, atol=1e-5, rtol=1e-5)


def test_flex_backend_batches_like_sdpa(backend):
    import warnings

    from scenec.runtime.families import load_backend

    flex_be = load_backend("tiny", device="cpu", dtype="fp32", attn_impl="flex")
    one = [dict(op) for op in plans()[0].json["jobs"][0]["program"][:1]]
    ps = [make_plan("a meadow at dawn", entities=[{"id": "fox", "prompt": "a red fox", "token": box(G, 4, 1, 8, 5)}],
                    width=128, height=128, steps=3, program=one, seed=1),
          make_plan("a forest", width=128, height=128, steps=3, program=one, seed=2)]
    pj = rows(ps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = run_batch(flex_be, pj)
    for (p, j), r in zip(pj, got):
        ref = run_job(backend, p, j, decode=False).latents
        torch.testing.assert_close(r.latents, ref, atol=1e-5, rtol=1e-5)


# -- the SD backend: CFG's two branches of every row in one UNet forward ------------------------------

def sd_plans(**kw):
    base = dict(width=128, height=128, steps=3, **kw)
    return [
        sd_plan(prompt="a meadow at dawn", negative="blurry",
                entities=[{"id": "fox", "prompt": "a red fox", "negative": "ugly", "token": box(G, 4, 1, 8, 5)}],
                seeds=[1, 2], **base),
        sd_plan(prompt="a quiet forest with tall pine trees and fog", seed=5, **base),
        sd_plan(prompt="a city", entities=[
            {"id": "car", "prompt": "a yellow taxi cab with a long description of many many words",
             "token": box(G, 0, 0, 4, 4)},
            {"id": "dog", "prompt": "dog", "token": box(G, 5, 5, 8, 8, value=0.5)}], seed=7, **base),
    ]


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_sd_rows_equal_their_jobs_alone(guidance):
    be = tiny_sd_backend()
    alone, got = assert_rows_equal_alone(be, rows(sd_plans(guidance=guidance)), SD_TOL)
    assert float((alone[0] - alone[1]).abs().max()) > 1e-2


def test_sd_plain_rows_batch_without_masks():
    be = tiny_sd_backend()
    pj = rows([sd_plan(prompt="a meadow", width=128, height=128, steps=2, seeds=[3, 4]),
               sd_plan(prompt="a desert", width=128, height=128, steps=2, seed=9)])
    import scenec.runtime.families.sd as sdmod

    seen = []
    orig = sdmod.attend
    sdmod.attend = lambda *a: seen.append(a) or orig(*a)
    try:
        assert_rows_equal_alone(be, pj, SD_TOL)
    finally:
        sdmod.attend = orig
    assert not seen  # no modifier anywhere: the pipeline's own unmasked processors, as alone


def test_sd_until_and_inpainting_rows_in_one_batch():
    be = tiny_sd_backend()
    y, x = np.mgrid[0:128, 0:128]
    init = np.stack([x * 2, y * 2, x + y], -1).astype(np.uint8)
    ents = [{"id": "fox", "prompt": "a red fox", "token": box(G, 2, 2, 6, 6)}]
    # regional on the first step only (attention.until), as the compiler writes it
    prog = [{"op": "denoise", "from": i, "to": i + 1, "regional": i < 1, "theta": None, "eta": 0.0} for i in range(3)]
    inpaint = sd_plan(prompt="a meadow", entities=ents, init_image=init, width=128, height=128, steps=3, seed=4,
                      program=prog)
    plain = sd_plan(prompt="a long prompt about a meadow with flowers", entities=ents[:0], width=128, height=128,
                    steps=3, seed=4, program=prog)
    other = sd_plan(prompt="a meadow", entities=[dict(ents[0], prompt="a grey wolf in the grass")], width=128,
                    height=128, steps=3, seed=6, program=prog)
    pj = rows([inpaint, plain, other])
    alone, got = assert_rows_equal_alone(be, pj, SD_TOL)
    z0, m = encode_init(be, inpaint, inpaint.jobs[0])
    out = (m == 0).expand_as(z0)
    assert torch.equal(got[0].latents[out], z0[out])  # fusion inside a batch: exactly the init outside
    assert float((got[1].latents[out] - z0[out]).abs().max()) > 1e-2


def test_sd_bad_row_fails_alone():
    be = tiny_sd_backend()
    ok = sd_plans()[1]
    bad = sd_plan(prompt="a meadow", entities=[{"id": "fox", "prompt": "a fox", "token": box(G, 0, 0, 2, 2)}],
                  width=128, height=128, steps=3, seed=3,
                  edit=lambda d, t: t.update({"region/fox/a16": box((4, 4), 0, 0, 2, 2)}))  # the wrong grid
    init = sd_plan(prompt="a meadow", entities=[{"id": "fox", "prompt": "a fox", "token": box(G, 0, 0, 2, 2)}],
                   init_image=np.zeros((128, 128, 3), np.uint8), width=128, height=128, steps=3, seed=3,
                   edit=lambda d, t: t.update({"image/init": np.zeros((64, 64, 3), np.uint8)}))  # not the canvas
    got = run_batch(be, [(ok, ok.jobs[0]), (bad, bad.json["jobs"][0]), (init, init.json["jobs"][0])])
    assert isinstance(got[1], PlanError) and "a16" in str(got[1])
    assert isinstance(got[2], PlanError) and "init image" in str(got[2])
    assert got[0].timings["batch"] == 1
    assert float((got[0].latents - run_job(be, ok, ok.jobs[0], decode=False).latents).abs().max()) <= SD_TOL


@pytest.mark.parametrize("mode", ["open", "restricted"])
def test_batch_layout_allow_rows_are_row_zeros_dense_rows(mode):
    """What SOW's flex path reads per query chunk: rows of batch row 0's allow-matrix, from the stacked
    tables (where the layout was moved), never the whole N×N."""
    from scenec.runtime.layout import region_membership

    grid = (8, 8)
    a = RegionalLayout([6, 3], region_membership([box(grid, 0, 0, 4, 4)], grid), mode, 128, n_text_to=128)
    b = RegionalLayout([9, 2, 4], region_membership([box(grid, 4, 4, 8, 8), box(grid, 0, 4, 4, 8)], grid),
                       mode, 128, n_text_to=128)
    lay = BatchLayout([a, b]).to("cpu")
    q = torch.tensor([0, 5, 7, 127, 128, 130, 191])
    assert torch.equal(lay.allow_rows(q), lay.dense()[0][q])
