"""A1111's prompt editing at run time: the text each sampling step reads (the schedule: spec/prompt_editing.py).

Under ``prompt_syntax: a1111`` a prompt with ``[from:to:when]`` or ``[a|b]`` reads another text from some step on.
The sampler (runtime/sampler.py ``Run.call``) hands the family, instead of the plan, :class:`AtStep`: the plan
whose ``prompt(i)`` is the text of step ``k``, every other attribute the plan's own. Step ``k`` is the call's
level less the level of the job's first ``denoise`` op: A1111's ``CFGDenoiser.step`` counts the steps that run
from 0, so an img2img job starts at 0 too, against a schedule over all the sampler's steps; a step run again at
its level (COW's cycles, runtime/methods/) reads that level's text. A hires pass (runtime/hires.py) reads A1111's
hires timeline: over the steps it runs, going on from the first pass's (spec/prompt_editing.py ``when_step``).
The family then encodes each variant as any prompt (emphasis and ``BREAK`` included), once per run (its text cache
is keyed by text), and the run's conditioning cache is keyed by the variants too. A plan without editing is
handed over as it is.
"""

from __future__ import annotations

from scenec.spec.plan import Denoise
from scenec.spec.prompt_editing import has_editing, text_at


def edits(plan, job) -> bool:
    """Whether any prompt of ``job`` (its global one, its entities'; negatives too) changes over the steps."""
    if plan.model.prompt_syntax != "a1111":
        return False
    streams = [job.global_] + list(job.entities)
    return any(has_editing(plan.prompt(i)) for s in streams for i in (s.prompt, s.negative))


def first_level(job) -> int:
    """The level of the job's first ``denoise`` op (img2img: where it starts; 0 otherwise)."""
    return next((op.from_ for op in job.program if isinstance(op, Denoise)), 0)


class AtStep:
    """``plan`` as sampling step ``step`` reads it: ``prompt(i)`` is that step's text, the rest the plan's."""

    def __init__(self, plan, step: int, steps: int | None = None, base: int | None = None):
        self._plan = plan
        self.step = step
        self._steps = plan.steps if steps is None else steps
        self._base = base

    def prompt(self, i: int) -> str:
        return text_at(self._plan.prompt(i), self._steps, self.step, self._base)

    def __getattr__(self, name):
        return getattr(self._plan, name)


def at_level(plan, job, level: int):
    """``plan`` for a model call at ``level`` of ``job``: :class:`AtStep` when its prompts change, else ``plan``."""
    if not edits(plan, job):
        return plan
    start = first_level(job)
    base = getattr(plan, "first_pass_steps", None)  # a hires pass (spec/plan.py hires_stage): A1111's hires timeline
    if base is not None:
        return AtStep(plan, max(0, level - start), steps=plan.steps - start, base=base)
    return AtStep(plan, max(0, level - start))


def texts(plan, spec, negative: bool) -> tuple[str, ...]:
    """The texts a call's streams read on ``plan`` (an :class:`AtStep` or a plan): part of the conditioning's key."""
    if not isinstance(plan, AtStep):
        return ()
    streams = ([spec.global_] if spec.global_ is not None else []) + list(spec.entities) + list(spec.pooled)
    return tuple(plan.prompt(s.text(negative)) for s in streams)
