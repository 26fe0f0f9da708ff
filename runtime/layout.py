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
FlexAttention ``BlockMask`` from the same rule as ``mask_mod`` (no dense N×N tensor, not even while
it is built: :func:`block_tables` classifies 128×128 blocks from the token classes present in each).

On the FlexAttention path the text is padded to a *bucket* (:func:`text_bucket`): a few sizes per
octave, so compiled kernels see a bounded number of sequence lengths however the prompts vary.
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
MAX_CLASSES = 256  # token classes above which block_tables evaluates the rule one query block at a time


def text_bucket(n: int, multiple: int) -> int:
    """The padded text length for ``n`` tokens: ``n`` itself when ``multiple`` ≤ 1 (SDPA needs no padding),
    else the next multiple of ``multiple`` up to 8 of them, then quarter octaves (10, 12, 14, 16, 20, 24, …
    multiples). Compiled FlexAttention specialises on the sequence length (``dynamic=False``), so the number
    of sizes a build meets grows with the log of its longest text, not with every prompt length; at most
    a quarter of the text is padding (pad tokens see only pad, and whole pad blocks are skipped)."""
    if multiple <= 1:
        return n
    u = max(1, -(-n // multiple))
    step = 1 << max(0, (u - 1).bit_length() - 3)  # 1 up to 8 units, then 2, 4, 8, …
    return -(-u // step) * step * multiple


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
        self.n_pad = text_bucket(n_txt, self.pad_multiple) - n_txt
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

    def allow_rows(self, q: torch.Tensor, rule: str = "regional") -> torch.Tensor:
        """Bool ``[len(q), N]``: the allow-matrix's rows of query tokens ``q`` (no N×N)."""
        kv = torch.arange(self.N, device=self.owner.device)
        return self.allow(q.to(self.owner.device)[:, None], kv[None, :], rule)

    def block_mask(self, device, rule: str = "regional"):
        """FlexAttention BlockMask with ``allow`` as mask_mod, its blocks from :func:`block_tables`."""
        partial, full = block_tables(self.owner, self.bits, self.image_self, rule, self.N)
        lay = self.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            return lay.allow(q_idx, kv_idx, rule)

        return _block_mask(partial[None], full[None], mask_mod, self.N, device)

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

    def allow_rows(self, q: torch.Tensor, rule: str = "regional") -> torch.Tensor:
        """Bool ``[len(q), N]`` of batch row 0 (as :meth:`RegionalLayout.allow_rows`), from the stacked
        tables where :meth:`to` put them (no round trip to the host)."""
        o, b = self.owner[0], self.bits[0]
        q, kv = q.to(o.device), torch.arange(self.N, device=o.device)
        return _allow(o[q][:, None], o[kv][None, :], b[q][:, None], b[kv][None, :], self.image_self, rule)

    def block_mask(self, device, rule: str = "regional"):
        """FlexAttention BlockMask with a batch dimension (row b uses its own owners and bits)."""
        tables = [block_tables(r.owner, r.bits, self.image_self, rule, self.N) for r in self.rows]
        lay = self.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            return _allow(lay.owner[b, q_idx], lay.owner[b, kv_idx], lay.bits[b, q_idx], lay.bits[b, kv_idx],
                          lay.image_self, rule)

        return _block_mask(torch.stack([p for p, _ in tables]), torch.stack([f for _, f in tables]), mask_mod,
                           self.N, device)

    def needs_mask(self, rule: str) -> bool:
        return rule == "regional" or self.n_pad > 0


Layout = RegionalLayout | BatchLayout


def block_tables(owner: torch.Tensor, bits: torch.Tensor, image_self: str, rule: str, n: int,
                 block: int = FLEX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Which ``block``×``block`` tiles of one row's allow-matrix are partial and which full: bool
    ``[nb, nb]`` each, as ``create_block_mask`` classifies them (a tile cut by the end of the sequence
    is never full), without its dense N×N intermediate.

    The rule depends on a token only through its (owner, bits): tokens with equal pairs form a class,
    and a tile is empty when no pair of classes present in it is allowed, full when none is disallowed.
    With presence P (bool ``[nb, C]``) and the class rule A (``[C, C]``): allowed = P·A·Pᵀ, disallowed =
    P·(1 − A)·Pᵀ. Beyond :data:`MAX_CLASSES` classes (thousands of region patterns) the rule is evaluated
    one query block at a time instead (``[block, N]``)."""
    owner, bits = owner.detach().to("cpu"), bits.detach().to("cpu")
    nb = -(-n // block)
    complete = torch.ones(nb, dtype=torch.bool)
    if n % block:
        complete[-1] = False  # padded by create_block_mask with False: partial at best
    keys, cls = torch.unique(torch.stack([owner, bits], 1), dim=0, return_inverse=True)
    blk = torch.arange(n) // block
    if keys.shape[0] <= MAX_CLASSES:
        pres = torch.zeros(nb, keys.shape[0], dtype=torch.float64)
        pres[blk, cls] = 1.0
        ok, kb = keys[:, 0], keys[:, 1]
        a = _allow(ok[:, None], ok[None, :], kb[:, None], kb[None, :], image_self, rule).to(torch.float64)
        allowed, disallowed = pres @ a @ pres.T, pres @ (1.0 - a) @ pres.T
    else:
        allowed = torch.zeros(nb, nb, dtype=torch.float64)
        disallowed = torch.zeros(nb, nb, dtype=torch.float64)
        kv = torch.arange(n)
        for i in range(nb):
            q = kv[i * block:(i + 1) * block]
            rows = _allow(owner[q][:, None], owner[None, :], bits[q][:, None], bits[None, :], image_self, rule)
            allowed[i].index_add_(0, blk, rows.sum(0, dtype=torch.float64))
            disallowed[i].index_add_(0, blk, (~rows).sum(0, dtype=torch.float64))
    full = (disallowed == 0) & complete[:, None] & complete[None, :]
    return (allowed > 0) & ~full, full


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A block table ``[B, H, nq, nkv]`` as FlexAttention's (count, indices), present blocks first in
    ascending order (as ``create_block_mask`` orders them)."""
    d = dense.to(torch.int32)
    order = torch.sort(d, dim=-1, descending=True, stable=True).indices
    return d.sum(-1, dtype=torch.int32), order.to(torch.int32).contiguous()


def _block_mask(partial: torch.Tensor, full: torch.Tensor, mask_mod, n: int, device):
    """A BlockMask from per-row tables ``[B, nb, nb]`` (``BlockMask.from_kv_blocks``, one head row)."""
    from torch.nn.attention.flex_attention import BlockMask

    kv_num, kv_idx = _ordered(partial[:, None].to(device))
    full_num, full_idx = _ordered(full[:, None].to(device))
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(FLEX_BLOCK, FLEX_BLOCK),
                                    mask_mod=mask_mod, seq_lengths=(n, n))


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

    def allow_rows(self, q: torch.Tensor, device) -> torch.Tensor:
        """Rows ``q`` of the allow-matrix, bool ``[len(q), N]`` (batch row 0): what SOW's ranges and
        indicator need, with no N×N on the FlexAttention path."""
        if self.impl == "sdpa":
            return self.mask[0, 0][q.to(self.mask.device)]
        return self.layout.allow_rows(q, self.rule).to(device)


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
