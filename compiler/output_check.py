"""Checks of ``output`` (part of the ``check`` pass): its directory and the placeholders of ``output.name``."""

from __future__ import annotations

import re

from scenec.spec.diagnostics import Diagnostics, did_you_mean, display_path
from scenec.spec.load import LoadedScene
from scenec.spec.paths import PathProblem

from .files import pos_in_string
from .resolve import PLACEHOLDERS

PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")


def check_output(ls: LoadedScene, diags: Diagnostics) -> None:
    from .resolve import render_name

    sc = ls.scene
    out = sc.output
    dpath = ("output", "dir")
    try:
        d = ls.resolve(dpath, out.dir)
    except PathProblem as e:
        diags.error(ls.pos(dpath), f"`output.dir`: {e.message}", e.hint)
    else:  # a file there fails every job of a build without -o ("cannot write"): say so where it is named
        blocker = next((q for q in (d, *d.parents) if q.exists()), None) if d is not None else None
        if blocker is not None and not blocker.is_dir():
            diags.warning(ls.pos(dpath), f"`output.dir` `{out.dir}`: {display_path(blocker)} is a file, not a "
                          "directory; a build without -o cannot write there", hint="name a directory, or build with -o")

    npath = ("output", "name")
    from .matrix import combinations, name_values, output_template

    template = output_template(sc)  # with a matrix and no output.name: the default plus the matrix keys
    npos = ls.pos(npath)
    bad = False
    for mt in PLACEHOLDER_RE.finditer(template):
        key = mt.group(1)
        if key not in PLACEHOLDERS and key not in sc.matrix:
            bad = True
            diags.error(pos_in_string(ls, npath, template, mt.start()), f"unknown placeholder `{{{key}}}` in "
                        "`output.name`", hint=did_you_mean(key, [*PLACEHOLDERS, *sc.matrix]) or
                        "placeholders: " + ", ".join("{%s}" % p for p in [*PLACEHOLDERS, *sc.matrix]))
    rest = PLACEHOLDER_RE.sub("", template)
    for ch in "{}":
        if ch in rest:
            bad = True
            k = _unmatched_brace(template)
            diags.error(pos_in_string(ls, npath, template, k), "unbalanced `{` or `}` in `output.name`",
                        hint="placeholders are written {scene}, {group}, {variant}, {seed} or {index}")
            break
    if bad:
        return

    combos = list({tuple(c.items()): name_values(c) for c in combinations(sc)}.values())  # seeds x matrix
    jobs: list[dict] = []
    if sc.groups:
        seen: set = set()
        for g in sc.groups:
            for v in g.variants:
                if (g.id, v.id) in seen:
                    continue  # duplicate ids are reported by the id checks
                seen.add((g.id, v.id))
                jobs += [{"group": g.id, "variant": v.id, **c} for c in combos]
    else:
        jobs = [{"group": None, "variant": None, **c} for c in combos]
    names: dict[str, dict] = {}
    for index, job in enumerate(jobs):
        values = {"scene": ls.name, **job, "index": index}
        name = render_name(template, values, dedupe="name" not in sc.output.model_fields_set)
        if not name or "\\" in name or "\x00" in name or any(p in ("", ".", "..") for p in name.split("/")):
            diags.error(npos, f"`output.name` makes `{name}`, which is not a safe relative file name",
                        hint="names may hold `/` for subfolders, but no empty, `.` or `..` parts and no `\\`")
            return
        if name in names:
            other = names[name]
            differ = [k for k in dict.fromkeys(("group", "variant", "seed", *sc.matrix)) if other.get(k) != job.get(k)]
            need = " or ".join("{%s}" % k for k in [*differ, "index"])
            diags.error(npos, f"output names collide: two images would be named `{name}`",
                        hint=f"add {need} to `output.name`")
            return
        names[name] = job


def _unmatched_brace(s: str) -> int:
    depth_open = -1
    for k, ch in enumerate(s):
        if ch == "{":
            if depth_open >= 0:
                return depth_open
            depth_open = k
        elif ch == "}":
            if depth_open < 0:
                return k
            depth_open = -1
    return max(depth_open, 0)
