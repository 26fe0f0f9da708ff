"""SOW's attention modulation ("SOWing Information: Cultivating Contextual Coherence with MLLMs in Image
Generation", arXiv 2411.19182, §IV, "dynamic attention modulation"), for COW's cycles (runtime/methods/oneway.py).

Inside the cycles SOW steers how information spreads through image–image attention: the condition region
C (the reference) should not read the outside (one-way), and the related region R (the "guiding box":
what should draw from the reference) should read C. As the paper describes it:

- **Scores are min–max normalised before modulating**, as DenseDiffusion does (Kim et al. 2023, Eq. 3–4:
  modulation "considering the value range of the original scores"). For each image query q, with
  S[q, ·] its pre-softmax scores QKᵀ/√d over the image keys it may see, lo_q = min and hi_q = max:

      S'[q, k] = S[q, k] + E[q, k]·(hi_q − S[q, k]) − U[q, k]·(S[q, k] − lo_q)

  i.e. in the normalised scores Ŝ = (S − lo)/(hi − lo): Ŝ' = Ŝ + E·(1 − Ŝ) − U·Ŝ. E pulls an enhanced
  pair towards its row's maximum, U a suppressed one towards its row's minimum; weights in [0, 1] keep
  every score inside its row's range. Text tokens are never modulated.
- **The weights**, per condition with fall-off f(p) = exp(−distance·|p − centre(C)|/diagonal) and gain
  g = decay^cycle · φ(s):

      U[q, k] = suppress · g · f(k)   for q ∈ C, k ∉ C     (the condition does not read the outside)
      E[q, k] = enhance  · g · f(q)   for q ∈ R, k ∈ C     (the related region reads the condition)

  summed over conditions and clipped to [0, 1].
- **The indicator** s: at the op's first attention call (the positive branch), the pre-softmax attention
  share of the probe points — the closest fifth of the guiding box's points (R \\ C; the outside of C
  when there is no guiding box) to the condition's centre — on the condition: the mean over rows, heads
  and probe queries of Σ_{k∈C} Ŝ[q, k] / Σ_k Ŝ[q, k] from the unmodulated scores.
- **Modulation scaled by the indicator's distance to its threshold**, not switched on/off:
  φ(s) = clip((threshold − s)/threshold, 0, 1) — full strength while nothing has spread, fading to 0 as
  the share reaches the threshold.

The seed's text lost the paper's equations for the modulation and the indicator; the forms above follow
its prose (normalise, then suppress/enhance with decay and distance, scaled by the indicator's distance
to its threshold; the indicator over the closest fifth of the guiding box), and the normalisation of φ by
the threshold is ours. Defaults: suppress 1, enhance 1, decay 0.8, distance 1, threshold 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from scenec.spec.errors import PlanError

PROBE_FRACTION = 0.2  # the closest fifth of the guiding box's points


@dataclass
class SowTerm:
    """One condition's modulation on one image grid (flattened, row-major)."""

    cond: torch.Tensor  # bool [n]: token in the condition region (coverage > 0)
    related: torch.Tensor  # bool [n]: token in the related region (empty when none)
    fall: torch.Tensor  # float [n]: exp(−distance · |p − centre| / diagonal)
    probe: torch.Tensor  # long [m]: the indicator's probe points (indices into the grid)
    suppress: float
    enhance: float
    decay: float
    threshold: float

    def to(self, device) -> "SowTerm":
        return SowTerm(self.cond.to(device), self.related.to(device), self.fall.to(device), self.probe.to(device),
                       self.suppress, self.enhance, self.decay, self.threshold)


def sow_term(cond_mask: np.ndarray, related_mask: np.ndarray | None, params) -> SowTerm:
    """A condition's SOW term from its grid coverage masks and ``modulation`` (a model or a dict)."""
    p = params if isinstance(params, dict) else params.model_dump()
    cm = np.asarray(cond_mask, np.float32)
    h, w = cm.shape
    if cm.sum() <= 0:
        raise PlanError("reference condition with an empty region")
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (ys * cm).sum() / cm.sum(), (xs * cm).sum() / cm.sum()  # coverage-weighted centre
    d = np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2) / math.hypot(h, w)
    fall = np.exp(-float(p.get("distance", 1.0)) * d)
    rel = np.zeros_like(cm, dtype=bool) if related_mask is None else np.asarray(related_mask) > 0
    if rel.shape != cm.shape:
        raise PlanError(f"related mask {list(rel.shape)} does not match the condition's grid {[h, w]}")
    inside = cm > 0
    pool = rel & ~inside
    if not pool.any():
        pool = ~inside
    idx = np.flatnonzero(pool)
    if idx.size == 0:  # the condition covers the whole grid: the indicator has nothing to measure
        idx = np.flatnonzero(inside)
    order = idx[np.argsort(d.reshape(-1)[idx], kind="stable")]
    probe = order[: max(1, math.ceil(PROBE_FRACTION * order.size))]
    return SowTerm(torch.from_numpy(inside.reshape(-1)), torch.from_numpy(rel.reshape(-1).copy()),
                   torch.from_numpy(fall.reshape(-1).astype(np.float32)), torch.from_numpy(np.sort(probe)),
                   float(p.get("suppress", 1.0)), float(p.get("enhance", 1.0)),
                   float(p.get("decay", 0.8)), float(p.get("threshold", 0.5)))


def sow_unit_weights(t: SowTerm) -> tuple[torch.Tensor, torch.Tensor]:
    """A term's (E, U) at gain 1, dense float ``[n, n]`` (query, key) on its grid:
    E = enhance·f(q) where q ∈ R and k ∈ C; U = suppress·f(k) where q ∈ C and k ∉ C; 0 elsewhere."""
    enh = (t.related[:, None] & t.cond[None, :]).float() * t.fall[:, None]
    sup = (t.cond[:, None] & ~t.cond[None, :]).float() * t.fall[None, :]
    return t.enhance * enh, t.suppress * sup


def sow_share(t: SowTerm, q: torch.Tensor, k: torch.Tensor, n_txt: int = 0,
              allow: torch.Tensor | None = None) -> float:
    """:func:`sow_share_t` on the host."""
    return float(sow_share_t(t, q, k, n_txt, allow))


def sow_share_t(t: SowTerm, q: torch.Tensor, k: torch.Tensor, n_txt: int = 0,
                allow: torch.Tensor | None = None) -> torch.Tensor:
    """The indicator of one term from one call's *unmodulated* q, k (``[b, h, N, d]``, image tokens after
    ``n_txt`` text tokens; ``allow`` an optional bool ``[len(t.probe), N]``: the allow-matrix's rows of the
    probe queries): the mean over rows, heads and probe queries of Σ_{k∈C} Ŝ[q, k] / Σ_k Ŝ[q, k], Ŝ the
    min–max normalised pre-softmax scores over the image keys the query may see."""
    qi = n_txt + t.probe
    s = (q[:, :, qi].float() @ k[:, :, n_txt:].float().transpose(-1, -2)) / (q.shape[-1] ** 0.5)
    ok = None if allow is None else allow[:, n_txt:][None, None]
    hi = s if ok is None else s.masked_fill(~ok, float("-inf"))
    lo = s if ok is None else s.masked_fill(~ok, float("inf"))
    hi, lo = hi.amax(-1, keepdim=True), lo.amin(-1, keepdim=True)
    n = (s - lo) / (hi - lo).clamp_min(1e-12)
    if ok is not None:
        n = n.masked_fill(~ok, 0.0)
    # boolean indexing needs the count on the host (a sync on a GPU); the product sums the same terms
    on_c = n[..., t.cond].sum(-1) if n.device.type == "cpu" else (n * t.cond.to(n.dtype)).sum(-1)
    share = on_c / n.sum(-1).clamp_min(1e-12)
    return share.mean()


def indicator_factor(share, threshold: float):
    """φ(s) = clip((threshold − s)/threshold, 0, 1): full strength while nothing has spread, 0 at the threshold.
    ``share`` a float, or a device scalar (then φ stays on the device)."""
    on_device = isinstance(share, torch.Tensor)
    if threshold <= 0.0:
        return share * 0.0 if on_device else 0.0
    f = (threshold - share) / threshold
    return f.clamp(0.0, 1.0) if on_device else min(1.0, max(0.0, f))


class Sow:
    """SOW's modulation as an attention modifier (see the module docstring): weights E, U per image grid
    for this op, applied by the dispatcher to the min–max range of each query's image scores
    (``runtime.attention``: the dense path, or FlexAttention's ``score_mod``).

    Terms exist per image grid (``grids``: token count → terms; Flux has one grid, a UNet one per
    resolution), picked per call by its image token count. The unit weights are built once per job and
    grid; per op only the gains change (decay^cycle, then × φ of the indicator at the op's first call).
    """

    kind = "sow"  # how probes name its records

    def __init__(self, grids: dict[int, list[SowTerm]], index: list[int], device, sites: frozenset[str]):
        self.device = torch.device(device)
        self.grids = {n: [t.to(device) for t in ts] for n, ts in grids.items()}
        self.index = index  # term → condition index
        self.sites = sites
        terms = next(iter(self.grids.values()))
        self.decay = [t.decay for t in terms]
        self.threshold = [t.threshold for t in terms]
        self.gains = [0.0] * len(self.decay)  # this op's, on the host (no device sync per call)
        self.gains_t = torch.zeros(len(self.decay), device=device)  # the same, read by the CUDA score_mod
        self.cycle = 0
        self.pending = False  # measure the indicator at the next attention call
        self.history: list[dict] = []  # per op: cycle, grid, share and factor per term, gains (diagnostics, tests)
        self._units: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._weights: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._score_mods: dict = {}
        self._ranges: dict = {}

    def begin_step(self, cycle: int, inside: list[bool]) -> bool:
        """Arm for one denoise op; False when no term is inside its cycles (then it adds nothing)."""
        self.cycle = cycle
        self._set_gains([(d ** cycle) if ins else 0.0 for d, ins in zip(self.decay, inside)])
        self.pending = any(inside)
        return self.pending

    def _set_gains(self, gains: list[float]) -> None:
        self.gains = list(gains)
        if self.gains_t.device.type == "cuda":  # fill kernels take the scalars: no host-to-device copy, no sync
            for i, g in enumerate(gains):
                self.gains_t[i].fill_(g)
        else:
            self.gains_t.copy_(torch.tensor(gains, dtype=torch.float32))  # in place: the compiled score_mod reads it
        self._weights.clear()

    def terms_for(self, n: int) -> list[SowTerm]:
        ts = self.grids.get(n)
        if ts is None:
            raise PlanError(f"SOW: no grid has {n} tokens (grids: {sorted(self.grids)})")
        return ts

    def observe(self, q, k, n_text: int, allow, rows: slice) -> None:
        if self.pending:
            self.pending = False
            self.measure(q, k, n_text, allow, rows)

    def active(self) -> bool:
        """Whether this op modulates at all (host gains; on a GPU before φ, which stays on the device)."""
        return any(g != 0.0 for g in self.gains)

    def measure(self, q, k, n_text: int, allow, rows: slice, on_device: bool | None = None) -> None:
        """The indicator from one call's unmodulated scores; scales each term's gain by φ(share).

        On a GPU (``on_device``, default: q is on CUDA) φ and the gains stay on the device (no host sync
        inside the step loop): the kernels read ``gains_t``; ``history`` then holds device scalars."""
        on_device = q.device.type == "cuda" if on_device is None else on_device
        n = q.shape[2] - n_text
        shares, factors, gains = [], [], list(self.gains)
        for ti, t in enumerate(self.terms_for(n)):
            if gains[ti] == 0.0:
                shares.append(None)
                factors.append(None)
                continue
            s = sow_share_t(t, q[rows], k[rows], n_text, allow(n_text + t.probe.to(q.device)))
            s = s if on_device else float(s)
            f = indicator_factor(s, self.threshold[ti])
            shares.append(s)
            factors.append(f)
            if on_device:
                self.gains_t[ti] = self.gains_t[ti] * f.to(self.gains_t.dtype)
            else:
                gains[ti] *= f
        if on_device:
            self._weights.clear()
        else:
            self._set_gains(gains)
        self.history.append({"cycle": self.cycle, "grid": n, "share": shares, "factor": factors,
                             "gains": self.gains_t.clone() if on_device else list(self.gains)})

    def weights(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This op's (E, U), float ``[n, n]`` on the grid of n tokens, or None when every gain is 0."""
        if not self.active():
            return None
        if n not in self._weights:
            if n not in self._units:
                self._units[n] = [sow_unit_weights(t) for t in self.terms_for(n)]
            e = torch.zeros(n, n, device=self.device)
            u = torch.zeros(n, n, device=self.device)
            on_device = self.device.type == "cuda"  # φ lives in gains_t there
            for ti, (g, (ue, uu)) in enumerate(zip(self.gains, self._units[n])):
                if g != 0.0:
                    g = self.gains_t[ti] if on_device else g
                    e, u = e + g * ue, u + g * uu
            self._weights[n] = (e.clamp_(0.0, 1.0), u.clamp_(0.0, 1.0))
        e, u = self._weights[n]
        return e.to(device), u.to(device)

    def ranges(self, key: tuple, hi: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-call row ranges ``[B, H, n_img]`` in buffers kept per shape (the compiled score_mod reads
        them in place)."""
        buf = self._ranges.get(key)
        if buf is None:
            buf = self._ranges[key] = (hi.clone(), lo.clone())
        else:
            buf[0].copy_(hi)
            buf[1].copy_(lo)
        return buf

    def score_mod(self, n_text: int, n_img: int, hi: torch.Tensor, lo: torch.Tensor):
        """The modulation as a FlexAttention score_mod over per-token tables and the call's row ranges
        (``hi``, ``lo``: ``[B, H, n_img]``, from :meth:`ranges`); one closure per shape, compiled once."""
        key = (n_text, n_img, tuple(hi.shape))
        if key not in self._score_mods:
            terms, gains = self.terms_for(n_img), self.gains_t

            def score_mod(score, b, h, q_idx, kv_idx):
                qi = (q_idx - n_text).clamp(0, n_img - 1)
                ki = (kv_idx - n_text).clamp(0, n_img - 1)
                img = (q_idx >= n_text) & (kv_idx >= n_text)
                e = score * 0
                u = score * 0
                for ti, t in enumerate(terms):
                    g = gains[ti]
                    e = e + torch.where(t.related[qi] & t.cond[ki], t.enhance * g * t.fall[qi], 0.0)
                    u = u + torch.where(t.cond[qi] & ~t.cond[ki], t.suppress * g * t.fall[ki], 0.0)
                e, u = e.clamp(0.0, 1.0), u.clamp(0.0, 1.0)
                mod = score + e * (hi[b, h, qi] - score) - u * (score - lo[b, h, qi])
                return torch.where(img, mod, score)

            self._score_mods[key] = score_mod
        return self._score_mods[key]


def sow_for(plan, job, grids, device, sites: frozenset[str]) -> Sow | None:
    """The job's SOW on every plan grid of ``grids``, or None when no active condition has a modulation."""
    index = [i for i, c in enumerate(job.conditions) if c.sow]
    if not index:
        return None
    by_n: dict[int, list[SowTerm]] = {}
    for g in grids:
        if g not in plan.doc.grids:
            continue
        h, w = plan.grid(g)
        terms = []
        for i in index:
            c = job.conditions[i]
            cm = plan.mask(c.masks, g)
            rel = plan.mask(c.related, g) if c.related else None
            terms.append(sow_term(np.ones((h, w), np.float32) if cm is None else cm, rel, c.sow))
        by_n[h * w] = terms
    return Sow(by_n, index, device, sites) if by_n else None
