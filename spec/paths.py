"""Project roots and path resolution for files that scenes name.

Paths are relative to the file that names them and must resolve inside the project root (the
nearest ancestor holding ``scenec.toml``, else the scene file's own directory). Symlinks are
followed before the check, so a link pointing out of the root is refused too.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

PROJECT_FILE = "scenec.toml"


def find_project_root(scene_file: Path) -> Path:
    from .fsio import note_input

    start = scene_file.resolve().parent
    for d in (start, *start.parents):
        note_input(d / PROJECT_FILE)  # found or not: creating one nearer would change the root
        if (d / PROJECT_FILE).is_file():
            return d
    return start


class PathProblem(ValueError):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


def resolve_inside(value: str, base_dir: Path, root: Path) -> Path:
    """Resolve ``value`` against ``base_dir``; raise PathProblem if it leaves ``root``."""
    if "\x00" in value:
        raise PathProblem("path contains a NUL byte")
    if PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute() or PureWindowsPath(value).drive:
        raise PathProblem(f"absolute path `{value}` is not allowed",
                          hint="write paths relative to the file that names them")
    try:
        resolved = (base_dir / value).resolve()
    except (OSError, RuntimeError) as e:  # symlink loops
        raise PathProblem(f"cannot resolve `{value}`: {e}") from None
    root = root.resolve()
    if resolved != root and root not in resolved.parents:
        what = "is a symlink that leads" if _has_symlink(base_dir / value, root) else "resolves"
        raise PathProblem(f"`{value}` {what} outside the project root {root}",
                          hint=f"keep files inside the project (the directory holding {PROJECT_FILE})")
    return resolved


def _has_symlink(p: Path, root: Path) -> bool:
    try:
        cur = p
        for _ in range(64):
            if cur.is_symlink():
                return True
            if cur == cur.parent:
                return False
            cur = cur.parent
    except OSError:
        return False
    return False


def project_config(root: Path) -> dict:
    """The `[project]` table of the root's scenec.toml ({} when absent); ValueError when invalid."""
    import tomllib

    f = root / PROJECT_FILE
    if not f.is_file():
        return {}
    try:
        data = tomllib.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"invalid {PROJECT_FILE}: {e}") from None
    proj = data.get("project", {})
    if not isinstance(proj, dict):
        raise ValueError(f"invalid {PROJECT_FILE}: `project` must be a table")
    return proj
