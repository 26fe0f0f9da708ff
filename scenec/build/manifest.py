"""``OUTDIR/scenec-manifest.json`` and its directory (docs/batch.md, "The manifest", "Resumability").

The manifest records, per output name, its cache key and the sha256 of its image: an output whose
key matches and whose files are on disk as recorded is *cached*. It is rewritten atomically after
every completed unit of work, after the unit's files; one build at a time holds an output
directory's lock, and starts by removing the temp files a killed build left there.
"""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path

from scenec.spec.fsio import atomic_write, sha256_file

MANIFEST = "scenec-manifest.json"
MANIFEST_FORMAT = "scenec-manifest/1"
LOCK = ".scenec-manifest.lock"
# tempfile.mkstemp(prefix=".NAME.", suffix=".tmp") as scenec.spec.fsio.atomic_write uses it
_OUR_TMP = re.compile(r"^\..+\.(png|json)\.[a-z0-9_]{8}\.tmp$")


class Manifest:
    """``OUTDIR/scenec-manifest.json``: one entry per output name (docs/batch.md, "Manifest")."""

    def __init__(self, out_dir: Path, data: dict | None = None):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / MANIFEST
        self.data = data or {"format": MANIFEST_FORMAT, "outputs": {}}
        self.problem: str | None = None

    @classmethod
    def load(cls, out_dir: Path) -> "Manifest":
        m = cls(out_dir)
        try:
            data = json.loads(m.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return m
        except (OSError, ValueError) as e:
            m.problem = f"{m.path}: unreadable manifest ({type(e).__name__}); every output counts as new"
            return m
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or \
                not isinstance(data.get("outputs"), dict):
            m.problem = f"{m.path}: not a {MANIFEST_FORMAT} manifest; every output counts as new"
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
        text = json.dumps(self.data, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
        atomic_write(self.path, text.encode("utf-8"))

    def check(self, name: str, key: str, masks: bool = False) -> tuple[str, str]:
        """(state, reason) of one output: cached | new | changed | missing | modified."""
        e = self.outputs.get(name)
        if e is None:
            return "new", "not built yet"
        if e.get("key") != key:
            return "changed", _what_changed(e)
        img = self.out_dir / e.get("image", name + ".png")
        if not img.is_file():
            return "missing", "image deleted"
        side = self.out_dir / e.get("sidecar", name + ".json")
        if not side.is_file():
            return "missing", "sidecar deleted"
        if masks and not e.get("masks") and e.get("has_entities"):
            return "changed", "masks requested"
        try:
            if sha256_file(img) != e.get("sha256"):
                return "modified", "image differs from the manifest's sha256"
        except OSError as err:
            return "missing", f"image unreadable ({err.strerror})"
        return "cached", "up to date"

    def record(self, item, result: dict) -> dict:
        """Enter a built output (a ``planning.Item`` and its runtime result); the caller saves."""
        from scenec import __version__

        img = Path(result["image"])
        side = Path(result["sidecar"])
        rel = lambda p: os.path.relpath(p, self.out_dir).replace(os.sep, "/")  # noqa: E731
        job = item.job
        entry = {
            "key": item.key,
            "job_hash": job.get("job_hash", ""),
            "model": item.identity,
            "seed": job["seed"],
            "scenec_version": __version__,
            "image": rel(img),
            "sha256": sha256_file(img),
            "sidecar": rel(side),
            "masks": [rel(Path(p)) for p in result.get("masks") or []],
            "has_entities": bool(job.get("entities")),
            "scene": {"name": item.plan.json["scene"]["name"],
                      "file": rel(item.scene_file.resolve()),
                      "line": (job.get("source") or {}).get("line"),
                      "job": job["id"], "group": job.get("group"), "variant": job.get("variant"),
                      "matrix": job.get("matrix")},
            "timings": result.get("timings") or {},
            "built_at": _now(),
        }
        self.outputs[item.name] = entry
        return entry


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _what_changed(e: dict) -> str:
    from scenec import __version__

    if e.get("scenec_version") not in (None, __version__):
        return f"scenec version {e.get('scenec_version')} → {__version__}"
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
    """An exclusive lock on OUTDIR for one build at a time (``flock``: a killed process releases it)."""
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
    """The locks of several output directories, taken in sorted order: two builds never wait on each
    other in a cycle."""
    with ExitStack() as stack:
        for d in sorted(dirs):
            stack.enter_context(locked(d))
        yield
