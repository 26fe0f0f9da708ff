"""Units of work and batches of them, and the sub-plan each one ships.

A *unit* is what runs together: one job, or the jobs to build of one coupling group (they share
their θ = 0 prefix). A *batch* is what runs as one forward per step: single-job units whose jobs
are batch-compatible (``--batch-size``), or any one unit alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .planning import Item


@dataclass
class Unit:
    """Jobs executed together: one job, or the jobs to build of one coupling group (shared prefix)."""

    items: list[Item]

    @property
    def plan(self):
        return self.items[0].plan

    @property
    def out_dir(self) -> Path:
        return self.items[0].out_dir

    def subplan(self):
        """The plan of this unit's jobs only (what it ships to an executor)."""
        return subplan(self.plan, [it.job for it in self.items])

    def stamps(self) -> dict[str, dict]:
        """Each job's manifest stamp by job id: written into its sidecar, so that a damaged manifest can
        be recovered from the sidecars (:func:`scenec.build.manifest.recover`)."""
        from .manifest import stamp

        return {it.job["id"]: stamp(it) for it in self.items}


def units_of(items: list[Item]) -> list[Unit]:
    """Group the items to build into units, in scene order; coupled jobs of one group stay together."""
    units: list[Unit] = []
    by_group: dict[tuple[int, str], Unit] = {}
    for it in items:
        gid = it.job.get("group")
        groups = {g["id"] for g in it.plan.json.get("groups") or []}
        if gid and gid in groups:
            k = (id(it.plan), gid)
            if k not in by_group:
                by_group[k] = Unit([])
                units.append(by_group[k])
            by_group[k].items.append(it)
        else:
            units.append(Unit([it]))
    return units


def batches_of(units: list[Unit], batch_size: int = 1) -> list[list[Unit]]:
    """Units grouped into what runs as one batch: single-job units whose jobs are batch-compatible
    (``scenec.runtime.batching.batch_key``: same model, canvas, sampler, program; any scene) go
    together, up to ``batch_size``; every other unit runs alone. A batch sits where its first unit was."""
    if batch_size <= 1:
        return [[u] for u in units]
    from scenec.runtime.batching import batch_key

    out: list[list[Unit]] = []
    filling: dict[str, list[Unit]] = {}
    for u in units:
        key = batch_key(u.plan.json, u.items[0].job) if len(u.items) == 1 else None
        if key is None:
            out.append([u])
            continue
        if key not in filling:
            filling[key] = []
            out.append(filling[key])
        filling[key].append(u)
        if len(filling[key]) >= batch_size:
            del filling[key]
    return out


def subplan(plan, jobs: list[dict]):
    """The plan restricted to ``jobs`` (their groups and the tensors they name), as a
    ``scenec.spec.plan.Plan``: what one unit ships."""
    from scenec.spec.plan import Plan

    ids = {j["id"] for j in jobs}
    doc = dict(plan.json)
    doc["jobs"] = [j for j in plan.json["jobs"] if j["id"] in ids]
    groups = []
    for g in plan.json.get("groups") or []:
        members = [x for x in g.get("jobs", []) if x in ids]
        if members:
            groups.append({**g, "jobs": members})
    doc["groups"] = groups
    hires = plan.json.get("hires")
    if hires:  # the second pass's plan, restricted to the same jobs (compiler/hires.py)
        second = [j for j in hires["plan"]["jobs"] if j["id"] in ids]
        second_groups = [{**g, "jobs": [x for x in g["jobs"] if x in ids]} for g in hires["plan"].get("groups") or []
                         if any(x in ids for x in g.get("jobs", []))]
        doc["hires"] = {**hires, "plan": {**hires["plan"], "jobs": second, "groups": second_groups}}
    names: set[str] = set()

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k != "matrix":
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str) and x in plan.tensors:
            names.add(x)

    walk(doc["jobs"])
    walk(groups)
    if hires:
        walk(doc["hires"]["plan"]["jobs"])
        walk(doc["hires"]["plan"]["groups"])
    return Plan(doc, {n: plan.tensors[n] for n in names})
