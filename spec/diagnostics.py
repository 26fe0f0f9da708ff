"""Diagnostics: problems in scene files, as data.

Every problem carries the file, line and column where it was written (1-based), a severity and a
message, and prints as ``FILE:LINE:COL: error: MESSAGE``. Checks append to a ``Diagnostics`` list
instead of raising, so a user sees every problem at once.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator


@dataclass(frozen=True, order=True)
class Pos:
    """A source position: file, 1-based line and column."""

    file: str
    line: int = 1
    col: int = 1

    def __str__(self) -> str:
        if self.line == 0:  # not in a file: a command-line flag (spec/overrides.py)
            return self.file
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Diagnostic:
    pos: Pos
    message: str
    severity: str = "error"  # "error" | "warning"
    hint: str | None = None

    def format(self) -> str:
        text = f"{self.pos}: {self.severity}: {self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    def __str__(self) -> str:
        return self.format()


@dataclass
class Diagnostics:
    """An ordered collection of diagnostics.

    One error per source position: a value reached twice (a def used by two entities, an include
    read twice) would otherwise be reported once per path that reaches it.
    """

    items: list[Diagnostic] = field(default_factory=list)
    # what add() has seen, so a scene with thousands of problems is not checked pairwise
    _seen: set = field(default_factory=set, init=False, repr=False, compare=False)

    def add(self, pos: Pos, message: str, *, hint: str | None = None, severity: str = "error",
            distinct: bool = False) -> None:
        """One error per position (a union's branches report one value several times), unless ``distinct``:
        a mapping's missing keys are reported at the mapping, where its first key's own error may be."""
        key = (pos, severity) if severity == "error" and not distinct else (pos, severity, message)
        if key in self._seen:
            return
        self._seen.add(key)
        self.items.append(Diagnostic(pos, message, severity, hint))

    def error(self, pos: Pos, message: str, hint: str | None = None) -> None:
        self.add(pos, message, hint=hint)

    def warning(self, pos: Pos, message: str, hint: str | None = None) -> None:
        self.add(pos, message, hint=hint, severity="warning")

    def extend(self, other: Iterable[Diagnostic]) -> None:
        for d in other:
            self.add(d.pos, d.message, hint=d.hint, severity=d.severity)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.items if d.severity == "error"]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.items if d.severity == "warning"]

    def has_errors(self) -> bool:
        return any(d.severity == "error" for d in self.items)

    def sorted(self) -> list[Diagnostic]:
        return sorted(self.items, key=lambda d: (d.pos.file, d.pos.line, d.pos.col, d.message))

    def __iter__(self) -> Iterator[Diagnostic]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class SceneError(Exception):
    """Raised when a scene cannot go further; carries every diagnostic found so far."""

    def __init__(self, diagnostics: Diagnostics | Iterable[Diagnostic]):
        if not isinstance(diagnostics, Diagnostics):
            d = Diagnostics()
            d.extend(diagnostics)
            diagnostics = d
        self.diagnostics = diagnostics
        # a scene whose only problems are values that can be left out, with them left out: the semantic
        # checks still run on it, so one bad value does not hide the others (spec.load; compiler.check)
        self.partial = None
        super().__init__("\n".join(x.format() for x in diagnostics.sorted()))


def _spelling(word: str) -> str:
    """A choice as A1111's and ComfyUI's menus spell it, reduced: no case, spaces, brackets, `_` or `-` (`DPM++ 2M
    SDE Karras` and ComfyUI's `dpmpp_2m_sde`: `dpm++2msde…`; ComfyUI's `euler_ancestral`: `eulera`; A1111's
    `Latent (nearest-exact)`: `latentnearestexact`)."""
    w = re.sub(r"[\s_()-]+", "", word.lower()).replace("dpmpp", "dpm++")
    return w[:-len("ancestral")] + "a" if w.endswith("ancestral") else w


# choices of other tools that scenec does not offer yet (another tool's key names: spec/key_hints.py)
NOT_YET = ((re.compile(r"esrgan|^\d+x|ultrasharp|remacri|swinir|\bscunet"),
            "upscaling models (ESRGAN and the like) are not offered yet: `lanczos` enlarges the image, `latent` its "
            "latent"),)


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A hint naming the closest valid choice, or None: first the one spelt the same but for case, spaces, brackets
    and separators (:func:`_spelling`), then the closest by difflib; a choice scenec does not offer yet says so
    (:data:`NOT_YET`)."""
    choices = list(choices)
    spelt = _spelling(str(word))
    same = [c for c in choices if _spelling(c) == spelt]
    if same:
        return f"did you mean `{same[0]}`?"
    for pattern, hint in NOT_YET:
        if pattern.search(str(word).lower()) and "lanczos" in choices:
            return hint
    # above 0.6: at exactly 0.6 `colour` was "did you mean `lora`?" (3 letters of 10 in common, in order)
    match = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.61)
    return f"did you mean `{match[0]}`?" if match else None


def display_path(path: Path | str, base: Path | None = None) -> str:
    """The path as a user typed it when possible: relative to the working directory if inside it.

    Always printable text: bytes of a file name that are not UTF-8 are shown as ``\\xNN``."""
    p = Path(path)
    base = base or Path.cwd()
    try:
        return printable(str(p.resolve().relative_to(base.resolve())))
    except (ValueError, OSError):
        return printable(str(p))


def printable(name: str) -> str:
    """A file name as valid Unicode text: the bytes Python keeps as lone surrogates (a name that is not
    UTF-8, ``os.fsdecode``'s surrogateescape) become ``\\xNN``; any other text is returned as is."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
