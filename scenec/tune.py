"""``scenec tune``: θ schedules optimised for the coupled-generation metric.

Problem (Coupled Image Generation, arXiv 2506.06826, §3.3): maximise
J(θ) = a·BgSim + b·CLIPScore over θ ∈ [0, 1]^T with θ₁ ≤ θ₂ ≤ … ≤ θ_T (T = sampler steps), where
each evaluation of J builds the group's images with θ and measures them (``scenec.eval``).

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

import copy
import dataclasses
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from scenec.compiler import schedule as sch

from .eval import ClipScorer, EvalError, Segmenter, evaluate_group, load_clip, to_float_image

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
            self.log(f"{p}: the state belongs to another problem (scene, group, model, weights or CLIP changed); "
                     "starting afresh")
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
        _atomic_write(self.state_path, json.dumps(doc, indent=1) + "\n")

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
            f.limit = max(f.used + 1, f.budget // 2) if method == "both" else f.budget
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


# --- the real objective: build the group with θ, measure it -------------------------------------------

class GroupObjective:
    """J(θ) for one group of a scene: compile with the group's schedule replaced by ``{values: θ}``,
    execute only that group's jobs on a backend loaded once, measure with :func:`evaluate_group`.

    The override is done on the loaded scene model (``Group.schedule`` → ``ValuesSchedule``), then the
    usual passes and lowering run: no temporary scene files, and includes, paths and positions stay
    those of the real scene.
    """

    def __init__(self, scene: str | Path, group: str | None, model: str | None = None, device: str | None = None,
                 dtype: str | None = None, clip: ClipScorer | None = None, weights=(1.0, 1.0),
                 segmenter: Segmenter | None = None, text: str = "full", backend=None):
        from scenec.spec.load import load_scene

        self.scene_path = Path(scene)
        self.ls = load_scene(self.scene_path)
        groups = [g.id for g in self.ls.scene.groups]
        if not groups:
            raise EvalError(f"{self.scene_path}: the scene has no `groups`; tune needs a coupling group")
        if group is None:
            if len(groups) > 1:
                raise EvalError(f"{self.scene_path}: the scene has {len(groups)} groups ({', '.join(groups)}); "
                                "choose one with --group")
            group = groups[0]
        if group not in groups:
            raise EvalError(f"{self.scene_path}: no group `{group}`; groups: {', '.join(groups)}")
        self.group = group
        self.gi = groups.index(group)
        self.model, self.device, self.dtype = model, device, dtype
        self.clip, self.weights, self.segmenter, self.text = clip, tuple(weights), segmenter, text
        self.backend = backend
        base = self._compile(None)
        self.steps = int(base.json["sampler"]["steps"])
        gdoc = next(g for g in base.json["groups"] if g["id"] == group)
        self.current = np.asarray(base.tensors[gdoc["theta"]], dtype=np.float64)
        self.current_schedule = gdoc.get("schedule")
        self.scene_name = base.json["scene"]["name"]
        self.n_variants = len({j["variant"] for j in base.json["jobs"] if j["group"] == group})
        if self.n_variants < 2:
            raise EvalError(f"group `{group}` has one variant; BgSim compares at least two")
        self.last = None  # the GroupEval of the last evaluation

    def _compile(self, theta):
        from scenec.compiler.lower import lower
        from scenec.compiler.passes import run_passes
        from scenec.spec import models as m

        ls = self.ls
        if theta is not None:
            groups = list(ls.scene.groups)
            sched = m.ValuesSchedule(values=[float(v) for v in theta])
            groups[self.gi] = groups[self.gi].model_copy(update={"schedule": sched})
            ls = dataclasses.replace(ls, scene=ls.scene.model_copy(update={"groups": groups}))
        plan = lower(run_passes(ls, model=self.model))
        return plan

    def plan_for(self, theta):
        """The runtime plan of the group's jobs only, with θ as its schedule (``plan_hash`` is that of the
        whole candidate plan)."""
        from scenec.runtime.plan import Plan

        p = self._compile(theta)
        doc = copy.deepcopy(p.json)
        doc["jobs"] = [j for j in doc["jobs"] if j.get("group") == self.group]
        doc["groups"] = [g for g in doc["groups"] if g["id"] == self.group]
        return Plan(doc, dict(p.tensors))

    def fingerprint(self) -> dict:
        """What a state file must match to be resumed: everything J depends on except θ."""
        p = self.plan_for(np.zeros(self.steps))
        return {"scene": self.scene_name, "group": self.group, "plan_hash_theta0": p.plan_hash,
                "model": p.model.get("spec"), "weights": list(self.weights),
                "clip": self.clip.name if self.clip is not None else None, "text": self.text,
                "segmenter": getattr(self.segmenter, "__qualname__", None) if self.segmenter else None}

    def _backend(self, plan):
        if self.backend is None:
            from scenec.runtime.flux import load_backend

            self.backend = load_backend(plan.model, device=self.device, dtype=self.dtype)
        return self.backend

    def __call__(self, theta) -> float:
        from PIL import Image

        from scenec.runtime.errors import RuntimeErrorBase
        from scenec.runtime.outputs import execute

        plan = self.plan_for(theta)
        try:
            be = self._backend(plan)
        except RuntimeErrorBase as e:
            raise EvalError(str(e), exit_code=1) from e
        with tempfile.TemporaryDirectory(prefix="scenec-tune-") as d:
            results = execute(plan, be, d)
            bad = [r for r in results if r["status"] != "built"]
            if bad:
                raise EvalError(f"building group `{self.group}` failed: {bad[0]['error']}", exit_code=1)
            images = {}
            for r in results:
                with Image.open(r["image"]) as im:
                    images[r["job"]] = to_float_image(im)
        ge = evaluate_group(plan, self.group, images, clip=self.clip, weights=self.weights,
                            segmenter=self.segmenter, text=self.text)
        self.last = ge
        if ge.combined is None:
            raise EvalError(f"group `{self.group}`: the metric is undefined ({'; '.join(ge.warnings) or 'no values'})")
        return ge.combined


# --- files --------------------------------------------------------------------------------------------

def default_output(scene: Path, scene_name: str, group: str) -> Path:
    return scene.parent / "schedules" / f"{scene_name}-{group}.json"


def state_path_for(output: Path) -> Path:
    return output.with_name(output.name + ".state.json") if output.suffix != ".json" else \
        output.with_name(output.stem + ".state.json")


def schedule_document(best: Evaluation, steps: int, extra: dict | None = None) -> dict:
    """The schedule file: ``{"steps", "values", "objective", "method", ...}`` (scenes read ``values``)."""
    doc = {"steps": steps, "values": [float(v) for v in best.values], "objective": best.objective,
           "method": best.method}
    if best.params:
        doc["params"] = best.params
    doc.update(extra or {})
    return doc


def schedule_line(scene: Path, output: Path) -> str:
    """The line to put in the group: ``schedule: {file: <output relative to the scene file>}``."""
    try:
        rel = Path(os.path.relpath(output.resolve(), scene.resolve().parent)).as_posix()
    except ValueError:
        rel = output.resolve().as_posix()
    return f"schedule: {{file: {rel}}}"


def _atomic_write(path: Path, text: str) -> None:
    from scenec.spec.fsio import atomic_write

    atomic_write(Path(path), text.encode("utf-8"))


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True))


def write_schedule(path: Path, doc: dict) -> None:
    _atomic_write(path, json.dumps(doc, indent=1) + "\n")


def progress_bar(total: int):
    """A rich progress bar on stderr when it is a terminal; else None."""
    if not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)


def tune(scene: str | Path, group: str | None = None, budget: int = 20, method: str = "both",
         output: str | Path | None = None, weights=(1.0, 1.0), clip: ClipScorer | str | None = None,
         model: str | None = None, device: str | None = None, dtype: str | None = None,
         segmenter: Segmenter | None = None, text: str = "full", seed: int = 0,
         log: Callable[[str], None] | None = None, objective: GroupObjective | None = None) -> dict:
    """Tune one group's θ; write the schedule file and its state file; return a summary dict."""
    log = log or (lambda s: print(f"scenec: {s}", file=sys.stderr))
    if method not in METHODS:
        raise EvalError(f"--method must be one of {', '.join(METHODS)}, not `{method}`")
    if budget < 1:
        raise EvalError("--budget must be at least 1")
    obj = objective or GroupObjective(scene, group, model=model, device=device, dtype=dtype, clip=None,
                                      weights=weights, segmenter=segmenter, text=text)
    if objective is None and clip is not None:
        # loaded after the scene and group are known to be fine (a missing model is the costlier problem)
        obj.clip = load_clip(clip) if isinstance(clip, str) else clip
    scene = Path(scene)
    out = Path(output) if output is not None else default_output(scene, obj.scene_name, obj.group)
    state = state_path_for(out)
    bar = progress_bar(budget)
    task = None

    def on_eval(ev: Evaluator) -> None:
        if bar is not None:
            bar.update(task, completed=ev.used,
                       description=f"tune {obj.group}: best {ev.best.objective:.4f}" if ev.best else "tune")

    f = Evaluator(obj, obj.steps, budget, state, fingerprint=obj.fingerprint(), progress=on_eval, log=log)
    if bar is not None:
        bar.start()
        task = bar.add_task(f"tune {obj.group}", total=budget)
    try:
        best = optimise(f, obj.steps, method=method, start=obj.current, seed=seed)
    finally:
        if bar is not None:
            bar.stop()
    doc = schedule_document(best, obj.steps, {
        "scene": obj.scene_name, "group": obj.group, "weights": list(obj.weights),
        "clip": obj.clip.name if obj.clip is not None else None, "evaluations": f.used,
        "start": {"schedule": obj.current_schedule, "objective": f.cache[_key(np.round(project_monotone(obj.current), DECIMALS))].objective}
        if _key(np.round(project_monotone(obj.current), DECIMALS)) in f.cache else None})
    write_schedule(out, doc)
    return {"output": str(out), "state": str(state), "line": schedule_line(scene, out), "best": doc,
            "evaluated": f.used, "built": f.new, "group": obj.group}
