"""A rich progress bar on stderr when it is a terminal; otherwise none, so that logs stay clean."""

from __future__ import annotations

import sys


def progress_bar(remaining: bool = True):
    """A transient ``rich.progress.Progress`` (description, bar, done/total, and the time remaining, or
    the time elapsed with ``remaining=False``), or None when stderr is not a terminal."""
    if not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    clock = TimeRemainingColumn() if remaining else TimeElapsedColumn()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), clock,
                    console=Console(stderr=True), transient=True)
