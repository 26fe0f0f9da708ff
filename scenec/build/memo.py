"""Partial compiles: replay what a batch needs of an unchanged scene without compiling it.

dbt's partial parsing, for scenes. A batch build needs, for a scene whose outputs are all up to date,
only each job's name, seed, selectors and ``job_hash`` — and computing those means compiling the scene
(geometry, masks, step programs) and importing the compiler. So after each successful compile the
batch stores a *memo* of them, together with every file the compile read or probed, recorded as it
ran (``scenec.spec.fsio.note_input``): the scene, its includes, the ``scenec.toml`` lookups from its
directory up to the project root, referenced images, mask images and schedule files, a local model's
``model_index.json``. A memo is replayed only while all of them hash to what they hashed to then
(a file that was absent must still be absent), with the same scenec code (version and the sources'
content), ``--model``, ``--lora`` and working directory. Any doubt compiles.

A replayed scene has no real plan; the batch compiles it for real as soon as one of its jobs has to be
built (``scenec.build.planning.plan_batch``). Memos live in ``$SCENEC_CACHE/compile`` (default
``~/.cache/scenec/compile``); ``SCENEC_PARTIAL_COMPILE=0`` turns them off.

A memo carries its format and the sha256 of its content, and is validated on read (:class:`MemoDoc`):
a torn, flipped or hand-edited one is set aside (``NAME.damaged-<time>``) with one warning, and the
scene is compiled.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from scenec.spec.fsio import atomic_write, json_bytes, set_aside, sha256_big_file

from .manifest import parse_json, problem_of

FORMAT = 2
JOB_FIELDS = ("id", "name", "seed", "group", "variant", "matrix", "source", "job_hash")
_code: str | None = None


def enabled() -> bool:
    return os.environ.get("SCENEC_PARTIAL_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")


def memo_dir() -> Path:
    root = os.environ.get("SCENEC_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "scenec") / "compile"


def code_stamp() -> str:
    """The scenec version and the content of every source file that could change a compile (≈ 300 kB:
    hashing is ~1 ms, and unlike mtimes it survives a fresh checkout in CI)."""
    global _code
    if _code is None:
        from scenec import __version__

        h = hashlib.sha256(__version__.encode())
        for pkg in ("scenec", "scenec.build", "scenec.spec", "scenec.compiler"):
            spec = find_spec(pkg)  # locates the package without importing it (no compiler import)
            for d in (spec.submodule_search_locations or []) if spec else []:
                for p in sorted(Path(d).glob("*.py")):
                    h.update(f"{pkg}/{p.name}\0".encode())
                    h.update(hashlib.sha256(p.read_bytes()).digest())
        _code = h.hexdigest()
    return _code


def _entry_path(scene: Path, model: str | None, lora=(), overrides=()) -> Path:
    who = json.dumps([str(scene.resolve()), model, os.getcwd()] + ([list(lora)] if lora else [])
                     + ([repr(o) for o in overrides] if overrides else []))
    return memo_dir() / (hashlib.sha256(who.encode()).hexdigest()[:40] + ".json")


def _state(path: str) -> str | None:
    """A dependency's content hash; None when it is not a regular file (absent, or a directory such as
    ``output.dir``, which the compile resolves but whose existence changes nothing)."""
    try:
        return sha256_big_file(path) if os.path.isfile(path) else None
    except OSError:
        return "unreadable"  # never equal to a hash: the memo will not replay


class MemoPlan:
    """What a batch reads of a plan before building, replayed from a memo (no tensors, no programs)."""

    memo = True

    def __init__(self, doc: dict):
        self.json = doc


# --- the memo's format: what the batch reads of it must have these types -------------------------------

class _Job(BaseModel):
    id: str
    name: str
    seed: int
    group: str | None = None
    variant: str | None = None
    matrix: dict[str, Any] | None = None
    source: dict[str, Any] | None = None
    job_hash: str


class _SceneRef(BaseModel):
    name: str


class _Plan(BaseModel):
    scene: _SceneRef
    model: dict[str, Any]
    output: dict[str, Any] | None = None
    jobs: list[_Job]


class _Warning(BaseModel):
    file: str
    line: int
    col: int
    message: str
    hint: str | None = None


class MemoDoc(BaseModel):
    format: int
    sha256: str
    code: str
    scene: str
    deps: list[tuple[str, str | None]]
    plan: _Plan
    warnings: list[_Warning]


def _digest(doc: dict) -> str:
    """sha256 of a memo's content (everything but the digest itself), as canonical JSON."""
    body = {k: v for k, v in doc.items() if k != "sha256"}
    return hashlib.sha256(json_bytes(body, sort_keys=True, separators=(",", ":"))).hexdigest()


def load(scene: Path, model: str | None, warn: Callable[[str], None] | None = None, overrides=(), lora=()
         ) -> tuple[MemoPlan, list[dict]] | None:
    """The memo of ``scene`` (compiled with ``overrides`` and ``lora``) when every input is as it was:
    ``(MemoPlan, warnings)``; else None. A damaged memo is set aside and ``warn`` told once."""
    path = _entry_path(scene, model, lora, overrides)
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    try:
        doc = parse_json(raw)
        if isinstance(doc, dict) and doc.get("format") != FORMAT:
            return None  # another scenec's memo: stale, not damaged
        if not isinstance(doc, dict) or doc.get("sha256") != _digest(doc):
            raise ValueError("its content does not match its sha256")
        MemoDoc.model_validate(doc)
    except ValueError as e:  # ValidationError too
        moved = set_aside(path)
        if warn is not None:
            warn(f"damaged compile memo {path} ({problem_of(e)})" + (f"; set aside as {moved.name}" if moved else "")
                 + "; compiling the scene")
        return None
    if doc["code"] != code_stamp():
        return None
    for dep, digest in doc["deps"]:
        if _state(dep) != digest:
            return None
    return MemoPlan(doc["plan"]), doc["warnings"]


def store(scene: Path, model: str | None, inputs: list[str], plan_json: dict, warnings: list[Any],
          overrides=(), lora=()) -> None:
    """Write the memo of a scene that just compiled (best effort: a memo that cannot be written is skipped)."""
    doc = {
        "format": FORMAT,
        "code": code_stamp(),
        "scene": str(scene.resolve()),
        "deps": [[p, _state(p)] for p in inputs],
        "plan": {"scene": plan_json.get("scene"), "model": plan_json.get("model"), "output": plan_json.get("output"),
                 "jobs": [{k: j.get(k) for k in JOB_FIELDS} for j in plan_json.get("jobs", [])]},
        "warnings": [{"file": d.pos.file, "line": d.pos.line, "col": d.pos.col, "message": d.message,
                      "hint": d.hint} for d in warnings],
    }
    doc["sha256"] = _digest(doc)
    try:
        # no fsync: a torn memo does not verify, and then the scene is simply compiled
        atomic_write(_entry_path(scene, model, lora, overrides), json_bytes(doc, sort_keys=True), durable=False)
    except OSError:
        pass


def warnings_of(entries: list[dict]):
    """The stored warnings as diagnostics again."""
    from scenec.spec.diagnostics import Diagnostic, Pos

    return [Diagnostic(Pos(e["file"], e["line"], e["col"]), e["message"], "warning", e.get("hint")) for e in entries]
