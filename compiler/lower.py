"""Lowering: IR → Plan (plan.json + tensors), the format in docs/plan-format.md. numpy only."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scenec import __version__
from scenec.spec.fsio import atomic_write

from .caps import grid_size
from .ir import IR, ConditionNode, GroupNode, PromptNode
from .schedule import level_to_index

FORMAT = "scenec-plan/1"
NEUTRAL_GREY = 128


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _hash(doc: Any, tensors: dict[str, np.ndarray], names) -> str:
    h = hashlib.sha256(canonical(doc))
    for n in sorted(names):
        t = np.ascontiguousarray(tensors[n])
        h.update(canonical([n, str(t.dtype), list(t.shape)]))
        h.update(t.tobytes())
    return h.hexdigest()


@dataclass
class Plan:
    """A compiled plan in memory: the JSON document and its tensors (numpy)."""

    json: dict
    tensors: dict[str, np.ndarray]
    ir: IR | None = field(default=None, repr=False)

    @property
    def plan_hash(self) -> str:
        return self.json["plan_hash"]

    def write(self, out_dir: str | Path) -> Path:
        """Write plan.json and tensors.safetensors atomically (tensors first, the JSON last)."""
        from safetensors.numpy import save

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "tensors.safetensors", save({k: np.ascontiguousarray(v) for k, v in self.tensors.items()}))
        text = json.dumps(self.json, sort_keys=True, indent=1, ensure_ascii=False) + "\n"
        atomic_write(out / "plan.json", text.encode("utf-8"))
        return out


def lower(ir: IR) -> Plan:
    """Rasterise regions on the family's grids, place references, and emit the plan document."""
    from PIL import Image

    from .geometry import rasterize_grids

    sc = ir.scene.scene
    fam = ir.info.family
    canvas = ir.canvas
    tensors: dict[str, np.ndarray] = {}
    prompts = sorted(ir.nodes(PromptNode), key=lambda p: int(p.id[1:]))
    pidx = {p.id: i for i, p in enumerate(prompts)}

    def region_masks(region) -> dict[str, str]:
        names = {gname: f"region/{region.id}/{gname}" for gname, _ in fam.grids}
        if any(n not in tensors for n in names.values()):
            grids = rasterize_grids(region.geom, region.feather_px, canvas, fam.grids)
            for gname, name in names.items():
                tensors[name] = grids[gname].astype(np.float32)
        return names

    init_name = None
    if sc.background.image:
        with Image.open(ir.scene.resolve(("background", "image"), sc.background.image)) as im:
            init = im.convert("RGB").resize(canvas, Image.Resampling.LANCZOS)
        init_name = "image/init"
        tensors[init_name] = np.asarray(init, dtype=np.uint8)

    programs = ir.extra.get("programs", {})
    jobs_json = []
    for job in ir.jobs():
        streams = ir.streams(job.id)
        g = streams[0]
        ents = []
        for s in streams[1:]:
            reg = ir.region_of(s.id)
            ents.append({"id": s.name, "prompt": pidx[ir.prompt_of(s.id).id],
                         "negative": pidx[ir.prompt_of(s.id, "negative").id],
                         "gain": s.gain, "masks": region_masks(reg) if reg is not None else None,
                         "region": reg.id if reg is not None else None})
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
                    tensors[name] = acc
                inpaint[gname] = name
        conds = []
        for c in ir.succ(job.id, ConditionNode):
            s = next(s for s in streams if s.entity == c.entity)
            reg = ir.region_of(s.id)
            conds.append(_lower_condition(ir, c, reg, region_masks(reg), tensors))
        jobs_json.append({
            "id": job.id, "name": job.id, "seed": job.seed, "index": job.index,
            "group": job.group, "variant": job.variant,
            "source": {"file": ir.scene.file.relative_to(ir.scene.root).as_posix(), "line": job.line},
            "global": {"prompt": pidx[ir.prompt_of(g.id).id], "negative": pidx[ir.prompt_of(g.id, "negative").id],
                       "gain": g.gain},
            "entities": ents,
            "init_image": init_name,
            "inpaint_mask": inpaint,
            "conditions": conds,
            "program": programs.get(job.id, []),
        })
        if job.id in ir.extra.get("matrix", {}):  # the job's matrix values (metadata: prompts carry their effect)
            jobs_json[-1]["matrix"] = ir.extra["matrix"][job.id]

    groups_json = []
    for gnode in sorted(ir.nodes(GroupNode), key=lambda x: x.id):
        gid = gnode.id.split(".", 1)[1]
        name = f"group/{gid}/theta"
        tensors[name] = np.asarray(ir.extra["theta"][gid], dtype=np.float32)
        groups_json.append({"id": gid, "jobs": [j.id for j in ir.succ(gnode.id)], "theta": name,
                            "schedule": gnode.schedule,
                            "shared_prefix": int(ir.extra.get("shared_prefix", {}).get(gid, 0))})

    doc = {
        "format": FORMAT,
        "scenec_version": __version__,
        "scene": {"name": ir.scene.name, "file": ir.scene.file.relative_to(ir.scene.root).as_posix()},
        "model": {"spec": ir.model_spec, "family": fam.name, "repo": ir.info.repo,
                  "max_sequence_length": ir.info.max_sequence_length},
        "canvas": {"width": canvas[0], "height": canvas[1]},
        "grids": {gname: list(grid_size(canvas, px)) for gname, px in fam.grids},
        "sampler": {"kind": fam.sampler, "steps": ir.steps, "guidance": float(ir.guidance),
                    "true_cfg": float(ir.true_cfg)},
        "attention": sc.attention.model_dump(),
        "prompts": [p.text for p in prompts],
        "output": {"dir": sc.output.dir, "ext": "png"},
        "jobs": jobs_json,
        "groups": groups_json,
    }
    _stamp_hashes(doc, tensors)
    return Plan(doc, tensors, ir)


def _lower_condition(ir: IR, c: ConditionNode, reg, masks: dict, tensors: dict) -> dict:
    from PIL import Image

    from .geometry import rasterize, rasterize_grids

    canvas = ir.canvas
    name = f"cond/{reg.id}/rgba"
    if name not in tensors:
        with Image.open(c.path) as im:
            ref = im.convert("RGB")
        tensors[name] = place_reference(ref, reg.geom, reg.feather_px, c.fit, canvas, rasterize)
    out = {"entity": c.entity, "image": name, "sha256": c.sha256, "fit": c.fit,
           "window": [level_to_index(c.window[0], ir.steps), level_to_index(c.window[1], ir.steps)],
           "cycles": c.cycles,
           "preserve": None if c.preserve is None else level_to_index(c.preserve, ir.steps),
           "eta": c.eta, "masks": masks, "related": None, "modulation": c.modulation}
    if c.related is not None:
        rel = {gname: f"related/{c.id}/{gname}" for gname, _ in ir.info.family.grids}
        if any(n not in tensors for n in rel.values()):
            grids = rasterize_grids(c.related, 0.0, canvas, ir.info.family.grids)
            for gname, name in rel.items():
                tensors[name] = grids[gname].astype(np.float32)
        out["related"] = rel
    return out


def place_reference(ref, geom, feather_px: float, fit: str, canvas, rasterize) -> np.ndarray:
    """The reference fitted into the region's bounding box on a neutral grey canvas; alpha = region."""
    from PIL import Image

    w, h = canvas
    x0, y0, x1, y1 = geom.bounds
    bw, bh = max(1, round(x1 - x0)), max(1, round(y1 - y0))
    rw, rh = ref.size
    if fit == "stretch":
        size, offset = (bw, bh), (0, 0)
    else:
        s = min(bw / rw, bh / rh) if fit == "contain" else max(bw / rw, bh / rh)
        size = (max(1, round(rw * s)), max(1, round(rh * s)))
        offset = ((bw - size[0]) // 2, (bh - size[1]) // 2)
    scaled = ref.resize(size, Image.Resampling.LANCZOS)
    box = Image.new("RGB", (bw, bh), (NEUTRAL_GREY,) * 3)
    foot = Image.new("L", (bw, bh), 0)
    box.paste(scaled, offset)
    foot.paste(255, (max(0, offset[0]), max(0, offset[1]), min(bw, offset[0] + size[0]), min(bh, offset[1] + size[1])))
    rgb = Image.new("RGB", (w, h), (NEUTRAL_GREY,) * 3)
    fp = Image.new("L", (w, h), 0)
    rgb.paste(box, (round(x0), round(y0)))
    fp.paste(foot, (round(x0), round(y0)))
    cover = rasterize(geom, feather_px, canvas, 1)
    alpha = np.clip(np.round(cover * (np.asarray(fp, np.float32) / 255.0) * 255.0), 0, 255).astype(np.uint8)
    return np.dstack([np.asarray(rgb, np.uint8), alpha])


def _stamp_hashes(doc: dict, tensors: dict[str, np.ndarray]) -> None:
    """plan_hash over everything; job_hash over what affects one image (settings, texts, its tensors).

    A job's hash names its tensors by content, not by name: tensor names (``region/r.fox.1/token``)
    are numbered across the whole plan, so another job's regions would otherwise move this one's hash.
    """
    settings = {k: doc[k] for k in ("format", "scenec_version", "model", "canvas", "grids", "sampler", "attention")}
    groups = {g["id"]: g for g in doc["groups"]}
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
        material["entities"] = [{**{k: v for k, v in e.items() if k != "region"},  # a plan-wide name; masks hold it
                                 "prompt": text(e["prompt"]), "negative": text(e["negative"])}
                                for e in material["entities"]]
        if job["group"]:
            g = groups[job["group"]]
            material["theta"] = digest(g["theta"])
            material["shared_prefix"] = g["shared_prefix"]
        job["job_hash"] = hashlib.sha256(canonical({"settings": settings, "job": material})).hexdigest()
    # where a job was written (line numbers) is metadata: moving it does not change the images
    semantic = {k: v for k, v in doc.items() if k != "plan_hash"}
    semantic["jobs"] = [{k: v for k, v in j.items() if k not in ("source", "job_hash")} for j in doc["jobs"]]
    doc["plan_hash"] = _hash(semantic, tensors, tensors.keys())
