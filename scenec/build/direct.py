"""Compile scenes and execute each one whole: no selection, no cache, no manifest.

Every scene is compiled first (fast, no torch): invalid input stops before any model loads, with
every problem of every file (``SceneError``). Then each plan runs on its model's backend, each model
loaded once. ``scenec build`` uses :func:`scenec.build.driver.build_batch` instead; this is the
plain path for callers that want every image of a few scenes, now.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable

from scenec.progress import progress_bar

from .planning import compile_file
from .pool import BackendPool


def build(scene_paths: Iterable[str | Path], out: str | Path | None = None, model: str | None = None,
          device: str | None = None, dtype: str | None = None, masks: bool = False, quiet: bool = False) -> dict:
    """Compile and execute scenes. Returns ``{"built", "cached", "failed", "outputs", "errors"}``.

    ``out`` overrides each scene's ``output.dir`` (which is relative to its scene file). Device
    defaults to CUDA when available, dtype to bf16 on CUDA and fp32 on CPU. A failed job (model not
    available, unsupported feature) counts in ``failed`` and the rest still run.
    """
    from scenec.runtime.outputs import execute
    from scenec.spec.diagnostics import Diagnostics, SceneError

    paths = [Path(p) for p in scene_paths]
    plans, diags = [], Diagnostics()
    for p in paths:
        try:
            plans.append((p, compile_file(p, model)))
        except SceneError as e:
            diags.extend(e.diagnostics)
    if diags.has_errors() or len(plans) < len(paths):
        raise SceneError(diags)

    summary = {"built": 0, "cached": 0, "failed": 0, "outputs": [], "errors": []}

    def fail(what: str, msg: str, n: int) -> None:
        summary["failed"] += n
        summary["errors"].append(f"{what}: {msg}")
        if not quiet:
            print(f"scenec: {what}: {msg}", file=sys.stderr)

    pool = BackendPool(device, dtype)
    bar = progress_bar()
    if bar is not None:
        bar.start()
    try:
        for path, plan in plans:
            be = pool.get(plan.json["model"])
            if isinstance(be, Exception):
                fail(str(path), str(be), len(plan.json["jobs"]))
                continue
            # the scene's output.dir is relative to the scene file (contract), -o to the current directory
            out_dir = Path(out) if out is not None else \
                path.resolve().parent / (plan.json.get("output") or {}).get("dir", "out")
            cb = None
            if bar is not None:
                task = bar.add_task(plan.json.get("scene", {}).get("name", str(path)), total=None)
                cb = lambda done, total, name, _t=task: bar.update(_t, completed=done, total=total, description=name)
            for r in execute(plan, be, out_dir, masks=masks, progress=cb):
                summary["outputs"].append(r)
                if r["status"] == "built":
                    summary["built"] += 1
                else:
                    fail(str(path), r["error"], 1)
    finally:
        if bar is not None:
            bar.stop()
    return summary
