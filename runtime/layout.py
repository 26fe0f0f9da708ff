"""Token layouts of attention calls and the masks built from them (runtime/attention.py uses them).

A forward's text is a sequence of streams packed back to back, then padding:
``[global | entity 0 | … | entity k-1 | pad]``; image tokens follow (joint attention, Flux) or are the
queries (cross-attention, SD). :class:`RegionalLayout` records who owns each token and, for image
tokens, which regions they lie in (coverage > 0 on the grid), and derives the allow-rules:

- ``regional`` (EliGen, arXiv 2501.01097, §3.2): each prompt ↔ its own tokens, prompts never see each
  other; entity prompt i ↔ the image tokens of region i; the global prompt ↔ every image token;
  image ↔ image all pairs (``image_self: open``) or pairs sharing a region, background with
  background (``restricted``, as InstantX/InvokeAI);
- ``open``: every real token ↔ every real token (what a forward without the region mask computes).

Under both, pad tokens see only pad tokens and nothing real sees them, so a padded forward computes
what the unpadded one does. A layout without pad needs no mask for ``open``. Masks are built once
per job and layout (:func:`build_mask`), never per block or step: a dense boolean matrix for SDPA, a
FlexAttention ``BlockMask`` from the same rule as ``mask_mod`` (no dense N×N tensor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from scenec.compiler.caps import MAX_ENTITIES  # region membership is an int64 bitmask: bit 0 = global
from scenec.spec.errors import PlanError, Unsupported

FLEX_BLOCK = 128
RULES = ("regional", "open")


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


def _allow(oq, ok, bq, bk, image_self: str, rule: str = "regional") -> torch.Tensor:
    """The allow-rules of the module docstring from the tokens' owners and region bits.

    Owners: prompt index for text, P (the prompt count) for pad, −1 for image. Bits: 1 << prompt for
    text, 0 for pad, 1 | (1 << (i + 1) for each region i holding the token) for image."""
    if rule == "open":
        return (bq != 0) == (bk != 0)  # real ↔ real, pad ↔ pad
    iq, ik = oq < 0, ok < 0
    text_text = (oq == ok) & ~iq & ~ik
    cross = (iq ^ ik) & ((bq & bk) != 0)
    if image_self == "open":
        img_img = iq & ik
    else:  # share an entity region (bit ≥ 1), or both are background (only the global bit)
        img_img = iq & ik & (((bq & bk & ~1) != 0) | ((bq == 1) & (bk == 1)))
    return text_text | cross | img_img


@dataclass
class RegionalLayout:
    """Token layout of one forward (one batch row) and its allow-rules (see the module docstring)."""

    text_lengths: list[int]  # per prompt, the global prompt first (0 = no global prompt)
    regions: torch.Tensor  # bool [k entities, n_img]
    image_self: str = "open"  # "open" | "restricted"
    pad_multiple: int = 1
    n_text_to: int | None = None  # pad the text to exactly this many tokens (a batch row)
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

    @property
    def rows(self) -> list["RegionalLayout"]:
        return [self]

    def to(self, device) -> "RegionalLayout":
        self.owner, self.bits = self.owner.to(device), self.bits.to(device)
        return self

    def allow(self, q: torch.Tensor, kv: torch.Tensor, rule: str = "regional") -> torch.Tensor:
        """True where query token q may attend to key token kv (broadcasting; usable as a mask_mod)."""
        return _allow(self.owner[q], self.owner[kv], self.bits[q], self.bits[kv], self.image_self, rule)

    def dense(self, device=None, rule: str = "regional") -> torch.Tensor:
        """Bool ``[N, N]`` allow-matrix (SDPA)."""
        lay = self if device is None else self.to(device)
        idx = torch.arange(self.N, device=lay.owner.device)
        return lay.allow(idx[:, None], idx[None, :], rule)

    def cross(self, device=None, rule: str = "regional") -> torch.Tensor:
        """Bool ``[n_img, n_text]``: image queries × text keys (cross-attention)."""
        d = self.dense(device, rule)
        return d[self.n_text:, :self.n_text]

    def block_mask(self, device, rule: str = "regional"):
        """FlexAttention BlockMask from ``allow`` as mask_mod (no dense N×N tensor)."""
        from torch.nn.attention.flex_attention import create_block_mask

        lay = self.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            return lay.allow(q_idx, kv_idx, rule)

        return create_block_mask(mask_mod, None, None, self.N, self.N, device=device, BLOCK_SIZE=FLEX_BLOCK)

    def needs_mask(self, rule: str) -> bool:
        """Whether ``rule`` masks anything here: ``open`` only matters where there is padding."""
        return rule == "regional" or self.n_pad > 0


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
        self.n_pad = max(r.n_pad for r in self.rows)
        self.owner = torch.stack([r.owner for r in self.rows])  # [B, N]
        self.bits = torch.stack([r.bits for r in self.rows])

    @property
    def N(self) -> int:
        return self.rows[0].N

    def to(self, device) -> "BatchLayout":
        self.owner, self.bits = self.owner.to(device), self.bits.to(device)
        return self

    def dense(self, device=None, rule: str = "regional") -> torch.Tensor:
        """Bool ``[B, N, N]`` allow-matrices."""
        lay = self if device is None else self.to(device)
        o, b = lay.owner, lay.bits
        return _allow(o[:, :, None], o[:, None, :], b[:, :, None], b[:, None, :], self.image_self, rule)

    def cross(self, device=None, rule: str = "regional") -> torch.Tensor:
        """Bool ``[B, n_img, n_text]``."""
        return self.dense(device, rule)[:, self.n_text:, :self.n_text]

    def block_mask(self, device, rule: str = "regional"):
        """FlexAttention BlockMask with a batch dimension (row b uses its own owners and bits)."""
        from torch.nn.attention.flex_attention import create_block_mask

        lay = self.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            return _allow(lay.owner[b, q_idx], lay.owner[b, kv_idx], lay.bits[b, q_idx], lay.bits[b, kv_idx],
                          lay.image_self, rule)

        return create_block_mask(mask_mod, len(self.rows), None, self.N, self.N, device=device,
                                 BLOCK_SIZE=FLEX_BLOCK)

    def needs_mask(self, rule: str) -> bool:
        return rule == "regional" or self.n_pad > 0


Layout = RegionalLayout | BatchLayout


@dataclass
class BuiltMask:
    """A layout's mask under one rule, built once, in the form the kernel wants.

    ``impl``: "sdpa" (``mask`` a dense bool ``[B|1, 1, N, N]``), "flex" (a ``BlockMask``) or "cross"
    (dense bool ``[B|1, 1, n_img, n_text]`` for cross-attention)."""

    layout: Any  # RegionalLayout | BatchLayout
    impl: str
    mask: Any
    rule: str = "regional"

    def dense_allow(self, device) -> torch.Tensor:
        """The allow-matrix as dense bool ``[N, N]`` (batch row 0), whatever the kernel form."""
        if self.impl == "sdpa":
            return self.mask[0, 0]
        d = self.layout.dense(device, self.rule)
        return d if d.dim() == 2 else d[0]


def build_mask(layout: Layout, impl: str, device, rule: str = "regional") -> BuiltMask:
    """Build a layout's mask once (per job, condition and rule); every block and step reuses it."""
    if rule not in RULES:
        raise PlanError(f"unknown attention rule {rule!r}")
    if impl == "flex":
        return BuiltMask(layout, "flex", layout.block_mask(device, rule), rule)
    if impl == "cross":
        c = layout.cross(device, rule)
        return BuiltMask(layout, "cross", c[None, None] if c.dim() == 2 else c[:, None], rule)
    d = layout.dense(device, rule)
    return BuiltMask(layout, "sdpa", d[None, None] if d.dim() == 2 else d[:, None], rule)
