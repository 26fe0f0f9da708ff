"""Executing a plan into files: PNGs with provenance metadata, JSON sidecars, optional mask PNGs.

Every file is written atomically (temp file in the target directory, fsync, ``os.replace``), so a
crash never leaves a half-written image that a later build would mistake for a result.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from scenec.spec.fsio import atomic_write  # noqa: F401 (re-exported)

from .errors import PlanError, RuntimeErrorBase
from .plan import Plan

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


def metadata(plan: Plan, job: dict, backend) -> dict[str, str]:
    """Provenance written into each PNG and its sidecar (what made this image)."""
    from scenec import __version__

    return {
        "scenec:scene": plan.json.get("scene", {}).get("name", ""),
        "scenec:scene_file": plan.json.get("scene", {}).get("file", ""),  # relative to the project root
        "scenec:job": job["id"],
        "scenec:group": job.get("group") or "",
        "scenec:variant": job.get("variant") or "",
        "scenec:seed": str(job["seed"]),
        "scenec:plan_hash": plan.plan_hash,
        "scenec:job_hash": job.get("job_hash", ""),
        "scenec:model": backend.model_id,
        "scenec:version": __version__,
    }


def execute(plan, backend, out_dir: str | Path, masks: bool = False, progress: Progress | None = None,
            keep_cache: bool = False) -> list[dict]:
    """Run every job of ``plan`` on ``backend``; write ``<name>.png`` + ``<name>.json`` per job.

    Returns one result dict per job: ``status`` "built" (with paths, timings) or "failed" (with
    ``error``, one sentence). Expected failures (unsupported features, bad plan data) fail that job
    only; the other jobs still run.
    """
    plan = Plan.of(plan)
    out = Path(out_dir)
    _require_png(plan)
    steps_per_job = {j["id"]: len(j.get("program") or []) for j in plan.jobs}
    total = sum(steps_per_job.values())
    done_by: dict[str, int] = {}  # ops done per job (a group's jobs advance together)
    names = {j["id"]: j.get("name", j["id"]) for j in plan.jobs}
    results = []

    def report(job_id: str, k: int) -> None:
        done_by[job_id] = k
        if progress is not None:
            progress(sum(done_by.values()), total, names[job_id])

    def runs():
        """(job, JobResult | error) in plan order; a coupling group's jobs run together (shared prefix)."""
        groups = {g["id"]: g for g in plan.json.get("groups") or []}
        started: set[str] = set()
        for job in plan.jobs:
            gid = job.get("group")
            if gid in groups and hasattr(backend, "run_group"):
                if gid not in started:
                    started.add(gid)
                    members = [j for j in plan.jobs if j.get("group") == gid]
                    yield from backend.run_group(plan, groups[gid], members, progress=report)
                continue
            try:
                yield job, backend.run_job(plan, job, progress=lambda k, _id=job["id"]: report(_id, k))
            except RuntimeErrorBase as e:
                yield job, e

    try:
        for job, r in runs():
            results.append(write_result(plan, job, r, backend, out, masks))
            report(job["id"], steps_per_job[job["id"]])
    finally:
        if not keep_cache:
            backend.clear_cache()
    order = {j["id"]: i for i, j in enumerate(plan.jobs)}
    return sorted(results, key=lambda r: order[r["job"]])


def write_result(plan: Plan, job: dict, r, backend, out: Path, masks: bool = False) -> dict:
    """Write one job's image + sidecar (atomically, the image first); its result dict (built or failed)."""
    meta = metadata(plan, job, backend)
    base = {"job": job["id"], "name": job.get("name", job["id"]), "seed": job["seed"],
            "job_hash": job.get("job_hash", "")}
    try:
        stem = _safe_stem(out, base["name"])
        if isinstance(r, RuntimeErrorBase):
            raise r
    except RuntimeErrorBase as e:
        return {**base, "status": "failed", "error": str(e)}
    img_path = stem.with_name(stem.name + ".png")
    atomic_write(img_path, png_bytes(r.image, meta))
    mask_paths = _write_masks(plan, job, stem) if masks else []
    side = {**meta, "image": img_path.name, "timings": r.timings,
            "device": str(backend.device), "dtype": str(backend.dtype).replace("torch.", ""),
            "masks": [p.name for p in mask_paths]}
    side_path = stem.with_name(stem.name + ".json")
    atomic_write(side_path, (json.dumps(side, indent=1, sort_keys=True) + "\n").encode("utf-8"))
    return {**base, "status": "built", "image": str(img_path), "sidecar": str(side_path),
            "masks": [str(p) for p in mask_paths], "timings": r.timings}


def execute_batch(entries: list[tuple], backend, masks: bool = False) -> list[dict]:
    """Run batch-compatible jobs of one or more plans as one batch (``backend.run_batch``) and write
    each into its own output directory. ``entries``: ``(plan, job, out_dir)``; one result per entry.
    The text cache is kept (the caller runs many plans on this backend)."""
    plans = [Plan.of(p) for p, _, _ in entries]
    for p in plans:
        _require_png(p)
    rs = backend.run_batch([(p, j) for p, (_, j, _) in zip(plans, entries)])
    return [write_result(p, j, r, backend, Path(d), masks) for p, (_, j, d), r in zip(plans, entries, rs)]


def _require_png(plan: Plan) -> None:
    ext = (plan.json.get("output") or {}).get("ext", "png")
    if ext != "png":
        raise PlanError(f"output.ext {ext!r}: this runtime writes png only")


def _write_masks(plan: Plan, job: dict, stem: Path) -> list[Path]:
    """Each entity's token-grid coverage as an 8-bit PNG ``<name>.mask-<entity>.png`` (one pixel per token)."""
    from PIL import Image

    paths = []
    for e in job.get("entities") or []:
        m = plan.mask(e.get("masks"), "token")
        if m is None:
            m = np.ones(plan.grid("token"), np.float32)
        img = Image.fromarray(np.clip(np.round(m * 255.0), 0, 255).astype(np.uint8))  # 2-D uint8 → mode L
        p = stem.with_name(f"{stem.name}.mask-{_slug(e['id'])}.png")
        atomic_write(p, png_bytes(img, {"scenec:job": job["id"], "scenec:entity": e["id"]}))
        paths.append(p)
    return paths
