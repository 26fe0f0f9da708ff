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


class BuildProgress:
    """``scenec build``'s live display on a terminal (rich): a spinner while a model loads, then a bar per
    image being made (its steps, steps/s and time left) under a bar of the images; each finished image
    leaves one line above them. Lines printed meanwhile go through :meth:`print`, above the bars."""

    def __init__(self, total: int):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task):
                if not task.fields.get("steps"):
                    return Text("")
                rate = f"{task.speed:5.2f} steps/s" if task.speed else "  –   steps/s"
                return Text(rate, style="progress.data.speed")

        self.console = Console(stderr=True, highlight=False)
        self.bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             Rate(), TextColumn("eta"), TimeRemainingColumn(), TimeElapsedColumn(),
                             console=self.console, transient=True)
        self.images = self.bars.add_task("images", total=total)
        self.image = None
        self.bars.start()

    def print(self, msg: str) -> None:
        self.console.print(msg, markup=False, highlight=False, soft_wrap=True)

    def loading(self, model: str):
        """A context: the spinner line while ``model`` loads."""
        from contextlib import contextmanager

        @contextmanager
        def ctx():
            t = self.bars.add_task(f"loading model {model}", total=None)
            try:
                yield
            finally:
                self.bars.remove_task(t)

        return ctx()

    def step(self, done: int, total: int, name: str) -> None:
        """Sampling ops ``done`` of ``total`` in the unit now running; ``name``: the image they make."""
        if self.image is None:
            self.image = self.bars.add_task(name, total=total, steps=True)
        self.bars.update(self.image, completed=done, total=total, description=name)

    def unit_done(self, images: int) -> None:
        if self.image is not None:
            self.bars.remove_task(self.image)
            self.image = None
        self.bars.advance(self.images, images)

    def stop(self) -> None:
        self.bars.stop()


def build_progress(total: int, enabled: bool = True) -> BuildProgress | None:
    """A :class:`BuildProgress` when stderr is a terminal (and ``enabled``); else None: logs stay clean."""
    if not enabled or total <= 0 or not sys.stderr.isatty():
        return None
    return BuildProgress(total)
