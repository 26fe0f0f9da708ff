"""Attention for every model family: the modifiers methods contribute, and one kernel dispatcher.

Methods (runtime/methods/) do not own processors: for each model call they contribute modifiers, and
the family's processors pass the ones for their site to :func:`attend`:

- :class:`Mask`: an allow-matrix built from the call's token layout (runtime/layout.py);
- :class:`KeyScale`: per-text-token key gains (coupling);
- :class:`Branches`: two attentions mixed (coupling on single-stream blocks);
- a bias: additive logits on image–image pairs (anything with the :class:`Bias` methods);
- a modulation: image–image scores moved within each query's min–max range (SOW, :class:`Modulation`);
- :class:`ExtraKV`: extra key/value tokens visible to chosen image queries (in the call's softmax, a
  decoupled attention added to its output, or one handed to the block: :func:`residual_extra`).

**Sites** (:class:`Site`) say what an attention call is: joint text+image (Flux dual- and
single-stream blocks), cross (SD ``attn2``: image queries, text keys) or self (SD ``attn1``: image
only). **Kernels**: the dispatcher picks SDPA (a dense mask or bias) or FlexAttention (a ``BlockMask``
and a ``score_mod``, on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from scenec.spec.errors import PlanError, Unsupported

from .kernels import flex_kernel, merge_lse, modulated_dense, modulated_flex
from .layout import BuiltMask

BLOCK_KINDS = {"all": ("double", "single"), "double": ("double",), "single": ("single",)}


# --- sites and modifiers -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Site:
    """What kind of attention call a processor makes: its name, whether text meets image there
    (``text``), whether image tokens are keys (``image_keys``) and whether it is a single-stream block
    (text and image share every weight, so coupling mixes two branches instead of scaling keys)."""

    name: str
    text: bool
    image_keys: bool
    single_stream: bool = False
    block: str | None = None  # the `attention.blocks` kind it belongs to ("double" | "single"); None: always


DOUBLE = Site("double", text=True, image_keys=True, block="double")  # Flux dual-stream block: [text | image]
SINGLE = Site("single", text=True, image_keys=True, single_stream=True, block="single")  # Flux single-stream
CROSS = Site("cross", text=True, image_keys=False)  # UNet attn2: image queries, text keys
SELF = Site("self", text=False, image_keys=True)  # UNet attn1: image only


@dataclass
class Mask:
    """An allow-matrix at ``sites``; ``by_n`` maps an image grid's token count to its mask (Flux has
    one grid, SD UNets one per resolution)."""

    by_n: dict[int, BuiltMask]
    sites: frozenset[str]

    def get(self, n_img: int) -> BuiltMask:
        m = self.by_n.get(n_img)
        if m is None:
            raise PlanError(f"no mask for a grid of {n_img} tokens (grids: {sorted(self.by_n)})")
        return m


@dataclass
class KeyScale:
    """Text keys multiplied per token (``scale``: float32 ``[n_text]``), e.g. coupling's background × (1 − θ)
    and entity × θ (arXiv 2506.06826, Eq. 4)."""

    scale: torch.Tensor
    sites: frozenset[str]


@dataclass
class Branches:
    """Coupling on a single-stream block (arXiv 2506.06826, §3.2): two attentions over one sequence
    ``[bg | ent… | pad | img]`` — ``[bg | img]`` unmasked and ``[ent… | pad | img]`` (with ``ent_mask``)
    — whose image outputs are mixed (1 − θ)·a_bg + θ·a_ent; each branch's text keeps its own output.
    Mixing before the block's (affine) output projection equals mixing the two blocks' outputs."""

    n_bg: int
    theta: float
    ent_mask: BuiltMask | None
    sites: frozenset[str]


@dataclass
class ExtraKV:
    """Extra key/value tokens (``k``, ``v``: ``[B|1, H, M, D]``) appended to every call at ``sites``,
    visible only to image queries with ``visible`` (bool ``[n_img]``, or a dict: image token count → that
    grid's) and scaled by ``scale`` (the logits get + log(scale)); queries outside see nothing of them.

    ``project``: the tokens per attention layer instead (the layer's module → (k, v)), for adapters with
    their own projections in every layer (visual prompts, runtime/methods/visual.py). ``decoupled``: a
    separate attention over the extra tokens added to the call's output, ``out + scale·vis·attn(q, k_x, v_x)``
    (IP-Adapter's decoupled cross-attention, arXiv 2308.06721, §3.2), instead of one softmax over both.
    ``residual``: that separate attention is not added to the attention's output but handed to the block,
    which adds it to its residual stream (:func:`residual_extra`; XLabs' Flux IP-Adapter adds it after the
    feed-forward, past the output projection and the gate), from the image queries before positional
    encoding; a processor whose site has such tokens calls :func:`residual_extra` itself."""

    k: torch.Tensor | None
    v: torch.Tensor | None
    visible: torch.Tensor | dict
    scale: float
    sites: frozenset[str]
    project: Callable | None = None  # made for the call's rows (a negative row: the no-image input's)
    decoupled: bool = False
    residual: bool = False

    def tokens(self, module) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.k, self.v) if self.project is None else self.project(module)

    def visible_for(self, n_img: int) -> torch.Tensor:
        if not isinstance(self.visible, dict):
            return self.visible
        if n_img not in self.visible:
            raise PlanError(f"extra tokens have no visibility for a grid of {n_img} tokens")
        return self.visible[n_img]


class Bias(Protocol):
    """Additive logits on image–image pairs (SOW, runtime/methods/oneway.py)."""

    sites: frozenset[str]

    def observe(self, q: torch.Tensor, k: torch.Tensor, n_text: int,
                allow: Callable[[torch.Tensor], torch.Tensor | None], rows: slice) -> None:
        """See one call's unbiased q/k (the indicator is measured at the first call of a step); ``allow(qi)``
        gives rows ``qi`` of the call's allow-matrix (bool ``[len(qi), N]``) or None, built only if asked
        for (never the whole N×N)."""

    def image_bias(self, n_img: int, device) -> torch.Tensor | None:
        """Float ``[n_img, n_img]`` (query, key) for this step, or None when it adds nothing."""

    def score_mod(self, n_text: int, n_img: int) -> Callable:
        """The same bias as a FlexAttention ``score_mod`` (no dense N×N)."""


class Modulation(Protocol):
    """Image–image scores moved within each query's range (SOW, runtime/methods/sow.py): for image query q
    and key k, S' = S + E·(hi_q − S) − U·(S − lo_q), hi_q / lo_q the max / min of q's image scores it may see."""

    sites: frozenset[str]

    def observe(self, q: torch.Tensor, k: torch.Tensor, n_text: int,
                allow: Callable[[torch.Tensor], torch.Tensor | None], rows: slice) -> None:
        """As :meth:`Bias.observe` (the indicator)."""

    def active(self) -> bool:
        """Whether this op modulates anything (decided on the host, without a device sync)."""

    def weights(self, n_img: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(E, U): float ``[n_img, n_img]`` (query, key) for this step, or None when it moves nothing."""

    def ranges(self, key: tuple, hi: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers holding this call's row ranges (read in place by the compiled score_mod)."""

    def score_mod(self, n_text: int, n_img: int, hi: torch.Tensor, lo: torch.Tensor) -> Callable:
        """The same modulation as a FlexAttention ``score_mod`` with the call's row ranges ``[B, H, n_img]``."""


class Attention:
    """The processors' shared state: the kernel implementation, this model call's modifiers, and a probe.

    A family installs its processors once; before each model call it sets :attr:`mods` (and, for
    joint attention, :attr:`n_img`); every processor passes its site's modifiers to :func:`attend`.
    With no modifier for its site a processor runs the model's stock processor (diffusers' own path).
    """

    def __init__(self, impl: str):
        self.impl = impl  # "sdpa" | "flex"
        self.mods: list = []
        self.n_img = 0  # image tokens of the current call (joint attention: text = the rest)
        self.rows = slice(None)  # batch rows of the positive branch (indicators read only those)
        self.probe: list | None = None  # tests: set to a list to record attention weights
        self.cache: dict = {}  # per model call: dense biases built once for all blocks
        self.module = None  # the attention layer calling `attend` (set by the processors; ExtraKV.project)

    def set(self, mods: list, n_img: int = 0, rows: slice = slice(None)) -> None:
        self.mods, self.n_img, self.rows = list(mods), n_img, rows
        self.cache = {}

    def clear(self) -> None:
        self.set([])

    def for_site(self, site: Site) -> list:
        return [m for m in self.mods if site.name in m.sites]


def _seq_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``[B, H, n, D]`` views along the sequence in the ``[B, N, H, D]`` layout the
    processors produce, and view back: the same memory layout (so the same kernel results) as
    concatenating before the transpose."""
    return torch.cat([p.transpose(1, 2) for p in parts], dim=1).transpose(1, 2)


def attend(ctl: Attention, site: Site, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mods: list) -> torch.Tensor:
    """The one kernel dispatcher: attention of ``q`` over ``k``/``v`` (``[B, H, N, D]``) under ``mods``.

    Joint sites: the sequence is ``[text | image]`` with ``ctl.n_img`` image tokens; cross sites: all
    keys are text, all queries image; self sites: all image. Returns ``[B, H, N_q, D]``.
    """
    n_q, n_k = q.shape[2], k.shape[2]
    if site.image_keys and site.text:
        n_img, n_text = ctl.n_img, n_k - ctl.n_img
    elif site.image_keys:
        n_img, n_text = n_k, 0
    else:
        n_img, n_text = n_q, n_k
    mask = bias = branches = None
    extra = []
    for m in mods:
        if isinstance(m, Mask):
            if mask is not None:
                raise PlanError(f"two masks at one {site.name} attention site")
            mask = m.get(n_img)
        elif isinstance(m, KeyScale):
            if m.scale.shape[0] != n_text:
                raise PlanError(f"key scale for {m.scale.shape[0]} text tokens, the call has {n_text}")
            kb = k.transpose(1, 2)
            k = torch.cat([kb[:, :n_text] * m.scale.to(k.dtype)[None, :, None, None], kb[:, n_text:]], 1)
            k = k.transpose(1, 2)
        elif isinstance(m, Branches):
            branches = m
        elif isinstance(m, ExtraKV):
            if not m.residual:  # residual ones are the block's (residual_extra)
                extra.append(m)
        else:
            bias = m
    if mask is not None and site.text and site.image_keys and mask.layout.N != n_text + n_img:
        raise PlanError(f"sequence of {n_text + n_img} tokens but the region mask is for {mask.layout.N}")
    if branches is not None:  # coupling: extra tokens are the entity stream's (its branch)
        return _branches(ctl, site, q, k, v, branches, bias, n_text, n_img, extra)
    if extra:
        return _with_extra(ctl, site, q, k, v, mask, extra, n_text, n_img, bias)
    return _kernel(ctl, site, q, k, v, mask, bias, n_text, n_img)


def _kernel(ctl: Attention, site: Site, q, k, v, mask: BuiltMask | None, bias, n_text: int, n_img: int):
    """SDPA or FlexAttention with an optional mask and an optional image–image bias or modulation."""
    if bias is not None and hasattr(bias, "weights"):
        out = _modulate(ctl, site, q, k, v, mask, bias, n_text, n_img)
        if out is not None:
            return out
        bias = None
    if bias is not None:
        _observe(ctl, q, k, mask, bias, n_text)
        img = bias.image_bias(n_img, q.device)
        if img is not None:
            if ctl.impl == "flex" and q.device.type == "cuda" and (mask is None or mask.impl == "flex"):
                return flex_kernel()(q, k, v, score_mod=bias.score_mod(n_text, n_img),
                               block_mask=None if mask is None else mask.mask)
            key = (id(bias), n_text, n_img, id(mask), q.dtype)
            full = ctl.cache.get(key)
            if full is None:  # once per model call, not per block
                if n_text == 0 and mask is None:
                    full = img
                else:
                    full = torch.zeros(n_text + n_img, n_text + n_img, device=q.device, dtype=torch.float32)
                    full[n_text:, n_text:] = img
                if mask is not None:
                    full = full.masked_fill(~mask.dense_allow(q.device), float("-inf"))
                full = ctl.cache[key] = full.to(q.dtype)[None, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=full)
            if ctl.probe is not None:
                logits = (q.float() @ k.float().transpose(-1, -2)) / (q.shape[-1] ** 0.5)
                ctl.probe.append({"kind": getattr(bias, "kind", "bias"), "site": site.name, "n_q": q.shape[2],
                                  "logits": logits, "bias": full[0, 0].float(), "n_txt": n_text,
                                  "expected": torch.softmax(logits + full[0, 0].float(), -1) @ v.float(),
                                  "out": out.float()})
            return out
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    if mask.impl == "flex":
        out = flex_kernel()(q, k, v, block_mask=mask.mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.mask)
    if ctl.probe is not None and bias is None:
        _record(ctl, site, q, k, v, out, mask)
    return out


def _observe(ctl: Attention, q, k, mask: BuiltMask | None, bias, n_text: int) -> None:
    """A bias's or modulation's indicator reads the call's unmodulated q/k (mask rows built only if asked)."""
    def allow(qi: torch.Tensor):
        return None if mask is None else mask.allow_rows(qi, q.device)

    bias.observe(q, k, n_text, allow, ctl.rows)


def _modulate(ctl: Attention, site: Site, q, k, v, mask: BuiltMask | None, mod, n_text: int, n_img: int,
              lse: bool = False):
    """A modulation's attention (SOW): its indicator sees the call's unmodulated q/k first; None when this op
    moves nothing. Fused FlexAttention on CUDA, the explicit dense form elsewhere; ``lse``: (out, log-sum-exp)."""
    _observe(ctl, q, k, mask, mod, n_text)
    if ctl.impl == "flex" and q.device.type == "cuda" and (mask is None or mask.impl == "flex"):
        # the score_mod reads the gains: no [n_img, n_img] weights on this path
        return modulated_flex(q, k, v, mask, mod, n_text, n_img, lse=lse) if mod.active() else None
    w = mod.weights(n_img, q.device)
    return None if w is None else modulated_dense(ctl, site, q, k, v, mask, w, n_text, n_img, lse=lse)


def _record(ctl: Attention, site: Site, q, k, v, out, mask: BuiltMask) -> None:
    """Probe: the attention weights softmax(QKᵀ/√d + log M), explicitly, and the kernel's output."""
    if mask.impl == "flex":
        d = mask.layout.dense(q.device, mask.rule)
        a4 = d[None, None] if d.dim() == 2 else d[:, None]
    else:
        a4 = mask.mask
    logits = (q.float() @ k.float().transpose(-1, -2)) / (q.shape[-1] ** 0.5)
    w = torch.softmax(logits.masked_fill(~a4, float("-inf")), dim=-1)
    ctl.probe.append({"kind": site.name, "rule": mask.rule, "n_q": q.shape[2], "weights": w,
                      "allow": a4[0, 0] if a4.shape[0] == 1 else a4,
                      "expected": w @ v.float(), "out": out.float()})


def _branches(ctl: Attention, site: Site, q, k, v, br: Branches, bias, n_text: int, n_img: int, extra=()):
    """Coupling's two branches on a single-stream block (:class:`Branches`), mixed on the image rows;
    ``extra`` tokens (an entity's visual prompt) join the entity branch."""
    nb = br.n_bg
    ne = n_text - nb  # entity text and its padding

    def bg_part(t):
        return _seq_cat([t[:, :, :nb], t[:, :, n_text:]])

    a_bg = _kernel(ctl, site, bg_part(q), bg_part(k), bg_part(v), None, bias, nb, n_img).transpose(1, 2)
    qe, ke, ve = q[:, :, nb:], k[:, :, nb:], v[:, :, nb:]
    a_ent = (_with_extra(ctl, site, qe, ke, ve, br.ent_mask, list(extra), ne, n_img, bias) if extra else
             _kernel(ctl, site, qe, ke, ve, br.ent_mask, bias, ne, n_img)).transpose(1, 2)
    img = (1 - br.theta) * a_bg[:, nb:] + br.theta * a_ent[:, ne:]
    return torch.cat([a_bg[:, :nb], a_ent[:, :ne], img], dim=1).transpose(1, 2)


def _with_extra(ctl: Attention, site: Site, q, k, v, mask: BuiltMask | None, extra: list[ExtraKV],
                n_text: int, n_img: int, bias=None):
    """Attention with extra key/value tokens (see :class:`ExtraKV`): the joint ones in the call's softmax,
    then each decoupled one's attention added to the output.

    Joint tokens with FlexAttention: the call's own attention runs as without them (its BlockMask, no
    dense N×N) and returns its log-sum-exp L₁; the extra tokens' logits s = q·k_xᵀ/√d + log(scale) (−∞
    outside their queries) are merged exactly, out = (e^{L₁}·o₁ + Σ e^{s}·v_x) / (e^{L₁} + Σ e^{s}) — one
    softmax over both, as flash attention merges its key blocks (Dao et al. 2022, arXiv 2205.14135, §3.1).
    SDPA returns no log-sum-exp: one softmax over [keys | extra] with a dense bias ``[N_q, N_k + M]`` built
    once per model call (``ctl.cache``, shared by every block and by backward). With a modulation (SOW)
    the call's own part is the modulated one and its log-sum-exp that of the modulated scores: the extra
    tokens join that softmax unmodulated (SOW moves image–image scores only)."""
    B, N_q, N_k = q.shape[0], q.shape[2], k.shape[2]

    def visible(e: ExtraKV) -> torch.Tensor:
        vis = torch.zeros(N_q, dtype=torch.bool, device=q.device)
        vis[N_q - n_img:] = e.visible_for(n_img).to(q.device)  # image queries (joint: after the text)
        return vis

    joint = [e for e in extra if not e.decoupled]
    if not joint:
        out = _kernel(ctl, site, q, k, v, mask, bias, n_text, n_img)
    else:
        if bias is not None and not hasattr(bias, "weights"):
            raise Unsupported("extra key/value tokens together with an additive image bias in one call")
        moved = None if bias is None else _modulate(ctl, site, q, k, v, mask, bias, n_text, n_img, lse=True)
        toks = [e.tokens(ctl.module) for e in joint]
        ek = _seq_cat([t[0].to(k.dtype).expand(B, -1, -1, -1) for t in toks])
        ev = _seq_cat([t[1].to(v.dtype).expand(B, -1, -1, -1) for t in toks])
        key = ("extra", tuple(id(e) for e in joint), tuple(t[0].shape[2] for t in toks), N_q, n_img, q.device)
        add = ctl.cache.get(key)
        if add is None:  # [N_q, M] float32: log(scale) where a query sees the tokens, −∞ elsewhere
            add = ctl.cache[key] = torch.cat([torch.where(
                visible(e)[:, None].expand(N_q, t[0].shape[2]), float(np.log(e.scale)) if e.scale > 0
                else float("-inf"), float("-inf")) for e, t in zip(joint, toks)], 1)

        def dense() -> torch.Tensor:  # [N_q, N_k + M] in q's dtype, once per model call
            dkey = key + (id(mask), N_k, q.dtype)
            if dkey not in ctl.cache:
                allow = (torch.ones(N_q, N_k, dtype=torch.bool, device=q.device) if mask is None else
                         mask.dense_allow(q.device) if mask.impl != "cross" else mask.mask[0, 0])
                main = torch.zeros(N_q, N_k, device=q.device).masked_fill(~allow, float("-inf"))
                ctl.cache[dkey] = torch.cat([main, add], 1).to(q.dtype)
            return ctl.cache[dkey]

        if moved is not None:
            out = merge_lse(moved[0], moved[1], q, ek, ev, add)
        # flex has no backward on CPU (refinement there takes the dense path)
        elif ctl.impl == "flex" and (mask is None or mask.impl == "flex") and (
                q.device.type == "cuda" or not torch.is_grad_enabled()):
            from torch.nn.attention.flex_attention import AuxRequest

            o1, aux = flex_kernel()(q, k, v, block_mask=None if mask is None else mask.mask,
                                    return_aux=AuxRequest(lse=True))
            out = merge_lse(o1, aux.lse, q, ek, ev, add)
        else:
            out = F.scaled_dot_product_attention(q, _seq_cat([k, ek]), _seq_cat([v, ev]), attn_mask=dense())
        if ctl.probe is not None and moved is None:  # modulated: the "sow" record holds the call's own part
            kk, vv = _seq_cat([k, ek]), _seq_cat([v, ev])
            w = torch.softmax((q.float() @ kk.float().transpose(-1, -2)) / (q.shape[-1] ** 0.5)
                              + dense().float(), -1)
            ctl.probe.append({"kind": "extra", "site": site.name, "n_q": N_q, "n_k": N_k, "weights": w,
                              "expected": w @ vv.float(), "out": out.float()})
    for e in extra:
        if not e.decoupled:
            continue
        ek, ev = e.tokens(ctl.module)
        gain = visible(e).to(torch.float32) * e.scale  # per query: scale inside, exactly 0 outside
        ek, ev = ek.to(q.dtype).expand(B, -1, -1, -1), ev.to(v.dtype).expand(B, -1, -1, -1)
        ip = F.scaled_dot_product_attention(q, ek, ev)
        if ctl.probe is not None:
            ctl.probe.append({"kind": "extra-decoupled", "site": site.name, "n_q": N_q, "gain": gain,
                              "base": out.float(), "extra": ip.float()})
        out = out + ip * gain.to(q.dtype)[None, None, :, None]
    return out


def residual_extra(ctl: Attention, site: Site, q_img: torch.Tensor, mods: list) -> torch.Tensor | None:
    """The residual extra tokens' attention (:class:`ExtraKV` with ``residual``) for image queries ``q_img``
    (``[B, H, n_img, D]``): Σ scale·vis·softmax(q k_xᵀ/√d) v_x over them, ``[B, H, n_img, D]``, exactly 0 on
    the queries outside each one's region; None when the call has none."""
    out = None
    for e in mods:
        if not (isinstance(e, ExtraKV) and e.residual):
            continue
        B, n_img = q_img.shape[0], q_img.shape[2]
        ek, ev = e.tokens(ctl.module)
        ek, ev = ek.to(q_img.dtype).expand(B, -1, -1, -1), ev.to(q_img.dtype).expand(B, -1, -1, -1)
        gain = e.visible_for(n_img).to(q_img.device, torch.float32) * e.scale  # per query: 0 outside
        ip = F.scaled_dot_product_attention(q_img, ek, ev)
        if ctl.probe is not None:
            ctl.probe.append({"kind": "extra-residual", "site": site.name, "n_q": n_img, "gain": gain,
                              "extra": ip.float()})
        ip = ip * gain.to(q_img.dtype)[None, None, :, None]
        out = ip if out is None else out + ip
    return out
