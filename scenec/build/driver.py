"""``build_batch``: the whole of ``scenec build DIR|GLOB|FILE...`` (docs/batch.md).

Plan (discover, compile or replay, key, check against the manifests), then, under the output
directories' locks, remove stale temp files, re-read the manifests, and execute the units to build
on an executor; each unit's outputs are entered in its manifest, saved after the unit's files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

from .executors import Executor, make_executor
from .manifest import Manifest, clean_temp_files, locked_all
from .options import BatchError, BuildOptions
from .planning import BatchPlan, Item, plan_batch
from .reporting import BuildReport
from .units import Unit, batches_of, units_of


def build_batch(targets: Iterable[str | Path], options: BuildOptions = BuildOptions()) -> dict:
    """Build every selected, not up-to-date job of the scenes found in ``targets``; returns the
    summary (:class:`~scenec.build.reporting.BuildReport`). Raises BatchError for bad options."""
    if options.batch_size < 1:
        raise BatchError(f"--batch-size must be at least 1, not {options.batch_size}")
    report = BuildReport(options.quiet)
    executor = make_executor(options, report.say)
    t0 = time.perf_counter()
    bp = plan_batch(targets, options)
    report.planned(bp)
    chosen = [it for it in bp.items if it.selected]
    for it in chosen:
        if it.state == "cached":
            report.cached(it, bp.manifests[it.out_dir])
    todo = [it for it in chosen if it.todo]
    if options.dry_run:
        for it in todo:
            report.would_build(it)
        return report.finish(time.perf_counter() - t0)
    if todo:
        _build(todo, bp, executor, report, options.batch_size)
    return report.finish(time.perf_counter() - t0, not_selected=len(bp.items) - len(chosen))


def _build(todo: list[Item], bp: BatchPlan, executor: Executor, report: BuildReport, batch_size: int) -> None:
    out_dirs = sorted({it.out_dir for it in todo})
    with locked_all(out_dirs):
        for d in out_dirs:
            for p in clean_temp_files(d):
                report.say(f"scenec: removed a stale temp file {p}")
            # re-read under the lock: another build may have finished meanwhile
            bp.manifests[d] = Manifest.load(d)

        def done(unit: Unit, results: list[dict] | None, error: str | None = None) -> None:
            man = bp.manifests[unit.out_dir]
            by_id = {r["job"]: r for r in results or []}
            built = False
            for it in unit.items:
                r = by_id.get(it.job["id"])
                if r is not None and r.get("status") == "built":
                    man.record(it, r)
                    report.built(it, r)
                    built = True
                else:
                    report.failed(it, (r or {}).get("error") or error or "no result")
            if built:
                man.save()  # manifest last: after the unit's images and sidecars

        executor.run(batches_of(units_of(todo), batch_size), done)
