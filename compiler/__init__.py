"""The scenec compiler: semantic checks, geometry, IR passes, lowering to plans. Never imports torch."""

from __future__ import annotations

from pathlib import Path


def compile_scene(path: str | Path, model: str | None = None, overrides=()):
    """Load, check and lower one scene file (with the command line's ``overrides``,
    ``scenec.spec.overrides``) to a ``CompiledPlan`` (a ``spec.plan.Plan`` with its IR and warnings);
    raises ``SceneError`` with every problem."""
    from scenec.spec.load import load_scene

    from .lower import lower
    from .passes import run_passes

    return lower(run_passes(load_scene(path, overrides=overrides), model=model))


def explain(path: str | Path, model: str | None = None, after: str | None = None) -> str:
    """The IR as text after pass ``after`` (default: the last)."""
    from scenec.spec.load import load_scene

    from .passes import run_passes
    from .printer import print_ir

    return print_ir(run_passes(load_scene(path), model=model, until=after))


__all__ = ["compile_scene", "explain"]
