"""The θ search of ``scenec tune``: the best non-decreasing schedule within a budget of evaluations.

Problem (Coupled Image Generation, arXiv 2506.06826, §3.3): maximise
J(θ) = a·BgSim + b·CLIPScore over θ ∈ [0, 1]^T with θ₁ ≤ θ₂ ≤ … ≤ θ_T (T = sampler steps), where
each evaluation of J builds the group's images with θ and measures them (``scenec.tune``).

Two searches, both over feasible θ only:

- ``param``: the schedule families of the scene language (step / linear / sin / arctan) by a coarse
  grid of centres, then coordinate search with step halving on (center, width | scale).
- ``vector``: the full per-step vector by projected zeroth-order ascent: SPSA (Spall 1992)
  directional estimates between two projected probes, a normalised step, projection onto the
  monotone cone ∩ [0, 1]^T by pool-adjacent-violators, step doubling/halving on success/failure.

Every candidate goes through one :class:`Evaluator`, which caches J by θ, counts the budget and
persists a state file: a rerun replays the same deterministic search from the cache (no builds) and
continues where the last run stopped. The optimisers are pure numpy and need no model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from scenec.compiler import schedule as sch
from scenec.spec.fsio import atomic_write

from .metrics import EvalError

STATE_FORMAT = "scenec-tune-state/1"
FAMILIES = ("sin", "linear", "arctan", "step")
METHODS = ("param", "vector", "both")
DECIMALS = 6  # θ values are rounded to this many decimals: what is evaluated is what is written


# --- projection onto the monotone cone ---------------------------------------------------------------

def pav(y, w=None) -> np.ndarray:
    """Isotonic (non-decreasing) least-squares fit of ``y`` with weights ``w`` by pool-adjacent-violators
    (Ayer et al. 1955, "An empirical distribution function for sampling with incomplete information";
    Barlow et al. 1972, "Statistical Inference under Order Restrictions"): argmin_{x₁≤…≤x_n} Σ wᵢ(xᵢ − yᵢ)².

    One left-to-right pass with a stack of blocks (mean, weight, length); merging a block into its
    predecessor while their means violate the order. O(n).
    """
    y = np.asarray(y, dtype=np.float64).ravel()
    n = y.size
    if n == 0:
        return y.copy()
    w = np.ones(n) if w is None else np.asarray(w, dtype=np.float64).ravel()
    if w.shape != y.shape or np.any(w <= 0):
        raise ValueError("pav: weights must be positive, one per value")
    means, weights, lengths = [], [], []
    for yi, wi in zip(y, w):
        m, ww, ln = yi, wi, 1
        while means and means[-1] > m:
            pm, pw, pl = means.pop(), weights.pop(), lengths.pop()
            m = (pm * pw + m * ww) / (pw + ww)
            ww, ln = pw + ww, pl + ln
        means.append(m)
        weights.append(ww)
        lengths.append(ln)
    return np.repeat(np.asarray(means), lengths)


def project_monotone(theta) -> np.ndarray:
    """Euclidean projection onto {θ ∈ [0, 1]^T : θ non-decreasing}: PAV, then clip to [0, 1].

    Clipping an isotonic fit is the projection onto the intersection (clipping is monotone and the box
    is a product of intervals), so no alternating projections are needed.
    """
    return np.clip(pav(theta), 0.0, 1.0)


# --- parametric families -----------------------------------------------------------------------------

PARAM_NAMES = {"step": ("center",), "linear": ("center", "width"), "sin": ("center", "width"),
               "arctan": ("center", "scale")}
DEFAULTS = {"width": 0.3, "scale": 0.1}
BOUNDS = {"center": (0.0, 1.0), "width": (1e-3, 2.0), "scale": (1e-3, 2.0)}


def family_theta(shape: str, params: dict, steps: int) -> np.ndarray:
    """θ table of a family (the compiler's own formulas, compiler/schedule.py)."""
    t = sch.progress(steps)
    if shape == "step":
        return sch.theta_step(t, params["center"])
    if shape == "linear":
        return sch.theta_linear(t, params["center"], params["width"])
    if shape == "sin":
        return sch.theta_sin(t, params["center"], params["width"])
    if shape == "arctan":
        return sch.theta_arctan(t, params["center"], params["scale"])
    raise ValueError(f"unknown schedule family {shape!r}")


def family_label(shape: str, params: dict) -> str:
    return f"{shape}(" + ", ".join(f"{k}={params[k]:.4g}" for k in PARAM_NAMES[shape]) + ")"


# --- evaluations: cache, budget, state ---------------------------------------------------------------

class BudgetSpent(Exception):
    """Raised by the evaluator when a new candidate would exceed the budget."""


def _key(theta: np.ndarray) -> tuple:
    return tuple(float(x) for x in np.round(theta, DECIMALS))


@dataclasses.dataclass
class Evaluation:
    values: list[float]
    objective: float
    method: str
    params: dict | None = None


class Evaluator:
    """J(θ) through a cache, a budget and a state file.

    The budget counts distinct candidates *requested* by this run (cached or not), so a rerun of the
    same deterministic search requests the same candidates in the same order, takes their values from
    the state file and spends no build on them.
    """

    def __init__(self, objective: Callable[[np.ndarray], float], steps: int, budget: int,
                 state_path: str | Path | None = None, fingerprint: dict | None = None,
                 progress: Callable[["Evaluator"], None] | None = None, log: Callable[[str], None] | None = None):
        self.objective = objective
        self.steps = int(steps)
        self.budget = int(budget)
        self.limit = self.budget
        self.state_path = Path(state_path) if state_path is not None else None
        self.fingerprint = fingerprint or {}
        self.progress = progress
        self.log = log or (lambda s: None)
        self.cache: dict[tuple, Evaluation] = {}
        self.order: list[tuple] = []  # cache keys in evaluation order
        self.seen: list[tuple] = []  # distinct keys requested by this run
        self._seen: set[tuple] = set()
        self.new = 0  # objective calls made by this run
        self.best: Evaluation | None = None
        self._load()

    # state ---------------------------------------------------------------------------------------
    def _load(self) -> None:
        p = self.state_path
        if p is None or not p.is_file():
            return
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.log(f"{p}: unreadable tuning state; starting afresh")
            return
        if doc.get("format") != STATE_FORMAT or doc.get("fingerprint") != _jsonable(self.fingerprint) \
                or doc.get("steps") != self.steps:
            self.log(f"{p}: the state belongs to another problem (scene, group, model, LoRAs, weights or CLIP "
                     "changed); starting afresh")
            return
        for e in doc.get("evaluations", []):
            ev = Evaluation([float(x) for x in e["values"]], float(e["objective"]), e.get("method", "?"),
                            e.get("params"))
            k = _key(np.asarray(ev.values))
            if k not in self.cache:
                self.cache[k] = ev
                self.order.append(k)
        if self.cache:
            self.log(f"resuming: {len(self.cache)} evaluated candidate{'s' if len(self.cache) != 1 else ''} "
                     f"in {p.name}")

    def save(self) -> None:
        if self.state_path is None:
            return
        doc = {"format": STATE_FORMAT, "fingerprint": _jsonable(self.fingerprint), "steps": self.steps,
               "evaluations": [dataclasses.asdict(self.cache[k]) for k in self.order]}
        atomic_write(self.state_path, (json.dumps(doc, indent=1) + "\n").encode("utf-8"))

    # evaluation ----------------------------------------------------------------------------------
    def __call__(self, theta, method: str = "vector", params: dict | None = None) -> float:
        x = np.round(project_monotone(theta), DECIMALS)
        k = _key(x)
        if k not in self._seen:
            if len(self.seen) >= self.limit:
                raise BudgetSpent
            self._seen.add(k)
            self.seen.append(k)
        ev = self.cache.get(k)
        if ev is None:
            f = float(self.objective(x.copy()))
            if not math.isfinite(f):
                raise EvalError(f"the objective is {f} for θ = {list(k)}", exit_code=1)
            ev = Evaluation(list(k), f, method, params)
            self.cache[k] = ev
            self.order.append(k)
            self.new += 1
            self.save()
        if self.best is None or ev.objective > self.best.objective:
            # a candidate's own label wins over the cached one's (the same θ may be reached twice)
            self.best = Evaluation(ev.values, ev.objective, method, params)
        if self.progress is not None:
            self.progress(self)
        return ev.objective

    @property
    def used(self) -> int:
        return len(self.seen)

    def evaluated(self, theta) -> Evaluation | None:
        """The cached evaluation of ``theta`` (after projection and rounding, as ``__call__`` does)."""
        return self.cache.get(_key(np.round(project_monotone(theta), DECIMALS)))


# --- searches -----------------------------------------------------------------------------------------

def param_search(f: Evaluator, steps: int, families=FAMILIES, centers=(0.5, 0.3, 0.7)) -> None:
    """Families: a coarse grid (each centre × each family, default width/scale), then coordinate search
    in each family, best first, from its best grid point: ±h per parameter (scale moves ×/÷ 2^(4h)),
    move on improvement, halve h otherwise, until h < 10⁻³ (or the budget is spent)."""
    best: dict[str, tuple[float, dict]] = {}

    def ev(shape: str, params: dict) -> float:
        p = {k: float(np.clip(v, *BOUNDS[k])) for k, v in params.items()}
        val = f(family_theta(shape, p, steps), method=f"param:{family_label(shape, p)}", params={"shape": shape, **p})
        if shape not in best or val > best[shape][0]:
            best[shape] = (val, p)
        return val

    for c in centers:
        for shape in families:
            ev(shape, {"center": c, **{k: DEFAULTS[k] for k in PARAM_NAMES[shape][1:]}})
    for shape in sorted(best, key=lambda s: -best[s][0]):
        _coordinate_search(shape, ev, best)


def _coordinate_search(shape: str, ev, best: dict) -> None:
    params = best[shape][1]
    h = {"center": 0.1, "width": 0.15, "scale": 0.25}
    while max(h[k] for k in PARAM_NAMES[shape]) > 1e-3:
        moved = False
        for name in PARAM_NAMES[shape]:
            for sign in (1.0, -1.0):
                cand = dict(params)
                if name == "scale":
                    cand[name] = params[name] * 2.0 ** (sign * 4 * h[name])
                else:
                    cand[name] = params[name] + sign * h[name]
                cur = best[shape][0]
                ev(shape, cand)
                if best[shape][0] > cur:
                    params = best[shape][1]
                    moved = True
                    break
            if moved:
                break
        if not moved:
            for k in h:
                h[k] /= 2.0


def vector_search(f: Evaluator, x0, seed: int = 0, eta0: float = 0.2, c_max: float = 0.05,
                  eta_min: float = 1e-4, beta: float = 0.7) -> None:
    """Projected zeroth-order ascent on the full θ vector (SPSA directions, Spall 1992).

    Per iteration: Rademacher Δ; probes x± = Π(x ± cΔ) with c = min(c_max, η/2); the directional
    estimate g = (J(x₊) − J(x₋))·d/‖d‖² along d = x₊ − x₋ (exact for a linear J, and well defined after
    projection), averaged into G ← βG + (1−β)g; a normalised step x' = Π(x + η·G/‖G‖). The best of
    x', x₊, x₋ replaces x when it beats J(x) (then η ← 1.25η, at most 0.5), otherwise η ← 0.7η. Stops
    when η < ``eta_min`` or the budget is spent. Π is :func:`project_monotone`. Deterministic for a
    fixed ``seed``.
    """
    rng = np.random.default_rng(seed)
    x = project_monotone(np.asarray(x0, dtype=np.float64))
    fx = f(x, method="vector")
    eta = eta0
    G = np.zeros_like(x)
    while eta >= eta_min:
        delta = rng.choice([-1.0, 1.0], size=x.size)
        c = min(c_max, eta / 2)
        xp, xm = project_monotone(x + c * delta), project_monotone(x - c * delta)
        fp, fm = f(xp, method="vector"), f(xm, method="vector")
        d = xp - xm
        nd = float(d @ d)
        cands = [(fp, xp), (fm, xm)]
        if nd > 1e-18:
            G = beta * G + (1.0 - beta) * ((fp - fm) / nd) * d
            norm = float(np.linalg.norm(G))
            if norm > 0:
                xn = project_monotone(x + eta * G / norm)
                cands.append((f(xn, method="vector"), xn))
        fb, xb = max(cands, key=lambda t: t[0])
        if fb > fx:
            x, fx = xb, fb
            eta = min(1.25 * eta, 0.5)
        else:
            eta *= 0.7


def optimise(f: Evaluator, steps: int, method: str = "both", start=None, seed: int = 0) -> Evaluation:
    """Run ``method`` (param | vector | both) within ``f``'s budget; returns the best evaluation.

    ``start`` (the scene's current θ table) is evaluated first, so the result is never worse than it.
    ``both``: the families with half the budget, then the vector search from the best θ found so far.
    """
    if method not in METHODS:
        raise EvalError(f"--method must be one of {', '.join(METHODS)}, not `{method}`")
    if f.budget < 1:
        raise EvalError("--budget must be at least 1")
    try:
        if start is not None:
            f(start, method="start")
        if method in ("param", "both"):
            f.limit = min(f.budget, max(f.used + 1, f.budget // 2)) if method == "both" else f.budget
            try:
                param_search(f, steps)
            except BudgetSpent:
                pass
            f.limit = f.budget
        if method in ("vector", "both"):
            x0 = np.asarray(f.best.values) if f.best is not None else np.linspace(0.0, 1.0, steps)
            vector_search(f, x0, seed=seed)
    except BudgetSpent:
        pass
    if f.best is None:
        raise EvalError("no candidate was evaluated (budget too small?)")
    return f.best


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True))
