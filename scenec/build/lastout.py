"""Where the last ``scenec build -o DIR`` of each scene wrote, so that ``scenec status`` without ``-o``
compares against that build (as ``git status`` needs no arguments after a commit). Kept beside the compile
memos (``$SCENEC_CACHE``, default ``~/.cache/scenec``) as ``last-out.json``: scene file → output directory,
or no entry when the last build wrote to the scene's own ``output.dir``. Best effort: a file that cannot
be read or written is ignored."""

from __future__ import annotations

import os
from pathlib import Path

from scenec.spec.fsio import atomic_write, json_bytes

from .manifest import parse_json


def _path() -> Path:
    root = os.environ.get("SCENEC_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "scenec") / "last-out.json"


def _load() -> dict[str, str]:
    try:
        doc = parse_json(_path().read_bytes())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in doc.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(doc, dict) else {}


def remember(scenes: dict[Path, Path | None]) -> None:
    """Record each scene's output directory of this build (None: its own ``output.dir``)."""
    if not scenes:
        return
    doc = _load()
    for scene, out in scenes.items():
        key = str(Path(scene).resolve())
        if out is None:
            doc.pop(key, None)
        else:
            doc[key] = str(Path(os.path.abspath(out)))
    try:
        _path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write(_path(), json_bytes(doc, sort_keys=True), durable=False)
    except OSError:
        pass


def recall(scene: Path) -> Path | None:
    """The directory the last ``build -o`` of ``scene`` wrote to, if it still holds a manifest."""
    d = _load().get(str(Path(scene).resolve()))
    return Path(d) if d and (Path(d) / "scenec-manifest.json").is_file() else None
