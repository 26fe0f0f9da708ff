"""Reference images by one-way diffusion: COW (arXiv 2306.08247) and SOW attention modulation.

The compiler unrolls the cycles into the job's step program (compiler/schedule.py); this method
executes their ops on any family:

- **Inversion** of each condition's placed reference (the RGB of its RGBA tensor: the reference in its
  region on a grey canvas), VAE-encoded with the distribution's mode, along the sampler's own
  trajectory (runtime/inversion.py), stored at every level the program pastes at and cached.
- ``paste``: ``x ← m·x_ref(ℓ) + (1 − m)·x`` with m the condition's coverage on the latent grid (§3.2,
  "visual condition" injection); exact inside the region.
- ``renoise`` a → b: the solver's closed-form forward transition (runtime/solvers.py), with fresh
  noise from the job's noise stream — COW's cycles (Alg. 1).
- **SOW**: inside the cycles, a bias on image–image attention logits (:class:`Sow`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from scenec.spec.errors import PlanError
from scenec.spec.plan import Denoise, Paste, Renoise

from .. import inversion
from .base import Method


def paste(x: torch.Tensor, ref: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Replace the region (coverage m ∈ [0, 1], 1 = inside) of x with ref: m·ref + (1−m)·x."""
    out = m * ref.to(torch.float32) + (1 - m) * x.to(torch.float32)
    return torch.where(m >= 1, ref.to(torch.float32), out).to(x.dtype)  # exact inside


def paste_levels(job) -> dict[int, list[int]]:
    """condition index → the sorted levels the program pastes it at."""
    out: dict[int, set[int]] = {}
    for op in job.program:
        if isinstance(op, Paste):
            out.setdefault(op.condition, set()).add(op.at)
    return {c: sorted(v) for c, v in out.items()}


def inside_cycles(cond, op) -> bool:
    """A denoise op is inside a condition's cycles when it starts within the window (cycles > 0)."""
    return cond.cycles > 0 and isinstance(op, Denoise) and cond.window[0] <= op.from_ < cond.window[1]


# --- SOW -------------------------------------------------------------------------------------------

@dataclass
class SowTerm:
    """One condition's modulation on one image grid (flattened, row-major)."""

    cond: torch.Tensor  # bool [n]: token in the condition region (coverage > 0)
    related: torch.Tensor  # bool [n]: token in the related region (empty when none)
    fall: torch.Tensor  # float [n]: exp(−distance · |p − centre| / diagonal)
    suppress: float
    enhance: float
    decay: float
    threshold: float

    def to(self, device) -> "SowTerm":
        return SowTerm(self.cond.to(device), self.related.to(device), self.fall.to(device), self.suppress,
                       self.enhance, self.decay, self.threshold)


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
    return SowTerm(torch.from_numpy((cm > 0).reshape(-1)), torch.from_numpy(rel.reshape(-1).copy()),
                   torch.from_numpy(fall.reshape(-1).astype(np.float32)),
                   float(p.get("suppress", 2.0)), float(p.get("enhance", 2.0)),
                   float(p.get("decay", 0.8)), float(p.get("threshold", 0.5)))


def sow_unit_bias(t: SowTerm) -> torch.Tensor:
    """A term's image–image bias at gain 1, dense float ``[n, n]`` (query, key) on its grid:
    −suppress·f(k) where q ∈ C and k ∉ C, +enhance·f(q) where q ∈ R and k ∈ C, 0 elsewhere."""
    sup = (t.cond[:, None] & ~t.cond[None, :]).float() * t.fall[None, :]
    enh = (t.related[:, None] & t.cond[None, :]).float() * t.fall[:, None]
    return t.enhance * enh - t.suppress * sup


def sow_spread(t: SowTerm, q: torch.Tensor, k: torch.Tensor, n_txt: int = 0,
               allow: torch.Tensor | None = None) -> float:
    """The SOW indicator of one term from one attention call's *unbiased* logits (q, k: [b, h, N, d],
    image tokens after ``n_txt`` text tokens; ``allow`` an optional bool [N, N] mask): mean over batch,
    heads and queries q ∈ R \\ C (the outside of C when R is empty) of Σ_{k ∈ C} softmax[q, k]."""
    rq = t.related & ~t.cond
    if not bool(rq.any()):
        rq = ~t.cond
    qi = n_txt + torch.nonzero(rq).flatten()
    logits = (q[:, :, qi].float() @ k.float().transpose(-1, -2)) / (q.shape[-1] ** 0.5)
    if allow is not None:
        logits = logits.masked_fill(~allow[qi][None, None], float("-inf"))
    p = torch.softmax(logits, dim=-1)[..., n_txt:]  # [b, h, |rq|, n_img]
    return float(p[..., t.cond].sum(-1).mean())


class Sow:
    """SOW: an additive bias on image–image attention logits inside COW's cycles (a ``Bias`` modifier).

    For image query q and image key k, per condition with region C, related region R, fall-off
    f(p) = exp(−distance·|p − centre(C)|/diagonal) and gain g = decay^cycle:

        B[q, k] −= suppress · g · f(k)   if q ∈ C and k ∉ C   (the condition region does not read
                                                                the outside: one-way)
        B[q, k] += enhance  · g · f(q)   if q ∈ R and k ∈ C   (the related region reads the condition)

    Indicator (per denoise op, per condition): at the op's first attention call, the spread s = mean
    over heads and queries q ∈ R \\ C (the outside of C when R is empty) of Σ_{k ∈ C} softmax[q, k]
    from the *unbiased* logits (with the call's mask, if any), over the positive branch's rows. The
    term applies to that op's calls only while s < threshold. Text tokens are never biased.

    Terms exist per image grid (``grids``: token count → terms; Flux has one grid, a UNet one per
    resolution), picked per call by its image token count. The unit biases are built once per job
    and grid; per op only the gains change.
    """

    kind = "sow"  # how probes name its records

    def __init__(self, grids: dict[int, list[SowTerm]], index: list[int], device, sites: frozenset[str]):
        self.device = torch.device(device)
        self.grids = {n: [t.to(device) for t in ts] for n, ts in grids.items()}
        self.index = index  # term → condition index
        self.sites = sites
        self.decay = [t.decay for t in next(iter(self.grids.values()))]
        self.gains = [0.0] * len(self.decay)  # this op's, on the host (no device sync per call)
        self.gains_t = torch.zeros(len(self.decay), device=device)  # the same, read by the CUDA score_mod
        self.cycle = 0
        self.pending = False  # measure the indicator at the next attention call
        self.history: list[dict] = []  # per op: cycle, grid, spread per term, gains (diagnostics, tests)
        self._units: dict[int, list[torch.Tensor]] = {}
        self._bias: dict[int, torch.Tensor | None] = {}
        self._score_mods: dict = {}

    def begin_step(self, cycle: int, inside: list[bool]) -> bool:
        """Arm for one denoise op; False when no term is inside its cycles (then it adds nothing)."""
        self.cycle = cycle
        g = torch.tensor([(d ** cycle) if ins else 0.0 for d, ins in zip(self.decay, inside)], dtype=torch.float32)
        self.gains_t.copy_(g)  # in place: the compiled score_mod captured this tensor
        self.gains = g.tolist()
        self._bias.clear()
        self.pending = any(inside)
        return self.pending

    def terms_for(self, n: int) -> list[SowTerm]:
        ts = self.grids.get(n)
        if ts is None:
            raise PlanError(f"SOW: no grid has {n} tokens (grids: {sorted(self.grids)})")
        return ts

    def observe(self, q, k, n_text: int, allow, rows: slice) -> None:
        if self.pending:
            self.pending = False
            self.measure(q, k, n_text, allow, rows)

    def measure(self, q, k, n_text: int, allow, rows: slice) -> None:
        """The indicator from one call's unbiased logits; switches off the terms whose spread reached
        their threshold."""
        n = q.shape[2] - n_text
        spreads = []
        a = None
        for ti, t in enumerate(self.terms_for(n)):
            if self.gains[ti] == 0.0:
                spreads.append(None)
                continue
            if a is None:
                a = allow()
            s = sow_spread(t, q[rows], k[rows], n_text, a)
            spreads.append(s)
            if s >= t.threshold:
                self.gains[ti] = 0.0
                self.gains_t[ti] = 0.0
        self.history.append({"cycle": self.cycle, "grid": n, "spread": spreads, "gains": list(self.gains)})
        self._bias.clear()

    def image_bias(self, n: int, device) -> torch.Tensor | None:
        """This op's float ``[n, n]`` bias on the grid of n tokens (None when every gain is 0)."""
        if not any(g != 0.0 for g in self.gains):
            return None
        if n not in self._bias:
            if n not in self._units:
                self._units[n] = [sow_unit_bias(t) for t in self.terms_for(n)]
            b = torch.zeros(n, n, device=self.device)
            for g, u in zip(self.gains, self._units[n]):
                if g != 0.0:
                    b = b + g * u
            self._bias[n] = b
        return self._bias[n].to(device)

    def score_mod(self, n_text: int, n_img: int):
        """The bias as a FlexAttention score_mod over per-token tables (no dense N×N); one closure per
        text length, compiled once: the gains are read in place from ``gains_t``."""
        key = (n_text, n_img)
        if key not in self._score_mods:
            terms, gains = self.terms_for(n_img), self.gains_t

            def score_mod(score, b, h, q_idx, kv_idx):
                qi = (q_idx - n_text).clamp(0, n_img - 1)
                ki = (kv_idx - n_text).clamp(0, n_img - 1)
                img = (q_idx >= n_text) & (kv_idx >= n_text)
                add = score * 0
                for ti, t in enumerate(terms):
                    g = gains[ti]
                    sup = t.cond[qi] & ~t.cond[ki]
                    enh = t.related[qi] & t.cond[ki]
                    add = add - torch.where(sup, t.suppress * g * t.fall[ki], 0.0) \
                        + torch.where(enh, t.enhance * g * t.fall[qi], 0.0)
                return score + torch.where(img, add, 0.0)

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


# --- the method --------------------------------------------------------------------------------------

class OneWay(Method):
    """COW's ops (paste, renoise) and SOW's modulation for a job's reference conditions."""

    name = "reference"
    ops = (Paste, Renoise)
    batchable = False

    @classmethod
    def wants(cls, plan, job) -> bool:
        return bool(job.conditions) or any(isinstance(op, (Paste, Renoise)) for op in job.program)

    def capabilities(self) -> tuple[str, ...]:
        return ("reference", "sow") if any(c.sow for c in self.run.job.conditions) else ("reference",)

    def setup(self) -> None:
        run = self.run
        be, plan, job = run.backend, run.plan, run.job
        self.refs: dict[int, dict[int, torch.Tensor]] = {}
        self.masks: dict[int, torch.Tensor] = {}
        self.inversions = 0
        lgrid = plan.grid("latent")
        for ci, levels in paste_levels(job).items():
            cond = job.conditions[ci]
            m = plan.mask(cond.masks, "latent")
            m = np.ones(lgrid, np.float32) if m is None else m
            self.masks[ci] = be.latent_mask(m)
            self.refs[ci] = self._inverted(cond, m, levels)
        cycles, k = [], 0
        for op in job.program:  # the COW cycle each op belongs to: renoise ops before it
            cycles.append(k)
            k += isinstance(op, Renoise)
        self.cycle_of = cycles
        sites = frozenset(s.name for s in be.sites if s.image_keys)
        self.sow = sow_for(plan, job, be.image_grids, be.device, sites)
        self.armed = False

    def _inverted(self, cond, m: np.ndarray, levels: list[int]) -> dict[int, torch.Tensor]:
        from scenec import __version__

        run = self.run
        be, plan, job = run.backend, run.plan, run.job
        w, h = plan.canvas
        parts = {"family": be.family, "model": be.model_id, "dtype": str(be.dtype), "version": __version__,
                 "prompt": plan.prompt(job.global_.prompt), "negative": plan.prompt(job.global_.negative),
                 "sampler": plan.sampler.model_dump(), "msl": plan.model.max_sequence_length,
                 "levels": levels, "canvas": [w, h], **run.solver.identity(),
                 "refine": [inversion.INVERSION_REFINE, inversion.INVERSION_TOL]}
        key = inversion.inversion_key(parts, {"rgba": np.asarray(plan.tensor(cond.image)), "mask": m})
        cache = inversion.CACHE
        hit = cache.get(key)
        x_dtype = run.x.dtype
        if hit is not None and all(lv in hit for lv in levels):
            return {lv: hit[lv].to(be.device, x_dtype) for lv in levels}
        rgb = np.ascontiguousarray(np.asarray(plan.tensor(cond.image))[..., :3])
        z = be.encode_image(rgb)
        out = inversion.invert(run.solver, run.predict_plain, z, levels)
        cache.stats["inverted"] += 1
        self.inversions += 1
        cache.put(key, out)
        return {lv: x.to(x_dtype) for lv, x in out.items()}

    def run_op(self, n: int, op, x: torch.Tensor) -> torch.Tensor:
        if isinstance(op, Paste):
            return paste(x, self.refs[op.condition][op.at], self.masks[op.condition])
        return self.run.solver.renoise(x, op.from_, op.to, self.run.noise_like(x))

    def before_denoise(self, n: int, op) -> None:
        self.armed = False
        if self.sow is not None:
            inside = [inside_cycles(self.run.job.conditions[ci], op) for ci in self.sow.index]
            self.armed = self.sow.begin_step(self.cycle_of[n], inside)

    def modifiers(self, call) -> list:
        return [self.sow] if self.armed else []
