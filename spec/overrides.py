"""Command-line overrides of a scene: ``--seed``, ``--steps``, ``--guidance`` and ``--set key.path=value``.

An override replaces one value of the scene document after includes and ``use`` are applied and before
the document is validated, so it is checked against the schema like a value written in the file; a
problem with it is reported at the flag (``--set sampler.steps=abc: error: ...``), not in the file.
Paths are dotted keys; a list element is named by its index or by its ``id``
(``entities.fox.prompt``, ``groups.animals.variants.0.prompt``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import yaml

from .diagnostics import Diagnostics, Pos
from .models_shapes import SHAPE_KINDS

MAX_SEEDS = 10_000


class OverrideError(ValueError):
    """A flag that cannot be read at all (``--seed x``, ``--set nokey``); exit 2."""


@dataclass(frozen=True)
class Override:
    """Replace the value at ``path`` with ``value``; ``flag`` is how the user wrote it."""

    path: tuple[str, ...]
    value: Any
    flag: str

    @property
    def pos(self) -> Pos:
        """Where diagnostics about this override point: the flag itself (line 0: no line)."""
        return Pos(self.flag, 0, 0)


def parse_value(text: str) -> Any:
    """A ``--set`` value as YAML (``4`` an integer, ``[1, 2]`` a list, ``null``), except that text which
    is not written as a flow list or mapping stays text: ``a cat: sitting`` is a prompt, not a mapping.
    An empty value is the empty string."""
    s = text.strip()
    if not s:
        return ""
    try:
        v = yaml.safe_load(s)
    except yaml.YAMLError:
        return text
    if isinstance(v, dict) and not s.startswith("{") or isinstance(v, list) and not s.startswith("["):
        return text
    return v


def parse_set(text: str) -> Override:
    """``key.path=value`` → Override; raises OverrideError."""
    flag = f"--set {text}"
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise OverrideError(f"{flag}: write --set KEY.PATH=VALUE (e.g. --set sampler.steps=8)")
    parts = tuple(key.split("."))
    if any(not p for p in parts):
        raise OverrideError(f"{flag}: `{key}` has an empty part")
    return Override(parts, parse_value(raw), flag)


def parse_seeds(text: str) -> int | list[int]:
    """``N``, ``A..B`` (inclusive, as a shell's ``{A..B}``) or ``A,B,C``; raises OverrideError."""
    s = text.strip()
    try:
        if ".." in s:
            a, _, b = s.partition("..")
            lo, hi = int(a), int(b)
            if hi < lo:
                raise OverrideError(f"--seed {text}: the range ends before it starts")
            if hi - lo + 1 > MAX_SEEDS:
                raise OverrideError(f"--seed {text}: {hi - lo + 1} seeds, over the limit of {MAX_SEEDS}")
            seeds: int | list[int] = list(range(lo, hi + 1))
        elif "," in s:
            seeds = [int(x) for x in s.split(",")]
            if len(seeds) > MAX_SEEDS:
                raise OverrideError(f"--seed {text}: {len(seeds)} seeds, over the limit of {MAX_SEEDS}")
        else:
            seeds = int(s)
    except OverrideError:
        raise  # its own message (a reversed or too long range), not the generic one below
    except ValueError:
        raise OverrideError(f"--seed {text}: expected N, A..B or A,B,C (non-negative integers)") from None
    if any(x < 0 for x in (seeds if isinstance(seeds, list) else [seeds])):
        raise OverrideError(f"--seed {text}: seeds are non-negative integers")
    return seeds


def from_flags(seed: str | None = None, steps: str | None = None, guidance: str | None = None,
               sets: Iterable[str] = ()) -> tuple[Override, ...]:
    """The overrides of the command line, in the order they apply (``--set`` last); raises OverrideError."""
    out = []
    if seed is not None:
        out.append(Override(("sampler", "seed"), parse_seeds(seed), f"--seed {seed}"))
    if steps is not None:
        out.append(Override(("sampler", "steps"), parse_value(steps), f"--steps {steps}"))
    if guidance is not None:
        out.append(Override(("sampler", "guidance"), parse_value(guidance), f"--guidance {guidance}"))
    out += [parse_set(s) for s in sets or ()]
    return tuple(out)


def apply_overrides(data: Any, smap, overrides: Iterable[Override], diags: Diagnostics, scene: str = "") -> None:
    """Write each override into the scene document ``data`` and point ``smap`` at its flag; a path that
    leads nowhere (an unknown id, an index out of range, into a scalar) is an error at the flag."""
    if not isinstance(data, dict):
        return
    for o in overrides:
        path = o.path
        if path == ("sampler", "seed") and isinstance(data.get("matrix"), dict) and "seed" in data["matrix"]:
            path = ("matrix", "seed")  # a matrix's seeds replace sampler.seed: --seed replaces them
            value = o.value if isinstance(o.value, list) else [o.value]
        else:
            value = o.value
        resolved = _walk(data, path, o, diags, scene)
        if resolved is None:
            continue
        parent, key, real = resolved
        gone = [real]
        if key in SHAPE_KINDS and "shape" in real[:-1] and isinstance(parent, dict):
            # a shape has one kind: `--set entities.0.shape.box=[…]` on an ellipse makes it a box
            gone += [real[:-1] + (k,) for k in SHAPE_KINDS if k != key and parent.pop(k, None) is not None]
        parent[key] = value
        for table in (smap.values, smap.keys):
            for p in [p for p in table if any(p[:len(g)] == g for g in gone)]:
                del table[p]
        _point(smap, real, value, o.pos)
        smap.keys[real] = o.pos


def _walk(data: dict, path: tuple[str, ...], o: Override, diags: Diagnostics, scene: str):
    """(container, key, real path) of the value ``path`` names; missing mappings are created."""
    cur: Any = data
    real: list = []
    where = f" in {scene}" if scene else ""
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(cur, dict):
            key: Any = part
            if last:
                return cur, key, tuple(real + [key])
            if key not in cur or cur[key] is None:
                cur[key] = {}
        elif isinstance(cur, list):
            if part.lstrip("-").isdigit():
                key = int(part)
                if not -len(cur) <= key < len(cur):
                    diags.error(o.pos, f"`{'.'.join(path[:i + 1])}`: no element {key}{where} "
                                       f"({len(cur)} element{'s' if len(cur) != 1 else ''})")
                    return None
                key %= len(cur)
            else:
                ids = [x.get("id") for x in cur if isinstance(x, dict)]
                if part not in ids:
                    listed = ", ".join(str(x) for x in ids if x is not None) or "none"
                    diags.error(o.pos, f"`{'.'.join(path[:i + 1])}`: no element with id `{part}`{where}",
                                hint=f"ids here: {listed}")
                    return None
                key = ids.index(part)
            if last:
                return cur, key, tuple(real + [key])
        else:
            # `model: tiny` and `--set model.vae=…`: a model's options need its mapping form
            hint = f"set it whole: --set '{path[0]}={{id: {cur}, {path[1]}: {o.flag.partition('=')[2]}}}'" \
                if i == 1 and path[0] == "model" and isinstance(cur, str) and len(path) == 2 else None
            diags.error(o.pos, f"`{'.'.join(path[:i])}` is not a mapping or a list{where}; "
                               f"`{'.'.join(path)}` cannot be set", hint=hint)
            return None
        real.append(key)
        cur = cur[key]
    return None


def _point(smap, path: tuple, value: Any, pos: Pos) -> None:
    smap.values[path] = pos
    if isinstance(value, dict):
        for k, v in value.items():
            smap.keys[path + (k,)] = pos
            _point(smap, path + (k,), v, pos)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _point(smap, path + (i,), v, pos)
