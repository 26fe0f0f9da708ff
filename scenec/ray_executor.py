"""``scenec build --executor ray``: the batch's units of work on a Ray cluster (issue #6).

One actor per GPU (or ``--workers N`` actors; on a cluster without GPUs one per CPU), each holding
its loaded model(s) for the whole batch. The driver compiles (no torch), ships each unit's sub-plan
(JSON + only the tensors it names) to an idle actor, and gets back the unit's files as bytes; it
writes them atomically into the output directory and updates the manifest, exactly as the local
executor does. So the cache, the manifest and resumability are the same, and workers need no
shared filesystem, only scenec and the model weights (or ``tiny``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

INSTALL_HINT = "pip install 'scenec[ray]'"
IN_FLIGHT_PER_WORKER = 2  # one running, one queued: the actor never waits for the driver


def require_ray():
    """Import ray, or raise BatchError (exit 2) saying how to install it."""
    from .batch import BatchError

    try:
        import ray
    except ImportError:
        raise BatchError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


class Worker:
    """A Ray actor: loads each model once, executes sub-plans into a private temp dir, returns the files."""

    def __init__(self, device: str | None, dtype: str | None, threads: int | None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.device, self.dtype = device, dtype
        self.backends: dict[str, object] = {}

    def ping(self) -> int:
        return os.getpid()

    def _backend(self, model: dict):
        import json

        from scenec.build import load_model
        from scenec.runtime.errors import RuntimeErrorBase

        mkey = json.dumps(model, sort_keys=True)
        if mkey not in self.backends:
            try:
                self.backends[mkey] = load_model(model, device=self.device, dtype=self.dtype)
            except RuntimeErrorBase as e:
                self.backends[mkey] = e
        return self.backends[mkey]

    def run(self, plan_json: dict, tensors: dict, masks: bool) -> dict:
        """One unit (a job or a coupling group): its results and files."""
        return self.run_batch([(plan_json, tensors)], masks)[0]

    def run_batch(self, subplans: list[tuple[dict, dict]], masks: bool) -> list[dict]:
        """Units of one single job each, batch-compatible (or one unit of any kind): one result per unit,
        each ``{"results", "files", "pid"}`` with paths relative to the unit's output directory."""
        from scenec.build import execute_batched, execute_unit
        from scenec.runtime.plan import Plan

        plans = [Plan(j, t) for j, t in subplans]
        be = self._backend(plans[0].model)
        if isinstance(be, Exception):
            return [{"error": str(be)} for _ in plans]
        tmp = Path(tempfile.mkdtemp(prefix="scenec-ray-"))
        dirs = [tmp / str(k) for k in range(len(plans))]
        try:
            if len(plans) == 1:
                per_unit = [execute_unit(plans[0], be, dirs[0], masks=masks)]
            else:
                rs = execute_batched([(p, p.jobs[0], d) for p, d in zip(plans, dirs)], be, masks=masks)
                per_unit = [[r] for r in rs]
            out = []
            for d, results in zip(dirs, per_unit):
                files = {}
                for p in sorted(d.rglob("*")) if d.is_dir() else ():
                    if p.is_file():
                        files[p.relative_to(d).as_posix()] = p.read_bytes()
                for r in results:  # paths relative to the output directory; the driver rebases them
                    for k in ("image", "sidecar"):
                        if k in r:
                            r[k] = Path(r[k]).relative_to(d).as_posix()
                    if "masks" in r:
                        r["masks"] = [Path(m).relative_to(d).as_posix() for m in r["masks"]]
                out.append({"results": results, "files": files, "pid": os.getpid()})
            return out
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _worker_count(ray, device: str | None, workers: int | None) -> tuple[int, bool, int]:
    """(actors, use GPUs, torch threads per actor)."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0)) if device != "cpu" else 0
    cpus = max(1, int(res.get("CPU", 1)))
    if workers is not None and workers < 1:
        from .batch import BatchError

        raise BatchError("--workers must be at least 1")
    if gpus:
        return (min(workers, gpus) if workers else gpus), True, 0
    n = workers or cpus
    return n, False, max(1, cpus // n)


def run_ray(units: list, done: Callable, device: str | None = None, dtype: str | None = None, masks: bool = False,
            address: str | None = None, workers: int | None = None, say: Callable[[str], None] = print,
            batch_size: int = 1) -> None:
    """Execute ``units`` on Ray actors; call ``done(unit, results | None, error)`` on the driver as each ends.

    With ``batch_size > 1`` batch-compatible single-job units go to one actor together and run as one
    batch there (scenec.batch.batches_of)."""
    from scenec.spec.fsio import atomic_write

    from .batch import batches_of, subplan

    ray = require_ray()
    started = False
    if not ray.is_initialized():
        kw = {"address": address} if address else {}
        ray.init(ignore_reinit_error=True, include_dashboard=False, logging_level="WARNING", **kw)
        started = True
    try:
        queue = batches_of(units, batch_size)
        n, gpu, threads = _worker_count(ray, device, workers)
        n = max(1, min(n, len(queue)))
        opts = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}
        actor_cls = ray.remote(**opts)(Worker)
        actors = [actor_cls.remote(device if not gpu else (device or "cuda"), dtype, threads or None) for _ in range(n)]
        say(f"scenec: ray: {n} worker{'s' if n != 1 else ''} ({'GPU' if gpu else 'CPU'}) for {len(units)} units"
            + (f" in {len(queue)} batches" if len(queue) != len(units) else ""))
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
                sps = [subplan(u.plan, [it.job for it in u.items]) for u in batch]
                fut = actors[i].run_batch.remote([(sp.json, sp.tensors) for sp in sps], masks)
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
                    done(unit, None, out["error"])
                    continue
                base = unit.out_dir
                for rel, data in sorted(out["files"].items(), key=lambda kv: not kv[0].endswith(".png")):
                    atomic_write(base / rel, data)
                results = out["results"]
                for r in results:
                    for k in ("image", "sidecar"):
                        if k in r:
                            r[k] = str(base / r[k])
                    if "masks" in r:
                        r["masks"] = [str(base / m) for m in r["masks"]]
                    r["worker"] = out.get("pid")
                done(unit, results)
            submit()
    finally:
        if started:
            ray.shutdown()
