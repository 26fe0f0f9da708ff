"""Planning a build: scenes → jobs (``Item``), each with its output, cache key and state.

Every scene found is compiled (no torch) or, when nothing it read has changed, replayed from its
memo (:mod:`scenec.build.memo`: the compiler is not even imported). Each job gets its cache key
(:mod:`scenec.build.keys`) and is checked against its output directory's manifest. A bad scene never
stops the others: its diagnostics are collected and the build goes on.

The build reads plan data only through the plan's document, ``plan.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from scenec.spec.diagnostics import Diagnostics, Pos, SceneError, display_path
from scenec.spec.fsio import recording_inputs

from . import memo
from .discovery import discover
from .keys import cache_key, job_identity, model_identity
from .manifest import Manifest
from .options import BatchError, BuildOptions
from .selection import candidates, parse_selectors, selected, unmatched


def compile_file(path: Path, model: str | None, overrides=(), lora=()):
    """Compile one scene file (with the command line's ``overrides`` and ``--lora`` arguments): a
    ``scenec.spec.plan.Plan`` with the scene's ``warnings``; raises ``SceneError`` with every problem. The
    one place the build calls the compiler."""
    from scenec.compiler import compile_scene

    return compile_scene(path, model=model, lora=lora, overrides=overrides)


@dataclass
class Item:
    """One output of the batch: the job, where it goes, its key and what the cache says of it."""

    scene_file: Path
    display: str  # the scene file as shown to the user
    plan: Any  # the compiled plan, or a memo.MemoPlan: read through ``.json`` only
    job: dict  # the job's entry of plan.json["jobs"]
    out_dir: Path
    name: str
    key: str
    identity: dict
    state: str = "new"  # new | changed | missing | modified | forced | cached
    reason: str = ""
    selected: bool = True
    entry: dict | None = None  # its manifest entry when it was checked (None: none)

    @property
    def info(self) -> dict:
        """What ``--select`` matches."""
        return {"scene": self.plan.json["scene"]["name"], "file": self.display, "group": self.job.get("group"),
                "variant": self.job.get("variant"), "seed": self.job.get("seed"), "matrix": self.job.get("matrix"),
                "name": self.name}

    @property
    def image(self) -> Path:
        return self.out_dir / (self.name + ".png")

    @property
    def line(self) -> int:
        """The job's line in its scene file."""
        return (self.job.get("source") or {}).get("line") or 1

    @property
    def todo(self) -> bool:
        return self.selected and self.state != "cached"


@dataclass
class BatchPlan:
    items: list[Item] = field(default_factory=list)
    scenes: list[Path] = field(default_factory=list)
    diagnostics: Any = None  # spec.diagnostics.Diagnostics
    invalid: list[str] = field(default_factory=list)  # scene files that did not compile
    failed_compile: list[tuple[str, str]] = field(default_factory=list)  # (file, message): internal errors
    manifests: dict[Path, Manifest] = field(default_factory=dict)
    compile_s: float = 0.0
    followed: dict[str, Path] = field(default_factory=dict)  # scene → its last `build -o` directory (last_out)


def plan_batch(targets: Iterable[str | Path], options: BuildOptions = BuildOptions()) -> BatchPlan:
    """Discover, compile (no torch), key and check every job against the manifests. Never raises for
    bad scenes: their diagnostics are collected and the other scenes go on."""
    if options.weights_hash not in ("stat", "content"):
        raise BatchError(f"--weights-hash must be stat or content, not `{options.weights_hash}`")
    return _Planner(options).run(targets)


class _Planner:
    """The state of one :func:`plan_batch`: the plan being filled, who makes which output, and the model
    identities computed so far (one per model, however many scenes use it)."""

    def __init__(self, options: BuildOptions):
        self.o = options
        self.sel, self.exc = parse_selectors(options.select), parse_selectors(options.exclude)
        self.bp = BatchPlan(diagnostics=Diagnostics())
        self.identities: dict[str, dict] = {}
        self.encoders: dict[str, str] = {}  # visual prompts' image encoder directories digested so far
        self.owners: dict[tuple[Path, str], Item] = {}
        self.partial = memo.enabled()

    def run(self, targets: Iterable[str | Path]) -> BatchPlan:
        bp = self.bp
        files, problems = discover(targets)
        bp.diagnostics.extend(problems)
        if any(d.severity == "error" for d in problems):
            bp.invalid += [d.pos.file for d in problems if d.severity == "error"]
        bp.scenes = files
        if not files and not problems:
            bp.diagnostics.error(Pos("."), "no scene files given")
        t0 = time.perf_counter()
        for f in files:
            hit = memo.load(f, self.o.model, self.memo_warning(f), self.o.overrides, lora=self.o.lora) \
                if self.partial else None
            if hit is not None:
                bp.items += self.add_scene(f, hit[0], memo.warnings_of(hit[1]))
                continue
            got = self.compile_one(f)
            if got is not None:
                bp.items += self.add_scene(f, *got)
        bp.compile_s = time.perf_counter() - t0
        self.check(bp.items)
        self.compile_replayed()
        self.check_selection()
        for man in bp.manifests.values():
            if man.problem:
                bp.diagnostics.warning(Pos(display_path(man.path)), man.problem)
        return bp

    def check_selection(self) -> None:
        """A ``--select`` term that matches nothing is a usage error, listing what it could match (git's
        "pathspec did not match"), unless a scene that did not compile might have held its match."""
        bp = self.bp
        jobs = [it.info for it in bp.items]
        missing = unmatched(self.sel, jobs)
        if not missing or bp.invalid or bp.failed_compile:
            return
        terms = ", ".join(f"`{s.text}`" for s in missing)
        could = candidates(jobs) if jobs else "no scenes were found"
        raise BatchError(f"--select {terms} matched nothing; {could}")

    def memo_warning(self, f: Path):
        return lambda msg: self.bp.diagnostics.warning(Pos(display_path(f)), msg)

    def compile_one(self, f: Path):
        """Compile ``f`` (recording what it reads, for its memo): ``(plan, warnings)``, or None when it
        did not compile."""
        bp = self.bp
        try:
            with recording_inputs() as inputs:
                plan = compile_file(f, self.o.model, self.o.overrides, self.o.lora)
        except SceneError as e:
            bp.diagnostics.extend(e.diagnostics)
            if not e.diagnostics.has_errors():
                bp.diagnostics.error(Pos(display_path(f)), "invalid scene")
            bp.invalid.append(display_path(f))
            return None
        except Exception as e:  # noqa: BLE001 - one scene's internal error must not stop the batch
            if os.environ.get("SCENEC_DEBUG"):
                raise
            bp.failed_compile.append((display_path(f), f"internal error while compiling: {type(e).__name__}: {e}"))
            return None
        warnings = list(plan.warnings)
        if self.partial:
            memo.store(f, self.o.model, list(inputs), plan.json, warnings, self.o.overrides, lora=self.o.lora)
        return plan, warnings

    def add_scene(self, f: Path, plan, warnings) -> list[Item]:
        """The items of one scene's jobs; an output another scene already makes is an error."""
        bp, out = self.bp, self.o.out
        bp.diagnostics.extend(warnings)
        model = plan.json["model"]
        mkey = json.dumps(model, sort_keys=True)
        if mkey not in self.identities:
            self.identities[mkey] = model_identity(model, self.o.weights_hash)
        identity = self.identities[mkey]
        out_dir = Path(out) if out is not None else f.resolve().parent / (plan.json.get("output") or {}).get("dir", "out")
        if out is None and self.o.last_out:
            from .lastout import recall

            last = recall(f)
            if last is not None:
                out_dir = bp.followed[display_path(f)] = last
        out_dir = Path(os.path.abspath(out_dir))
        display = display_path(f)
        added = []
        for job in plan.json["jobs"]:
            name = job.get("name", job["id"])
            ident = job_identity(identity, job, self.o.weights_hash, self.encoders)
            item = Item(f, display, plan, job, out_dir, name, cache_key(job.get("job_hash", ""), ident, job["seed"]),
                        ident)
            item.selected = selected(item.info, self.sel, self.exc)
            other = self.owners.get((out_dir, name))
            if other is not None:
                bp.diagnostics.error(Pos(display, job.get("source", {}).get("line", 1)),
                                     f"output `{name}` in {out_dir} is also made by "
                                     f"{other.display}:{other.job.get('source', {}).get('line', 1)}",
                                     hint="give the scenes different `name`s or `output.dir`s")
                if display not in bp.invalid:
                    bp.invalid.append(display)
                continue
            self.owners[(out_dir, name)] = item
            added.append(item)
        return added

    def check(self, items: list[Item]) -> None:
        """Each item's state against its output directory's manifest (``--force`` included)."""
        for item in items:
            if item.out_dir not in self.bp.manifests:
                self.bp.manifests[item.out_dir] = Manifest.load(item.out_dir)
            man = self.bp.manifests[item.out_dir]
            item.state, item.reason = man.check(item.name, item.key)
            item.entry = man.outputs.get(item.name)
            if item.selected and item.entry is not None:
                self.warn_other_owner(item)
            if self.o.force and item.selected and item.state == "cached":
                item.state, item.reason = "forced", "--force"

    def warn_other_owner(self, item: Item) -> None:
        """An output whose last build came from another scene file that still exists: two scenes built one
        at a time would replace each other's image on every build (built together, it is an error)."""
        rel = ((item.entry.get("scene") or {}).get("file")) or ""
        other = Path(os.path.normpath(item.out_dir / rel)) if rel else None
        if other is None or other == Path(os.path.normpath(item.scene_file.resolve())) or not other.is_file():
            return
        self.bp.diagnostics.warning(
            Pos(item.display, item.job.get("source", {}).get("line", 1)),
            f"output `{item.name}` in {item.out_dir} was last built by {display_path(other)}, which still "
            "exists: if both scenes make it, each build replaces the other's image",
            hint="give the scenes different `name`s or `output.dir`s (or delete the other scene)")

    def compile_replayed(self) -> None:
        """A replayed scene with something to build is compiled for real: building needs its plan. Its
        new items take the old ones' place."""
        bp = self.bp
        replayed = list(dict.fromkeys(it.scene_file for it in bp.items if getattr(it.plan, "memo", False) and it.todo))
        if not replayed:
            return
        t1 = time.perf_counter()
        for f in replayed:
            old = [it for it in bp.items if it.scene_file == f]
            for it in old:
                self.owners.pop((it.out_dir, it.name), None)
            got = self.compile_one(f)  # its warnings equal the replayed ones: Diagnostics drops repeats
            new_items = self.add_scene(f, *got) if got is not None else []
            self.check(new_items)
            gone = {id(it) for it in old}  # by identity: Items compare by value
            at = next(i for i, it in enumerate(bp.items) if id(it) in gone)
            bp.items = [it for it in bp.items[:at] if id(it) not in gone] + new_items + \
                [it for it in bp.items[at:] if id(it) not in gone]
        bp.compile_s += time.perf_counter() - t1
