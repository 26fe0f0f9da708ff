"""Named pure passes, LoadedScene → IR → … → IR (design.md: "Passes are named pure functions").

``PIPELINE`` lists them in order; ``run_passes(..., until=NAME)`` stops after a pass so that
``scenec explain --after NAME`` can print the IR at that point.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from scenec.spec import models as m
from scenec.spec.diagnostics import Diagnostics, SceneError
from scenec.spec.load import LoadedScene
from scenec.spec.prompt_syntax import comfy_embeddings, embedding_names

from . import schedule as sch
from .ir import IR, ConditionNode, GroupNode, JobNode, PromptNode, RegionNode, StreamNode
from .levels import level_index, noise_levels
from .resolve import render_name, resolve_model
from .solvers import solver_of

# --- passes -----------------------------------------------------------------------------------

def p_check(ir: IR) -> IR:
    """Semantic checks; stops the pipeline with every problem found."""
    from .check import check_scene

    diags = Diagnostics()
    glob, by_entity = check_scene(ir.scene, ir.info, diags, ir.model_override, ir.cli_lora)
    if diags.has_errors():
        raise SceneError(diags)
    out = ir.evolve("check")
    out.warnings = tuple(diags.warnings)
    out.loras, out.entity_loras = tuple(glob), {k: tuple(v) for k, v in by_entity.items()}
    from .text_options import check_text_options

    embeddings, out.clip_skip = check_text_options(ir.scene, ir.info, Diagnostics(), ir.model_override)
    out.embeddings = tuple(embeddings)
    from .resolve import prompt_syntax

    out.prompt_syntax = prompt_syntax(ir.scene)
    from .vae import check_vae

    out.vae = check_vae(ir.scene, ir.info, Diagnostics(), ir.model_override)
    return out


def p_expand(ir: IR) -> IR:
    """Jobs, streams and deduplicated prompts: one job per seed, or per (group, variant, seed);
    with a `matrix`, per matrix combination too (compiler/matrix.py)."""
    from . import matrix as mx

    out = ir.evolve("expand")
    sc = ir.scene.scene
    name = ir.scene.name
    combos = mx.combinations(sc)
    template = mx.output_template(sc)
    prompts: dict[str, str] = {}
    combo: dict = {}

    # ComfyUI's `embedding:NAME` becomes the token of the scene's embedding it names (spec/prompt_syntax.py)
    names = embedding_names(ir.embeddings) if ir.prompt_syntax == "comfy" else {}

    def prompt(text: str) -> str:
        text = comfy_embeddings(mx.fill(text, combo, bool(sc.matrix)), names)
        if text not in prompts:
            prompts[text] = f"p{len(prompts)}"
            out.add(PromptNode(prompts[text], text))
        return prompts[text]

    ents = {e.id: (i, e) for i, e in enumerate(sc.entities)}
    bg_neg = sc.background.negative

    def add_stream(job: str, order: int, s: StreamNode, text: str, negative: str) -> None:
        out.add(s)
        out.graph.add_edge(job, s.id, order=order)
        # one edge per prompt node: a text used as both prompt and negative ("" and "" without a
        # background) is one edge carrying both relations, not a second edge overwriting the first
        rels: dict[str, tuple[str, ...]] = {}
        for rel, t in (("prompt", text), ("negative", negative)):
            pid = prompt(t)
            rels[pid] = rels.get(pid, ()) + (rel,)
        for pid, rs in rels.items():
            out.graph.add_edge(s.id, pid, rel=rs)

    plans: list[tuple[str | None, m.Variant | None, tuple[str, ...], int]] = []
    if sc.groups:
        for gi, g in enumerate(sc.groups):
            out.add(GroupNode(f"group.{g.id}", _schedule_text(g.schedule), ir.scene.pos(("groups", gi)).line))
            for vi, v in enumerate(g.variants):
                plans.append((g.id, v, tuple(e for e in (v.entities or []) if e in ents),
                              ir.scene.pos(("groups", gi, "variants", vi)).line))
    else:
        plans.append((None, None, tuple(e.id for e in sc.entities), ir.scene.pos(()).line))

    index = 0
    matrix_values: dict[str, dict] = {}
    for group, variant, present, line in plans:
        for combo in combos:
            seed = combo["seed"]
            jid = render_name(template, {"scene": name, "group": group, "variant": variant.id if variant else None,
                                         "index": index, **mx.name_values(combo)},
                              dedupe="name" not in sc.output.model_fields_set)
            if jid in out.graph:
                raise SceneError([_collision(ir, jid)])
            job = JobNode(jid, seed, index, group, variant.id if variant else None, present, line)
            out.add(job)
            if sc.matrix:
                matrix_values[jid] = {k: v for k, v in combo.items() if k in sc.matrix}
            if group:
                out.graph.add_edge(f"group.{group}", jid, order=index)
            coupled = group is not None
            add_stream(jid, 0, StreamNode(f"{jid}/global", "global", "global", "1-theta" if coupled else "1"),
                       sc.background.prompt, bg_neg)
            order = 1
            if variant is not None and variant.prompt is not None:
                add_stream(jid, order, StreamNode(f"{jid}/{variant.id}", "entity", variant.id, "theta"),
                           variant.prompt, variant.negative if variant.negative is not None else bg_neg)
                order += 1
            for eid in present:
                e = ents[eid][1]
                add_stream(jid, order, StreamNode(f"{jid}/{eid}", "entity", eid, "theta" if coupled else "1", eid),
                           e.prompt, e.negative if e.negative is not None else bg_neg)
                order += 1
            for eid in present:
                e = ents[eid][1]
                if e.reference is not None:
                    cid = f"cond.{eid}"
                    if cid not in out.graph:
                        out.add(_condition(ir, ents[eid][0], e))
                    out.graph.add_edge(jid, cid, order=ents[eid][0])
            index += 1
    out.matrix = matrix_values
    return out


def _collision(ir: IR, jid: str):
    from scenec.spec.diagnostics import Diagnostic

    return Diagnostic(ir.scene.pos(("output", "name")) if "output" in _keys(ir) else ir.scene.pos(()),
                      f"output names collide: two images would be named `{jid}`",
                      hint="add {seed}, {group}, {variant} or {index} to `output.name`")


def _keys(ir: IR) -> set:
    return {p[0] for p in ir.scene.smap.values if p}


def _condition(ir: IR, i: int, e: m.Entity) -> ConditionNode:
    from scenec.spec.fsio import sha256_file

    r = e.reference
    p = ir.scene.resolve(("entities", i, "reference", "image"), r.image)
    mod = r.modulation.model_dump() if r.modulation is not False else False
    return ConditionNode(f"cond.{e.id}", e.id, r.image, p, sha256_file(p), r.fit, tuple(r.window), r.cycles,
                         r.preserve, r.eta, None, mod, init=r.init, eta_after=r.eta_after)


def p_geometry(ir: IR) -> IR:
    """Regions: shapes → shapely, z-occlusion per set of present entities, feathering."""
    from .geometry import resolve_regions
    from .shapes import shape_geometry

    out = ir.evolve("geometry")
    sc = ir.scene.scene
    diags = Diagnostics()
    by_set: dict[tuple, dict] = {}
    region_ids: dict[tuple, str] = {}
    for job in out.jobs():
        if job.entities not in by_set:
            by_set[job.entities] = resolve_regions(ir.scene, list(job.entities), ir.canvas, diags)
        for s in out.streams(job.id):
            if s.entity is None:
                continue
            reg = by_set[job.entities][s.entity]
            key = (s.entity, _geom_key(reg.geom), reg.feather_px)
            if key not in region_ids:
                n = sum(1 for k in region_ids if k[0] == s.entity)
                rid = f"r.{s.entity}" + (f".{n}" if n else "")
                region_ids[key] = rid
                out.add(RegionNode(rid, s.entity, reg.geom, reg.feather_px, reg.z))
            out.graph.add_edge(s.id, region_ids[key])
    # reference conditions: related regions
    idx = {e.id: i for i, e in enumerate(sc.entities)}
    for c in out.nodes(ConditionNode):
        i = idx[c.entity]
        rel = sc.entities[i].reference.related
        if rel is not None:
            g = shape_geometry(ir.scene, rel, ("entities", i, "reference", "related"), ir.canvas, diags)
            out.graph.nodes[c.id]["node"] = ConditionNode(**{**c.__dict__, "related": g})
    if diags.has_errors():
        raise SceneError(diags)
    return out


def _geom_key(g) -> bytes:
    return b"" if g is None else g.wkb


def p_schedule(ir: IR) -> IR:
    """θ tables, shared prefixes and each job's unrolled step program."""
    out = ir.evolve("schedule")
    sc = ir.scene.scene
    n = ir.steps
    thetas: dict[str, np.ndarray] = {}
    for gi, g in enumerate(sc.groups):
        values = None
        if isinstance(g.schedule, m.FileSchedule):
            from .files import read_json

            d = Diagnostics()
            data = read_json(ir.scene, ("groups", gi, "schedule", "file"), g.schedule.file, d, "schedule file")
            values = data.get("values") if isinstance(data, dict) else data
            if d.has_errors():
                raise SceneError(d)
        thetas[g.id] = sch.theta_table(g.schedule, n, values)
    out.theta = thetas
    prefix: dict[str, int] = {}
    for g in sc.groups:
        # every variant of a group shares θ (one schedule per group), so the θ = 0 prefix is shared
        prefix[g.id] = sch.shared_prefix([thetas[g.id]])
    out.shared_prefix = prefix
    programs = {}
    table = noise_levels(ir.info, ir.canvas, n, ir.solver)  # where each noise level lands (compiler/levels.py)
    for job in out.jobs():
        conds = []
        for ci, c in enumerate(out.succ(job.id, ConditionNode)):
            conds.append(sch.Cow(ci, level_index(c.window[0], table), level_index(c.window[1], table), c.cycles,
                                 None if c.preserve is None else level_index(c.preserve, table), c.eta,
                                 c.eta_after, c.init))
        theta = thetas.get(job.group) if job.group else None
        fork = prefix.get(job.group) if job.group else None
        programs[job.id] = sch.build_program(sch.ProgramInputs(
            steps=n, until=sc.attention.until, theta=theta, conditions=conds, fork_at=fork if fork else None))
        if sc.background.strength is not None:  # img2img: the last steps only (no groups or references)
            start = sch.img2img_start(n, sc.background.strength)
            programs[job.id] = tuple(op for op in programs[job.id] if getattr(op, "from_", start) >= start)
    out.programs = programs
    return out


def _schedule_text(s) -> str:
    if isinstance(s, m.StepSchedule):
        return f"step(center={s.center:g})"
    if isinstance(s, m.RampSchedule):
        return f"{s.shape}(center={s.center:g}, width={s.width:g})"
    if isinstance(s, m.ArctanSchedule):
        return f"arctan(center={s.center:g}, scale={s.scale:g})"
    if isinstance(s, m.ValuesSchedule):
        return "values"
    return f"file({s.file})"


PIPELINE: list[tuple[str, Callable[[IR], IR]]] = [
    ("check", p_check),
    ("expand", p_expand),
    ("geometry", p_geometry),
    ("schedule", p_schedule),
]
PASS_NAMES = [n for n, _ in PIPELINE] + ["lower"]


def initial_ir(ls: LoadedScene, model: str | None = None, lora=()) -> IR:
    diags = Diagnostics()
    spec, info = resolve_model(ls, model, diags)
    if diags.has_errors():
        raise SceneError(diags)
    sc = ls.scene
    return IR(scene=ls, info=info, model_spec=spec, canvas=(sc.canvas.width, sc.canvas.height),
              steps=sc.sampler.steps or info.steps,
              guidance=sc.sampler.guidance if sc.sampler.guidance is not None else info.guidance,
              true_cfg=sc.sampler.true_cfg, solver=solver_of(sc.sampler.solver, info.family), model_override=model,
              cli_lora=tuple(lora or ()))


def run_passes(ls: LoadedScene, model: str | None = None, until: str | None = None, lora=()) -> IR:
    ir = initial_ir(ls, model, lora)
    for name, fn in PIPELINE:
        ir = fn(ir)
        if name == until:
            break
    return ir
