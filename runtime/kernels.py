"""The attention kernels :func:`runtime.attention.attend` dispatches to, beyond plain SDPA: FlexAttention,
SOW's score modulation (dense and flex), and the exact merge of extra key/value tokens into a call by its
log-sum-exp. Each returns ``[B, H, N_q, D]``; the modulated ones also the call's log-sum-exp when asked
(``lse=True``), so extra tokens can join the same softmax (:func:`merge_lse`)."""

from __future__ import annotations

from typing import Callable

import torch

from .layout import BuiltMask

_flex_compiled: Callable | None = None


def flex_kernel():
    """FlexAttention: compiled on CUDA (the fused kernel), eager elsewhere; created once."""
    global _flex_compiled
    if _flex_compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        # compiled flex is the fused kernel; eager flex materialises scores (only for tests/CPU)
        _flex_compiled = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _flex_compiled


def allow4(mask: BuiltMask | None, device) -> torch.Tensor | None:
    """A mask as a dense bool ``[B|1, 1, N, N]`` (None: everything allowed)."""
    if mask is None:
        return None
    return mask.mask if mask.impl == "sdpa" else mask.dense_allow(device)[None, None]


def row_range(scores: torch.Tensor, allow: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's max and min over the keys it may see."""
    if allow is None:
        return scores.amax(-1), scores.amin(-1)
    return scores.masked_fill(~allow, float("-inf")).amax(-1), scores.masked_fill(~allow, float("inf")).amin(-1)


def modulated_dense(ctl, site, q, k, v, mask: BuiltMask | None, w, n_text: int, n_img: int, lse: bool = False):
    """Attention with image–image scores S' = S + E·(hi − S) − U·(S − lo) (SOW, runtime/methods/sow.py),
    explicitly: the scores, each image query's range over the image keys it may see, the modulation, the
    mask, softmax. ``lse``: also the rows' log-sum-exp of the modulated, masked scores (``[B, H, N_q]``)."""
    e, u = w
    allow = allow4(mask, q.device)
    logits = (q.float() @ k.float().transpose(-1, -2)) / (q.shape[-1] ** 0.5)
    img = logits[..., n_text:, n_text:]
    hi, lo = row_range(img, None if allow is None else allow[..., n_text:, n_text:])
    moved = logits.clone()
    moved[..., n_text:, n_text:] = img + e * (hi[..., None] - img) - u * (img - lo[..., None])
    if allow is not None:
        moved = moved.masked_fill(~allow, float("-inf"))
    out = (torch.softmax(moved, dim=-1) @ v.float()).to(q.dtype)
    if ctl.probe is not None:
        ctl.probe.append({"kind": "sow", "site": site.name, "n_q": q.shape[2], "n_txt": n_text, "logits": logits,
                          "e": e, "u": u, "allow": None if allow is None else allow[0, 0], "v": v.float(),
                          "out": out.float()})
    return (out, torch.logsumexp(moved, -1)) if lse else out


def modulated_flex(q, k, v, mask: BuiltMask | None, mod, n_text: int, n_img: int, chunk: int = 1024,
                   lse: bool = False):
    """The same modulation through FlexAttention: each image query's range computed here in query chunks
    (no dense N×N: the mask's rows per chunk, ``BuiltMask.allow_rows``), the modulation in
    ``mod.score_mod``, the mask as the BlockMask; ``lse`` as :func:`modulated_dense`."""
    kk = k[:, :, n_text:].float().transpose(-1, -2)
    his, los = [], []
    for s0 in range(n_text, q.shape[2], chunk):
        sc = (q[:, :, s0:s0 + chunk].float() @ kk) / (q.shape[-1] ** 0.5)
        qi = torch.arange(s0, min(s0 + chunk, q.shape[2]), device=q.device)
        a = None if mask is None else mask.allow_rows(qi, q.device)[None, None, :, n_text:]
        hi, lo = row_range(sc, a)
        his.append(hi)
        los.append(lo)
    hi, lo = mod.ranges((n_text, n_img, q.shape[0], q.shape[1]), torch.cat(his, -1), torch.cat(los, -1))
    kw = {"score_mod": mod.score_mod(n_text, n_img, hi, lo), "block_mask": None if mask is None else mask.mask}
    if not lse:
        return flex_kernel()(q, k, v, **kw)
    from torch.nn.attention.flex_attention import AuxRequest

    out, aux = flex_kernel()(q, k, v, return_aux=AuxRequest(lse=True), **kw)
    return out, aux.lse


def merge_lse(o1: torch.Tensor, lse1: torch.Tensor, q, ek, ev, add: torch.Tensor) -> torch.Tensor:
    """One softmax over a call's keys and M extra ones, from the call's output ``o1`` and log-sum-exp ``lse1``
    (``[B, H, N_q]``) and the extra logits q·k_xᵀ/√d + ``add`` (``[N_q, M]``): (Z₁·o₁ + Σ e^{s}·v_x)/(Z₁ + Σ e^{s}),
    Z₁ = e^{L₁}, in float32 shifted by the row maximum (detached: it cancels); a row that sees nothing is 0."""
    s = (q.float() @ ek.float().transpose(-1, -2)) * q.shape[-1] ** -0.5 + add  # [B, H, N_q, M]
    m = torch.maximum(lse1.float(), s.amax(-1)).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z1, p = torch.exp(lse1.float() - m), torch.exp(s - m[..., None])
    den = z1 + p.sum(-1)
    den = torch.where(den > 0, den, torch.ones_like(den))
    return (z1 / den).to(o1.dtype)[..., None] * o1 + (p / den[..., None]).to(ev.dtype) @ ev
