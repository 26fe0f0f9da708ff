"""θ schedules and step programs: small pure functions, numpy only.

θ(t) is the weight of the entity prompts against the background prompt over sampling progress
t ∈ [0, 1] (0 = first step, 1 = last), as in "Controllable Coupled Image Generation via Diffusion
Models" (arXiv 2506.06826, §3: θ rises from 0 to 1, background first, subject later).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scenec.spec import models as m
from scenec.spec.plan import Denoise, Fork, Op, Paste, Renoise, Seed


def progress(steps: int) -> np.ndarray:
    """Sampling progress t_i = i / (N − 1) of each step (a single step is at t = 0)."""
    if steps == 1:
        return np.zeros(1)
    return np.arange(steps, dtype=np.float64) / (steps - 1)


def _ramp(t: np.ndarray, center: float, width: float) -> np.ndarray:
    return np.clip((t - (center - width / 2)) / width, 0.0, 1.0)


def theta_step(t: np.ndarray, center: float) -> np.ndarray:
    """Step schedule: θ = 0 before ``center``, 1 from it on."""
    return (t >= center).astype(np.float64)


def theta_linear(t: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear ramp from 0 to 1 across [center − width/2, center + width/2]."""
    return _ramp(t, center, width)


def theta_sin(t: np.ndarray, center: float, width: float) -> np.ndarray:
    """Half-cosine ramp (smooth at both ends) across the same interval as the linear ramp."""
    return 0.5 - 0.5 * np.cos(math.pi * _ramp(t, center, width))


ENDPOINT_TOL = 1e-6  # an arctan value this close to 0 or 1 is that endpoint (its exact path runs)


def theta_arctan(t: np.ndarray, center: float, scale: float) -> np.ndarray:
    """θ(t) = ½ + arctan((t − center)/scale)/π (arXiv 2506.06826's arctan family: θ(center) = ½, θ → 0 and 1
    far before and after it; smaller ``scale`` is steeper). A value within ``ENDPOINT_TOL`` of 0 or 1 is
    made exactly 0 or 1, so steep schedules reach the exact endpoints (and the shared θ = 0 prefix)."""
    th = 0.5 + np.arctan((np.asarray(t, np.float64) - center) / scale) / math.pi
    th = np.where(th <= ENDPOINT_TOL, 0.0, th)
    return np.where(th >= 1.0 - ENDPOINT_TOL, 1.0, th)


def theta_table(schedule: Any, steps: int, values: list[float] | None = None) -> np.ndarray:
    """θ at every step index for a parsed schedule (``values`` for file schedules, already read)."""
    t = progress(steps)
    if isinstance(schedule, m.StepSchedule):
        return theta_step(t, schedule.center)
    if isinstance(schedule, m.RampSchedule):
        fn = theta_linear if schedule.shape == "linear" else theta_sin
        return fn(t, schedule.center, schedule.width)
    if isinstance(schedule, m.ArctanSchedule):
        return theta_arctan(t, schedule.center, schedule.scale)
    if isinstance(schedule, m.ValuesSchedule):
        return np.asarray(schedule.values, dtype=np.float64)
    if isinstance(schedule, m.FileSchedule):
        if values is None:
            raise ValueError("file schedule not read")
        return np.asarray(values, dtype=np.float64)
    raise TypeError(f"unknown schedule {schedule!r}")


def schedule_problems(values: list[float] | np.ndarray, steps: int) -> list[str]:
    """What is wrong with an explicit θ table (empty when it is valid)."""
    out = []
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) != steps:
        out.append(f"schedule has {len(v) if v.ndim == 1 else v.shape} values, the sampler has {steps} steps")
    if v.size and (np.any(~np.isfinite(v)) or v.min() < 0 or v.max() > 1):
        out.append("θ values must lie in [0, 1]")
    if v.ndim == 1 and v.size > 1:
        bad = np.nonzero(np.diff(v) < 0)[0]
        if bad.size:
            i = int(bad[0])
            out.append(f"θ must be non-decreasing, but step {i + 2} has {v[i + 1]:g} after {v[i]:g}")  # 1-based
    return out


# --- step programs ------------------------------------------------------------------------------

@dataclass
class Cow:
    """A reference condition's schedule in step indices (COW, arXiv 2306.08247, Alg. 1; the official
    pipeline's defaults: window 0.7 → 0.5, 10 cycles, preserve 0.4, η 1 inside the cycles and 0.1 after)."""

    index: int  # the condition's index in the job
    start: int  # window start (higher noise)
    end: int  # window end
    cycles: int
    preserve: int | None
    eta: float  # η of the steps inside the cycles
    eta_after: float = 0.0  # η of the steps after the cycles
    init: str = "seed"  # "seed": start from the inverted seed canvas; "noise": sample down from noise


@dataclass
class ProgramInputs:
    steps: int
    until: float = 1.0
    theta: np.ndarray | None = None
    conditions: list[Cow] = field(default_factory=list)
    fork_at: int | None = None  # shared-prefix length of the job's group


def img2img_start(steps: int, strength: float) -> int:
    """The step img2img starts at for ``strength`` (diffusers' img2img pipelines: the last
    ``int(steps·strength)`` steps run; strength 0 runs none, and the image is the init image)."""
    return steps - min(int(steps * strength), steps)


def build_program(p: ProgramInputs) -> tuple[Op, ...]:
    """Unroll a job's sampling into the plan format's typed ops (``spec/plan.py``, docs/plan-format.md).

    Plain: denoise 0→1→…→N. With references (COW §3, as its official pipeline ``pipeline_COW.py`` runs it):

    - **seed initialisation** (``init: seed``, the default): ``seed`` at the window's end — the latent
      becomes the inversion of the seed canvas (every cycling reference placed on one grey canvas);
      nothing is sampled from noise. ``init: noise``: sample from noise down to the window's start;
    - each cycle: re-noise from the window's end up to its start (the first cycle too with the seed; not
      with noise, whose latent is already there), then paste at every level of the window, its end
      included, denoising between them with the cycles' η;
    - after the cycles: sample to the end with η after (0.1 in the reference code), pasting once more
      at each ``preserve`` level.

    Several references run their windows together (the union of windows, the largest ``cycles``, η and
    η after); each pastes at its own window's levels during its own cycles. Every ``preserve`` paste is
    emitted: one that falls inside the union window lands in the last cycle (the last time the sampler
    passes that level); one before the window only with ``init: noise`` (the check pass refuses it with
    the seed, which never visits those levels).
    """
    n = p.steps
    t = progress(n)
    ops: list[Op] = []

    def fork_here(i: int) -> None:
        if p.fork_at is not None and i == p.fork_at and not any(isinstance(o, Fork) for o in ops):
            ops.append(Fork())

    def denoise(i: int, eta: float = 0.0) -> None:
        fork_here(i)
        ops.append(Denoise(from_=i, to=i + 1, regional=bool(t[i] < p.until or p.until >= 1.0),
                           theta=None if p.theta is None else float(p.theta[i]), eta=eta))

    preserve: dict[int, list[int]] = {}  # step index -> conditions replaced there (several may share one)
    for c in p.conditions:
        if c.preserve is not None:
            preserve.setdefault(c.preserve, []).append(c.index)

    def sample(steps: range) -> None:
        for i in steps:
            ops.extend(Paste(condition=ci, at=i) for ci in preserve.get(i, ()))
            denoise(i)

    active = [c for c in p.conditions if c.cycles > 0 and c.end > c.start]
    if not active:
        sample(range(n))
        if p.fork_at is not None and p.fork_at >= n:
            fork_here(p.fork_at)
        return tuple(ops)
    start, end = min(c.start for c in active), max(c.end for c in active)
    cycles = max(c.cycles for c in active)
    eta, eta_after = max(c.eta for c in active), max(c.eta_after for c in active)
    seeded = [c.index for c in active if c.init == "seed"]
    if seeded:
        ops.append(Seed(at=end, conditions=seeded))
    else:
        sample(range(start))
    for cyc in range(cycles):
        if seeded or cyc > 0:
            ops.append(Renoise(from_=end, to=start))
        last = cyc == cycles - 1
        for i in range(start, end + 1):
            here = [c.index for c in active if c.start <= i <= c.end and cyc < c.cycles]
            if last:
                here += [ci for ci in preserve.get(i, ()) if ci not in here]
            ops.extend(Paste(condition=ci, at=i) for ci in here)
            if i < end:
                denoise(i, eta)
    after = {i: v for i, v in preserve.items() if i > end}
    for i in range(end, n):
        ops.extend(Paste(condition=ci, at=i) for ci in after.get(i, ()))
        denoise(i, eta_after)
    return tuple(ops)


def shared_prefix(thetas: list[np.ndarray]) -> int:
    """Leading steps where θ = 0 for every variant: those compute the same thing and can be shared."""
    if not thetas:
        return 0
    n = min(len(x) for x in thetas)
    k = 0
    while k < n and all(x[k] == 0.0 for x in thetas):
        k += 1
    return k


def schedule_file_values(data: Any) -> list[float] | str:
    """θ values of a schedule file's JSON (a list, or an object with ``values``), or what is wrong."""
    if isinstance(data, dict):
        if "values" not in data:
            return 'holds an object without a "values" key'
        data = data["values"]
    if not isinstance(data, list):
        return "must hold a list of numbers or an object with \"values\""
    if not data:
        return "holds no values"
    out = []
    for i, x in enumerate(data):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return f"value {i + 1} is not a number"
        try:
            out.append(float(x))
        except OverflowError:
            return f"value {i + 1} is out of range"
    return out


def first_decrease(values: list[float]) -> int | None:
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            return i
    return None


def values_problems(values: list[float], steps: int) -> list[str]:
    """``schedule_problems``, with the decreasing value named by its 1-based number."""
    out = []
    for msg in schedule_problems(values, steps):
        if msg.startswith("θ must be non-decreasing"):
            i = first_decrease(values)
            msg = f"θ must be non-decreasing, but value {i + 1} is {values[i]:g} after {values[i - 1]:g}"
        out.append(msg)
    return out
