"""``scenec build``: compile scenes to plans, execute them, write images + sidecars.

Every scene is compiled first (fast, no torch): invalid input stops the build before any model
loads, with every problem of every file (``SceneError``, exit 2). Then each model is loaded once
and every plan that uses it runs on it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable


def _compile(path: Path, model: str | None):
    """The one place the build calls the compiler: a Plan-like object with ``.json`` and ``.tensors``."""
    from scenec.compiler import compile_scene

    return compile_scene(path, model=model)


def _progress_bar():
    """A rich progress bar on stderr when it is a terminal; otherwise nothing (logs stay clean)."""
    if not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True)


def build(scene_paths: Iterable[str | Path], out: str | Path | None = None, model: str | None = None,
          device: str | None = None, dtype: str | None = None, masks: bool = False, quiet: bool = False) -> dict:
    """Compile and execute scenes. Returns ``{"built", "cached", "failed", "outputs", "errors"}``.

    ``out`` overrides each scene's ``output.dir`` (which is relative to its scene file). Device
    defaults to CUDA when available, dtype to bf16 on CUDA and fp32 on CPU. A failed job (model not
    available, unsupported feature) counts in ``failed`` and the rest still run.
    """
    from scenec.runtime.errors import RuntimeErrorBase
    from scenec.runtime.backends import load_backend  # by the plan's model family (flux | sd)
    from scenec.runtime.outputs import execute
    from scenec.runtime.plan import Plan
    from scenec.spec.diagnostics import Diagnostics, SceneError

    paths = [Path(p) for p in scene_paths]
    plans, diags = [], Diagnostics()
    for p in paths:
        try:
            plans.append((p, Plan.of(_compile(p, model))))
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

    backends: dict[tuple, object] = {}
    bar = _progress_bar()
    if bar is not None:
        bar.start()
    try:
        for path, plan in plans:
            m = plan.model
            key = (m.get("spec"), m.get("repo"), m.get("family"))
            try:
                if key not in backends:
                    backends[key] = load_backend(m, device=device, dtype=dtype)
            except RuntimeErrorBase as e:
                backends[key] = e
            be = backends[key]
            if isinstance(be, Exception):
                fail(str(path), str(be), len(plan.jobs))
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


# --- batch builds (issue #6): directories, selection, the cache and the manifest live in scenec/batch.py ---

def load_model(model: dict, device: str | None = None, dtype: str | None = None):
    """Load the backend for a plan's ``model`` (once per process and model; the batch executors call this)."""
    from scenec.runtime.backends import load_backend  # by the plan's model family (flux | sd)

    return load_backend(model, device=device, dtype=dtype)


def execute_unit(plan, backend, out_dir: str | Path, masks: bool = False) -> list[dict]:
    """Execute one unit of a batch (a job, or the jobs of a coupling group) into ``out_dir``.

    The backend's text cache is kept: the next scenes of the batch often share prompts."""
    from scenec.runtime.outputs import execute

    return execute(plan, backend, out_dir, masks=masks, keep_cache=True)


def execute_batched(entries: list[tuple], backend, masks: bool = False) -> list[dict]:
    """Execute batch-compatible single jobs ``(plan, job, out_dir)`` of any scenes as one batch."""
    from scenec.runtime.outputs import execute_batch

    return execute_batch(entries, backend, masks=masks)


def batch(targets: Iterable[str | Path], **kwargs) -> dict:
    """``scenec build DIR|GLOB|FILE...``: incremental, resumable, selectable; see scenec.batch.build_batch."""
    from scenec.batch import build_batch

    return build_batch(targets, **kwargs)
