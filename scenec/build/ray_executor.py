"""``scenec build --executor ray``: the build's batches on Ray actors (docs/batch.md, "Ray").

One actor per GPU (or ``--workers N`` actors; on a cluster without GPUs one per CPU), each with its
own :class:`~scenec.build.pool.BackendPool` for the whole build. The driver compiles (no torch),
ships each batch's sub-plans (JSON + only the tensors they name) to an idle actor, and gets back the
units' files as bytes; it writes them atomically into the output directory and reports them, exactly
as the local executor does. So the cache, the manifest and resumability are the same, and workers
need no shared filesystem, only scenec and the model weights (or ``tiny``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .options import BatchError
from .pool import BackendPool, ModelLoadError, execute_plans

INSTALL_HINT = "pip install 'scenec[ray]'"
IN_FLIGHT_PER_WORKER = 2  # one running, one queued: the actor never waits for the driver


def require_ray():
    """Import ray, or raise BatchError (exit 2) saying how to install it."""
    try:
        import ray
    except ImportError:
        raise BatchError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


class Worker:
    """A Ray actor: loads each model once, executes sub-plans into a private temp dir, returns the files."""

    def __init__(self, device: str | None, dtype: str | None, threads: int | None, memory: dict | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.pool = BackendPool(device, dtype, memory)

    def ping(self) -> int:
        return os.getpid()

    def run_batch(self, subplans: list[tuple[dict, dict]], masks: bool, stamps: list[dict] | None = None) -> list[dict]:
        """One batch, as ``(plan JSON, tensors)`` per unit (and each unit's sidecar stamps): one result per
        unit, each ``{"results", "files", "pid"}`` with paths relative to the unit's output directory, or
        ``{"error"}`` when the model could not be loaded."""
        from scenec.spec.plan import Plan

        plans = [Plan(j, t) for j, t in subplans]
        be = self.pool.get(plans[0].json["model"])
        if isinstance(be, Exception):
            return [{"error": str(be)} for _ in plans]
        tmp = Path(tempfile.mkdtemp(prefix="scenec-ray-"))
        dirs = [tmp / str(k) for k in range(len(plans))]
        try:
            per_unit = execute_plans(plans, be, dirs, masks=masks, stamps=stamps)
            return [_collect(d, results) for d, results in zip(dirs, per_unit)]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _collect(d: Path, results: list[dict]) -> dict:
    """A unit's files under ``d`` as bytes, and its results with paths relative to ``d``."""
    files = {}
    for p in sorted(d.rglob("*")) if d.is_dir() else ():
        if p.is_file():
            files[p.relative_to(d).as_posix()] = p.read_bytes()
    for r in results:  # the driver rebases them onto the unit's output directory
        _rebase(r, lambda p: Path(p).relative_to(d).as_posix())
    return {"results": results, "files": files, "pid": os.getpid()}


def _rebase(result: dict, move: Callable[[str], str]) -> None:
    for k in ("image", "sidecar"):
        if k in result:
            result[k] = move(result[k])
    if "masks" in result:
        result["masks"] = [move(m) for m in result["masks"]]


def _worker_count(ray, device: str | None, workers: int | None) -> tuple[int, bool, int]:
    """(actors, use GPUs, torch threads per actor)."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0)) if device != "cpu" else 0
    cpus = max(1, int(res.get("CPU", 1)))
    if workers is not None and workers < 1:
        raise BatchError("--workers must be at least 1")
    if gpus:
        return (min(workers, gpus) if workers else gpus), True, 0
    n = workers or cpus
    return n, False, max(1, cpus // n)


def _sigterm_handler(restore=None):
    """SIGTERM's Python handler; with ``restore``, put that one back. ray.init replaces ``scenec build``'s
    (:func:`scenec.exits.sigterm_raises`: stop as Ctrl-C does, exit 143 with the summary) with its own, which
    exits 1 without a word; the local Ray it started is stopped by ``ray.shutdown`` as the build unwinds."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    if callable(restore):
        signal.signal(signal.SIGTERM, restore)
    return signal.getsignal(signal.SIGTERM)


class RayExecutor:
    """Batches on Ray actors (an :class:`~scenec.build.executors.Executor`); results come back to this
    process, which writes the files."""

    def __init__(self, device: str | None = None, dtype: str | None = None, masks: bool = False,
                 address: str | None = None, workers: int | None = None, say: Callable[[str], None] = print,
                 memory: dict | None = None):
        require_ray()  # at once: a missing extra is a usage error, found before anything is compiled
        self.device, self.dtype, self.masks, self.memory = device, dtype, masks, memory
        self.address, self.workers, self.say = address, workers, say

    def run(self, batches: list[list], done: Callable[..., None]) -> None:
        """Execute ``batches`` on actors; call ``done(unit, results | None, error)`` here as each unit ends."""
        ray = require_ray()
        started = False
        if not ray.is_initialized():
            kw = {"address": self.address} if self.address else {}
            ours = _sigterm_handler()
            ray.init(ignore_reinit_error=True, include_dashboard=False, logging_level="WARNING", **kw)
            started = True
            _sigterm_handler(ours)
        try:
            self._run(ray, list(batches), done)
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray, queue: list[list], done: Callable[..., None]) -> None:
        from scenec.spec.fsio import atomic_write

        n_units = sum(len(b) for b in queue)
        n, gpu, threads = _worker_count(ray, self.device, self.workers)
        n = max(1, min(n, len(queue)))
        opts = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}
        actor_cls = ray.remote(**opts)(Worker)
        device = self.device if not gpu else (self.device or "cuda")
        actors = [actor_cls.remote(device, self.dtype, threads or None, self.memory) for _ in range(n)]
        self.say(f"scenec: ray: {n} worker{'s' if n != 1 else ''} ({'GPU' if gpu else 'CPU'}) for {n_units} units"
                 + (f" in {len(queue)} batches" if len(queue) != n_units else ""))
        inflight: dict = {}  # future -> (actor index, batch of units)
        alive = set(range(n))
        load = {i: 0 for i in range(n)}

        def fail_all(batch: list, msg: str) -> None:
            for u in batch:
                done(u, None, msg)

        def submit() -> None:
            while queue:
                free = [i for i in sorted(alive) if load[i] < IN_FLIGHT_PER_WORKER]
                if not free:
                    return
                i = min(free, key=lambda k: load[k])
                batch = queue.pop(0)
                sps = [u.subplan() for u in batch]
                fut = actors[i].run_batch.remote([(sp.json, sp.tensors) for sp in sps], self.masks,
                                                 [u.stamps() for u in batch])
                inflight[fut] = (i, batch)
                load[i] += 1

        submit()
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            fut = ready[0]
            i, batch = inflight.pop(fut)
            load[i] -= 1
            try:
                outs = ray.get(fut)
            except ray.exceptions.RayActorError as e:
                alive.discard(i)
                fail_all(batch, f"Ray worker died: {type(e).__name__}")
                if not alive:
                    for _, b in list(inflight.values()):
                        fail_all(b, "no Ray worker left")
                    inflight.clear()
                    for b in queue:
                        fail_all(b, "no Ray worker left")
                    queue.clear()
                submit()
                continue
            except Exception as e:  # noqa: BLE001 - a task's exception fails its units only
                cause = getattr(e, "cause", None) or e
                fail_all(batch, f"{type(cause).__name__}: {cause}")
                submit()
                continue
            for unit, out in zip(batch, outs):
                if "error" in out:
                    done(unit, None, ModelLoadError(out["error"]))
                    continue
                base = path = unit.out_dir
                try:
                    for rel, data in sorted(out["files"].items(), key=lambda kv: not kv[0].endswith(".png")):
                        path = base / rel
                        atomic_write(path, data)
                except OSError as e:  # a full or read-only disk fails the unit, not the build
                    done(unit, None, f"cannot write {path}: {e.strerror or e}")
                    continue
                for r in out["results"]:
                    _rebase(r, lambda p: str(base / p))
                    r["worker"] = out.get("pid")
                done(unit, out["results"])
            submit()
