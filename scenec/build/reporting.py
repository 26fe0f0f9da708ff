"""What a build and ``scenec status`` report: the build's summary and the lines it prints as it goes,
and the status of every output (docs/batch.md, "Status and dry runs", "Failures and exit codes")."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable

from scenec.spec.diagnostics import display_path, printable

from .manifest import Manifest
from .options import BuildOptions, check_out_dir
from .planning import BatchPlan, Item, plan_batch
from .pool import ModelLoadError

STALE_STATES = ("new", "changed", "missing", "modified")


class BuildReport:
    """A build's summary as it goes (``data``: what ``build_batch`` returns) and its lines on stderr.

    ``data`` is ``{"built", "cached", "failed", "invalid", "outputs", "errors", "diagnostics", "plan",
    "seconds"}``; ``outputs`` has one entry per selected job (``status``: built | cached | failed |
    would-build)."""

    def __init__(self, quiet: bool = False, live: bool = False, lines: bool = True):
        self.quiet = quiet
        self.live = live  # a live progress display when stderr is a terminal (scenec.progress)
        self.lines = lines  # one line per image built (off: `scenec build --quiet`)
        self.progress = None  # the display while the build runs
        self.data: dict[str, Any] = {"built": 0, "cached": 0, "failed": 0, "invalid": 0, "outputs": [],
                                     "errors": [], "diagnostics": None, "plan": None}
        self._models_said: set[str] = set()  # model errors already printed

    def say(self, msg: str) -> None:
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.print(msg)  # above the bars
        else:
            print(msg, file=sys.stderr)

    def start_progress(self, images: int) -> None:
        """The live display, for ``images`` images to make (none when off or not on a terminal)."""
        from scenec.progress import build_progress

        self.progress = build_progress(images, self.live and self.lines and not self.quiet)

    def stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def planned(self, bp: BatchPlan, dry_run: bool = False) -> None:
        """The plan's diagnostics, invalid scenes and scenes that failed to compile."""
        self.data.update(invalid=len(bp.invalid), diagnostics=bp.diagnostics, plan=bp)
        for d in bp.diagnostics.sorted():
            self.say(d.format())
        if bp.invalid:
            others = ("the others would build" if dry_run else "building the others") \
                if len(bp.scenes) > len(bp.invalid) else "nothing else to build"
            self.say(f"scenec: {len(bp.invalid)} invalid scene{'s' if len(bp.invalid) != 1 else ''}; {others}")
        for f, msg in bp.failed_compile:
            self.data["failed"] += 1
            self.data["errors"].append(f"{f}: {msg}")
            self.say(f"scenec: {f}: {msg}")

    def cached(self, it: Item, man: Manifest) -> None:
        e = man.outputs[it.name]
        d = man.out_dir
        self.data["cached"] += 1
        self.data["outputs"].append({
            "job": it.job["id"], "name": it.name, "seed": it.job["seed"], "job_hash": it.job.get("job_hash", ""),
            "status": "cached", "image": str(d / e["image"]), "sidecar": str(d / e["sidecar"]),
            "masks": [str(d / p) for p in e.get("masks") or []], "timings": e.get("timings") or {}})

    def would_build(self, it: Item) -> None:
        self.data["outputs"].append({"job": it.job["id"], "name": it.name, "seed": it.job["seed"],
                                     "status": "would-build", "state": it.state, "reason": it.reason,
                                     "image": str(it.image), "scene": f"{it.display}:{it.line}"})

    def built(self, it: Item, result: dict) -> None:
        self.data["built"] += 1
        self.data["outputs"].append({**result, "state": it.state, "reason": it.reason})
        t = (result.get("timings") or {}).get("total_s")
        if self.lines:
                self.say(f"  built   {it.name}" + (f"  ({t:.2f} s)" if t is not None else "")
                     + f"  [{it.state}: {it.reason}]")
        if result.get("kept"):  # runtime/outputs.keep_edited: said even without the per-image lines
            self.say(f"  kept    {display_path(result['kept'])}: the image as it was edited after it was built")

    def unbuilt(self, it: Item) -> None:
        """Take back :meth:`built` for ``it``: its manifest could not be saved (the caller reports it failed)."""
        self.data["built"] -= 1
        self.data["outputs"] = [o for o in self.data["outputs"] if not (o.get("name") == it.name and
                                                                        o.get("status") == "built")]

    def masks_written(self, masks: dict[str, list[str]]) -> None:
        """``--masks``: the masks written after the images were reported, into their outputs' entries."""
        for o in self.data["outputs"]:
            if o.get("image") and str(Path(o["image"]).absolute()) in masks:
                o["masks"] = masks[str(Path(o["image"]).absolute())]

    def failed(self, it: Item, msg: str) -> None:
        """One line per failed image; a model that could not be loaded is explained once (its first line)."""
        self.data["failed"] += 1
        self.data["errors"].append(f"{it.display}:{it.line}: {it.name}: {msg}")
        self.data["outputs"].append({"job": it.job["id"], "name": it.name, "seed": it.job["seed"],
                                     "status": "failed", "error": str(msg)})
        if isinstance(msg, ModelLoadError):
            if msg not in self._models_said:
                self._models_said.add(msg)
                self.say(f"scenec: {msg}")
            self.say(f"scenec: {it.display}:{it.line}: {it.name}: not built: its model could not be loaded (above)")
            return
        self.say(f"scenec: {it.display}:{it.line}: {it.name}: {msg}")

    def finish(self, seconds: float, not_selected: int | None = None) -> dict:
        """The summary; with ``not_selected`` (a build that ran), its last line too."""
        self.stop_progress()
        s = self.data
        s["seconds"] = seconds
        if not_selected is not None:
            self.say(f"scenec: {s['built']} built, {s['cached']} cached, {s['failed']} failed"
                     + (f", {s['invalid']} invalid" if s["invalid"] else "")
                     + (f", {not_selected} not selected" if not_selected else "")
                     + f" ({s['seconds']:.1f} s)" + _where(s["outputs"]))
        return s


def _where(outputs: list[dict]) -> str:
    """``; images in DIR/`` for the directories holding the images built or up to date (a scene without
    ``output.dir`` or ``-o`` writes beside itself, where a user may not look)."""
    from scenec.spec.diagnostics import display_path

    dirs = list(dict.fromkeys(str(Path(o["image"]).parent) for o in outputs if o.get("image")
                              and o.get("status") in ("built", "cached")))
    if not dirs:
        return ""
    shown = [display_path(d).rstrip("/") + "/" for d in dirs[:3]]
    return "; images in " + ", ".join(shown) + (f" and {len(dirs) - 3} more" if len(dirs) > 3 else "")


def status(targets: Iterable[str | Path], options: BuildOptions = BuildOptions()) -> dict:
    """What a build would do, like ``git status``: each output's state, and manifest entries of these
    scenes that no scene makes any more (``orphaned``). Never imports torch."""
    check_out_dir(options.out)  # as build says (it read no manifest there)
    bp = plan_batch(targets, options)
    rows = []
    for it in bp.items:
        if it.selected:
            rows.append({"state": it.state, "reason": it.reason, "name": it.name, "image": str(it.image),
                         "scene": it.display, "line": it.line})
    made = {(it.out_dir, it.name) for it in bp.items}
    scanned = {f.resolve() for f in bp.scenes}
    orphans = []
    for d, man in bp.manifests.items():
        for name, e in man.outputs.items():
            src = (man.out_dir / (e.get("scene") or {}).get("file", "")).resolve()
            if src in scanned and (d, name) not in made:
                image = d / e.get("image", name + ".png")
                orphans.append({"state": "orphaned", "name": name, "image": str(image), "scene": display_path(src),
                                "reason": "no scene makes it any more" + ("" if image.is_file() else
                                                                          "; the image is gone too")})
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return {"outputs": rows, "orphaned": orphans, "counts": counts,
            "stale": sum(counts.get(s, 0) for s in STALE_STATES), "invalid": bp.invalid,
            "failed_compile": bp.failed_compile, "diagnostics": bp.diagnostics, "scenes": len(bp.scenes),
            "followed": {k: str(v) for k, v in bp.followed.items() if k in {r["scene"] for r in rows}}}


def format_status(rep: dict, verbose: bool = False) -> str:
    lines = []
    n = len(rep["outputs"])
    cached = rep["counts"].get("cached", 0)
    lines.append(f"{rep['scenes']} scene{'s' if rep['scenes'] != 1 else ''}, {n} output{'s' if n != 1 else ''}: "
                 f"{cached} up to date, {rep['stale']} to build"
                 + (f", {len(rep['invalid'])} invalid scene{'s' if len(rep['invalid']) != 1 else ''}"
                    if rep["invalid"] else ""))
    by_dir: dict[str, list[str]] = {}  # one line per directory: a project's scenes mostly share one
    for scene, d in (rep.get("followed") or {}).items():
        by_dir.setdefault(d, []).append(scene)
    for d, scenes in by_dir.items():
        who = f"{scenes[0]}: outputs of its" if len(scenes) == 1 else \
            (", ".join(scenes) if len(scenes) <= 3 else f"{scenes[0]} and {len(scenes) - 1} more scenes") + \
            ": outputs of their"
        lines.append(f"  ({who} last `scenec build -o {printable(d)}`; -o chooses another)")
    cwd = Path.cwd()
    for r in rep["outputs"] + rep["orphaned"]:
        if r["state"] == "cached" and not verbose:
            continue
        try:
            shown = printable(str(Path(r["image"]).relative_to(cwd)))
        except ValueError:
            shown = printable(r["image"])
        where = f"{r['scene']}:{r['line']}" if "line" in r else r["scene"]
        lines.append(f"  {r['state'] + ':':<10} {shown}  ({r['reason']}; {where})")
    return "\n".join(lines)
