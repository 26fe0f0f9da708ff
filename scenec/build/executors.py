"""Executors: where a build's batches of units run. Every executor satisfies :class:`Executor`; the
local one runs them in this process, :mod:`scenec.build.ray_executor` on Ray actors. Both load
models through a :class:`~scenec.build.pool.BackendPool` and execute with
:func:`~scenec.build.pool.execute_plans`, so a unit builds the same bytes wherever it runs."""

from __future__ import annotations

import os
from typing import Callable, Protocol

from .options import BatchError, BuildOptions
from .pool import BackendPool, ModelLoadError, execute_plans
from .units import Unit

# done(unit, results, error): results is None, and error one sentence, when the unit failed as a whole
Done = Callable[..., None]

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    def run(self, batches: list[list[Unit]], done: Done) -> None:
        """Execute every batch; call ``done(unit, results)``, or ``done(unit, None, error)``, in this
        process as each unit ends. Files are written into ``unit.out_dir`` before ``done``; the manifest
        is the caller's."""
        ...


class LocalExecutor:
    """Batches in this process, one after another, each model loaded once."""

    def __init__(self, device: str | None = None, dtype: str | None = None, masks: bool = False,
                 memory: dict | None = None, report=None):
        self.pool = BackendPool(device, dtype, memory)
        self.masks = masks
        self.report = report  # its live display, when there is one (scenec.progress.BuildProgress)

    def run(self, batches: list[list[Unit]], done: Done) -> None:
        for batch in batches:
            live = getattr(self.report, "progress", None)
            model = batch[0].plan.json["model"]
            if live is not None and not self.pool.has(model):
                with live.loading(model.get("spec") or model.get("repo") or "model"):
                    be = self.pool.get(model)
            else:
                be = self.pool.get(model)
            if isinstance(be, Exception):
                for u in batch:
                    done(u, None, ModelLoadError(str(be)))
                continue
            try:
                per_unit = execute_plans([u.subplan() for u in batch], be, [u.out_dir for u in batch],
                                         masks=self.masks, stamps=[u.stamps() for u in batch],
                                         progress=live.step if live is not None else None)
            except Exception as e:  # noqa: BLE001 - one batch's failure (OOM, a bug) must not stop the build
                if os.environ.get("SCENEC_DEBUG"):
                    raise
                for u in batch:
                    done(u, None, f"{type(e).__name__}: {e}")
                continue
            for u, results in zip(batch, per_unit):
                done(u, results)
                if live is not None:
                    live.unit_done(len(u.items))


def make_executor(options: BuildOptions, say: Callable[[str], None], report=None) -> Executor:
    """The executor ``options.executor`` names; raises BatchError for an unknown one, or for Ray when
    it is not installed (before anything is compiled: a usage error)."""
    if options.executor not in EXECUTORS:
        raise BatchError(f"--executor must be local or ray, not `{options.executor}`")
    if options.executor == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(device=options.device, dtype=options.dtype, masks=False,
                           address=options.address, workers=options.workers, say=say, memory=options.memory)
    return LocalExecutor(device=options.device, dtype=options.dtype, masks=False, memory=options.memory,
                         report=report)
