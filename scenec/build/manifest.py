"""``OUTDIR/scenec-manifest.json`` and its directory (docs/batch.md, "The manifest", "Resumability").

The manifest records, per output name, its cache key and the sha256 of its image: an output whose
key matches and whose files are on disk as recorded is *cached*. It is rewritten atomically after
every completed unit of work, after the unit's files; one build at a time holds an output
directory's lock, and starts by removing the temp files a killed build left there.

A manifest is validated on read (:class:`ManifestDoc`). One that is damaged — not JSON, nested too
deep, entries of the wrong shape — is never an error: its outputs are recovered from their sidecars
(each holds its cache key and its image's sha256, :func:`recover`), and a build sets the damaged
file aside (``scenec-manifest.json.damaged-<time>``) and writes the recovered one.
"""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from scenec.spec.fsio import atomic_write, json_bytes, set_aside, sha256_file

from .keys import runtime_code

MANIFEST = "scenec-manifest.json"
MANIFEST_FORMAT = "scenec-manifest/1"
LOCK = ".scenec-manifest.lock"
# tempfile.mkstemp(prefix=".NAME.", suffix=".tmp") as scenec.spec.fsio.atomic_write uses it
_OUR_TMP = re.compile(r"^\..+\.(png|json)\.[a-z0-9_]{8}\.tmp$")


# --- the format --------------------------------------------------------------------------------------

class _Loose(BaseModel):
    # fields a newer scenec adds are kept; the fields this one reads must have their types
    model_config = ConfigDict(extra="allow")


class SceneOf(_Loose):
    name: str
    file: str  # relative to OUTDIR
    line: int | None = None
    job: str
    group: str | None = None
    variant: str | None = None
    matrix: dict[str, Any] | None = None


class Stamp(_Loose):
    """What the build knows of an output before it runs: written into its sidecar (``build``) too, so a
    damaged manifest can be recovered from the sidecars."""

    key: str
    job_hash: str
    model: dict[str, str | dict[str, str]]  # a single-file checkpoint's `config` is an identity of its own
    seed: int
    scenec_version: str
    runtime_code: str | None = None  # keys.runtime_code() of the build (absent in older manifests)
    has_entities: bool = False
    scene: SceneOf


class Entry(Stamp):
    image: str  # paths relative to OUTDIR
    sha256: str
    sidecar: str
    masks: list[str] = []
    timings: dict[str, float] = {}
    built_at: str


class ManifestDoc(_Loose):
    format: Literal["scenec-manifest/1"]
    outputs: dict[str, Entry]
    scenec_version: str | None = None
    updated: str | None = None


def parse_json(raw: bytes) -> Any:
    """JSON as Python data; ValueError for anything that is not (bad UTF-8, bad syntax, nested too deep)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deep") from None


def problem_of(e: Exception) -> str:
    """A pydantic ValidationError or a JSON error in a few words: where, and what was expected."""
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "top level"
        more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
        return f"{where}: {err['msg']}{more}"
    return str(e).split("\n")[0][:200]


# --- the manifest ------------------------------------------------------------------------------------

class Manifest:
    """``OUTDIR/scenec-manifest.json``: one entry per output name (docs/batch.md, "Manifest").

    ``problem``: one sentence when the file on disk was damaged or unreadable (the caller warns);
    ``damaged``: the file is to be set aside (:meth:`repair`)."""

    def __init__(self, out_dir: Path, data: dict | None = None):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / MANIFEST
        self.data = data or {"format": MANIFEST_FORMAT, "outputs": {}}
        self.problem: str | None = None
        self.damaged = False

    @classmethod
    def load(cls, out_dir: Path) -> "Manifest":
        m = cls(out_dir)
        try:
            raw = m.path.read_bytes()
        except FileNotFoundError:
            return m
        except OSError as e:
            if m.path.is_dir():
                m.problem = "is a directory, not a manifest; every output counts as new"
                return m
            m.problem = f"unreadable manifest ({e.strerror}); every output counts as new"
            return m
        try:
            data = parse_json(raw)
            ManifestDoc.model_validate(data)
        except ValueError as e:  # pydantic's ValidationError is a ValueError
            m.outputs.update(recover(m.out_dir))
            m.damaged = True
            m.problem = (f"damaged manifest ({problem_of(e)}); {len(m.outputs)} output"
                         f"{'s' if len(m.outputs) != 1 else ''} recovered from their sidecars; a build sets "
                         f"the file aside as {MANIFEST}.damaged-<time> and writes a new one")
            return m
        m.data = data
        return m

    @property
    def outputs(self) -> dict[str, dict]:
        return self.data["outputs"]

    def save(self) -> None:
        from scenec import __version__

        self.data["scenec_version"] = __version__
        self.data["updated"] = _now()
        self.data["outputs"] = dict(sorted(self.outputs.items()))
        atomic_write(self.path, json_bytes(self.data, indent=1, sort_keys=True) + b"\n")

    def repair(self) -> Path | None:
        """Set the damaged file aside and write the recovered manifest (the caller holds the lock);
        the set-aside file's path. Raises OSError when the new manifest cannot be written."""
        if not self.damaged:
            return None
        moved = set_aside(self.path)
        self.save()
        self.damaged = False
        return moved

    def check(self, name: str, key: str) -> tuple[str, str]:
        """(state, reason) of one output: cached | new | changed | missing | modified."""
        e = self.outputs.get(name)
        if e is None:
            return "new", "not built yet"
        if e["key"] != key:
            return "changed", _what_changed(e)
        img = self.out_dir / e["image"]
        if not img.is_file():
            return "missing", "image deleted"
        side = self.out_dir / e["sidecar"]
        if not side.is_file():
            return "missing", "sidecar deleted"
        try:
            if sha256_file(img) != e["sha256"]:
                return "modified", "image differs from the manifest's sha256; a build keeps it as NAME.edited.png"
        except OSError as err:
            return "missing", f"image unreadable ({err.strerror})"
        return "cached", "up to date"

    def record(self, item, result: dict) -> dict:
        """Enter a built output (a ``planning.Item`` and its runtime result); the caller saves."""
        img = Path(result["image"])
        entry = {**stamp(item), "image": _rel(img, self.out_dir),
                 "sha256": result.get("sha256") or sha256_file(img),
                 "sidecar": _rel(Path(result["sidecar"]), self.out_dir),
                 "masks": [_rel(Path(p), self.out_dir) for p in result.get("masks") or []],
                 "timings": result.get("timings") or {}, "built_at": _now()}
        self.outputs[item.name] = entry
        return entry


def stamp(item) -> dict:
    """The part of an output's manifest entry known before it is built (:class:`Stamp`)."""
    from scenec import __version__

    job = item.job
    return {"key": item.key, "job_hash": job.get("job_hash", ""), "model": item.identity, "seed": job["seed"],
            "scenec_version": __version__, "runtime_code": runtime_code(), "has_entities": bool(job.get("entities")),
            "scene": {"name": item.plan.json["scene"]["name"], "file": _rel(item.scene_file.resolve(), item.out_dir),
                      "line": (job.get("source") or {}).get("line"), "job": job["id"], "group": job.get("group"),
                      "variant": job.get("variant"), "matrix": job.get("matrix")}}


def recover(out_dir: Path) -> dict[str, dict]:
    """Manifest entries rebuilt from the sidecars under ``out_dir``: an output counts as built when its
    sidecar carries the build's stamp and the sha256 of its image, and the image hashes to it (a sidecar
    is written after its image, so the pair is complete). Anything else will be built again."""
    found: dict[str, dict] = {}
    if not out_dir.is_dir():
        return found
    for side in sorted(out_dir.rglob("*.json")):
        if side.name == MANIFEST or side.name.startswith("."):
            continue
        try:
            doc = parse_json(side.read_bytes())
            if not isinstance(doc, dict) or not isinstance(doc.get("image"), str) or "/" in doc["image"]:
                continue
            img = side.with_name(doc["image"])
            if img.suffix != ".png" or sha256_file(img) != doc.get("sha256"):
                continue
            masks = [_rel(side.with_name(str(p)), out_dir) for p in doc.get("masks") or []]
            entry = Entry.model_validate({**(doc.get("build") or {}), "image": _rel(img, out_dir),
                                          "sha256": doc["sha256"], "sidecar": _rel(side, out_dir), "masks": masks,
                                          "timings": doc.get("timings") or {}, "built_at": _mtime(side)})
        except (OSError, ValueError, TypeError):
            continue
        found[entry.image[:-len(".png")]] = entry.model_dump(mode="json")
    return found


def _rel(p: Path, base: Path) -> str:
    return os.path.relpath(p, base).replace(os.sep, "/")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _mtime(p: Path) -> str:
    return datetime.fromtimestamp(p.stat().st_mtime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _what_changed(e: dict) -> str:
    from scenec import __version__

    if e.get("scenec_version") not in (None, __version__):
        return f"scenec version {e.get('scenec_version')} → {__version__}"
    if e.get("runtime_code") != runtime_code():
        return f"scenec's runtime code changed (same version {__version__})"
    return "job or model changed"


# --- the output directory: our temp files, the lock -------------------------------------------------

def clean_temp_files(out_dir: Path) -> list[Path]:
    """Remove temp files our atomic writes left behind (a killed build); returns what was removed."""
    removed = []
    if not out_dir.is_dir():
        return removed
    for root, dirs, files in os.walk(out_dir):
        for f in files:
            if _OUR_TMP.match(f):
                p = Path(root) / f
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


@contextmanager
def locked(out_dir: Path):
    """An exclusive lock on OUTDIR for one build at a time (``flock``: a killed process releases it).
    Raises OSError when the directory cannot be made or the lock file cannot be opened."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out_dir / LOCK, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"scenec: waiting for another build of {out_dir} to finish", file=sys.stderr)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextmanager
def locked_all(dirs: list[Path]):
    """The locks of several output directories, taken in sorted order (two builds never wait on each
    other in a cycle). Yields ``{dir: OSError}`` for the directories that could not be locked (cannot
    be created, read-only, not a directory): their units fail, the others build."""
    failed: dict[Path, OSError] = {}
    with ExitStack() as stack:
        for d in sorted(dirs):
            try:
                stack.enter_context(locked(d))
            except OSError as e:
                failed[d] = e
        yield failed
