"""Regional attention (EliGen): the mask's semantics, probed through the real processors and weights."""

import warnings

import numpy as np
import pytest
import torch

from scenec.runtime.layout import RegionalLayout, region_membership
from scenec.runtime.sampler import run_job
from scenec.runtime.testing import box, make_plan, tiny_backend
from scenec.spec.errors import PlanError

GRID = (16, 16)
FOX = box(GRID, 2, 2, 8, 8)
BIRD = box(GRID, 6, 6, 12, 12, value=0.25)  # partial coverage still counts as inside
ENTS = [{"id": "fox", "prompt": "a red fox running", "token": FOX},
        {"id": "bird", "prompt": "a small blue bird flying", "token": BIRD}]
ONE_STEP = [{"op": "denoise", "from": 0, "to": 1, "regional": True, "theta": None, "eta": 0.0}]


@pytest.fixture(scope="module")
def backend():
    return tiny_backend()


def probe(backend, pad_multiple=128, **kw):
    """Run one regional step with the probe on; returns (records, layout)."""
    plan = make_plan(entities=ENTS, program=ONE_STEP, **kw)
    old = backend.pad_multiple
    backend.pad_multiple, backend.attn.probe = pad_multiple, []
    try:
        run_job(backend, plan, plan.jobs[0], decode=False)
        recs = backend.attn.probe
    finally:
        backend.pad_multiple, backend.attn.probe = old, None
    return recs, recs[0]["allow"] if recs else None


def segments(backend, kw=None):
    """Token index ranges of [global | fox | bird | pad | image] for the plan used by ``probe``."""
    plan = make_plan(entities=ENTS, program=ONE_STEP, **(kw or {}))
    msl = 32
    lens = [backend.encode_global("a meadow", msl).seq.shape[1]] + [
        backend.encode_entity(e["prompt"], msl).seq.shape[1] for e in ENTS]
    starts = np.cumsum([0] + lens)
    n_txt = starts[-1] + (-starts[-1]) % 128
    return [slice(starts[i], starts[i + 1]) for i in range(3)], slice(starts[-1], n_txt), n_txt, plan


def test_probe_weights_follow_the_regions(backend):
    recs, _ = probe(backend)
    assert {r["kind"] for r in recs} == {"double", "single"} and len(recs) == 4
    (g, fox, bird), pad, n_txt, _ = segments(backend)
    inside = {1: FOX.reshape(-1) > 0, 2: BIRD.reshape(-1) > 0}
    for r in recs:
        w = r["weights"][0]  # [heads, N, N]
        img = w[:, n_txt:]  # image queries
        # the kernel (SDPA with the mask) computes exactly these weights
        torch.testing.assert_close(r["out"], r["expected"], atol=1e-5, rtol=1e-4)
        for p, seg in ((1, fox), (2, bird)):
            out_idx = np.flatnonzero(~inside[p]) + n_txt
            in_idx = np.flatnonzero(inside[p]) + n_txt
            assert (w[:, out_idx][:, :, seg] == 0).all()  # image outside region → entity prompt: 0
            assert (w[:, seg][:, :, out_idx] == 0).all()  # entity prompt → image outside: 0
            assert (w[:, in_idx][:, :, seg] > 0).all()
            assert (w[:, seg][:, :, in_idx] > 0).all()
        assert (img[:, :, g] > 0).all() and (w[:, g, n_txt:] > 0).all()  # global ↔ every image token
        for a in (g, fox, bird):  # prompts see themselves, never each other
            for b in (g, fox, bird):
                block = w[:, a, b]
                assert (block > 0).all() if a == b else (block == 0).all()
        # pad tokens: attend only among themselves; nothing real attends to them
        assert pad.stop > pad.start
        assert (w[:, :pad.start, pad] == 0).all() and (w[:, n_txt:, pad] == 0).all()
        assert (w[:, pad, :pad.start] == 0).all() and (w[:, pad, n_txt:] == 0).all()
        assert (img[:, :, n_txt:] > 0).all()  # open: image ↔ image everywhere


def test_restricted_differs_from_open_exactly_on_cross_region_image_pairs(backend):
    recs_o, allow_o = probe(backend, image_self="open")
    recs_r, allow_r = probe(backend, image_self="restricted")
    (_, _, _), _, n_txt, _ = segments(backend)
    f, b = FOX.reshape(-1) > 0, BIRD.reshape(-1) > 0
    bg = ~(f | b)
    share = (f[:, None] & f[None]) | (b[:, None] & b[None]) | (bg[:, None] & bg[None])
    expected = torch.zeros_like(allow_o)
    expected[n_txt:, n_txt:] = torch.from_numpy(~share)
    assert torch.equal(allow_o & ~allow_r, expected)  # removed exactly there
    assert not (allow_r & ~allow_o).any()  # nothing added
    w = recs_r[0]["weights"][0]
    assert (w[:, expected] == 0).all()
    assert (recs_o[0]["weights"][0][:, expected] > 0).all()


def test_blocks_option_selects_block_kinds(backend):
    def regional(recs):  # the other kind's forwards mask only the padding (rule "open")
        return {r["kind"] for r in recs if r["rule"] == "regional"}

    assert regional(probe(backend, blocks="double")[0]) == {"double"}
    assert regional(probe(backend, blocks="single")[0]) == {"single"}


def test_unregional_ops_and_no_entities_run_plain(backend):
    plan = make_plan(entities=ENTS, program=[dict(ONE_STEP[0], regional=False)])
    backend.attn.probe = []
    try:
        run_job(backend, plan, plan.jobs[0], decode=False)
        assert backend.attn.probe == []  # no masked forward happened
        run_job(backend, make_plan(program=ONE_STEP), make_plan().jobs[0], decode=False)
        assert backend.attn.probe == []
    finally:
        backend.attn.probe = None


def test_layout_rules():
    regs = region_membership([FOX, None], GRID)
    assert regs[1].all() and regs[0].sum() == 36
    lay = RegionalLayout([4, 3, 2], regs, "open", pad_multiple=128)
    assert lay.n_text == 128 and lay.n_pad == 119 and lay.N == 128 + 256
    with pytest.raises(PlanError):
        region_membership([np.zeros((8, 8), np.float32)], GRID)
    with pytest.raises(PlanError):
        RegionalLayout([4], regs)  # two regions need three prompts
    with pytest.raises(PlanError):
        RegionalLayout([4, 3, 2], regs, "closed")


@pytest.mark.parametrize("mode", ["open", "restricted"])
def test_flex_block_mask_equals_dense(mode):
    """The CUDA path (FlexAttention BlockMask from the same allow-function) computes what SDPA does."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    regs = region_membership([FOX, BIRD], GRID)
    lay = RegionalLayout([32, 5, 7], regs, mode, pad_multiple=128)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, lay.N, 16, generator=g) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=lay.dense()[None, None])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = flex_attention(q, k, v, block_mask=lay.block_mask("cpu"))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_flex_backend_matches_sdpa_backend(backend):
    from scenec.runtime.families import load_backend

    flex_be = load_backend("tiny", device="cpu", dtype="fp32", attn_impl="flex")
    assert flex_be.pad_multiple == 128
    plan = make_plan(entities=ENTS, image_self="restricted", program=ONE_STEP)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = run_job(flex_be, plan, plan.jobs[0], decode=False).latents
    b = run_job(backend, plan, plan.jobs[0], decode=False).latents
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["open", "restricted"])
@pytest.mark.parametrize("rule", ["regional", "open"])
@pytest.mark.parametrize("many_classes", [False, True])
def test_block_tables_classify_blocks_as_create_block_mask_does(mode, rule, many_classes, monkeypatch):
    """The BlockMask built from per-class tables (no N×N) has the block structure create_block_mask
    derives from the dense rule: same partial and full blocks, in the same order."""
    from torch.nn.attention.flex_attention import create_block_mask

    from scenec.runtime import layout as L

    if many_classes:
        monkeypatch.setattr(L, "MAX_CLASSES", 1)  # the per-query-block path
    regs = region_membership([FOX, BIRD, box(GRID, 0, 10, 16, 16)], GRID)
    lay = RegionalLayout([150, 5, 130, 7], regs, mode, pad_multiple=128)
    ours = lay.block_mask("cpu", rule)
    dense = lay.dense("cpu", rule)
    ref = create_block_mask(lambda b, h, q, kv: dense[q, kv], None, None, lay.N, lay.N, device="cpu",
                            BLOCK_SIZE=L.FLEX_BLOCK)
    for a, b in ((ours.kv_num_blocks, ref.kv_num_blocks), (ours.full_kv_num_blocks, ref.full_kv_num_blocks)):
        assert torch.equal(a.flatten(), b.flatten())
    for num, a, b in ((ref.kv_num_blocks, ours.kv_indices, ref.kv_indices),
                      (ref.full_kv_num_blocks, ours.full_kv_indices, ref.full_kv_indices)):
        for i, n in enumerate(num.flatten().tolist()):
            assert a.flatten(0, -2)[i, :n].tolist() == b.flatten(0, -2)[i, :n].tolist()
    assert ours.to_dense().equal(ref.to_dense())


def test_text_buckets_are_few_and_waste_at_most_a_quarter():
    """Compiled kernels specialise on the sequence length: every text length from 1 to 4096 maps to a
    handful of sizes, each a multiple of 128, with at most a quarter of padding past the first 8 blocks."""
    from scenec.runtime.layout import text_bucket

    sizes = {text_bucket(n, 128) for n in range(1, 4097)}
    assert len(sizes) <= 20 and all(s % 128 == 0 for s in sizes)
    for n in range(1, 4097):
        b = text_bucket(n, 128)
        assert b >= n and (b <= 1024 or (b - n) <= b / 4)
    assert text_bucket(77, 1) == 77  # SDPA: no padding at all
