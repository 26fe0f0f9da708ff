"""Finding scenes: ``DIR | GLOB | FILE`` arguments → scene files (docs/batch.md, "Finding scenes").

A YAML file is a scene when it has ``scenec:`` and ``canvas:`` at top level; library files (``defs:``,
no canvas) and other YAML are skipped (one that looks like a scene missing one of them, with a warning
saying so), but a file named explicitly is always taken, so that an invalid one is reported rather
than skipped.
"""

from __future__ import annotations

import glob as globmod
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

SCENE_SUFFIXES = (".yaml", ".yml")
SKIP_DIRS = {"node_modules", "__pycache__", "site-packages"}
_GLOB_CHARS = re.compile(r"[*?\[]")
_TOP_KEY = re.compile(r"^(scenec|canvas)\s*:", re.MULTILINE)
# top-level keys only scenes have: a YAML file with some of them but not `scenec:` + `canvas:` looks like
# a scene that is missing one, and is named when skipped
_SCENE_KEY = re.compile(r"^(scenec|canvas|background|entities|groups|sampler)\s*:", re.MULTILINE)


def is_scene_file(path: Path) -> bool:
    """A scene has top-level ``scenec:`` and ``canvas:`` keys; a library (defs only) has no canvas.

    A cheap textual test (block style at column 0, or a flow mapping ``{scenec: 1, canvas: …}``), so
    that a broken scene is still found and reported rather than skipped.
    """
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20).decode("utf-8-sig", "replace")  # a BOM is no key
    except OSError:
        return False
    found = set(_TOP_KEY.findall(text))
    if found == {"scenec", "canvas"}:
        return True
    body = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")).lstrip()
    return body.startswith("{") and re.search(r"[{,]\s*scenec\s*:", body) is not None \
        and re.search(r"[{,]\s*canvas\s*:", body) is not None


def is_library_file(path: Path) -> bool:
    """A library: top-level ``scenec:`` and ``defs:``, no ``canvas:`` (``scenec validate`` checks it as one)."""
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20).decode("utf-8-sig", "replace")  # a BOM is no key
    except OSError:
        return False
    keys = set(re.findall(r"^(scenec|canvas|defs)\s*:", text, re.MULTILINE))
    return keys == {"scenec", "defs"}


def skip_reason(path: Path) -> str | None:
    """Why a YAML file that is not a scene but looks like one (scene keys at top level, not a library)
    is skipped; None for a library or YAML that is no scene at all."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):  # UTF-16's byte order mark (Windows Notepad's "Unicode")
        return "is UTF-16 text (save it as UTF-8)"
    text = raw.decode("utf-8-sig", "replace")  # a BOM is no key
    found = set(_SCENE_KEY.findall(text))
    if not found or re.search(r"^defs\s*:", text, re.MULTILINE) and "canvas" not in found:
        return None
    if "scenec" not in found:
        return "has scene keys but no top-level `scenec: 1` (a scene needs it)"
    if "canvas" not in found:
        return "has `scenec:` but no top-level `canvas:` (a scene needs one; a library has `defs:`)"
    return None


def _walk(d: Path, skipped: list | None = None, libraries: bool = False) -> Iterator[Path]:
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x not in SKIP_DIRS)
        for f in sorted(files):
            if f.lower().endswith(SCENE_SUFFIXES) and not f.startswith("."):  # SCENE.YAML too
                p = Path(root) / f
                if is_scene_file(p) or libraries and is_library_file(p):
                    yield p
                elif skipped is not None and (why := skip_reason(p)) is not None:
                    skipped.append((p, why))


def discover(targets: Iterable[str | Path], libraries: bool = False) -> tuple[list[Path], list]:
    """Scene files named by ``DIR | GLOB | FILE`` arguments, in order, each once; and diagnostics.

    A directory is searched recursively for ``*.yaml`` / ``*.yml`` scenes (hidden directories
    skipped); a glob (``scenes/**/*.yaml``) likewise keeps only scenes; a file named explicitly is
    always taken (so that an invalid one is reported). A target that matches nothing is an error.
    ``libraries``: library files too (``scenec validate``).
    """
    from scenec.spec.diagnostics import Diagnostic, Pos, display_path

    found: dict[Path, Path] = {}
    problems = []
    skipped: list[tuple[Path, str]] = []

    def add(p: Path) -> None:
        found.setdefault(p.resolve(), p)

    for t in targets:
        s = str(t)
        p = Path(s)
        if p.is_dir():
            n = len(found)
            for f in _walk(p, skipped, libraries):
                add(f)
            if len(found) == n:
                problems.append(Diagnostic(Pos(s), "no scene files here (a scene has top-level `scenec:` and "
                                                   "`canvas:`)", "warning"))
        elif p.is_file():
            add(p)
        elif _GLOB_CHARS.search(s):
            n = len(found)
            for m in sorted(globmod.glob(s, recursive=True)):
                mp = Path(m)
                if mp.is_dir():
                    for f in _walk(mp, skipped, libraries):
                        add(f)
                elif mp.suffix.lower() in SCENE_SUFFIXES and (is_scene_file(mp) or libraries and is_library_file(mp)):
                    add(mp)
            if len(found) == n:
                problems.append(Diagnostic(Pos(s), "the pattern matches no scene file", "warning"))
        else:
            problems.append(Diagnostic(Pos(s), "no such file or directory"))
    for p, why in skipped:
        if p.resolve() not in found:
            problems.append(Diagnostic(Pos(display_path(p)), f"skipped: {why}", "warning"))
    return list(found.values()), problems
