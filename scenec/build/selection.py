"""Selection: ``--select`` / ``--exclude`` terms and what they match (docs/batch.md, "Selection").

Whitespace (and repeated options) make a union, a comma an intersection; patterns are shell globs.
A job is matched through its :attr:`~scenec.build.planning.Item.info`: scene name, file, group,
variant, seed, matrix values and its image's name (as ``build`` and ``status`` print it).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .discovery import SCENE_SUFFIXES
from .options import BatchError

METHODS = ("scene", "path", "group", "seed", "matrix")


@dataclass(frozen=True)
class Selector:
    """One ``--select`` term: the intersection of its comma-separated parts."""

    text: str
    parts: tuple[tuple[str, str], ...]  # (method, pattern)

    def matches(self, job: dict) -> bool:
        return all(_match_part(m, p, job) for m, p in self.parts)


def parse_selectors(exprs: Iterable[str] | None) -> list[Selector]:
    """Parse ``--select``/``--exclude`` values: whitespace separates a union, commas an intersection.

    Terms: ``NAME`` (scene name or group id, glob), ``GROUP/VARIANT`` (globs), ``scene:GLOB``,
    ``group:GLOB[/GLOB]``, ``path:GLOB`` (scene file), ``seed:N``, ``KEY=GLOB`` (a matrix value),
    and a path ending in ``.yaml``/``.yml``. See docs/batch.md.
    """
    out = []
    for e in exprs or ():
        for term in str(e).split():
            parts = []
            for raw in term.split(","):
                if not raw:
                    raise BatchError(f"--select `{term}`: empty part (commas join terms that must all match)")
                parts.append(_parse_part(raw, term))
            out.append(Selector(term, tuple(parts)))
    return out


def _parse_part(raw: str, term: str) -> tuple[str, str]:
    if ":" in raw:
        method, _, pat = raw.partition(":")
        if method not in METHODS:
            raise BatchError(f"--select `{term}`: unknown method `{method}:`; methods: "
                             + ", ".join(m + ":" for m in METHODS))
        if not pat:
            raise BatchError(f"--select `{term}`: `{method}:` needs a pattern")
        if method == "seed" and not pat.isdigit():
            raise BatchError(f"--select `{term}`: `seed:` takes an integer")
        if method == "matrix" and "=" not in pat:
            raise BatchError(f"--select `{term}`: write `matrix:KEY=VALUE` or `KEY=VALUE`")
        return method, pat
    if "=" in raw:
        return "matrix", raw
    if raw.lower().endswith(SCENE_SUFFIXES):
        return "path", raw
    if "/" in raw:
        return "variant", raw
    return "name", raw


def _glob(pat: str, value: Any) -> bool:
    return value is not None and fnmatch.fnmatchcase(str(value), pat)


def _match_part(method: str, pat: str, job: dict) -> bool:
    if method == "scene":
        return _glob(pat, job["scene"])
    if method == "name":
        return _glob(pat, job["scene"]) or _glob(pat, job.get("group")) or _glob(pat, job.get("variant")) \
            or _glob(pat, job.get("name"))
    if method in ("group", "variant") and "/" in pat:  # a `variant` term always has its slash
        g, _, v = pat.partition("/")
        return _glob(g, job.get("group")) and _glob(v, job.get("variant"))
    if method == "group":
        return _glob(pat, job.get("group"))
    if method == "seed":
        return int(pat) == job.get("seed")
    if method == "path":
        f = job["file"]
        pat = pat.rstrip("/")
        return fnmatch.fnmatchcase(f, pat) or f.startswith(pat + "/") or fnmatch.fnmatchcase(Path(f).name, pat)
    if method == "matrix":
        k, _, v = pat.partition("=")
        vals = dict(job.get("matrix") or {})
        vals.setdefault("seed", job.get("seed"))
        if k not in vals:
            return False
        from scenec.compiler.matrix import slug

        return _glob(v, vals[k]) or _glob(v, slug(vals[k]))
    raise AssertionError(method)


def selected(job: dict, select: list[Selector], exclude: list[Selector]) -> bool:
    if select and not any(s.matches(job) for s in select):
        return False
    return not any(s.matches(job) for s in exclude)


def unmatched(select: list[Selector], jobs: list[dict]) -> list[Selector]:
    """The ``--select`` terms that match no job."""
    return [s for s in select if not any(s.matches(j) for j in jobs)]


def candidates(jobs: list[dict], limit: int = 12) -> str:
    """What a selection could have named (as git lists what a pathspec could match): scene names, groups,
    GROUP/VARIANT, seeds, matrix values and image names."""
    def listed(values) -> str:
        vals = list(dict.fromkeys(str(v) for v in values if v is not None))
        return ", ".join(vals[:limit]) + (f", … ({len(vals) - limit} more)" if len(vals) > limit else "")

    parts = [f"scenes: {listed(j['scene'] for j in jobs)}"]
    grouped = [j for j in jobs if j.get("group")]
    if grouped:
        parts.append(f"groups: {listed(j['group'] for j in grouped)}")
        parts.append("variants: " + listed(f"{j['group']}/{j.get('variant')}" for j in grouped))
    parts.append(f"seeds: {listed(sorted({j['seed'] for j in jobs if j.get('seed') is not None}))}")
    matrix = [(k, v) for j in jobs for k, v in (j.get("matrix") or {}).items()]
    if matrix:  # as KEY=VALUE selects them on a command line: a value with spaces by its slug
        from scenec.compiler.matrix import slug

        parts.append("matrix: " + listed(f"{k}={slug(v)}" for k, v in matrix))
    if any(j.get("name") for j in jobs):
        parts.append("images: " + listed(j.get("name") for j in jobs))
    return "; ".join(parts)
