"""The hires pass (scene key ``hires``; A1111's "Hires. fix", ComfyUI's upscale → KSampler at a lower denoise).

Each image is made at the canvas as usual; the runtime then enlarges it (``upscaler``, a Pillow filter) to the
second canvas and repaints it by img2img at that size, with the scene's prompts, regions, controls and visual
prompts laid out again on the larger grids. The second pass is a plan of its own, nested in the first
(``plan.json``'s ``hires``, docs/plan-format.md), whose jobs start from an init image the runtime supplies
(``spec.plan.HIRES_INIT``).

Its steps follow A1111 (``setup_img2img_steps`` with the hires steps given) and ComfyUI (``KSampler`` with
``denoise``): the pass runs exactly ``steps`` steps, the last ones of a schedule of ``int(steps / strength)``
levels — not diffusers' img2img convention (``int(N · strength)`` of N), which ``background.strength`` keeps.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from shapely import affinity

from scenec.spec import models as m
from scenec.spec.diagnostics import Diagnostics
from scenec.spec.load import LoadedScene
from scenec.spec.models import MAX_CANVAS

from . import schedule as sch
from .ir import IR, RegionNode

PREFIX = "hires/"  # the second pass's tensors, in the plan's one tensors file


def canvas_of(canvas: tuple[int, int], scale: float, multiple: int) -> tuple[int, int]:
    """The second pass's canvas: each side times ``scale``, rounded down to the family's multiple."""
    return tuple(int(side * scale) // multiple * multiple for side in canvas)  # type: ignore[return-value]


def levels_of(steps: int, strength: float) -> tuple[int, int]:
    """``(levels, start)``: the second pass's schedule length and the step it starts at, so that it runs exactly
    ``steps`` steps (A1111: ``int(steps / min(strength, 0.999))`` levels)."""
    total = max(int(steps / min(strength, 0.999)), steps)
    return total, total - steps


def scaled(region, sx: float, sy: float):
    """A region (``ir.RegionNode`` or ``geometry.Region``) on a canvas ``sx`` × ``sy`` times as large: its geometry
    scaled from the origin, its feather (pixels) by the mean factor."""
    if region.geom is None:
        return region
    return dataclasses.replace(region, geom=affinity.scale(region.geom, sx, sy, origin=(0, 0)),
                               feather_px=region.feather_px * (sx + sy) / 2)


def check_hires(ls: LoadedScene, steps: int, multiple: int, diags: Diagnostics) -> None:
    """What the second pass cannot do: references (cycles at fixed levels of the first canvas) are not carried into
    it yet; its canvas must grow and stay in bounds."""
    sc = ls.scene
    hr = sc.hires
    if hr is None:
        return
    for i, e in enumerate(sc.entities):
        if e.reference is not None:
            diags.error(ls.key_pos(("entities", i, "reference")), "a `reference` cannot be combined with `hires` yet",
                        hint="the second pass would repaint the reference's region")
            break
    bg = sc.background
    if hr.upscaler.startswith("latent") and hr.strength < 0.5:
        diags.warning(ls.pos(("hires", "strength")) if "strength" in hr.model_fields_set else ls.key_pos(("hires",)),
                      f"`upscaler: {hr.upscaler}` at `strength: {hr.strength:g}`: an enlarged latent is blurred, and "
                      "a second pass this light leaves it so", hint="use a `strength` of 0.5 or more, or `lanczos`")
    if hr.upscaler.startswith("latent") and bg.image and (bg.strength is None or bg.repaint == "regions"):
        diags.error(ls.pos(("hires", "upscaler")) if "upscaler" in hr.model_fields_set else ls.key_pos(("hires",)),
                    f"`upscaler: {hr.upscaler}` with inpainting: the second pass keeps the outside of the regions as "
                    "enlarged, and an enlarged latent is blurred", hint="use `lanczos`")
    cw, ch = sc.canvas.width, sc.canvas.height
    w, h = canvas_of((cw, ch), hr.scale, multiple)
    scale_pos = ls.pos(("hires", "scale")) if "scale" in hr.model_fields_set else ls.key_pos(("hires",))
    if max(w, h) > MAX_CANVAS:
        diags.error(scale_pos, f"the second pass would be {w}×{h}, larger than {MAX_CANVAS} pixels a side",
                    hint="use a smaller `scale`")
    elif (w, h) == (cw, ch):
        diags.error(scale_pos, f"`scale: {hr.scale:g}` leaves the canvas at {w}×{h} (each side is rounded down to "
                    f"a multiple of {multiple})", hint="use a larger `scale`")
    elif abs((w / cw) / (h / ch) - 1.0) > 0.02:
        diags.warning(scale_pos, f"the second pass is {w}×{h}: its sides grow {w / cw:.3g}× and {h / ch:.3g}× (each "
                      f"rounded down to a multiple of {multiple}), so the image is stretched",
                      hint=f"pick a `scale` that keeps both sides multiples of {multiple}")
    total, _ = levels_of(hr.steps or steps, hr.strength)
    if total > 1000:
        at = ls.pos(("hires", "strength")) if "strength" in hr.model_fields_set else ls.key_pos(("hires",))
        diags.error(at, f"the second pass would need a schedule of {total} levels (steps / strength; at most 1000)",
                    hint="use a larger `strength` or fewer `steps`")


def theta_of(ir: IR, group: str, steps: int) -> np.ndarray:
    """A coupling group's θ on a schedule of ``steps`` levels: the same θ(t) over sampling progress t (a schedule
    given as values, one per first-pass step, interpolated linearly: still non-decreasing in [0, 1])."""
    sc = ir.scene.scene
    g = next(g for g in sc.groups if g.id == group)
    if isinstance(g.schedule, (m.ValuesSchedule, m.FileSchedule)):
        first = ir.theta[group]
        return np.interp(sch.progress(steps), sch.progress(len(first)), first)
    return sch.theta_table(g.schedule, steps)


def stage_ir(ir: IR) -> tuple[IR, int]:
    """The second pass's IR and the step it starts at: the canvas and every region scaled, the steps a schedule of
    ``int(steps / strength)`` levels, each job's program its last ``steps`` denoise steps; a coupled job's with its
    group's θ(t) on that schedule (:func:`theta_of`), no shared prefix (no references: :func:`check_hires`)."""
    hr = ir.scene.scene.hires
    fam = ir.info.family
    canvas = canvas_of(ir.canvas, hr.scale, fam.multiple)
    total, start = levels_of(hr.steps or ir.steps, hr.strength)
    out = ir.evolve("hires")
    out.canvas, out.steps = canvas, total
    sx, sy = canvas[0] / ir.canvas[0], canvas[1] / ir.canvas[1]
    for r in out.nodes(RegionNode):
        out.graph.nodes[r.id]["node"] = scaled(r, sx, sy)
    until = ir.scene.scene.attention.until
    out.theta = {gid: theta_of(ir, gid, total) for gid in ir.theta}
    out.shared_prefix = {gid: 0 for gid in ir.theta}
    programs = {None: sch.build_program(sch.ProgramInputs(steps=total, until=until))}
    for gid, theta in out.theta.items():
        programs[gid] = sch.build_program(sch.ProgramInputs(steps=total, until=until, theta=theta))
    out.programs = {job.id: tuple(op for op in programs[job.group] if op.from_ >= start) for job in out.jobs()}
    return out, start
