"""The scenec compiler: semantic checks, geometry, IR passes, lowering to plans. Never imports torch."""

from __future__ import annotations

from pathlib import Path


def compile_scene(path: str | Path, model: str | None = None, lora=(), overrides=()):
    """Load, check and lower one scene file (with the command line's ``overrides``,
    ``scenec.spec.overrides``, and ``lora``: ``--lora PATH[:SCALE]`` arguments) to a ``CompiledPlan`` (a
    ``spec.plan.Plan`` with its IR and warnings); raises ``SceneError`` with every problem."""
    from scenec.spec.diagnostics import SceneError
    from scenec.spec.load import load_scene

    from .check import check_partial
    from .lower import lower
    from .passes import run_passes

    try:
        ls = load_scene(path, overrides=overrides)
    except SceneError as e:
        check_partial(e, model)  # the checks' problems too, in the same run
        raise
    return lower(run_passes(ls, model=model, lora=lora))


def explain(path: str | Path, model: str | None = None, after: str | None = None) -> str:
    """The IR as text after pass ``after`` (default: the last)."""
    from scenec.spec.load import load_scene

    from .passes import run_passes
    from .printer import print_ir

    return print_ir(run_passes(load_scene(path), model=model, until=after))


def explain_scene(ls, model: str | None = None, after: str | None = None):
    """What ``scenec explain`` prints, and the last IR: the IR after every pass (each headed
    ``; scenec IR after check > …``), then the plan (``plan.json``, its tensors named, not shown); with ``after``,
    only what that pass made (``lower``: the plan)."""
    import json

    from .lower import lower
    from .passes import PIPELINE, initial_ir
    from .printer import print_ir

    ir = initial_ir(ls, model)
    parts = []
    for name, fn in PIPELINE:
        ir = fn(ir)
        if after is None:
            parts.append(print_ir(ir))  # its first line names the passes run
        elif after == name:
            return print_ir(ir), ir
    plan_text = json.dumps(lower(ir).json, indent=1, ensure_ascii=False) + "\n"
    if after == "lower":
        return plan_text, ir
    parts.append(f"; after lower: the plan (plan.json)\n{plan_text}")
    return "\n".join(parts), ir


__all__ = ["compile_scene", "explain", "explain_scene"]
