"""Stable text form of the IR (``scenec explain``), for people and for golden tests."""

from __future__ import annotations

import json
from typing import Iterable

from scenec.spec.plan import Denoise, Fork, Op, Paste, Renoise, Seed

from .caps import grid_size
from .ir import IR, ConditionNode, GroupNode, PromptNode, RegionNode
from .solvers import unshared_reason


def _f(x: float) -> str:
    return f"{x:.4g}"


def _q(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _options(ir: IR) -> str:
    """The model line's options a scene may set, each only when set (IR text without them is what it was)."""
    sc = ir.scene.scene
    out = [f"tiling={sc.canvas.tiling}"] if sc.canvas.tiling != "none" else []
    if ir.prompt_syntax != "plain":
        out.append(f"prompt_syntax={ir.prompt_syntax}")
    if ir.clip_skip is not None:
        out.append(f"clip_skip={ir.clip_skip}")
    if ir.embeddings:
        out.append("embeddings=" + ",".join(e.token for e in ir.embeddings))
    if ir.vae[0] is not None:  # as the scene names it (the IR text is the same on every machine)
        out.append(f"vae={_q(getattr(sc.model, 'vae', None) or ir.vae[0].rsplit('/', 1)[-1])}")
    out += [f"lora={_q(lo.name)}:{_f(lo.scale)}" for lo in ir.loras]  # the whole image's, then each entity's
    out += [f"lora.{e}={_q(lo.name)}:{_f(lo.scale)}" for e, los in ir.entity_loras.items() for lo in los]
    return "".join(" " + o for o in out)


def _sampler_options(sampler) -> str:
    out = f" cfg_rescale={_f(sampler.cfg_rescale)}" if sampler.cfg_rescale else ""
    if sampler.freeu is not None:
        out += " freeu=" + ",".join(_f(v) for v in sampler.freeu.model_dump().values())
    return out


def print_ir(ir: IR) -> str:
    sc = ir.scene.scene
    w, h = ir.canvas
    fam = ir.info.family
    lines = [f"; scenec IR after {' > '.join(ir.passes) or '(nothing)'}",
             f"scene {_q(ir.scene.name)} file {_q(ir.scene.file.relative_to(ir.scene.root).as_posix())}",
             f"model {ir.model_spec or '-'} family={fam.name} canvas={w}x{h} grids="
             + ",".join(f"{n}:{gw}x{gh}" for n, px in fam.grids for gh, gw in [grid_size(ir.canvas, px)])
             + _options(ir),
             f"sampler {ir.solver or fam.sampler} steps={ir.steps} guidance={_f(ir.guidance)} "
             f"true_cfg={_f(ir.true_cfg)}" + _sampler_options(sc.sampler),
             "attention image_self={} blocks={} until={} pad_prompts={}".format(
                 sc.attention.image_self, sc.attention.blocks, _f(sc.attention.until), sc.attention.pad_prompts or "-")]
    if sc.hires is not None:  # the second pass (compiler/hires.py), only when set
        from .hires import canvas_of, levels_of

        hw, hh = canvas_of(ir.canvas, sc.hires.scale, fam.multiple)
        total, start = levels_of(sc.hires.steps or ir.steps, sc.hires.strength)
        lines.append(f"hires canvas={hw}x{hh} upscaler={sc.hires.upscaler} strength={_f(sc.hires.strength)} "
                     f"steps={total - start} of {total}")
    prompts = sorted(ir.nodes(PromptNode), key=lambda p: int(p.id[1:]))
    if prompts:
        lines.append("")
    for p in prompts:
        lines.append(f"%{p.id} = prompt {_q(p.text)}")
    regions = sorted(ir.nodes(RegionNode), key=lambda r: r.id)
    if regions:
        lines.append("")
    for r in regions:
        lines.append(f"%{r.id} = region entity={r.entity} z={_f(r.z)} feather={_f(r.feather_px)}px "
                     + _geom_text(r.geom, ir.canvas))
    conds = sorted(ir.nodes(ConditionNode), key=lambda c: c.id)
    if conds:
        lines.append("")
    for c in conds:
        lines.append(f"%{c.id} = condition entity={c.entity} image={_q(c.image)} sha256={c.sha256[:12]} fit={c.fit} "
                     f"window={_f(c.window[0])}->{_f(c.window[1])} cycles={c.cycles} init={c.init} "
                     f"preserve={'-' if c.preserve is None else _f(c.preserve)} eta={_f(c.eta)} "
                     f"eta_after={_f(c.eta_after)}"
                     + ("" if c.related is None else " related=" + _geom_text(c.related, ir.canvas))
                     + (" modulation=off" if c.modulation is False else
                        " modulation=" + ",".join(f"{k}:{_f(v)}" for k, v in sorted(c.modulation.items()))))
    programs = ir.programs
    for job in ir.jobs():
        lines.append("")
        where = f"{ir.scene.display}:{job.line}"
        lines.append(f"job %{job.id} seed={job.seed} group={job.group or '-'} variant={job.variant or '-'}"
                     f"  ; {where}")
        for s in ir.streams(job.id):
            reg = ir.region_of(s.id)
            neg = ir.prompt_of(s.id, "negative")
            lines.append(f"  stream {s.name} prompt=%{ir.prompt_of(s.id).id} negative=%{neg.id} "
                         f"region={'%' + reg.id if reg else ('-' if s.entity is None else '?')} gain={s.gain}")
        for c in ir.succ(job.id, ConditionNode):
            lines.append(f"  condition %{c.id}")
        if job.id in programs:
            lines.append("  program:")
            lines.extend("    " + t for t in program_text(programs[job.id]))
    groups = sorted(ir.nodes(GroupNode), key=lambda g: g.id)
    thetas = ir.theta
    prefix = ir.shared_prefix
    for g in groups:
        gid = g.id.split(".", 1)[1]
        jobs = ir.succ(g.id)
        lines.append("")
        lines.append(f"group %{gid} schedule={g.schedule} jobs={len(jobs)}")
        if gid in thetas:
            lines.append("  theta = [" + ", ".join(_f(x) for x in thetas[gid]) + "]")
            k = prefix.get(gid, 0)
            seeds = len({j.seed for j in jobs})
            saved = k * (len(jobs) - seeds)
            if unshared_reason(ir.solver) and k:  # each variant runs it (runtime/sampler.py _share_key)
                lines.append(f"  shared_prefix = {k} steps (not shared: {unshared_reason(ir.solver)})")
            else:
                lines.append(f"  shared_prefix = {k} steps (saves {saved} of {len(jobs) * ir.steps} job-steps)")
    return "\n".join(lines) + "\n"


def _geom_text(g, canvas) -> str:
    if g is None:
        return "area=1 bbox=[0,0,1,1]"
    w, h = canvas
    x0, y0, x1, y1 = g.bounds if not g.is_empty else (0, 0, 0, 0)
    return (f"area={_f(g.area / (w * h))} bbox=[{_f(x0 / w)},{_f(y0 / h)},{_f(x1 / w)},{_f(y1 / h)}]")


def program_text(ops: Iterable[Op]) -> list[str]:
    """Ops as text; runs of plain denoise steps with equal flags fold into one line."""
    out: list[str] = []
    run: list[Denoise] = []

    def flush() -> None:
        if not run:
            return
        a, b = run[0].from_, run[-1].to
        flags = ("regional" if run[0].regional else "plain") + (f" eta={_f(run[0].eta)}" if run[0].eta else "")
        th = [o.theta for o in run]
        theta = "" if th[0] is None else " theta=[" + ",".join(_f(x) for x in th) + "]"
        out.append(f"denoise {a}->{b} {flags}{theta}")
        run.clear()

    for op in ops:
        if isinstance(op, Denoise) and (not run or (run[-1].to == op.from_ and run[-1].regional == op.regional
                                                    and run[-1].eta == op.eta)):
            run.append(op)
            continue
        flush()
        if isinstance(op, Denoise):
            run.append(op)
        elif isinstance(op, Renoise):
            out.append(f"renoise {op.from_}->{op.to}")
        elif isinstance(op, Paste):
            out.append(f"paste condition={op.condition} at={op.at}")
        elif isinstance(op, Seed):
            out.append(f"seed conditions={','.join(map(str, op.conditions))} at={op.at}")
        elif isinstance(op, Fork):
            out.append("fork")
    flush()
    return out
