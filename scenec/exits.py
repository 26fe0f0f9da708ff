"""How the command line ends: exit statuses and the one line each kind of failure prints.

0 success, 1 a build failed, 2 invalid input (a scene, or an argument: a path that cannot be used as
asked). Never a traceback, unless SCENEC_DEBUG=1 for an internal error.
"""

from __future__ import annotations

import os
import sys

import typer

EXIT_OK, EXIT_BUILD_FAILED, EXIT_INVALID = 0, 1, 2


def print_diags(diags, stream=None) -> None:
    stream = stream or sys.stderr
    for d in diags.sorted() if hasattr(diags, "sorted") else diags:
        print(d.format(), file=stream)


def fail_invalid(err) -> None:
    """Every problem of a SceneError at FILE:LINE:COL, their count, exit 2."""
    print_diags(err.diagnostics)
    n = len(err.diagnostics.errors)
    print(f"{n} error{'s' if n != 1 else ''}", file=sys.stderr)
    raise typer.Exit(EXIT_INVALID)


def internal(e: BaseException) -> None:
    if os.environ.get("SCENEC_DEBUG"):
        raise e
    print(f"scenec: internal error: {type(e).__name__}: {e} (set SCENEC_DEBUG=1 for a traceback)", file=sys.stderr)
    raise typer.Exit(EXIT_BUILD_FAILED)


def path_error(e: OSError, what: str = "", code: int = EXIT_INVALID) -> None:
    """An environment error in one line, naming the path and the cause (``-o out.png: Is a directory``)."""
    from scenec.spec.diagnostics import printable

    where = what or (printable(str(e.filename)) if e.filename else "")
    why = e.strerror or str(e)
    if isinstance(e, FileExistsError):  # mkdir(parents=True) through a file: "File exists" says nothing useful
        why = "exists and is not a directory"
    print(f"scenec: {where + ': ' if where else ''}{why}", file=sys.stderr)
    raise typer.Exit(code)


def bad_path(path, why: str, code: int = EXIT_INVALID) -> None:
    """A path argument that cannot be used as asked (``-o plans: exists and is not a directory``)."""
    from scenec.spec.diagnostics import printable

    print(f"scenec: {printable(str(path))}: {why}", file=sys.stderr)
    raise typer.Exit(code)
