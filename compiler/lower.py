"""Lowering: IR → Plan (plan.json + tensors) in the typed format of ``spec/plan.py``. numpy only.

The document is built from the format's own types (``Job``, ``Condition``, ``Group``, …) and emitted
with ``model_dump(by_alias=True, mode="json")``; hashes are stamped on the emitted JSON.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from scenec import __version__
from scenec.spec.plan import (
    FORMAT,
    Attention,
    Canvas,
    Condition,
    Document,
    EntityStream,
    GlobalStream,
    Group,
    Job,
    Model,
    Modulation,
    Output,
    Plan,
    Sampler,
    SceneRef,
    Source,
    write_plan,
)

from .caps import grid_size
from .control import lower_controls
from .files import to_rgb
from .ir import IR, ConditionNode, GroupNode, PromptNode
from .provenance import model_directory_at, resolved_scene

NEUTRAL_GREY = 128


class CompiledPlan(Plan):
    """A validated plan as the compiler returns it, with the IR it was lowered from (``ir``)."""

    def __init__(self, json_doc: dict, tensors: dict, ir: IR | None = None):
        super().__init__(json_doc, tensors)
        if self.invalid:  # the compiler emits only valid jobs: anything else is a compiler bug
            raise next(iter(self.invalid.values()))
        self.ir = ir

    @property
    def warnings(self) -> tuple:
        """The scene's warnings (``Diagnostic``s) found while compiling it."""
        return self.ir.warnings if self.ir is not None else ()

    def write(self, out_dir: str | Path) -> Path:
        """Write plan.json and tensors.safetensors atomically (``spec.plan.write_plan``)."""
        return write_plan(self, out_dir)


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _hash(doc: Any, tensors: dict[str, np.ndarray], names) -> str:
    h = hashlib.sha256(canonical(doc))
    for n in sorted(names):
        t = np.ascontiguousarray(tensors[n])
        h.update(canonical([n, str(t.dtype), list(t.shape)]))
        h.update(t.tobytes())
    return h.hexdigest()


def _rasterized(tensors: dict, prefix: str, geom, feather_px: float, canvas, grids) -> dict[str, str]:
    """``{grid: tensor name}`` of a geometry's masks named ``prefix/<grid>``, rasterised once per name."""
    from .raster import rasterize_grids

    names = {gname: f"{prefix}/{gname}" for gname, _ in grids}
    if any(n not in tensors for n in names.values()):
        masks = rasterize_grids(geom, feather_px, canvas, grids)
        for gname, n in names.items():
            tensors[n] = masks[gname].astype(np.float32)
    return names


def lower(ir: IR) -> CompiledPlan:
    """Rasterise regions on the family's grids, place references, and emit the plan document (with ``hires``, the
    second pass's plan nested in it: compiler/hires.py)."""
    sc = ir.scene.scene
    tensors: dict[str, np.ndarray] = {}
    init_name, init_level, foot = _init_image(ir, tensors)
    repaint = sc.background.strength is not None and sc.background.repaint != "regions"  # img2img: everything
    doc = _document(ir, tensors, init_name, init_level, repaint=repaint, footprint=foot,
                    overlay=sc.background.overlay and not repaint)
    if sc.hires is not None:
        doc["hires"] = _hires(ir, tensors, foot)
    _stamp_hashes(doc, tensors, _directory(ir))
    return CompiledPlan(doc, tensors, ir)


def _directory(ir: IR) -> str | None:
    """A local diffusers directory's path from the project root (None: another model, or outside the project)."""
    directory = ir.info.repo if ir.info.source == "local" else None
    return None if directory is None else model_directory_at(directory, ir.scene.root)


def _init_image(ir: IR, tensors: dict) -> tuple[str | None, int | None, tuple | None]:
    """``background.image`` placed on the canvas (``fit`` into ``box``; stretched over the whole canvas by default),
    with ``background.strength`` the level img2img starts at, and the image's footprint in canvas pixels when it
    leaves part of the canvas to paint (outpainting), else None."""
    from PIL import Image

    sc = ir.scene.scene
    bg = sc.background
    if not bg.image:
        return None, None, None
    foot = None
    with Image.open(ir.scene.resolve(("background", "image"), bg.image)) as im:
        rgb = to_rgb(im)
        if bg.fit == "stretch" and bg.box is None:
            init = rgb.resize(ir.canvas, Image.Resampling.LANCZOS)
        else:
            from .raster import place_on_canvas

            init, foot = place_on_canvas(rgb, bg.box or [0.0, 0.0, 1.0, 1.0], bg.fit, ir.canvas, NEUTRAL_GREY)
    tensors["image/init"] = np.asarray(init, dtype=np.uint8)
    if bg.strength is None:
        return "image/init", None, foot
    from .schedule import img2img_start

    return "image/init", img2img_start(ir.steps, bg.strength), foot


def _hires(ir: IR, tensors: dict, foot: tuple | None = None) -> dict:
    """The second pass (compiler/hires.py): a plan of its own at the larger canvas, its jobs (the same ids) starting
    from the init image the runtime supplies, repainting everything (an inpainting scene: its regions only); its
    tensors join the plan's under ``hires/``."""
    from scenec.spec.plan import HIRES_INIT

    from .hires import PREFIX, stage_ir

    ir2, start = stage_ir(ir)
    own: dict[str, np.ndarray] = {}
    bg = ir.scene.scene.background  # inpainting keeps the outside of the regions in both passes
    repaint = not bg.image or (bg.strength is not None and bg.repaint != "regions")
    if foot is not None:  # the image's footprint on the larger canvas
        sx, sy = ir2.canvas[0] / ir.canvas[0], ir2.canvas[1] / ir.canvas[1]
        foot = (foot[0] * sx, foot[1] * sy, foot[2] * sx, foot[3] * sy)
    doc2 = _document(ir2, own, HIRES_INIT, start, repaint=repaint, provenance=False, footprint=foot)
    _stamp_hashes(doc2, own, _directory(ir))
    names = {n: PREFIX + n for n in own}

    def renamed(x: Any, key: str | None = None) -> Any:
        if isinstance(x, dict):
            return {k: renamed(v, k) for k, v in x.items()}
        if isinstance(x, list):
            return [renamed(v, key) for v in x]
        if isinstance(x, str) and key not in _NOT_TENSORS:
            return names.get(x, x)
        return x

    doc2["jobs"] = [renamed(j) for j in doc2["jobs"]]
    doc2["groups"] = [renamed(g) for g in doc2["groups"]]
    tensors.update({names[n]: t for n, t in own.items()})
    return {"upscaler": ir.scene.scene.hires.upscaler, "plan": doc2}


_NOT_TENSORS = frozenset({"id", "name", "entity", "region", "matrix", "job_hash", "sha256", "adapter_sha256", "jobs",
                          "schedule"})


def _document(ir: IR, tensors: dict, init_name: str | None, init_level: int | None, repaint: bool,
              provenance: bool = True, footprint: tuple | None = None, overlay: bool = False) -> dict:
    """The plan document of ``ir`` (hashes not stamped): every job's streams, regions rasterised on the family's
    grids, init image (``repaint``: the whole image, img2img), references, visual prompts, controls; groups.
    ``provenance``: the resolved scene and each job's source line (the hires pass's nested plan has neither).
    ``footprint``: where the init image lies when it leaves part of the canvas to paint (outpainting). ``overlay``:
    each job's painted part at canvas size, where the runtime pastes the init image back (``background.overlay``)."""
    sc = ir.scene.scene
    fam = ir.info.family
    canvas = ir.canvas
    scene_file = ir.scene.file.relative_to(ir.scene.root).as_posix()
    prompts = sorted(ir.nodes(PromptNode), key=lambda p: int(p.id[1:]))
    pidx = {p.id: i for i, p in enumerate(prompts)}

    def region_masks(region) -> dict[str, str]:
        return _rasterized(tensors, f"region/{region.id}", region.geom, region.feather_px, canvas, fam.grids)

    def prompts_of(stream_id: str) -> dict[str, int]:
        return {"prompt": pidx[ir.prompt_of(stream_id).id], "negative": pidx[ir.prompt_of(stream_id, "negative").id]}

    # ControlNets act on the whole image of every job: lowered once per plan (each image read and hashed once)
    controls = lower_controls(ir, tensors) if sc.control else []
    # outpainting: the canvas outside the image, painted in every job (on the grids, and at pixels for `overlay`)
    outside = None
    if footprint is not None:
        grids = list(fam.grids) + ([("pixel", 1)] if overlay else [])
        outside = _outside(footprint, sc.background.feather * min(canvas), canvas, grids)
    jobs_json = []
    for job in ir.jobs():
        streams = ir.streams(job.id)
        g = streams[0]
        ents = []
        for s in streams[1:]:
            reg = ir.region_of(s.id)
            ents.append(EntityStream(id=s.name, **prompts_of(s.id), gain=s.gain,
                                     masks=region_masks(reg) if reg is not None else None,
                                     region=reg.id if reg is not None else None,
                                     lora=list(ir.entity_loras.get(s.entity, ()) if s.entity else ())))
        inpaint = None
        if init_name is not None:
            inpaint = {}
            regs = [ir.region_of(s.id) for s in streams[1:]]
            key = hashlib.sha1(",".join(sorted(r.id if r else "*" for r in regs)).encode()).hexdigest()[:12]
            for gname, px in fam.grids:
                name = f"inpaint/{key}/{gname}"
                if name not in tensors:
                    acc = np.zeros(grid_size(canvas, px), np.float32)
                    for r in regs:
                        acc = np.maximum(acc, 1.0 if r is None else tensors[region_masks(r)[gname]])
                    if outside is not None:  # outpainting: the canvas outside the image is painted too
                        acc = np.maximum(acc, outside[gname])
                    if repaint:  # img2img repaints everything
                        acc = np.ones_like(acc)
                    tensors[name] = acc
                inpaint[gname] = name
        painted = None
        if overlay and init_name is not None:  # the painted part at pixel resolution (runtime/hires.py pastes back)
            painted = f"overlay/{key}"
            if painted not in tensors:
                from .raster import rasterize

                acc = np.zeros((canvas[1], canvas[0]), np.float32)
                for r in regs:
                    acc = np.maximum(acc, 1.0 if r is None else rasterize(r.geom, r.feather_px, canvas, 1))
                if outside is not None:
                    acc = np.maximum(acc, outside["pixel"])
                tensors[painted] = acc
        conds = []
        for c in ir.succ(job.id, ConditionNode):
            s = next(s for s in streams if s.entity == c.entity)
            reg = ir.region_of(s.id)
            conds.append(_lower_condition(ir, c, reg, region_masks(reg), tensors))
        visuals = _lower_visuals(ir, streams, region_masks, tensors)
        job_controls = _job_controls(ir, controls, streams, region_masks, tensors)
        typed = Job(id=job.id, name=job.id, seed=job.seed, index=job.index, group=job.group, variant=job.variant,
                    source=Source(file=scene_file, line=job.line) if provenance else None,
                    global_=GlobalStream(**prompts_of(g.id), gain=g.gain), entities=ents,
                    init_image=init_name, inpaint_mask=inpaint, overlay=painted, conditions=conds, visuals=visuals,
                    controls=job_controls, init_level=init_level,
                    program=list(ir.programs.get(job.id, ())),
                    matrix=ir.matrix.get(job.id))  # metadata (selection, manifests): prompts carry its effect
        # the `matrix`, `visuals` and `controls` keys are present only in scenes that have them
        absent = {k for k in ("matrix", "visuals", "controls", "overlay") if not getattr(typed, k)}
        jobs_json.append(typed.model_dump(by_alias=True, mode="json", exclude=absent or None))

    groups = []
    for gnode in sorted(ir.nodes(GroupNode), key=lambda x: x.id):
        gid = gnode.id.split(".", 1)[1]
        name = f"group/{gid}/theta"
        tensors[name] = np.asarray(ir.theta[gid], dtype=np.float32)
        groups.append(Group(id=gid, jobs=[j.id for j in ir.succ(gnode.id)], theta=name, schedule=gnode.schedule,
                            shared_prefix=int(ir.shared_prefix.get(gid, 0))))

    directory = ir.info.repo if ir.info.source == "local" else None  # a diffusers directory's absolute path
    resolved, files = resolved_scene(ir.scene, ir.model_spec, ir.loras, ir.embeddings, ir.clip_skip,
                                     ir.prompt_syntax,
                                     (ir.info.repo, ir.info.config) if ir.info.source == "file" else None,
                                     ir.vae[0], directory) if provenance else ("", {})
    document = Document(
        format=FORMAT,
        scenec_version=__version__,
        scene=SceneRef(name=ir.scene.name, file=scene_file, overrides=list(ir.scene.overrides),
                       resolved=resolved, files=files),
        model=Model(spec=ir.model_spec, family=fam.name, repo=ir.info.repo,
                    max_sequence_length=ir.info.max_sequence_length, lora=list(ir.loras),
                    embeddings=list(ir.embeddings), clip_skip=ir.clip_skip, prompt_syntax=ir.prompt_syntax,
                    config=ir.info.config, sha256=ir.info.sha256, vae=ir.vae[0], vae_sha256=ir.vae[1]),
        canvas=Canvas(width=canvas[0], height=canvas[1], tiling=sc.canvas.tiling),
        grids={gname: grid_size(canvas, px) for gname, px in fam.grids},
        sampler=Sampler(kind=ir.solver or fam.sampler, steps=ir.steps, guidance=float(ir.guidance),
                        true_cfg=float(ir.true_cfg), cfg_rescale=float(sc.sampler.cfg_rescale),
                        freeu=None if sc.sampler.freeu is None else sc.sampler.freeu.model_dump()),
        attention=Attention(**{**sc.attention.model_dump(), **_eligen(ir)}),
        prompts=[p.text for p in prompts],
        output=Output(dir=sc.output.dir, ext="png"),
        jobs=jobs_json,
        groups=groups,
    )
    return document.model_dump(by_alias=True, mode="json", exclude={"hires"})


def _outside(foot: tuple, feather_px: float, canvas, grids) -> dict:
    """The canvas outside an image's footprint on every grid (1 = painted), blending ``feather_px`` into the image
    (its coverage ramps inward, as an entity's feather does) on the sides where something is painted: a side on the
    canvas's own edge is pushed past it, so that no ramp lies there."""
    from shapely.geometry import box

    from .raster import rasterize_grids

    w, h = canvas
    out = feather_px + 1.0
    x0, y0, x1, y1 = foot
    grown = (x0 - out if x0 <= 0 else x0, y0 - out if y0 <= 0 else y0, x1 + out if x1 >= w else x1,
             y1 + out if y1 >= h else y1)
    cov = rasterize_grids(box(*grown), feather_px, canvas, grids)
    return {g: (1.0 - m).astype(np.float32) for g, m in cov.items()}


def _job_controls(ir: IR, controls: list, streams, region_masks, tensors: dict) -> list:
    """The plan's controls as one job has them: a control with a ``region`` takes that entity's region masks in this
    job (occlusion included), and is left out of a job without the entity (a group's variant)."""
    out = []
    for c in controls:
        if c.region is None:
            out.append(c)
            continue
        s = next((s for s in streams[1:] if s.entity == c.region), None)
        reg = ir.region_of(s.id) if s is not None else None
        if s is not None:
            masks = region_masks(reg) if reg is not None else None
            if masks is not None and all(np.all(tensors[n] == 1.0) for n in masks.values()):
                masks = None  # a region covering the canvas (no shape): the control everywhere, unmasked
            out.append(c.model_copy(update={"masks": masks}))
    return out


def _eligen(ir: IR) -> dict:
    """EliGen's entity-prompt padding when its LoRA is loaded (compiler/lora.py ``eligen_padding``)."""
    from .lora import eligen_padding

    pad = eligen_padding(ir.scene, list(ir.loras), ir.info.family.name)
    return {} if pad is None else {"pad_prompts": pad}


def _lower_condition(ir: IR, c: ConditionNode, reg, masks: dict, tensors: dict) -> Condition:
    """A reference condition: its placed RGBA, and its masks = the region's coverage × the placed image's
    footprint on every grid (``fit: contain``'s letterbox bars are not the reference: neither pasted nor a
    SOW condition region). Levels → step indices on the model's own noise schedule (compiler/levels.py)."""
    from PIL import Image

    from .levels import level_index, noise_levels
    from .raster import footprint, rasterize, rasterize_grids

    canvas = ir.canvas
    name = f"cond/{reg.id}/rgba"
    with Image.open(c.path) as im:
        rgb = to_rgb(im)  # upright: its size is the one the user sees
        foot = footprint(rgb.size, reg.geom.bounds, c.fit)
        if name not in tensors:
            tensors[name] = place_reference(rgb, reg.geom, reg.feather_px, c.fit, canvas, rasterize)
    x0, y0, x1, y1 = reg.geom.bounds
    if not (foot[0] <= x0 and foot[1] <= y0 and foot[2] >= x1 and foot[3] >= y1):  # bars inside the region
        from shapely.geometry import box

        fp = rasterize_grids(box(*foot), 0.0, canvas, ir.info.family.grids)
        for gname, region_name in list(masks.items()):
            tensors.setdefault(f"cond/{reg.id}/mask/{gname}", (tensors[region_name] * fp[gname]).astype(np.float32))
        masks = {gname: f"cond/{reg.id}/mask/{gname}" for gname in masks}
    related = None
    if c.related is not None:
        related = _rasterized(tensors, f"related/{c.id}", c.related, 0.0, canvas, ir.info.family.grids)
    table = noise_levels(ir.info, canvas, ir.steps, ir.solver)
    return Condition(entity=c.entity, image=name, sha256=c.sha256, fit=c.fit,
                     window=(level_index(c.window[0], table), level_index(c.window[1], table)),
                     cycles=c.cycles, preserve=None if c.preserve is None else level_index(c.preserve, table),
                     eta=c.eta, masks=masks, related=related,
                     modulation=Modulation(**c.modulation) if c.modulation is not False else False)


def _lower_visuals(ir: IR, streams, region_masks, tensors: dict) -> list:
    """The visual prompts of a job's entities (compiler/visual.py), each with its entity's region masks."""
    from .visual import lower_visual

    idx = {e.id: i for i, e in enumerate(ir.scene.scene.entities)}
    out = []
    for s in streams[1:]:
        i = idx.get(s.entity) if s.entity is not None else None
        if i is not None and ir.scene.scene.entities[i].visual is not None:
            reg = ir.region_of(s.id)
            out.append(lower_visual(ir, i, region_masks(reg) if reg is not None else None, tensors))
    return out


def place_reference(ref, geom, feather_px: float, fit: str, canvas, rasterize) -> np.ndarray:
    """The reference fitted into the region's bounding box on a neutral grey canvas; alpha = the region's
    coverage × the placed image's footprint (``raster.footprint``: letterbox bars are not the reference)."""
    from PIL import Image

    from .raster import fit_into_box, footprint

    w, h = canvas
    scaled, (bw, bh), offset = fit_into_box(ref, geom.bounds, fit)
    box = Image.new("RGB", (bw, bh), (NEUTRAL_GREY,) * 3)
    box.paste(scaled, offset)
    rgb = Image.new("RGB", (w, h), (NEUTRAL_GREY,) * 3)
    fp = Image.new("L", (w, h), 0)
    rgb.paste(box, (round(geom.bounds[0]), round(geom.bounds[1])))
    fp.paste(255, footprint(ref.size, geom.bounds, fit))
    cover = rasterize(geom, feather_px, canvas, 1)
    alpha = np.clip(np.round(cover * (np.asarray(fp, np.float32) / 255.0) * 255.0), 0, 255).astype(np.uint8)
    return np.dstack([np.asarray(rgb, np.uint8), alpha])


def _not_where(model: dict, directory: str | None = None) -> dict:
    """A model, a single-file checkpoint and a VAE by what they are, not where they lie (the scene's
    `../m.safetensors`, an absolute path): a file by its sha256, a local config or VAE directory by a marker (the
    build's cache key digests their files, scenec/build/keys.py), so the embedded scene (paths from the root)
    compiles to the image's job in a copy of the project too. A local model directory (``directory``: its path from
    the project root, compiler/provenance.py ``model_directory_at``; None for one outside the project) by that
    path, or by the marker alone outside the project, never by its absolute path or the scene's spelling of it: a
    copy or a fresh checkout elsewhere keeps its hashes (its files are in the cache key). An alias or hub id keeps its
    hash."""
    out = dict(model)
    if out.get("sha256"):
        out.pop("spec", None)
        out.pop("repo", None)
        if Path(str(out.get("config"))).is_absolute():
            out["config"] = "directory"
    elif out.get("repo") and Path(out["repo"]).is_absolute():  # a diffusers directory (a hub id is ORG/NAME)
        out.pop("spec", None)
        out["repo"] = "directory" if directory is None else f"directory:{directory}"
    if out.get("vae"):
        out["vae"] = "file" if out.get("vae_sha256") else "directory"
    return out


def _stamp_hashes(doc: dict, tensors: dict[str, np.ndarray], directory: str | None = None) -> None:
    """plan_hash over everything; job_hash over what affects one image (settings, texts, its tensors).
    ``directory``: a local model directory's path from the project root (:func:`_not_where`).

    A job's hash names its tensors by content, not by name: tensor names (``region/r.fox.1/token``)
    are numbered across the whole plan, so another job's regions would otherwise move this one's hash.
    """
    from .lora import identity

    settings = {k: doc[k] for k in ("format", "scenec_version", "model", "canvas", "grids", "sampler", "attention")}
    # a LoRA by what it does (digest, scale, format), not where its file is
    settings["model"] = _not_where(identity(doc["model"]), directory)
    groups = {g["id"]: g for g in doc["groups"]}
    hires = doc.get("hires")  # the second pass's jobs carry their own hashes (compiler/hires.py)
    second = {j["id"]: j["job_hash"] for j in hires["plan"]["jobs"]} if hires else {}
    digests: dict[str, str] = {}

    def digest(name: str) -> str:
        if name not in digests:
            t = np.ascontiguousarray(tensors[name])
            h = hashlib.sha256(canonical([str(t.dtype), list(t.shape)]))
            h.update(t.tobytes())
            digests[name] = "sha256:" + h.hexdigest()
        return digests[name]

    def by_content(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: by_content(v) for k, v in x.items()}
        if isinstance(x, list):
            return [by_content(v) for v in x]
        if isinstance(x, str) and x in tensors:
            return digest(x)
        return x

    for job in doc["jobs"]:
        # prompt indices depend on the other jobs of the plan: hash the texts instead
        text = doc["prompts"].__getitem__
        material = by_content({k: v for k, v in job.items()
                               if k not in ("id", "name", "index", "source", "job_hash", "group", "variant", "matrix")})
        material["global"] = {**material["global"], "prompt": text(job["global"]["prompt"]),
                              "negative": text(job["global"]["negative"])}
        material["entities"] = [identity({**{k: v for k, v in e.items() if k != "region"},  # a plan-wide name
                                          "prompt": text(e["prompt"]), "negative": text(e["negative"])})
                                for e in material["entities"]]
        for vp in material.get("visuals", ()):  # an adapter is its content (the digest), not where it lies
            vp.pop("adapter", None)
            vp.pop("encoder", None)  # its encoder's files are in the cache key (scenec/build/keys.py)
        for c in material.get("controls", ()):  # as an encoder: its files are in the cache key
            c.pop("model", None)
            c.pop("model_spec", None)
            c.pop("region", None)  # a name: what it does is its masks, by content
            for k in ("mode", "masks"):  # absent before Union and regional controls: hashes kept
                if c.get(k) is None:
                    c.pop(k, None)
        if job["group"]:
            g = groups[job["group"]]
            material["theta"] = digest(g["theta"])
            material["shared_prefix"] = g["shared_prefix"]
        if job["id"] in second:
            material["hires"] = {"upscaler": hires["upscaler"], "job": second[job["id"]]}
        job["job_hash"] = hashlib.sha256(canonical({"settings": settings, "job": material})).hexdigest()
    # where a job was written (line numbers) is metadata: moving it does not change the images
    semantic = {k: v for k, v in doc.items() if k != "plan_hash"}
    semantic["jobs"] = [{k: v for k, v in j.items() if k not in ("source", "job_hash")} for j in doc["jobs"]]
    doc["plan_hash"] = _hash(semantic, tensors, tensors.keys())
