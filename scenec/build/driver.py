"""``build_batch``: the whole of ``scenec build DIR|GLOB|FILE...`` (docs/batch.md).

Plan (discover, compile or replay, key, check against the manifests), then, under the output
directories' locks, remove stale temp files, re-read the manifests (setting a damaged one aside),
recompute what is still to build — another build may have made some of it while this one waited —
and execute those units on an executor; each unit's outputs are entered in its manifest, saved after
the unit's files. A directory that cannot be written, or a manifest that cannot be saved, fails its
units with one sentence naming the path; the build goes on and ends with its summary.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

from scenec.spec.diagnostics import display_path

from .executors import Executor, make_executor
from .manifest import Manifest, clean_temp_files, locked_all
from .options import BatchError, BuildOptions, check_out_dir
from .planning import BatchPlan, Item, plan_batch
from .reporting import BuildReport
from .units import Unit, batches_of, units_of


def build_batch(targets: Iterable[str | Path], options: BuildOptions = BuildOptions(),
                report: BuildReport | None = None) -> dict:
    """Build every selected, not up-to-date job of the scenes found in ``targets``; returns the
    summary (:class:`~scenec.build.reporting.BuildReport`, ``report`` if given). Raises BatchError for
    bad options."""
    if options.batch_size < 1:
        raise BatchError(f"--batch-size must be at least 1, not {options.batch_size}")
    if options.workers is not None and options.workers < 1:  # before a Ray cluster is started for nothing
        raise BatchError(f"--workers must be at least 1, not {options.workers}")
    check_out_dir(options.out)
    report = report if report is not None else BuildReport(options.quiet)
    executor = make_executor(options, report.say, report)
    t0 = time.perf_counter()
    bp = plan_batch(targets, options)
    report.planned(bp, options.dry_run)
    chosen = [it for it in bp.items if it.selected]
    for it in chosen:
        if it.state == "cached":
            report.cached(it, bp.manifests[it.out_dir])
    todo = [it for it in chosen if it.todo]
    if options.dry_run:
        for it in todo:
            report.would_build(it)
        return report.finish(time.perf_counter() - t0)
    from .lastout import remember

    # for `scenec status` without -o; before building, so that it holds for a build stopped halfway too
    remember({it.scene_file: options.out for it in chosen})
    damaged = [d for d, man in bp.manifests.items() if man.damaged]
    if todo or damaged:
        _build(todo, bp, executor, report, options, damaged)
    if options.masks:  # from the geometry, beside images built now or already up to date: no model
        from .canvas_masks import write_build_masks

        report.masks_written(write_build_masks(chosen, bp, options, report.say))
    return report.finish(time.perf_counter() - t0, not_selected=len(bp.items) - len(chosen))


def _build(todo: list[Item], bp: BatchPlan, executor: Executor, report: BuildReport, options: BuildOptions,
           damaged: list[Path]) -> None:
    out_dirs = sorted({it.out_dir for it in todo} | set(damaged))
    with locked_all(out_dirs) as unwritable:
        for d, e in unwritable.items():
            why = "not a directory" if d.exists() and not d.is_dir() else (e.strerror or str(e))
            for it in todo:
                if it.out_dir == d:
                    report.failed(it, f"cannot write to {d}: {why}")
        for d in out_dirs:
            if d not in unwritable:
                _reopen(d, bp, report)
        todo = _still_to_build([it for it in todo if it.out_dir not in unwritable], bp, report, options)
        _keep_edits(todo, bp, report)

        def done(unit: Unit, results: list[dict] | None, error: str | None = None) -> None:
            man = bp.manifests[unit.out_dir]
            by_id = {r["job"]: r for r in results or []}
            built = []
            for it in unit.items:
                r = by_id.get(it.job["id"])
                if r is not None and r.get("status") == "built":
                    built.append((it, r))
                else:
                    report.failed(it, (r or {}).get("error") or error or "no result")
            if not built:
                return
            before = {it.name: man.outputs.get(it.name) for it, _ in built}
            for it, r in built:
                man.record(it, r)
                # reported before the manifest is saved: a signal right after the save (a CI job cancelled) must not
                # leave an image recorded that the summary does not count
                report.built(it, r)
            try:
                man.save()  # manifest last: after the unit's images and sidecars
            except OSError as e:  # a full disk: not recorded, so the next build makes them again
                for name, old in before.items():
                    if old is None:
                        man.outputs.pop(name, None)
                    else:
                        man.outputs[name] = old
                for it, _ in built:
                    report.unbuilt(it)
                    report.failed(it, f"built, but {man.path} could not be written: {e.strerror or e}")
                return

        report.start_progress(len(todo))
        try:
            executor.run(batches_of(units_of(todo), options.batch_size), done)
        finally:
            report.stop_progress()


def _reopen(d: Path, bp: BatchPlan, report: BuildReport) -> None:
    """Under the lock: remove a killed build's temp files, re-read the manifest (another build may have
    finished meanwhile) and set a damaged one aside."""
    for p in clean_temp_files(d):
        report.say(f"scenec: removed a stale temp file {p}")
    man = Manifest.load(d)
    if man.damaged:
        try:
            man.repair()
        except OSError:
            pass  # the units' own saves fail and say why
    bp.manifests[d] = man


def _keep_edits(todo: list[Item], bp: BatchPlan, report: BuildReport) -> None:
    """An image about to be remade whose bytes are not the ones its manifest entry recorded (edited since it was
    built) is kept as ``NAME.edited.png`` first — also when its sidecar, which the runtime compares with
    (runtime/outputs.py ``keep_edited``), is gone. Nothing is lost."""
    from scenec.spec.fsio import keep_as_edited, sha256_file

    for it in todo:
        e = bp.manifests[it.out_dir].outputs.get(it.name)
        img = it.out_dir / e["image"] if e else None
        try:
            if img is None or not img.is_file() or sha256_file(img) == e.get("sha256"):
                continue
            kept = keep_as_edited(img)
        except OSError:
            continue  # unreadable or not movable: the runtime's own check (or its write) says so
        report.say(f"  kept    {display_path(kept)}: the image as it was edited after it was built")


def _still_to_build(todo: list[Item], bp: BatchPlan, report: BuildReport, options: BuildOptions) -> list[Item]:
    """The items still to build against the manifests re-read under the lock. One that another build
    made meanwhile is cached — with ``--force`` too, when its entry is newer than the one planned on."""
    still, theirs = [], 0
    for it in todo:
        man = bp.manifests[it.out_dir]
        state, _ = man.check(it.name, it.key)
        if state == "cached" and (it.state != "forced" or man.outputs.get(it.name) != it.entry):
            report.cached(it, man)
            theirs += 1
        else:
            still.append(it)
    if theirs:
        report.say(f"scenec: {theirs} output{'s were' if theirs != 1 else ' was'} built by another build "
                   "while this one waited")
    return still
