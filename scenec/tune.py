"""``scenec tune``: θ schedules optimised for the coupled-generation metric (docs/eval-tune-split.md).

J(θ) = a·BgSim + b·CLIPScore of one coupling group, θ non-decreasing in [0, 1]^T: each evaluation
(:class:`GroupObjective`) compiles the scene with θ as the group's schedule, builds the group's
images and measures them (``scenec.eval.evaluate_group``). The search, its budget and its resumable
state file are :mod:`scenec.isotonic`; this module is the objective, the files it writes, and
:func:`tune`, the command.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from scenec.progress import progress_bar
from scenec.spec.fsio import atomic_write

from .clip import ClipScorer, load_clip
from .eval import evaluate_group
from .isotonic import METHODS, Evaluation, Evaluator, optimise
from .metrics import EvalError, Segmenter, to_float_image

# --- the real objective: build the group with θ, measure it -------------------------------------------

class GroupObjective:
    """J(θ) for one group of a scene: compile with the group's schedule replaced by ``{values: θ}``,
    execute only that group's jobs on a backend loaded once, measure with :func:`evaluate_group`.

    The override is done on the loaded scene model (``Group.schedule`` → ``ValuesSchedule``), then the
    usual passes and lowering run: no temporary scene files, and includes, paths and positions stay
    those of the real scene.
    """

    def __init__(self, scene: str | Path, group: str | None, model: str | None = None, device: str | None = None,
                 dtype: str | None = None, lora=(), clip: ClipScorer | None = None, weights=(1.0, 1.0),
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
        self.model, self.device, self.dtype, self.lora = model, device, dtype, tuple(lora)
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
            ls = dataclasses.replace(ls, scene=ls.scene.model_copy(update={"groups": groups,
                                                                           "entities": self._refined(theta)}))
        return lower(run_passes(ls, model=self.model, lora=self.lora))

    def _refined(self, theta) -> list:
        """The scene's entities, each ``visual.refine`` of one the group shows kept only at the levels whose
        step has θ > 0 (the compiler refuses a level at a θ = 0 step, where the tokens act on nothing and a
        refinement would change nothing: a candidate θ that is 0 there is built without it)."""
        from scenec.compiler.levels import noise_levels
        from scenec.compiler.passes import initial_ir
        from scenec.compiler.visual_refine import refine_step

        shown, out, table = self._shown(), [], None
        for e in self.ls.scene.entities:
            r = e.visual.refine if e.id in shown and e.visual is not None else None
            if r is not None:
                if table is None:
                    ir = initial_ir(self.ls, self.model, self.lora)
                    table = noise_levels(ir.info, ir.canvas, ir.steps, ir.solver)
                at = [a for a in r.at if theta[refine_step(a, table)] > 0]
                keep = r.model_copy(update={"at": at}) if at else None
                e = e.model_copy(update={"visual": e.visual.model_copy(update={"refine": keep})})
            out.append(e)
        return out

    def _shown(self) -> set[str]:
        """The ids of the entities the group's variants show."""
        return {eid for var in self.ls.scene.groups[self.gi].variants for eid in var.entities or ()}

    def plan_for(self, theta):
        """The plan of the group's jobs only, with θ as its schedule (``plan_hash`` is that of the whole
        candidate plan)."""
        from scenec.spec.plan import Plan

        p = self._compile(theta)
        doc = copy.deepcopy(p.json)
        doc["jobs"] = [j for j in doc["jobs"] if j.get("group") == self.group]
        doc["groups"] = [g for g in doc["groups"] if g["id"] == self.group]
        return Plan(doc, dict(p.tensors))

    def fingerprint(self) -> dict:
        """What a state file must match to be resumed: everything J depends on except θ."""
        p = self.plan_for(np.zeros(self.steps))  # without visual.refine (at θ = 0: _refined); it is here
        refine = {e.id: e.visual.refine.model_dump(mode="json") for e in self.ls.scene.entities
                  if e.id in self._shown() and e.visual is not None and e.visual.refine is not None}
        return {"scene": self.scene_name, "group": self.group, "plan_hash_theta0": p.plan_hash,
                **({"refine": refine} if refine else {}),
                "model": p.json["model"].get("spec"), "weights": list(self.weights),
                "clip": self.clip.name if self.clip is not None else None, "text": self.text,
                "segmenter": getattr(self.segmenter, "__qualname__", None) if self.segmenter else None}

    def _backend(self, plan):
        if self.backend is None:
            from scenec.build.pool import load_model

            self.backend = load_model(plan.json["model"], device=self.device, dtype=self.dtype)
        return self.backend

    def __call__(self, theta) -> float:
        from PIL import Image

        from scenec.runtime.outputs import execute
        from scenec.spec.errors import RuntimeErrorBase

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


def _check_inside_project(scene: Path, out: Path) -> None:
    """A scene names only files inside its project root: a schedule written elsewhere could not be used
    (the line printed to add would fail `scenec validate`), so -o there is refused before any build."""
    from scenec.spec.paths import find_project_root

    root = find_project_root(scene)
    where = out.resolve()
    if where != root and root not in where.parents:
        raise EvalError(f"-o {out}: outside the project root {root}, where the scene cannot name it; "
                        "write the schedule under the project root")


def schedule_line(scene: Path, output: Path) -> str:
    """The line to put in the group: ``schedule: {file: <output relative to the scene file>}``."""
    try:
        rel = Path(os.path.relpath(output.resolve(), scene.resolve().parent)).as_posix()
    except ValueError:
        rel = output.resolve().as_posix()
    return f"schedule: {{file: {rel}}}"


def write_schedule(path: Path, doc: dict) -> None:
    atomic_write(Path(path), (json.dumps(doc, indent=1) + "\n").encode("utf-8"))


def tune(scene: str | Path, group: str | None = None, budget: int = 20, method: str = "both",
         output: str | Path | None = None, weights=(1.0, 1.0), clip: ClipScorer | str | None = None,
         model: str | None = None, device: str | None = None, dtype: str | None = None, lora=(),
         segmenter: Segmenter | None = None, text: str = "full", seed: int = 0,
         log: Callable[[str], None] | None = None, objective: GroupObjective | None = None) -> dict:
    """Tune one group's θ; write the schedule file and its state file; return a summary dict."""
    log = log or (lambda s: print(f"scenec: {s}", file=sys.stderr))
    if method not in METHODS:
        raise EvalError(f"--method must be one of {', '.join(METHODS)}, not `{method}`")
    if budget < 1:
        raise EvalError("--budget must be at least 1")
    if text not in ("full", "entity"):  # before the state file is read and a model loads
        raise EvalError(f"--text must be full or entity, not `{text}`")
    if output is not None:  # (the default, schedules/ beside the scene, is inside)
        _check_inside_project(Path(scene), Path(output))
    obj = objective or GroupObjective(scene, group, model=model, device=device, dtype=dtype, lora=lora, clip=None,
                                      weights=weights, segmenter=segmenter, text=text)
    if objective is None and clip is not None:
        # loaded after the scene and group are known to be fine (a missing model is the costlier problem)
        obj.clip = load_clip(clip) if isinstance(clip, str) else clip
    scene = Path(scene)
    out = Path(output) if output is not None else default_output(scene, obj.scene_name, obj.group)
    state = state_path_for(out)
    bar = progress_bar(remaining=False)
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
    start = f.evaluated(obj.current)
    doc = schedule_document(best, obj.steps, {
        "scene": obj.scene_name, "group": obj.group, "weights": list(obj.weights),
        "clip": obj.clip.name if obj.clip is not None else None, "evaluations": f.used,
        "start": {"schedule": obj.current_schedule, "objective": start.objective} if start is not None else None})
    write_schedule(out, doc)
    return {"output": str(out), "state": str(state), "line": schedule_line(scene, out), "best": doc,
            "evaluated": f.used, "built": f.new, "group": obj.group}
