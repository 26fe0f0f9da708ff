"""Where the build meets the runtime: the backend pool, and the execution of a batch on a backend.

Each process (the local executor's, or a Ray actor) holds one :class:`BackendPool`: a model is loaded
once and reused by every scene that uses it, and so is the backend's text-encoding cache. torch is
imported only when a model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_model(model: dict, device: str | None = None, dtype: str | None = None, memory: dict | None = None):
    """The backend of a plan's model (``plan.json["model"]``) on ``device`` in ``dtype`` (``memory``: offload
    and quantisation, runtime/memory.py); raises the runtime's ``RuntimeErrorBase`` (``ModelUnavailable``,
    ``Unsupported``) when it cannot."""
    from scenec.runtime.families import load_backend

    return load_backend(model, device=device, dtype=dtype, **(memory or {}))


class ModelLoadError(str):
    """The error of a model that could not be loaded, as every unit that needs it fails with it: the
    report prints it once per model, and each image's line refers to it."""


PER_PLAN = ("lora", "embeddings", "clip_skip", "prompt_syntax", "vae", "vae_sha256")  # applied per run


def _key(model: dict) -> str:
    """One loaded model per weights: a model with a ``repo`` (a directory's or checkpoint file's absolute path, a
    hub id) is that, not its ``spec`` as a scene wrote it (`m.safetensors` from the root, `../m.safetensors` from a
    subdirectory)."""
    drop = PER_PLAN + (("spec",) if model.get("repo") else ())
    return json.dumps({k: v for k, v in model.items() if k not in drop}, sort_keys=True)


class BackendPool:
    """The backends of one process, by model: each loaded on first use and kept. A model that fails to
    load is not tried again: its error is kept, and every unit that needs it fails with it. What the runtime
    applies per plan on the one loaded model is not part of its key: LoRAs (hooks, runtime/lora.py), the text
    options (runtime/textual_inversion.py, runtime/prompt_weights.py) and a replacement VAE
    (runtime/methods/vae.py)."""

    def __init__(self, device: str | None = None, dtype: str | None = None, memory: dict | None = None):
        self.device, self.dtype, self.memory = device, dtype, memory
        self._backends: dict[str, Any] = {}

    def has(self, model: dict) -> bool:
        """Whether ``model`` was loaded (or failed to load) already."""
        return _key(model) in self._backends

    def get(self, model: dict):
        """The backend of ``model``, or the ``RuntimeErrorBase`` that loading it raised."""
        from scenec.spec.errors import RuntimeErrorBase

        key = _key(model)
        if key not in self._backends:
            try:
                self._backends[key] = load_model(model, device=self.device, dtype=self.dtype, memory=self.memory)
            except RuntimeErrorBase as e:
                self._backends[key] = e
        return self._backends[key]


def execute_unit(plan, backend, out_dir: str | Path, masks: bool = False, stamps: dict | None = None,
                 progress=None) -> list[dict]:
    """Execute one unit's sub-plan (a job, or the jobs of a coupling group) into ``out_dir``; ``stamps``
    (by job id) go into the sidecars.

    The backend's text cache is kept: the next scenes of the batch often share prompts."""
    from scenec.runtime.outputs import execute

    return execute(plan, backend, out_dir, masks=masks, keep_cache=True, stamps=stamps, progress=progress)


def execute_plans(plans: list, backend, out_dirs: list[Path], masks: bool = False,
                  stamps: list[dict] | None = None, progress=None) -> list[list[dict]]:
    """Execute one batch: a unit's sub-plan alone, or the single-job sub-plans of batch-compatible jobs
    (any scenes) as the rows of one batch. Returns each plan's results, in order. ``stamps``: each
    plan's sidecar stamps by job id. ``progress(done, total, name)``: sampling ops done (a batch: its
    first image's name)."""
    stamps = stamps or [None] * len(plans)
    if len(plans) == 1:
        return [execute_unit(plans[0], backend, out_dirs[0], masks=masks, stamps=stamps[0], progress=progress)]
    from scenec.runtime.outputs import execute_batch

    jobs = [p.json["jobs"][0] for p in plans]
    rows = execute_batch([(p, j, d) for p, j, d in zip(plans, jobs, out_dirs)], backend, masks=masks,
                         stamps=[(s or {}).get(j["id"]) for s, j in zip(stamps, jobs)], progress=progress)
    return [[r] for r in rows]
