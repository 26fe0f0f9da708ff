"""The base class of the methods: every hook, doing nothing (runtime/methods/__init__.py says when each runs)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch


class Method:
    """Base of the methods: every hook does nothing; a method overrides the ones it needs."""

    name: ClassVar[str]  # its capability name (compiler/caps.py METHODS); families declare what they run
    ops: ClassVar[tuple[type, ...]] = ()  # step-op types this method executes
    batchable: ClassVar[bool] = True  # may run on the rows of a batch (else only on a run of one job)

    def __init__(self, run):
        self.run = run

    @classmethod
    def wants(cls, plan, job) -> bool:
        """Whether ``job`` of ``plan`` needs this method."""
        return False

    def capabilities(self) -> tuple[str, ...]:
        """The capability names this run needs of the family (usually just ``name``)."""
        return (self.name,)

    def setup(self) -> None:
        pass

    def run_op(self, n: int, op, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def before_denoise(self, n: int, op) -> None:
        pass

    def shape(self, call) -> None:
        """Change ``call.specs`` / ``call.pooled_weights`` before its text is assembled."""

    def modifiers(self, call) -> list:
        """Attention modifiers for ``call`` (its ``cond`` is assembled)."""
        return []

    def denoiser_inputs(self, call, x: torch.Tensor, t, kwargs: dict) -> dict:
        """Extra keyword inputs of the denoiser for ``call`` (e.g. a ControlNet's residuals), from the model's
        input ``x``, timestep ``t`` and the keyword inputs so far; the family passes them to its forward."""
        return {}

    def output(self, n: int, op, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out

    def after_step(self, n: int, op, x: torch.Tensor) -> torch.Tensor:
        return x

    def sampled(self) -> None:
        """Once, when sampling has ended and before the decode (not on failure): free what only sampling needed
        (an offloaded ControlNet), so the decode does not hold it."""

    def close(self) -> None:
        """Once, when the run ends (also when it fails): undo what ``setup`` did to the model."""
