"""Semantic checks of a structurally valid scene (the ``check`` pass).

``spec.load`` guarantees keys, types and ranges; this module checks meaning: ids and the
references between them, canvas sizes and what the scene asks for against the model family
(``compiler.caps.check_family``), schedules against the sampler's step count, reference windows,
the files a scene names, and output names. Every problem goes to a ``Diagnostics`` at the position
where it was written (an included file too); nothing raises for bad input. Geometric checks live
in ``compiler.geometry.check_geometry``, called from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from scenec.spec import models as m
from scenec.spec.diagnostics import Diagnostics, Pos, SceneError, did_you_mean
from scenec.spec.load import LoadedScene, load_scene
from scenec.spec.paths import PathProblem

from . import schedule as sch
from .caps import ModelInfo, check_family
from .control import check_controls
from .files import open_image, read_json
from .guidance import check_sampler
from .output_check import check_output
from .schedule import schedule_file_values


def check_scene(ls: LoadedScene, info: ModelInfo, diags: Diagnostics, model_override: str | None = None,
                cli_lora=()) -> tuple[list, dict]:
    """Every semantic check of ``ls``; problems go to ``diags`` (all of them, never raised). Returns the
    scene's LoRAs as checked (``compiler.lora.check_loras``: the whole image's, each entity's)."""
    from .lora import check_loras

    sc = ls.scene
    steps = sc.sampler.steps or info.steps
    entity_ids = _check_entities(ls, diags)
    _check_groups(ls, entity_ids, diags)
    known = info.source != "unknown"  # an unknown model is one error (compiler/resolve.py), not its family's too
    if known:
        _check_canvas(ls, info, diags)
        check_family(ls, info, diags)  # what the model's family cannot run (compiler/caps.py)
        check_sampler(ls, info, diags, model_override)  # solver, cfg_rescale, freeu (compiler/guidance.py)
        from .hires import check_hires

        check_hires(ls, steps, info.family.multiple, diags)  # the second pass (compiler/hires.py)
    _check_seeds(ls, diags)
    _check_schedules(ls, steps, diags)
    _check_references(ls, info, steps, diags)
    from .visual import check_visuals

    check_visuals(ls, info, steps, diags)  # entities' visual prompts (compiler/visual.py)
    check_controls(ls, info, diags, steps)  # ControlNet conditions (compiler/control.py)
    _check_files(ls, diags)
    check_output(ls, diags)  # output.dir and output.name (compiler/output_check.py)
    _check_includes(ls, diags)
    from .advice import check_advice

    if known:
        check_advice(ls, info, diags)  # negatives that cannot act, prompts cut short (compiler/advice.py)
    from .matrix import check_matrix

    check_matrix(ls, diags)  # matrix keys and {placeholders} in prompts (compiler/matrix.py)
    from . import geometry

    try:
        geometry.check_geometry(ls, info.family, diags)
    except NotImplementedError:
        pass  # geometry is not written yet
    from .prompt_check import check_prompt_syntax
    from .text_options import check_text_options
    from .vae import check_vae

    embeddings, _ = check_text_options(ls, info, diags, model_override)  # embeddings, clip_skip (text_options.py)
    check_vae(ls, info, diags, model_override)  # model.vae (compiler/vae.py)
    check_prompt_syntax(ls, diags, info.family.name, steps, embeddings)  # A1111/ComfyUI weights (prompt_check.py)
    return check_loras(ls, info.family.name, diags, model_override, cli_lora)


def validate_file(path: str | Path, model: str | None = None, lora=(),
                  overrides=()) -> tuple[LoadedScene | None, Diagnostics]:
    """Load and check one scene file; never raises for bad input. (scene or None, diagnostics)."""
    from .resolve import resolve_model

    diags = Diagnostics()
    try:
        ls = load_scene(path, diags, overrides)
    except SceneError as e:
        if e.diagnostics is not diags:
            diags.extend(e.diagnostics)
        check_partial(e, model)
        if e.diagnostics is not diags:
            diags.extend(e.diagnostics)
        return None, diags
    _, info = resolve_model(ls, model, diags)
    check_scene(ls, info, diags, model, lora)
    return ls, diags


def check_partial(err: SceneError, model: str | None = None) -> None:
    """Add to ``err`` what the semantic checks find in its scene with the bad values left out
    (``err.partial``), so that a file's problems are reported in one run, not one layer at a time."""
    ls = err.partial
    if ls is None:
        return
    from .resolve import resolve_model

    diags = Diagnostics()
    try:
        _, info = resolve_model(ls, model, diags)
        check_scene(ls, info, diags)
    except SceneError as e:  # a check that cannot go on (a bad file it reads): what it found so far
        diags.extend(e.diagnostics)
    except Exception:  # noqa: BLE001 - a check surprised by the left-out values: the errors already found stand
        return
    err.diagnostics.extend(d for d in diags if d.severity == "error")


# --- helpers ------------------------------------------------------------------------------------

def _where(first: Pos, second: Pos) -> str:
    """How to name ``first`` in a message about ``second``: `line N`, or FILE:LINE elsewhere."""
    return f"line {first.line}" if first.file == second.file else f"{first.file}:{first.line}"


def _seeds(sc: m.Scene) -> list[int]:
    return sc.sampler.seed if isinstance(sc.sampler.seed, list) else [sc.sampler.seed]


# --- ids and references between them -----------------------------------------------------------

def _unique(ls: LoadedScene, diags: Diagnostics, seen: dict[str, tuple], value: str, path: tuple, what: str,
            hint: str) -> None:
    """Report ``value`` at ``path`` if an earlier path holds it (``seen``: value → first path)."""
    pos = ls.pos(path)
    if value in seen:
        diags.error(pos, f"duplicate {what} (first at {_where(ls.pos(seen[value]), pos)})", hint=hint)
    else:
        seen[value] = path


def _check_entities(ls: LoadedScene, diags: Diagnostics) -> set[str]:
    sc = ls.scene
    seen: dict[str, tuple] = {}
    for i, e in enumerate(sc.entities):
        _unique(ls, diags, seen, e.id, ("entities", i, "id"), f"entity id `{e.id}`",
                "entity ids must be unique in a scene")
        if not e.prompt.strip():
            diags.warning(ls.pos(("entities", i, "prompt")), f"entity `{e.id}` has an empty prompt")
    return set(seen)


def _check_groups(ls: LoadedScene, entity_ids: set[str], diags: Diagnostics) -> None:
    sc = ls.scene
    seen_groups: dict[str, tuple] = {}
    named: set[str] = set()
    for gi, g in enumerate(sc.groups):
        _unique(ls, diags, seen_groups, g.id, ("groups", gi, "id"), f"group id `{g.id}`",
                "group ids must be unique in a scene")
        seen_variants: dict[str, tuple] = {}
        for vi, v in enumerate(g.variants):
            vpath = ("groups", gi, "variants", vi)
            _unique(ls, diags, seen_variants, v.id, vpath + ("id",), f"variant id `{v.id}` in group `{g.id}`",
                    "variant ids must be unique within a group")
            if not v.entities and v.prompt is None:
                what = "an empty `entities` list and no `prompt`" if v.entities is not None else \
                    "neither `entities` nor `prompt`"
                diags.error(ls.pos(vpath), f"variant `{v.id}` has {what}",
                            hint="name the entities it shows, or give it a prompt of its own")
            if v.negative is not None and v.prompt is None:
                diags.warning(ls.key_pos(vpath + ("negative",)),
                              f"variant `{v.id}` has a `negative` but no `prompt`; it is ignored",
                              hint="a variant's negative applies to its own prompt")
            listed: dict[str, int] = {}
            for k, eid in enumerate(v.entities or []):
                epos = ls.pos(vpath + ("entities", k))
                if eid in listed:
                    first = ls.pos(vpath + ("entities", listed[eid]))
                    diags.error(epos, f"entity `{eid}` is listed twice in variant `{v.id}` "
                                      f"(first at {_where(first, epos)}, column {first.col})")
                    continue
                listed[eid] = k
                if eid not in entity_ids:
                    hint = did_you_mean(eid, entity_ids)
                    if hint is None:
                        hint = ("entities: " + ", ".join(sorted(entity_ids))) if entity_ids else \
                            "the scene defines no entities"
                    diags.error(epos, f"unknown entity `{eid}` in variant `{v.id}`", hint)
                else:
                    named.add(eid)
    if sc.groups:
        first_of = {}
        for i, e in enumerate(sc.entities):
            first_of.setdefault(e.id, i)
        for i, e in enumerate(sc.entities):
            if e.id not in named and first_of[e.id] == i:
                diags.warning(ls.pos(("entities", i, "id")),
                              f"entity `{e.id}` is in no variant, so no image shows it",
                              hint="with `groups`, an entity appears only in the variants that name it")


# --- canvas, sampler ----------------------------------------------------------------------------

def _check_canvas(ls: LoadedScene, info: ModelInfo, diags: Diagnostics) -> None:
    k = info.family.multiple
    for side in ("width", "height"):
        v = getattr(ls.scene.canvas, side)
        if v % k:
            lo = v // k * k
            options = [x for x in (lo, lo + k) if 16 <= x <= m.MAX_CANVAS]
            diags.error(ls.pos(("canvas", side)),
                        f"canvas {side} {v} is not a multiple of {k} (required by {info.family.name} models"
                        f" such as `{info.spec}`)",
                        hint="nearest valid: " + " or ".join(str(x) for x in options) if options else None)


def _check_seeds(ls: LoadedScene, diags: Diagnostics) -> None:
    seed = ls.scene.sampler.seed
    if not isinstance(seed, list):
        return
    seen: dict[int, int] = {}
    for i, s in enumerate(seed):
        pos = ls.pos(("sampler", "seed", i))
        if s in seen:
            first = ls.pos(("sampler", "seed", seen[s]))
            diags.error(pos, f"seed {s} is listed twice (first at {_where(first, pos)}, column {first.col})",
                        hint="each seed makes one image; the same seed makes the same image")
        else:
            seen[s] = i


# --- schedules ----------------------------------------------------------------------------------

def _check_schedules(ls: LoadedScene, steps: int, diags: Diagnostics) -> None:
    for gi, g in enumerate(ls.scene.groups):
        s = g.schedule
        path = ("groups", gi, "schedule")
        if isinstance(s, m.ValuesSchedule):
            _check_values(ls, path + ("values",), s.values, steps, diags)
        elif isinstance(s, m.FileSchedule):
            fpath = path + ("file",)
            data = read_json(ls, fpath, s.file, diags, "schedule file")
            if data is None:
                continue
            values = schedule_file_values(data)
            pos = ls.pos(fpath)
            if isinstance(values, str):
                diags.error(pos, f"schedule file `{s.file}` {values}",
                            hint='write a JSON list of θ values, or {"values": [...]}')
                continue
            problems = sch.values_problems(values, steps)
            if problems:
                diags.error(pos, f"schedule file `{s.file}`: " + "; ".join(problems),
                            hint=_steps_hint(ls, steps, len(values)))


def _steps_hint(ls: LoadedScene, steps: int, n: int) -> str | None:
    if n == steps:
        return None
    if ls.scene.sampler.steps is None:
        return f"the model's default is {steps} steps; set `sampler.steps: {n}` or give {steps} values"
    return f"give one value per step ({steps}), or set `sampler.steps: {n}`"


def _check_values(ls: LoadedScene, path: tuple, values: list[float], steps: int, diags: Diagnostics) -> None:
    """An inline ``{values: [...]}`` schedule: the count at the list, a decrease at its value."""
    i = sch.first_decrease(values)
    for msg in sch.values_problems(values, steps):
        if msg.startswith("θ must be non-decreasing") and i is not None:
            diags.error(ls.pos(path + (i,)), msg)
        else:
            diags.error(ls.pos(path), msg, hint=_steps_hint(ls, steps, len(values)) if "sampler has" in msg else None)


# --- references ---------------------------------------------------------------------------------

def _check_references(ls: LoadedScene, info: ModelInfo, steps: int, diags: Diagnostics) -> None:
    from .levels import level_index, noise_levels

    sc = ls.scene
    table = noise_levels(info, (sc.canvas.width, sc.canvas.height), steps, sc.sampler.solver)
    starts: dict[int, int] = {}  # entity index -> its window's start index, when it cycles
    for i, e in enumerate(sc.entities):
        r = e.reference
        if r is None:
            continue
        path = ("entities", i, "reference")
        hi, lo = r.window
        if hi <= lo:
            diags.error(ls.pos(path + ("window",)),
                        f"reference window [{hi:g}, {lo:g}] must go from a higher noise level to a lower one",
                        hint=f"the first level (where cycles start) must be above the second, e.g. [{max(hi, lo):g}, "
                             f"{min(hi, lo):g}]" if hi != lo else "e.g. [0.7, 0.5] (1 = pure noise)")
            continue
        a, b = level_index(hi, table), level_index(lo, table)
        if r.preserve is not None and r.preserve > lo:
            diags.warning(ls.pos(path + ("preserve",)),
                          f"`preserve` {r.preserve:g} is above the window's end {lo:g}: the last replacement "
                          "would come inside or before the window, where it has no effect",
                          hint=f"use a level at or below {lo:g}, or null")
        elif r.preserve is not None and level_index(r.preserve, table) >= steps:
            diags.warning(ls.pos(path + ("preserve",)),
                          f"`preserve` {r.preserve:g} is nearest step {steps} of {steps}, after the last one: "
                          "no replacement happens",
                          hint=f"use a level of at least {table[steps - 1] / 2:.3g} (nearer the last step), or null")
        if r.cycles > 0 and a == b:
            diags.warning(ls.pos(path + ("window",)),
                          f"reference window [{hi:g}, {lo:g}] covers no sampler step at {steps} steps; "
                          "its cycles do nothing", hint="widen the window or use more steps")
        elif r.cycles > 0:
            starts[i] = a
    _check_reference_images(ls, table, starts, diags)


def _check_reference_images(ls: LoadedScene, table, starts: dict[int, int], diags: Diagnostics) -> None:
    """References shown in one image run their windows together: their ``init`` must agree, and with the
    seed initialisation no ``preserve`` may come before the union window (those levels are never sampled)."""
    from .levels import level_index

    sc = ls.scene
    ids = {e.id: i for i, e in enumerate(sc.entities)}
    images = [[ids[x] for x in (v.entities or []) if x in ids] for g in sc.groups for v in g.variants] \
        if sc.groups else [list(range(len(sc.entities)))]
    reported: set = set()
    for shown in images:
        cyc = sorted({i for i in shown if i in starts})
        if not cyc:
            continue
        inits = {sc.entities[i].reference.init for i in cyc}
        if len(inits) > 1 and ("init", tuple(cyc)) not in reported:
            reported.add(("init", tuple(cyc)))
            j = next(i for i in cyc if sc.entities[i].reference.init != sc.entities[cyc[0]].reference.init)
            diags.error(ls.pos(("entities", j, "reference", "init")),
                        f"references shown in one image run their cycles together, but `{sc.entities[cyc[0]].id}` "
                        f"has init {sc.entities[cyc[0]].reference.init} and `{sc.entities[j].id}` "
                        f"{sc.entities[j].reference.init}", hint="give them the same `init`")
            continue
        if inits != {"seed"}:
            continue
        start = min(starts[i] for i in cyc)
        for i in shown:
            r = sc.entities[i].reference
            if r is None or r.preserve is None or level_index(r.preserve, table) >= start or \
                    ("preserve", i) in reported:
                continue
            reported.add(("preserve", i))
            diags.error(ls.pos(("entities", i, "reference", "preserve")),
                        f"`preserve` {r.preserve:g} comes before the cycles' window, which the seed initialisation "
                        "never samples: this replacement cannot happen",
                        hint="use a level below the window's end, null, or `init: noise`")


# --- files --------------------------------------------------------------------------------------

def _shape_masks(shape: Any, path: tuple) -> Iterator[tuple[tuple, str]]:
    if shape is None:
        return
    if isinstance(shape, m.MaskShape):
        yield path + ("mask",), shape.mask
    for op in ("union", "intersection", "difference"):
        children = getattr(shape, op, None)
        if isinstance(children, list):
            for k, child in enumerate(children):
                yield from _shape_masks(child, path + (op, k))


def _check_files(ls: LoadedScene, diags: Diagnostics) -> None:
    sc = ls.scene
    if sc.background.image is not None:
        open_image(ls, ("background", "image"), sc.background.image, diags, "background image")
    for i, e in enumerate(sc.entities):
        if e.reference is not None:
            open_image(ls, ("entities", i, "reference", "image"), e.reference.image, diags, "reference image")
        masks = list(_shape_masks(e.shape, ("entities", i, "shape")))
        if e.reference is not None:
            masks += _shape_masks(e.reference.related, ("entities", i, "reference", "related"))
        for path, value in masks:
            open_image(ls, path, value, diags, "mask")


def _check_includes(ls: LoadedScene, diags: Diagnostics) -> None:
    seen: dict[Path, int] = {}
    for i, inc in enumerate(ls.scene.include):
        try:
            p = ls.resolve(("include", i), inc)
        except PathProblem:
            continue  # reported while loading
        if p in seen:
            pos = ls.pos(("include", i))
            first = ls.pos(("include", seen[p]))
            diags.warning(pos, f"`{inc}` is included twice (first at {_where(first, pos)}, column {first.col})")
        else:
            seen[p] = i


# --- output names -------------------------------------------------------------------------------

__all__ = ["check_scene", "validate_file", "schedule_file_values"]
