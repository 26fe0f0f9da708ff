"""Executing a plan into files: PNGs with provenance metadata, JSON sidecars, optional mask PNGs.

Every file is written atomically (temp file in the target directory, fsync, ``os.replace``), so a
crash never leaves a half-written image that a later build would mistake for a result.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from scenec.spec.errors import PlanError, RuntimeErrorBase
from scenec.spec.fsio import atomic_write, json_bytes
from scenec.spec.plan import Job, Plan

from .hires import decodes, finish, run_image
from .memory import peak, reset_peak
from .sampler import run_batch, run_group

Progress = Callable[[int, int, str], None]  # (steps done, steps total, job name)


def png_bytes(image, text: dict[str, str]) -> bytes:
    """PNG with tEXt chunks; deterministic for the same pixels and text (no timestamps)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in text.items():
        info.add_text(k, str(v))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _scenec_made(path: Path) -> bool:
    """Whether ``path`` carries scenec's marks: a PNG with scenec's text chunks, or a sidecar (JSON with an
    image digest and scenec's keys)."""
    try:
        if path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                return any(k.startswith("scenec:") for k in getattr(im, "text", {}))
        doc = json.loads(path.read_text(encoding="utf-8"))
        return isinstance(doc, dict) and "sha256" in doc and any(k.startswith("scenec:") for k in doc)
    except (OSError, ValueError, SyntaxError):
        return False


def foreign(img: Path, side: Path) -> Path | None:
    """An output's image or sidecar path holding a file scenec did not write, or None. Either file carrying
    scenec's marks vouches for the pair (a damaged image beside its sidecar is scenec's to rebuild)."""
    there = [p for p in (img, side) if p.exists()]
    if not there or any(_scenec_made(p) for p in there):
        return None
    return there[0]


def keep_edited(img: Path, side: Path) -> Path | None:
    """An image scenec built and someone changed since (its bytes differ from its sidecar's sha256) is moved aside
    before it is replaced, to ``<name>.edited.png`` (``.edited-2.png``, … when taken): nothing is lost. Its new path,
    or None (no such image)."""
    from scenec.spec.fsio import keep_as_edited, sha256_file

    try:
        doc = json.loads(side.read_text(encoding="utf-8"))
        if not (isinstance(doc, dict) and doc.get("sha256") and img.is_file()) or sha256_file(img) == doc["sha256"]:
            return None
    except (OSError, ValueError):
        return None  # no sidecar to tell: a build compares with its manifest first (scenec/build/driver.py)
    return keep_as_edited(img)


def _safe_stem(out_dir: Path, name: str) -> Path:
    """The output path stem for a job name, kept inside ``out_dir`` (names may have subfolders)."""
    if not name or "\\" in name or any(part in ("", ".", "..") for part in name.split("/")):
        raise PlanError(f"output name {name!r} is not a safe relative file name")
    p = (out_dir / name).resolve()
    if not p.is_relative_to(out_dir.resolve()):
        raise PlanError(f"output name {name!r} leaves the output directory")
    return out_dir / name


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s) or "_"


def metadata(plan: Plan, job: Job, backend) -> dict[str, str]:
    """Provenance written into each PNG and its sidecar (what made this image)."""
    import json

    from scenec import __version__

    doc = plan.doc
    extra = {"scenec:overrides": " ".join(doc.scene.overrides)} if doc.scene.overrides else {}
    sampler = {"seed": job.seed, "steps": doc.sampler.steps, "guidance": doc.sampler.guidance,
               "true_cfg": doc.sampler.true_cfg, "kind": doc.sampler.kind, "group": job.group or "",
               "variant": job.variant or ""}
    if doc.sampler.cfg_rescale:  # the SD family's guidance knobs, only where they acted (other images keep their bytes)
        sampler["cfg_rescale"] = doc.sampler.cfg_rescale
    if doc.sampler.freeu is not None:
        sampler["freeu"] = doc.sampler.freeu.model_dump()
    if doc.hires is not None:  # the second pass (runtime/hires.py), as A1111's infotext names its hires settings
        second = next((j for j in doc.hires.plan.get("jobs") or [] if j.get("id") == job.id), {})
        c, steps = doc.hires.plan["canvas"], doc.hires.plan["sampler"]["steps"]
        extra["scenec:hires"] = json.dumps({"size": [c["width"], c["height"]], "upscaler": doc.hires.upscaler,
                                            "steps": len(second.get("program") or []), "of": steps})
    # what rebuilds the image (`scenec show`, `scenec build --from`): the resolved scene and its files
    rebuild = {"scenec:scene.yaml": doc.scene.resolved,
               "scenec:files": json.dumps(doc.scene.files, sort_keys=True)} if doc.scene.resolved else {}
    return {
        **extra,
        **rebuild,
        "scenec:sampler": json.dumps(sampler),
        # `text_encoder` only where its text-encoder layers acted (other images keep their bytes)
        "scenec:loras": json.dumps([{"name": lo.name, "sha256": lo.sha256, "scale": lo.scale, "format": lo.format,
                                     **({"text_encoder": True} if lo.text_encoder else {})}
                                    for lo in doc.model.lora]),
        "scenec:device": str(backend.device),
        "scenec:dtype": str(backend.dtype).replace("torch.", ""),
        "scenec:scene": plan.doc.scene.name,
        "scenec:scene_file": plan.doc.scene.file,  # relative to the project root
        "scenec:job": job.id,
        "scenec:group": job.group or "",
        "scenec:variant": job.variant or "",
        "scenec:seed": str(job.seed),
        "scenec:plan_hash": plan.plan_hash,
        "scenec:job_hash": job.job_hash,
        "scenec:model": backend.model_id,
        "scenec:version": __version__,
    }


def execute(plan: Plan, backend, out_dir: str | Path, masks: bool = False, progress: Progress | None = None,
            keep_cache: bool = False, stamps: dict[str, dict] | None = None) -> list[dict]:
    """Run every job of ``plan`` on ``backend``; write ``<name>.png`` + ``<name>.json`` per job.

    Returns one result dict per job: ``status`` "built" (with paths, timings) or "failed" (with
    ``error``, one sentence). Expected failures (unsupported features, bad plan data, non-finite values,
    a file that cannot be written) fail that job only; the other jobs still run. A coupling group's
    jobs run together (their shared prefix once). ``stamps``: what the caller wants in each job's
    sidecar as ``build`` (by job id; the batch build's manifest stamp).
    """
    out = Path(out_dir)
    _require_png(plan)
    raw = {j.get("id"): j for j in plan.json.get("jobs") or [] if isinstance(j, dict)}
    steps_per_job = {jid: len((raw.get(jid) or {}).get("program") or []) for jid, _ in plan.all_jobs()}
    if plan.doc.hires is not None:  # the second pass's steps too (runtime/hires.py)
        for j in plan.doc.hires.plan.get("jobs") or []:
            if isinstance(j, dict) and j.get("id") in steps_per_job:
                steps_per_job[j["id"]] += len(j.get("program") or [])
    total = sum(steps_per_job.values())
    done_by: dict[str, int] = {}  # ops done per job (a group's jobs advance together)
    results = []

    def report(job_id: str, k: int) -> None:
        done_by[job_id] = k
        if progress is not None:
            progress(sum(done_by.values()), total, (raw.get(job_id) or {}).get("name", job_id))

    def runs():
        """(job id, job or None, JobResult | error) in plan order."""
        started: set[str] = set()
        groups = {g.id for g in plan.groups}
        for jid, job in plan.all_jobs():
            if not isinstance(job, Job):
                yield jid, None, job
                continue
            if job.group in groups:
                if job.group not in started:
                    started.add(job.group)
                    members = [j for j in plan.jobs if j.group == job.group]
                    for j, r in run_group(backend, plan, plan.group(job.group), members, progress=report,
                                          decode=decodes(plan)):
                        try:  # each image's hires pass, after its group's first pass (runtime/hires.py)
                            r = finish(backend, plan, j, r, progress=lambda k, _id=j.id: report(_id, k))
                        except RuntimeErrorBase as e:
                            r = e
                        yield j.id, j, r
                continue
            try:
                r = run_image(backend, plan, job, progress=lambda k, _id=jid: report(_id, k))
            except RuntimeErrorBase as e:
                r = e
            yield jid, job, r

    try:
        for jid, job, r in runs():
            results.append(write_result(plan, job, r, backend, out, masks, (stamps or {}).get(jid))
                           if job is not None else _failed(raw.get(jid) or {"id": jid}, r))
            report(jid, steps_per_job.get(jid, 0))
    finally:
        if not keep_cache:
            backend.clear_cache()
    order = {jid: i for i, (jid, _) in enumerate(plan.all_jobs())}
    return sorted(results, key=lambda r: order[r["job"]])


def _failed(raw: dict, error: Exception) -> dict:
    """The result of a job that could not run (its plan data is invalid)."""
    return {"job": raw.get("id"), "name": raw.get("name", raw.get("id")), "seed": raw.get("seed"),
            "job_hash": raw.get("job_hash", ""), "status": "failed", "error": str(error)}


def write_result(plan: Plan, job: Job, r, backend, out: Path, masks: bool = False, stamp: dict | None = None,
                 meta: dict[str, str] | None = None) -> dict:
    """Write one job's image + sidecar (atomically, the image first); its result dict (built or failed).

    The sidecar holds the image's sha256 (and ``stamp`` as ``build``): written after the image, it
    vouches for a complete image. A file that cannot be written (full or read-only disk) fails the job.
    ``meta``: the PNG's text chunks (default: :func:`metadata`; a rebuild passes the original's)."""
    meta = meta if meta is not None else metadata(plan, job, backend)
    base = {"job": job.id, "name": job.name, "seed": job.seed, "job_hash": job.job_hash}
    try:
        stem = _safe_stem(out, base["name"])
        if isinstance(r, RuntimeErrorBase):
            raise r
    except RuntimeErrorBase as e:
        return {**base, "status": "failed", "error": str(e)}
    img_path = path = stem.with_name(stem.name + ".png")
    side_path = stem.with_name(stem.name + ".json")
    theirs = foreign(img_path, side_path)
    if theirs is not None:  # nothing is lost: a file scenec did not make is never replaced
        return {**base, "status": "failed", "error": f"{theirs} exists and was not written by scenec; move it "
                "away or pick another output.name / -o (scenec never replaces a file it did not make)"}
    try:
        data = png_bytes(r.image, meta)
        kept = keep_edited(img_path, side_path)  # an image changed since it was built is kept beside
        atomic_write(img_path, data)
        # a `hires` image's masks on its own (larger) grids
        src = plan.hires_stage(job.id) if masks and plan.doc.hires is not None else plan
        mask_paths = _write_masks(src, src.job(job.id), stem) if masks else []
        side = {**meta, "image": img_path.name, "sha256": hashlib.sha256(data).hexdigest(), "timings": r.timings,
                "device": str(backend.device), "dtype": str(backend.dtype).replace("torch.", ""),
                "masks": [p.name for p in mask_paths],
                "memory": {**getattr(backend, "memory", {"offload": "none", "quantize": "none"}),
                           "peak": peak(backend.device)}}
        reset_peak(backend.device)
        if getattr(r, "diagnostics", None):  # only when a method measured something (visual.refine)
            side["diagnostics"] = r.diagnostics
        if stamp is not None:
            side["build"] = stamp
        path = side_path
        atomic_write(side_path, json_bytes(side, indent=1, sort_keys=True) + b"\n")
    except OSError as e:
        return {**base, "status": "failed", "error": f"cannot write {path}: {e.strerror or e}"}
    return {**base, "status": "built", "image": str(img_path), "sidecar": str(side_path),
            "masks": [str(p) for p in mask_paths], "timings": r.timings, "sha256": side["sha256"],
            **({"kept": str(kept)} if kept is not None else {})}


def execute_batch(entries: list[tuple], backend, masks: bool = False, stamps: list[dict | None] | None = None,
                  progress: Progress | None = None) -> list[dict]:
    """Run batch-compatible jobs of one or more plans as one batch (:func:`run_batch`) and write each
    into its own output directory. ``entries``: ``(plan, job, out_dir)`` with the job typed, as its raw
    dict or by id; one result per entry; ``stamps``: each entry's sidecar stamp. The text cache is kept
    (the caller runs many plans)."""
    for p, _, _ in entries:
        _require_png(p)
    first = entries[0][1] if entries else None
    name = (first.get("name") if isinstance(first, dict) else getattr(first, "name", None)) or "batch"
    total = len(entries[0][0].json["jobs"][0].get("program") or []) if entries else 0
    label = f"{name} (+{len(entries) - 1})"
    rs = run_batch(backend, [(p, j) for p, j, _ in entries],
                   progress=None if progress is None else (lambda k: progress(k, total, label)))
    results = []
    for k, ((p, j, d), r) in enumerate(zip(entries, rs)):
        try:
            job = j if isinstance(j, Job) else p.job(j["id"] if isinstance(j, dict) else j)
        except RuntimeErrorBase as e:
            results.append(_failed(j if isinstance(j, dict) else {"id": j}, e))
            continue
        results.append(write_result(p, job, r, backend, Path(d), masks, (stamps or [None] * len(entries))[k]))
    return results


def _require_png(plan: Plan) -> None:
    if plan.doc.output.ext != "png":
        raise PlanError(f"output.ext {plan.doc.output.ext!r}: this runtime writes png only")


def _write_masks(plan: Plan, job: Job, stem: Path) -> list[Path]:
    """Each entity's coverage on the attention grid (Flux: tokens; SD: latent cells) as an 8-bit PNG
    ``<name>.mask-<entity>.png`` (one pixel per cell)."""
    from PIL import Image

    grid = "token" if "token" in plan.doc.grids else "latent"
    paths = []
    for e in job.entities:
        m = plan.mask(e.masks, grid)
        if m is None:
            m = np.ones(plan.grid(grid), np.float32)
        img = Image.fromarray(np.clip(np.round(m * 255.0), 0, 255).astype(np.uint8))  # 2-D uint8 → mode L
        p = stem.with_name(f"{stem.name}.mask-{_slug(e.id)}.png")
        atomic_write(p, png_bytes(img, {"scenec:job": job.id, "scenec:entity": e.id}))
        paths.append(p)
    return paths
