"""How the command line ends: exit statuses and the one line each kind of failure prints.

0 success, 1 a build failed, 2 invalid input (a scene, or an argument: a path that cannot be used as
asked). Never a traceback, unless SCENEC_DEBUG=1 for an internal error.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

import typer

EXIT_OK, EXIT_BUILD_FAILED, EXIT_INVALID = 0, 1, 2


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, a CI runner cancelling a job, ``docker stop``), raised wherever the program is,
    as Ctrl-C raises KeyboardInterrupt: a file being written is dropped with its temp file
    (``spec.fsio.atomic_write``), locks are released, and the command ends with its summary (exit 143)."""


@contextmanager
def sigterm_raises():
    """Within: SIGTERM raises :class:`Terminated` (once; a second SIGTERM kills at once). Yields an Event
    set on SIGTERM: a library that turns the exception into KeyboardInterrupt (Ray's waits do) cannot hide
    it. Only in the main thread, and not where SIGTERM was ignored when the program started."""
    got = threading.Event()
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield got
        return

    def on_term(signum, frame):
        got.set()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, previous)


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
