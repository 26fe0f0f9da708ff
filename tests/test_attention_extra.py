"""Joint extra key/value tokens (visual prompts on Flux): the call's own kernel merged with the extra tokens by
log-sum-exp (FlexAttention) and the dense-bias SDPA path both equal one explicit softmax over [keys | extra]
(masked and unmasked calls, several prompts, scales 0 / 0.5 / 1), in value and gradient; the dense bias is
built once per model call."""

import warnings

import numpy as np
import pytest
import torch

from scenec.runtime.attention import DOUBLE, Attention, ExtraKV, Mask, attend, merge_lse
from scenec.runtime.layout import RegionalLayout, build_mask, region_membership
from scenec.runtime.testing import box

GRID = (8, 8)
N_IMG, D, H = 64, 16, 2


def setup(seed=0, scales=(1.0, 0.5)):
    g = torch.Generator().manual_seed(seed)
    regs = region_membership([box(GRID, 0, 0, 4, 5), box(GRID, 3, 3, 8, 8)], GRID)
    lay = RegionalLayout([24, 5, 7], regs, "restricted", pad_multiple=128)  # text padded to 128
    q, k, v = (torch.randn(1, H, lay.N, D, generator=g) for _ in range(3))
    extra, toks = [], []
    for i, s in enumerate(scales):
        ek, ev = (torch.randn(1, H, 3 + i, D, generator=g) for _ in range(2))
        extra.append(ExtraKV(ek, ev, (regs[i] > 0).reshape(-1), s, frozenset({"double"})))
        toks.append((ek, ev))
    return lay, q, k, v, extra, toks


def reference(q, k, v, allow, extra, toks):
    """The old dense path, explicitly: logits over [keys | extra], + log(scale), −∞ where not allowed."""
    n_q = q.shape[2]
    logits = [q @ k.transpose(-1, -2) / D ** 0.5]
    if allow is not None:
        logits[0] = logits[0].masked_fill(~allow, float("-inf"))
    for e, (ek, _) in zip(extra, toks):
        s = q @ ek.transpose(-1, -2) / D ** 0.5 + (np.log(e.scale) if e.scale > 0 else float("-inf"))
        vis = torch.zeros(n_q, dtype=torch.bool)
        vis[n_q - N_IMG:] = e.visible
        logits.append(s.masked_fill(~vis[:, None], float("-inf")))
    return torch.softmax(torch.cat(logits, -1), -1) @ torch.cat([v] + [ev for _, ev in toks], 2)


def call(impl, mask_impl, lay, q, k, v, extra):
    ctl = Attention(impl)
    ctl.set([], n_img=N_IMG)
    mods = list(extra)
    if mask_impl is not None:
        mods.append(Mask({N_IMG: build_mask(lay, mask_impl, "cpu")}, frozenset({"double"})))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on CPU
        return attend(ctl, DOUBLE, q, k, v, mods), ctl


@pytest.mark.parametrize("impl,mask_impl", [("sdpa", None), ("sdpa", "sdpa"), ("flex", None), ("flex", "flex")])
@pytest.mark.parametrize("scales", [(1.0, 0.5), (0.0, 1.0), (0.5,)])
def test_joint_extra_tokens_equal_one_explicit_softmax(impl, mask_impl, scales):
    lay, q, k, v, extra, toks = setup(scales=scales)
    allow = None if mask_impl is None else lay.dense("cpu")
    with torch.no_grad():
        out, _ = call(impl, mask_impl, lay, q, k, v, extra)
    expected = reference(q, k, v, allow, extra, toks)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    if 0.0 in scales:  # a prompt of scale 0 is exactly absent
        keep = [i for i, s in enumerate(scales) if s > 0]
        without = reference(q, k, v, allow, [extra[i] for i in keep], [toks[i] for i in keep])
        torch.testing.assert_close(out, without, atol=2e-5, rtol=1e-4)
    # queries outside every region (text, the rest of the image) see no extra token: the plain attention
    outside = torch.ones(lay.N, dtype=torch.bool)
    for e in extra:
        outside[lay.N - N_IMG:] &= ~e.visible
    plain = reference(q, k, v, allow, [], [])
    torch.testing.assert_close(out[:, :, outside], plain[:, :, outside], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(out[:, :, ~outside], plain[:, :, ~outside], atol=1e-3)


@pytest.mark.parametrize("masked", [False, True])
def test_the_lse_merge_has_the_dense_gradient(masked):
    """What the flex path computes on CUDA (its lse is differentiable there; CPU flex has no backward): the
    merge from an explicit lse, differentiated, equals the dense softmax's gradient in q, k, v and the tokens."""
    lay, q, k, v, extra, toks = setup(seed=1)
    allow = lay.dense("cpu") if masked else None
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, *[x for t in toks for x in t])]
    lq, lk, lv, *lt = leaves
    pairs = [(lt[2 * i], lt[2 * i + 1]) for i in range(len(toks))]
    ref = reference(lq, lk, lv, allow, extra, pairs)
    g = torch.randn_like(ref)
    want = torch.autograd.grad((ref * g).sum(), leaves)
    logits = lq @ lk.transpose(-1, -2) / D ** 0.5
    if allow is not None:
        logits = logits.masked_fill(~allow, float("-inf"))
    o1, lse = torch.softmax(logits, -1) @ lv, torch.logsumexp(logits, -1)
    ctl = Attention("flex")
    ctl.set([], n_img=N_IMG)
    adds = []
    for e, (ek, _) in zip(extra, pairs):
        vis = torch.zeros(lay.N, dtype=torch.bool)
        vis[lay.N - N_IMG:] = e.visible
        adds.append(torch.where(vis[:, None].expand(-1, ek.shape[2]), float(np.log(e.scale)), float("-inf")))
    out = merge_lse(o1, lse, lq, torch.cat([p[0] for p in pairs], 2), torch.cat([p[1] for p in pairs], 2),
                    torch.cat(adds, 1))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    got = torch.autograd.grad((out * g).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_sdpa_gradient_and_the_bias_is_built_once_per_call():
    lay, q, k, v, extra, toks = setup(seed=2)
    mask = Mask({N_IMG: build_mask(lay, "sdpa", "cpu")}, frozenset({"double"}))
    ctl = Attention("sdpa")
    ctl.set([], n_img=N_IMG)
    ql = q.clone().requires_grad_(True)
    a = attend(ctl, DOUBLE, ql, k, v, [*extra, mask])
    b = attend(ctl, DOUBLE, ql * 1.0, k, v, [*extra, mask])  # a second block of the same model call
    dense = [t for t in ctl.cache.values() if t.shape == (lay.N, lay.N + 3 + 4)]
    assert len(dense) == 1 and len(ctl.cache) == 2  # the [N_q, M] extra bias and one dense bias
    torch.testing.assert_close(a, b)
    ref_q = q.clone().requires_grad_(True)
    ref = reference(ref_q, k, v, lay.dense("cpu"), extra, toks)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad((a * g).sum(), ql)[0],
                               torch.autograd.grad((ref * g).sum(), ref_q)[0], atol=5e-5, rtol=1e-4)
    ctl.set([], n_img=N_IMG)
    assert ctl.cache == {}  # a new model call builds its own


def _sow(grid_mask):
    """A SOW modulation (runtime/methods/sow.py) on the 8×8 grid, armed for one op without its indicator."""
    from scenec.runtime.methods import sow

    cond = np.zeros(GRID, np.float32)
    cond[0:3, 0:3] = 1
    term = sow.sow_term(cond, grid_mask, {"suppress": 0.7, "enhance": 0.9, "decay": 0.8, "distance": 1.0,
                                          "threshold": 0.5})
    s = sow.Sow({N_IMG: [term]}, [0], "cpu", frozenset({"double"}))
    s.begin_step(1, [True])
    s.pending = False
    return s


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("mask_impl", [None, "sdpa", "flex"])
def test_sow_modulation_and_extra_tokens_share_one_softmax(mask_impl):
    """A visual prompt's tokens beside SOW's modulation in one joint call (Flux, COW cycles): one softmax over
    [the modulated scores S' = S + E·(hi − S) − U·(S − lo) of the call's keys | the extra logits + log scale],
    the extra tokens unmodulated; the flex path's modulated kernel with its log-sum-exp gives the same."""
    from scenec.runtime.kernels import modulated_flex

    lay, q, k, v, extra, toks = setup(seed=3)
    related = np.zeros(GRID, np.float32)
    related[2:6, 2:6] = 1
    mod = _sow(related)
    e, u = mod.weights(N_IMG, "cpu")
    n_text = lay.n_text
    allow = None if mask_impl is None else build_mask(lay, "sdpa", "cpu").mask
    logits = q @ k.transpose(-1, -2) / D ** 0.5
    img = logits[..., n_text:, n_text:]
    a_img = None if allow is None else allow[..., n_text:, n_text:]
    hi = (img if a_img is None else img.masked_fill(~a_img, float("-inf"))).amax(-1, keepdim=True)
    lo = (img if a_img is None else img.masked_fill(~a_img, float("inf"))).amin(-1, keepdim=True)
    moved = logits.clone()
    moved[..., n_text:, n_text:] = img + e * (hi - img) - u * (img - lo)
    assert not torch.allclose(moved, logits)  # the modulation moves something here
    if allow is not None:
        moved = moved.masked_fill(~allow, float("-inf"))
    parts = [moved]
    for x, (ek, _) in zip(extra, toks):
        s = q @ ek.transpose(-1, -2) / D ** 0.5 + np.log(x.scale)
        vis = torch.zeros(lay.N, dtype=torch.bool)
        vis[lay.N - N_IMG:] = x.visible
        parts.append(s.masked_fill(~vis[:, None], float("-inf")))
    want = torch.softmax(torch.cat(parts, -1), -1) @ torch.cat([v] + [ev for _, ev in toks], 2)

    ctl = Attention("flex" if mask_impl == "flex" else "sdpa")
    ctl.set([], n_img=N_IMG)
    mods = list(extra) + [mod]
    if mask_impl is not None:
        mods.append(Mask({N_IMG: build_mask(lay, mask_impl, "cpu")}, frozenset({"double"})))
    torch.testing.assert_close(attend(ctl, DOUBLE, q, k, v, mods), want, atol=1e-5, rtol=1e-4)

    # the CUDA path's kernel (eager flex here): the modulated call and its log-sum-exp, merged
    fm = None if mask_impl is None else build_mask(lay, "flex", "cpu")
    o1, lse = modulated_flex(q, k, v, fm, mod, n_text, N_IMG, chunk=40, lse=True)
    ek, ev = torch.cat([t[0] for t in toks], 2), torch.cat([t[1] for t in toks], 2)
    add = torch.cat([torch.where(torch.cat([torch.zeros(lay.N - N_IMG, dtype=torch.bool), x.visible])[:, None]
                                 .expand(lay.N, t[0].shape[2]), float(np.log(x.scale)), float("-inf"))
                     for x, t in zip(extra, toks)], 1)
    torch.testing.assert_close(merge_lse(o1, lse, q, ek, ev, add), want, atol=1e-5, rtol=1e-4)
