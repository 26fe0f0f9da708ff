"""Which jobs may share one batched forward pass (``scenec build --batch-size N``); no torch here.

Two jobs are batch-compatible when one denoising loop can carry both as rows of one batch: same
model, canvas, sampler and attention settings, the same step program (``from``/``to``/``regional``
per op), and nothing that needs per-job control flow (coupling θ, COW/SOW reference conditions, visual prompts,
stochastic steps, an ancestral solver). Prompts, entities, regions, seeds and init images may differ: the runtime pads
each row's text to a common length and masks the padding out (runtime/sampler.run_batch).

The key is computed from the plan JSON alone, so the batch driver (and Ray's) can group jobs of
different scenes before any model is loaded.
"""

from __future__ import annotations

import json


def batch_key(plan_json: dict, job: dict) -> str | None:
    """A string equal for batch-compatible jobs, or None when ``job`` must run alone."""
    from scenec.compiler.caps import FAMILIES  # every family runs batch rows through the one sampler
    from scenec.compiler.solvers import FRESH_NOISE

    model = plan_json.get("model") or {}
    if model.get("family", "flux") not in FAMILIES:
        return None
    if plan_json.get("hires") or job.get("overlay"):
        return None  # a second pass per image after the first, the init image pasted back (runtime/hires.py)
    if (plan_json.get("sampler") or {}).get("kind") in FRESH_NOISE:
        return None  # each step draws from the job's own noise stream (a batch draws one stream for all rows)
    if job.get("group") or job.get("conditions") or job.get("visuals") or job.get("controls"):
        return None  # coupling groups run together (shared prefix); references run cycles; visual prompts and
        # ControlNets alone
    program = []
    for op in job.get("program") or []:
        if op.get("op") != "denoise" or op.get("theta") is not None or op.get("eta"):
            return None
        program.append((op.get("from"), op.get("to"), bool(op.get("regional", True))))
    if not program:
        return None
    material = {
        "model": model,
        "canvas": plan_json.get("canvas"),
        "grids": plan_json.get("grids"),
        "sampler": plan_json.get("sampler"),
        "attention": plan_json.get("attention"),
        "program": program,
    }
    return json.dumps(material, sort_keys=True, separators=(",", ":"))


def require_compatible(plan_jobs: list) -> None:
    """Refuse a batch whose ``(plan, job)`` pairs are not all batch-compatible (a caller's bug)."""
    from scenec.spec.errors import PlanError

    keys = {batch_key(p.json, j if isinstance(j, dict) else j.model_dump(by_alias=True, mode="json"))
            for p, j in plan_jobs}
    if len(keys) != 1 or None in keys:
        raise PlanError("run_batch: the jobs are not batch-compatible (runtime/batching.batch_key)")


def row_timings(encode_s: float, denoise_s: float, decode_s: float, rows: int) -> dict:
    """One row's share of a batch's timings: encoding and denoising split evenly, its own decode."""
    enc, den = encode_s / rows, denoise_s / rows
    return {"encode_s": enc, "denoise_s": den, "decode_s": decode_s, "total_s": enc + den + decode_s, "batch": rows}
