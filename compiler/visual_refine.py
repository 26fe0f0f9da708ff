"""``visual.refine`` in the compiler: checks at FILE:LINE:COL and lowering to step indices.

Test-time refinement of a visual prompt's value tokens (Parmar et al., arXiv 2501.01424, §3.4): the
scene names the sampler steps by noise level, as ``visual.window`` does; each level lowers to the step
index whose noise level is nearest (``compiler.levels.level_index``), which must be a step the visual
tokens act on (inside the window). Only kv-mixed prompts have value tokens of their own (ip-adapter mode
takes keys and values from the same tokens), and a prompt of scale 0 is seen by nobody: both refused.
In a coupling group the tokens are the entity stream's, weighted by the group's θ (arXiv 2506.06826): a
step where θ = 0 runs the background alone, so a refinement there is refused too.
"""

from __future__ import annotations

import numpy as np

from scenec.spec.diagnostics import Diagnostics
from scenec.spec.load import LoadedScene
from scenec.spec.plan_visual import Refine


def group_thetas(ls: LoadedScene, steps: int) -> dict[str, np.ndarray]:
    """Each coupling group's θ at every step index, where its schedule gives one per step (a schedule file
    that cannot be read or has the wrong count is left out: the schedule checks report it)."""
    from scenec.spec import models as m

    from .files import read_json
    from .schedule import schedule_file_values, theta_table, values_problems

    out = {}
    for gi, g in enumerate(ls.scene.groups):
        values = None
        if isinstance(g.schedule, m.FileSchedule):
            data = read_json(ls, ("groups", gi, "schedule", "file"), g.schedule.file, Diagnostics(), "schedule file")
            values = None if data is None else schedule_file_values(data)
            if not isinstance(values, list) or values_problems(values, steps):
                continue
        elif isinstance(g.schedule, m.ValuesSchedule) and values_problems(g.schedule.values, steps):
            continue
        out[g.id] = theta_table(g.schedule, steps, values)
    return out


def check_refine(ls: LoadedScene, path: tuple, v, table: np.ndarray, steps: int, diags: Diagnostics,
                 thetas: dict[str, np.ndarray] | None = None) -> None:
    """Entity visual ``v``'s ``refine`` (at ``path`` + refine) against its mode, scale and window on the
    model's noise-level ``table`` at ``steps`` steps, and against θ of the coupling groups that show the
    entity (``thetas``: group id → θ per step); every problem at the key that has it."""
    from .levels import level_index

    r, rp = v.refine, path + ("refine",)
    if v.mode != "kv-mixed":
        diags.error(ls.pos(rp), f"`refine` needs kv-mixed mode: {v.mode} takes keys and values from the same "
                    "tokens, so there are no value tokens of their own to refine", hint="drop `refine`")
    if v.scale <= 0:
        diags.error(ls.pos(rp), "`refine` on a visual prompt of scale 0: its tokens are seen by no query, so "
                    "there is nothing to refine", hint="set `scale` > 0 or drop `refine`")
    lo, hi = level_index(v.window[0], table), level_index(v.window[1], table, end=True)
    if hi <= lo:  # the window covers no step (warned at `window`): no level of `at` can be inside it
        diags.error(ls.pos(rp + ("at",)), f"`refine` has no step to run on: the visual window [{v.window[0]:g}, "
                    f"{v.window[1]:g}] covers no sampler step at {steps} steps",
                    hint="widen `window` or use more steps, or drop `refine`")
        return
    seen: dict[int, float] = {}
    for k, a in enumerate(r.at):
        s = refine_step(a, table)
        if not lo <= s < hi:
            inside = f"step {lo}" if hi == lo + 1 else f"steps {lo}–{hi - 1}"
            diags.error(ls.pos(rp + ("at", k)), f"refine at {a:g} is sampler step {s} (noise level "
                        f"{table[s]:.3g}) at {steps} steps, outside the visual window [{v.window[0]:g}, "
                        f"{v.window[1]:g}] ({inside})", hint="pick a level inside `window`")
        elif zero := [g for g, th in (thetas or {}).items() if th[s] <= 0]:
            diags.error(ls.pos(rp + ("at", k)), f"refine at {a:g} is sampler step {s}, where θ of group "
                        f"`{zero[0]}` is 0: the group's images are the background alone there and the visual "
                        "tokens act on nothing", hint="pick a lower level, where θ has risen above 0")
        elif s in seen:
            diags.warning(ls.pos(rp + ("at", k)), f"refine at {a:g} and at {seen[s]:g} are the same sampler step "
                          f"({s}) at {steps} steps: it refines once there", hint="drop one, or use more steps")
        else:
            seen[s] = a


def refine_step(level: float, table: np.ndarray) -> int:
    """The sampler step a refinement level names: the one whose starting level is nearest (the table's last
    entry, the end of sampling, starts no step)."""
    from .levels import level_index

    return level_index(level, table[:-1])


def lower_refine(v, table: np.ndarray) -> Refine | None:
    """The plan's refinement of entity visual ``v`` (None without one): its levels as distinct sorted step indices."""
    if v.refine is None:
        return None
    r = v.refine
    return Refine(steps=r.steps, lr=r.lr, at=tuple(sorted({refine_step(a, table) for a in r.at})))
