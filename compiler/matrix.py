"""`matrix:` — one scene, many jobs: the product of named value lists.

```yaml
matrix: {seed: [1, 2], style: ["oil painting", "watercolor"]}
background: {prompt: "a harbour at dusk, {style}"}
output: {name: "{scene}-{style}-{seed}"}
```

Rules (docs/language.md, "matrix"):

- Keys are ``[a-z_][a-z0-9_]*``; ``scene``, ``group``, ``variant`` and ``index`` are reserved (they
  are output-name placeholders already). ``seed`` is allowed and replaces ``sampler.seed``.
- Each value list is non-empty, without duplicates; values are strings, integers or numbers.
- Jobs: for every image the scene makes without a matrix (one per seed, or per (group, variant,
  seed)), one per combination, in the order the keys are written (the last key varies fastest);
  without a ``seed`` key the seeds of ``sampler.seed`` are the last, fastest dimension.
- ``{key}`` in any prompt or negative (background, entities, variants) is replaced by the value;
  ``{{`` and ``}}`` write literal braces. Without a matrix prompts are taken literally.
- In ``output.name`` ``{key}`` is the value slugified (lowercase, runs of other characters than
  ``a-z0-9._`` become ``-``). When the scene does not set ``output.name``, the default gains every
  non-seed key: ``{scene}-{group}-{variant}-{k1}-{k2}-{seed}``.

numpy-free and torch-free: used by the check pass and by ``p_expand``.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, Iterator

from scenec.spec import models as m
from scenec.spec.diagnostics import Diagnostics, did_you_mean

from .files import pos_in_string

RESERVED = ("scene", "group", "variant", "index")
MAX_JOBS = 4096  # per scene, after expansion
_FIELD_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def keys(sc: m.Scene) -> list[str]:
    return list(sc.matrix)


def combinations(sc: m.Scene) -> list[dict[str, Any]]:
    """Every combination of matrix values, seed included (from ``sampler.seed`` when not a key)."""
    names = list(sc.matrix)
    lists = [list(sc.matrix[k]) for k in names]
    if "seed" not in sc.matrix:
        seeds = sc.sampler.seed if isinstance(sc.sampler.seed, list) else [sc.sampler.seed]
        names.append("seed")
        lists.append(list(dict.fromkeys(seeds)) if sc.matrix else list(seeds))
    return [dict(zip(names, combo)) for combo in itertools.product(*lists)]


def slug(value: Any) -> str:
    """A matrix value as it appears in a file name."""
    s = re.sub(r"[^a-z0-9._]+", "-", str(value).lower()).strip("-.")
    return s or "_"


def output_template(sc: m.Scene) -> str:
    """``output.name``, or the default extended with the matrix keys when the scene does not set it."""
    if "name" in sc.output.model_fields_set or not sc.matrix:
        return sc.output.name
    extra = "".join("-{%s}" % k for k in sc.matrix if k != "seed")
    return "{scene}-{group}-{variant}" + extra + "-{seed}"


def name_values(combo: dict[str, Any]) -> dict[str, Any]:
    """Output-name placeholder values of one combination (matrix values slugified, seed as is)."""
    return {k: (v if k == "seed" else slug(v)) for k, v in combo.items()}


def fill(text: str, combo: dict[str, Any], active: bool) -> str:
    """``text`` with ``{key}`` replaced by the combination's values; unchanged when ``active`` is false."""
    if not active or ("{" not in text and "}" not in text):
        return text

    def sub(mt: re.Match) -> str:
        tok = mt.group(0)
        if tok == "{{":
            return "{"
        if tok == "}}":
            return "}"
        key = mt.group(1)
        if key is None or key not in combo:  # the check pass reports these; keep the text as written
            return tok
        v = combo[key]
        return format(v, "g") if isinstance(v, float) else str(v)

    return _FIELD_RE.sub(sub, text)


def text_fields(sc: m.Scene) -> Iterator[tuple[tuple, str]]:
    """(path, text) of every prompt and negative a matrix may fill."""
    for k in ("prompt", "negative"):
        yield ("background", k), getattr(sc.background, k)
    for i, e in enumerate(sc.entities):
        for k in ("prompt", "negative"):
            v = getattr(e, k)
            if v is not None:
                yield ("entities", i, k), v
    for gi, g in enumerate(sc.groups):
        for vi, v in enumerate(g.variants):
            for k in ("prompt", "negative"):
                t = getattr(v, k)
                if t is not None:
                    yield ("groups", gi, "variants", vi, k), t


def check_matrix(ls, diags: Diagnostics) -> None:
    """Semantic checks of `matrix` and of the `{placeholders}` in prompts (called by the check pass)."""
    sc = ls.scene
    mx = sc.matrix
    for k, values in mx.items():
        if k in RESERVED:
            diags.error(ls.key_pos(("matrix", k)), f"matrix key `{k}` is reserved (an output-name placeholder)",
                        hint="reserved: " + ", ".join(RESERVED) + "; `seed` is allowed and replaces sampler.seed")
        seen: dict[Any, int] = {}
        for i, v in enumerate(values):
            pos = ls.pos(("matrix", k, i))
            if k == "seed" and (not isinstance(v, int) or not 0 <= v <= 2**63 - 1):
                diags.error(pos, f"matrix seed {v!r} is not an integer in 0 … 2^63−1")
            key = (type(v) is str, v)
            if key in seen:
                diags.error(pos, f"matrix value {v!r} of `{k}` is listed twice (first as item {seen[key] + 1})",
                            hint="each value makes its own images; the same value makes the same images")
            else:
                seen[key] = i
    if "seed" in mx and "seed" in sc.sampler.model_fields_set:
        diags.warning(ls.pos(("sampler", "seed")), "`sampler.seed` is ignored: `matrix.seed` replaces it")
    n_images = _images_without_matrix(sc)
    n = n_images
    for k, values in mx.items():
        n *= len(values)
    if "seed" not in mx and mx:
        n *= len(sc.sampler.seed) if isinstance(sc.sampler.seed, list) else 1
    if n > MAX_JOBS:
        diags.error(ls.key_pos(("matrix",)), f"the matrix makes {n} images; the limit is {MAX_JOBS} per scene",
                    hint="split the scene, or select fewer values")
    used: set[str] = set()
    for path, text in text_fields(sc):
        for off, key, problem in placeholders(text):
            if problem == "unbalanced":
                if mx:
                    diags.error(pos_in_string(ls, path, text, off), "unbalanced `{` or `}` in a prompt of a scene "
                                "with a `matrix`", hint="write `{{` and `}}` for literal braces")
                continue
            used.add(key)
            if not mx:
                diags.warning(pos_in_string(ls, path, text, off),
                              f"`{{{key}}}` is written literally: the scene has no `matrix`")
            elif key not in mx and key != "seed":
                diags.error(pos_in_string(ls, path, text, off), f"unknown placeholder `{{{key}}}` in a prompt",
                            hint=did_you_mean(key, list(mx)) or
                            ("matrix keys: " + ", ".join("{%s}" % k for k in mx)))
    for k in mx:  # in output.name only (the default name holds every key), its values still make identical images
        if k != "seed" and k not in used and k not in RESERVED:
            diags.warning(ls.key_pos(("matrix", k)), f"matrix key `{k}` appears in no prompt: its values make "
                          "identical images", hint="use `{%s}` in a prompt or negative; a matrix varies prompts and "
                          "`seed` only, not sampler settings such as `guidance` or `steps`" % k)


def placeholders(text: str) -> Iterator[tuple[int, str, str]]:
    """(offset, name, "" | "unbalanced") for each ``{name}`` (or stray brace) in ``text``."""
    for mt in _FIELD_RE.finditer(text):
        tok = mt.group(0)
        if tok in ("{{", "}}"):
            continue
        if mt.group(1) is None:
            yield mt.start(), tok, "unbalanced"
        else:
            yield mt.start(), mt.group(1), ""


def _images_without_matrix(sc: m.Scene) -> int:
    if not sc.groups:
        return 1
    return sum(len(g.variants) for g in sc.groups)


__all__ = ["combinations", "fill", "slug", "output_template", "name_values", "check_matrix", "RESERVED"]
