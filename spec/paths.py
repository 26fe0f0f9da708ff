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


def not_found_hint(p: Path, value: str, base_dir: Path, root: Path) -> str:
    """``looked for P``, and where the file is when ``value`` was written from the project root or a directory
    between it and ``base_dir`` (a scene in scenes/ naming `loras/x.safetensors`): the path to write instead."""
    import os

    hint = f"looked for {p}"
    base, root = base_dir.resolve(), root.resolve()
    for d in base.parents:
        if d != root and root not in d.parents:
            break
        q = d / value
        if q.exists():
            rel = Path(os.path.relpath(q, base)).as_posix()
            return (f"{hint}; did you mean `{rel}`? (a path is relative to the file that names it, not to the project "
                    "root)")
    return hint


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


PROJECT_KEYS = ("default_model", "prompt_syntax", "weights_hash")  # the keys of the `[project]` table


class ProjectFileError(ValueError):
    """scenec.toml cannot be read; ``line``/``col`` where (TOML's parser names them only in its message)."""

    def __init__(self, message: str, line: int = 1, col: int = 1):
        super().__init__(message)
        self.line, self.col = line, col


def project_key_line(root: Path, key: str, table: str | None = "project") -> int:
    """The line of scenec.toml that sets ``key`` inside ``[table]`` (with ``table`` None: the header ``[key]``
    or a top-level ``key = …``), else 1: TOML parsers keep no positions."""
    import re

    try:
        lines = (root / PROJECT_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return 1
    current = None
    for i, t in enumerate(lines, 1):
        head = re.match(r"\s*\[+\s*([^\]]*?)\s*\]", t)
        if head:
            current = head.group(1)
            if table is None and current == key:
                return i
        elif current == table and re.match(rf"\s*{re.escape(key)}\s*=", t):
            return i
    return 1


def project_problems(root: Path) -> list[tuple[int, str, str | None]]:
    """(line, message, hint) for each table or key scenec.toml has that scenec does not know: strict, as scene
    keys are, so `default_modle = "tiny"` is not silently a project without a default model."""
    from .diagnostics import did_you_mean

    try:
        data = _read_toml(root)
    except ProjectFileError:
        return []  # project_config reports it
    out = []
    for key, val in data.items():
        if key != "project":
            kind = "table" if isinstance(val, dict) else "key"
            hint = ("write it under `[project]`" if key in PROJECT_KEYS else did_you_mean(key, ["project"])
                    or f"{PROJECT_FILE} has one table, `[project]`")
            out.append((project_key_line(root, key, None), f"unknown {kind} `{key}` in {PROJECT_FILE}", hint))
    proj = data.get("project")
    for key in proj if isinstance(proj, dict) else ():
        if key not in PROJECT_KEYS:
            out.append((project_key_line(root, key), f"unknown key `{key}` in `[project]`",
                        did_you_mean(key, PROJECT_KEYS) or f"allowed here: {', '.join(PROJECT_KEYS)}"))
    return out


def _read_toml(root: Path) -> dict:
    import re
    import tomllib

    f = root / PROJECT_FILE
    if not f.is_file():
        return {}
    try:
        return tomllib.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ProjectFileError(f"invalid {PROJECT_FILE}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        at = re.search(r"\s*\(at line (\d+), column (\d+)\)", str(e))
        msg = str(e).replace(at.group(0), "") if at else str(e)
        raise ProjectFileError(f"invalid {PROJECT_FILE}: {msg}", *(map(int, at.groups()) if at else ())) from None


def project_config(root: Path) -> dict:
    """The `[project]` table of the root's scenec.toml ({} when absent); ProjectFileError when invalid."""
    proj = _read_toml(root).get("project", {})
    if not isinstance(proj, dict):
        line = project_key_line(root, "project", None)
        raise ProjectFileError(f"invalid {PROJECT_FILE}: `project` must be a table", line)
    return proj
