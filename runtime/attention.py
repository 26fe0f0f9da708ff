"""Regional attention for Flux (EliGen, arXiv 2501.01097): attention processors with a region mask.

The joint sequence of one forward is ``[global prompt | entity 0 | … | entity k-1 | pad | image]``.
Allowed pairs (query ↔ key, symmetric):

- each prompt's tokens ↔ its own tokens; prompts never see each other;
- entity prompt i ↔ the image tokens of region i; the global prompt ↔ every image token;
- image ↔ image: all pairs (``image_self: open``, EliGen), or only pairs sharing at least one region,
  with background tokens (outside every region) ↔ each other (``restricted``, as InstantX/InvokeAI);
- pad tokens (text padded to a multiple of 128 so image tokens start on a FlexAttention block) ↔ pad
  tokens only: they see nothing real and nothing real sees them.

A region is the set of image tokens whose coverage (``masks.token`` in the plan, area-weighted) is
> 0: a token partly covered by an entity belongs to it, so thin or feathered regions still get their
prompt and every pixel the compiler meant to draw is reachable. Coverage is not used as a weight.

The mask is built ONCE per job and condition (positive/negative) and shared by every block and step:
a dense boolean ``[N, N]`` for SDPA on CPU, a FlexAttention ``BlockMask`` on CUDA built from a
``mask_mod`` over per-token ids (no dense N×N tensor there). Both come from the same ``allow``
function, so the two kernels compute the same attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import PlanError, Unsupported

FLEX_BLOCK = 128
MAX_ENTITIES = 62  # region membership is an int64 bitmask: bit 0 = global, bit i+1 = entity i
BLOCK_KINDS = {"all": ("double", "single"), "double": ("double",), "single": ("single",)}


def region_membership(masks: list[np.ndarray | None], grid: tuple[int, int]) -> torch.Tensor:
    """Bool ``[k, h*w]``: image token t is in region i iff its coverage is > 0 (None = whole canvas)."""
    h, w = grid
    out = torch.zeros(len(masks), h * w, dtype=torch.bool)
    for i, m in enumerate(masks):
        if m is None:
            out[i] = True
            continue
        m = np.asarray(m)
        if m.shape != (h, w):
            raise PlanError(f"token mask of shape {tuple(m.shape)} does not match the token grid {(h, w)}")
        out[i] = torch.from_numpy(np.ascontiguousarray(m > 0).reshape(-1))
    return out


@dataclass
class RegionalLayout:
    """Token layout of one regional forward and its allow-function (see the module docstring)."""

    text_lengths: list[int]  # per prompt, the global prompt first
    regions: torch.Tensor  # bool [k entities, n_img]
    image_self: str = "open"  # "open" | "restricted"
    pad_multiple: int = 1
    n_text_to: int | None = None  # pad the text to exactly this many tokens (a batch row: runtime/flux.run_batch)
    owner: torch.Tensor = field(init=False)  # int64 [N]: prompt index; P for pad; -1 for image
    bits: torch.Tensor = field(init=False)  # int64 [N]: who a token may meet across text/image

    def __post_init__(self) -> None:
        k = self.regions.shape[0]
        if len(self.text_lengths) != k + 1:
            raise PlanError(f"{len(self.text_lengths)} prompts for {k} regions (need global + one per entity)")
        if k > MAX_ENTITIES:
            raise Unsupported(f"{k} entities in one image; regional attention supports at most {MAX_ENTITIES}")
        if self.image_self not in ("open", "restricted"):
            raise PlanError(f"attention.image_self must be 'open' or 'restricted', not {self.image_self!r}")
        n_txt = sum(self.text_lengths)
        self.n_pad = (-n_txt) % max(1, self.pad_multiple)
        if self.n_text_to is not None:
            if self.n_text_to < n_txt:
                raise PlanError(f"text of {n_txt} tokens does not fit a batch row of {self.n_text_to}")
            self.n_pad = self.n_text_to - n_txt
        self.n_text = n_txt + self.n_pad
        self.n_img = self.regions.shape[1]
        P = len(self.text_lengths)
        owner = [torch.full((n,), p, dtype=torch.long) for p, n in enumerate(self.text_lengths)]
        owner.append(torch.full((self.n_pad,), P, dtype=torch.long))
        owner.append(torch.full((self.n_img,), -1, dtype=torch.long))
        self.owner = torch.cat(owner)
        tbits = [torch.full((n,), 1 << p, dtype=torch.long) for p, n in enumerate(self.text_lengths)]
        tbits.append(torch.zeros(self.n_pad, dtype=torch.long))
        weights = torch.tensor([1 << (i + 1) for i in range(k)], dtype=torch.long)
        ibits = 1 + (self.regions.long() * weights[:, None]).sum(0) if k else torch.ones(self.n_img, dtype=torch.long)
        self.bits = torch.cat(tbits + [ibits])

    @property
    def N(self) -> int:
        return self.n_text + self.n_img

    def to(self, device) -> "RegionalLayout":
        self.owner, self.bits = self.owner.to(device), self.bits.to(device)
        return self

    def allow(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """True where query token q may attend to key token kv (broadcasting; usable as a mask_mod)."""
        return _allow(self.owner[q], self.owner[kv], self.bits[q], self.bits[kv], self.image_self)

    def dense(self, device=None) -> torch.Tensor:
        """Bool ``[N, N]`` allow-matrix (CPU / SDPA path)."""
        lay = self if device is None else self.to(device)
        idx = torch.arange(self.N, device=lay.owner.device)
        return lay.allow(idx[:, None], idx[None, :])

    def block_mask(self, device):
        """FlexAttention BlockMask from ``allow`` as mask_mod (CUDA path; no dense N×N tensor)."""
        from torch.nn.attention.flex_attention import create_block_mask

        lay = self.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            return lay.allow(q_idx, kv_idx)

        return create_block_mask(mask_mod, None, None, self.N, self.N, device=device, BLOCK_SIZE=FLEX_BLOCK)


def _allow(oq, ok, bq, bk, image_self: str) -> torch.Tensor:
    """The allow-rule of the module docstring from the tokens' owners and region bits."""
    iq, ik = oq < 0, ok < 0
    text_text = (oq == ok) & ~iq & ~ik
    cross = (iq ^ ik) & ((bq & bk) != 0)
    if image_self == "open":
        img_img = iq & ik
    else:  # share an entity region (bit ≥ 1), or both are background (only the global bit)
        img_img = iq & ik & (((bq & bk & ~1) != 0) | ((bq == 1) & (bk == 1)))
    return text_text | cross | img_img


@dataclass
class BatchLayout:
    """The layouts of a batch's rows (one job each), all padded to one text length: row b's mask is
    rows[b]'s, so every row attends exactly as it would alone (its padding sees only padding)."""

    rows: list[RegionalLayout]

    def __post_init__(self) -> None:
        if not self.rows:
            raise PlanError("a batch needs at least one row")
        if len({r.N for r in self.rows}) != 1 or len({r.image_self for r in self.rows}) != 1:
            raise PlanError("batch rows must have one token count and one image_self setting")
        r0 = self.rows[0]
        self.n_text, self.n_img, self.image_self = r0.n_text, r0.n_img, r0.image_self
        self.owner = torch.stack([r.owner for r in self.rows])  # [B, N]
        self.bits = torch.stack([r.bits for r in self.rows])

    @property
    def N(self) -> int:
        return self.rows[0].N

    def to(self, device) -> "BatchLayout":
        self.owner, self.bits = self.owner.to(device), self.bits.to(device)
        return self

    def dense(self, device=None) -> torch.Tensor:
        """Bool ``[B, N, N]`` allow-matrices."""
        lay = self if device is None else self.to(device)
        o, b = lay.owner, lay.bits
        return _allow(o[:, :, None], o[:, None, :], b[:, :, None], b[:, None, :], self.image_self)

    def block_mask(self, device):
        """FlexAttention BlockMask with a batch dimension (row b uses its own owners and bits)."""
        from torch.nn.attention.flex_attention import create_block_mask

        lay = self.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            return _allow(lay.owner[b, q_idx], lay.owner[b, kv_idx], lay.bits[b, q_idx], lay.bits[b, kv_idx],
                          lay.image_self)

        return create_block_mask(mask_mod, len(self.rows), None, self.N, self.N, device=device,
                                 BLOCK_SIZE=FLEX_BLOCK)


@dataclass
class BuiltMask:
    """A layout's mask, built once, in the form the kernel wants (dense bool or BlockMask)."""

    layout: RegionalLayout
    impl: str  # "sdpa" | "flex"
    mask: Any


_flex_compiled: Callable | None = None


def _flex():
    global _flex_compiled
    if _flex_compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        # compiled flex is the fused kernel; eager flex materialises scores (only for tests/CPU)
        _flex_compiled = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _flex_compiled


class RegionalAttention:
    """Installs regional processors on every Flux block once; each forward picks mask or plain path.

    ``use(mask, blocks)`` sets what the next forwards do: ``mask=None`` runs the stock
    ``FluxAttnProcessor`` everywhere (bit-identical to diffusers); otherwise blocks of the kinds in
    ``blocks`` ("all" | "double" | "single") apply the mask and the others run plain attention.
    """

    def __init__(self, transformer, impl: str | None = None):
        self.transformer = transformer
        dev = next(transformer.parameters()).device
        self.impl = impl or ("flex" if dev.type == "cuda" else "sdpa")
        self.current: BuiltMask | None = None
        self.kinds: tuple[str, ...] = ()
        self.probe: list | None = None  # tests: set to a list to record attention weights
        self.modulation = None  # runtime/cow.SowModulation while inside COW cycles (SOW), else None
        self.installed = False

    def install(self) -> None:
        if self.installed:
            return
        for b in self.transformer.transformer_blocks:
            b.attn.processor = RegionalFluxAttnProcessor(self, "double")
        for b in self.transformer.single_transformer_blocks:
            b.attn.processor = RegionalFluxAttnProcessor(self, "single")
        self.installed = True

    def build(self, layout: RegionalLayout, device) -> BuiltMask:
        """Build a layout's mask once (per job and condition); reuse it for every block and step."""
        if self.impl == "flex":
            return BuiltMask(layout, "flex", layout.block_mask(device))
        d = layout.dense(device)
        return BuiltMask(layout, "sdpa", d[None, None] if d.dim() == 2 else d[:, None])  # [1|B, 1, N, N]

    def use(self, mask: BuiltMask | None, blocks: str = "all") -> None:
        if blocks not in BLOCK_KINDS:
            raise PlanError(f"attention.blocks must be one of {sorted(BLOCK_KINDS)}, not {blocks!r}")
        self.current = mask
        self.kinds = BLOCK_KINDS[blocks] if mask is not None else ()

    def mask_for(self, kind: str) -> BuiltMask | None:
        return self.current if kind in self.kinds else None


class RegionalFluxAttnProcessor:
    """Flux attention (double- or single-stream block) with the EliGen region mask (arXiv 2501.01097).

    Same projections, QK-norm and RoPE as diffusers' ``FluxAttnProcessor``; only the kernel gets the
    mask. Without an active mask it calls the stock processor, so unmasked forwards are diffusers'.
    """

    def __init__(self, ctl: RegionalAttention, kind: str):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        self.ctl, self.kind = ctl, kind
        self.plain = FluxAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        built = self.ctl.mask_for(self.kind)
        mod = self.ctl.modulation  # SOW bias on image-image logits (runtime/cow.py), or None
        if built is None and mod is None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections, apply_rotary_emb

        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.added_kv_proj_dim is not None:
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        if built is not None and q.shape[1] != built.layout.N:
            raise PlanError(f"sequence of {q.shape[1]} tokens but the region mask is for {built.layout.N}")
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if mod is not None:
            out = mod.attend(qt, kt, vt, built, self.ctl.probe)
        elif built.impl == "flex":
            out = _flex()(qt, kt, vt, block_mask=built.mask)
        else:
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=built.mask)
        if self.ctl.probe is not None and mod is None:
            self._record(qt, kt, vt, out, built)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is not None:
            n_txt = encoder_hidden_states.shape[1]
            e, h = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
            h = attn.to_out[1](attn.to_out[0](h.contiguous()))
            return h, attn.to_add_out(e.contiguous())
        return out

    def _record(self, q, k, v, out, built: BuiltMask) -> None:
        """Probe: the attention weights softmax(QKᵀ/√d + log M), explicitly, and the kernel's output."""
        allow = built.layout.dense(q.device)
        allow = allow if allow.dim() == 2 else allow[:, None]  # a batch: [B, 1, N, N]
        logits = (q.float() @ k.float().transpose(-1, -2)) / (q.shape[-1] ** 0.5)
        w = torch.softmax(logits.masked_fill(~allow, float("-inf")), dim=-1)
        self.ctl.probe.append({"kind": self.kind, "weights": w, "allow": allow,
                               "expected": w @ v.float(), "out": out.float()})
