"""File I/O every layer shares: atomic writes and content hashes.

Nothing is ever half-written: data goes to a temp file in the target directory (so the rename
stays on one filesystem), is fsynced, then ``os.replace``d over the target. Readers see the old
file or the new one. Temp names are ``.<name>.<random>.tmp``, so a killed build's leftovers are
recognisable (``scenec.build.manifest.clean_temp_files``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

# The files a compile reads or probes (scene, includes, scenec.toml lookups, images, schedules, a
# local model's model_index.json): scenec.build.memo replays a compile only while all of them are unchanged.
_inputs: ContextVar[dict[str, None] | None] = ContextVar("scenec_inputs", default=None)


def note_input(path: str | Path) -> None:
    """Record that the running compile's result depends on ``path`` (its content, or its absence)."""
    seen = _inputs.get()
    if seen is not None:
        seen[os.path.abspath(path)] = None


@contextmanager
def recording_inputs():
    """Collect the paths :func:`note_input` sees inside the block (in first-seen order)."""
    seen: dict[str, None] = {}
    token = _inputs.set(seen)
    try:
        yield seen
    finally:
        _inputs.reset(token)


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write(path: str | Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename), with the usual file mode.

    ``durable=False`` skips the fsync, for caches whose readers reject a torn file anyway."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the mode any new file gets
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


BIG_FILE = 64 << 20  # model files: hashed once per process (a checkpoint is several GB)
_big_digests: dict[tuple, str] = {}


def sha256_big_file(path: str | Path) -> str:
    """:func:`sha256_file`, remembered per (path, size, mtime) for files of at least ``BIG_FILE`` bytes in this
    process: a build reads a multi-GB checkpoint's digest at compile and for each scene's compile memo, and
    hashes it once. Smaller files (scenes, images, edited in place under `scenec watch`) are hashed each time."""
    st = os.stat(path)
    if st.st_size < BIG_FILE:
        return sha256_file(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _big_digests:
        _big_digests[key] = sha256_file(path)
    return _big_digests[key]


def json_bytes(obj, **kw) -> bytes:
    """``obj`` as UTF-8 JSON. A file name that is not UTF-8 reaches Python as lone surrogates; each is
    written as its JSON escape (``\\udcXX``), which reads back as the same name."""
    return json.dumps(obj, ensure_ascii=False, **kw).encode("utf-8", "backslashreplace")


def set_aside(path: str | Path) -> Path | None:
    """Rename a damaged file to ``NAME.damaged-<UTC time>`` next to it (kept for inspection, never read
    again); the new name, or None when it could not be renamed."""
    from datetime import datetime, timezone

    path = Path(path)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    dest = path.with_name(f"{path.name}.damaged-{stamp}")
    try:
        os.replace(path, dest)
    except OSError:
        return None
    return dest


def keep_as_edited(img: str | Path) -> Path:
    """Move an image someone changed since it was built to ``NAME.edited.png`` (``NAME.edited-2.png``, … when taken)
    beside it, atomically: the build that remakes it loses nothing. The new path."""
    img = Path(img)
    k, dest = 1, img.with_name(img.stem + ".edited" + img.suffix)
    while dest.exists():
        k += 1
        dest = img.with_name(f"{img.stem}.edited-{k}{img.suffix}")
    os.replace(img, dest)
    return dest

