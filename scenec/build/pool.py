"""Where the build meets the runtime: the backend pool, and the execution of a batch on a backend.

Each process (the local executor's, or a Ray actor) holds one :class:`BackendPool`: a model is loaded
once and reused by every scene that uses it, and so is the backend's text-encoding cache. torch is
imported only when a model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_model(model: dict, device: str | None = None, dtype: str | None = None):
    """The backend of a plan's model (``plan.json["model"]``) on ``device`` in ``dtype``; raises the
    runtime's ``RuntimeErrorBase`` (``ModelUnavailable``, ``Unsupported``) when it cannot."""
    from scenec.runtime.families import load_backend

    return load_backend(model, device=device, dtype=dtype)


class BackendPool:
    """The backends of one process, by model: each loaded on first use and kept. A model that fails to
    load is not tried again: its error is kept, and every unit that needs it fails with it."""

    def __init__(self, device: str | None = None, dtype: str | None = None):
        self.device, self.dtype = device, dtype
        self._backends: dict[str, Any] = {}

    def get(self, model: dict):
        """The backend of ``model``, or the ``RuntimeErrorBase`` that loading it raised."""
        from scenec.spec.errors import RuntimeErrorBase

        key = json.dumps(model, sort_keys=True)
        if key not in self._backends:
            try:
                self._backends[key] = load_model(model, device=self.device, dtype=self.dtype)
            except RuntimeErrorBase as e:
                self._backends[key] = e
        return self._backends[key]


def execute_unit(plan, backend, out_dir: str | Path, masks: bool = False) -> list[dict]:
    """Execute one unit's sub-plan (a job, or the jobs of a coupling group) into ``out_dir``.

    The backend's text cache is kept: the next scenes of the batch often share prompts."""
    from scenec.runtime.outputs import execute

    return execute(plan, backend, out_dir, masks=masks, keep_cache=True)


def execute_plans(plans: list, backend, out_dirs: list[Path], masks: bool = False) -> list[list[dict]]:
    """Execute one batch: a unit's sub-plan alone, or the single-job sub-plans of batch-compatible jobs
    (any scenes) as the rows of one batch. Returns each plan's results, in order."""
    if len(plans) == 1:
        return [execute_unit(plans[0], backend, out_dirs[0], masks=masks)]
    from scenec.runtime.outputs import execute_batch

    rows = execute_batch([(p, p.json["jobs"][0], d) for p, d in zip(plans, out_dirs)], backend, masks=masks)
    return [[r] for r in rows]
