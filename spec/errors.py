"""Errors of executing a plan, shared by every layer (the plan format raises them, the runtime and
the build report them). Each carries one sentence a user can act on: expected failures are reported,
never shown as tracebacks."""

from __future__ import annotations


class RuntimeErrorBase(Exception):
    """Base of the expected errors of executing a plan (the CLI reports them in one line)."""


class PlanError(RuntimeErrorBase):
    """The plan is malformed or of an unknown format."""


class ModelUnavailable(RuntimeErrorBase):
    """The model's weights are not available locally and cannot be fetched."""


class Unsupported(RuntimeErrorBase, NotImplementedError):
    """The plan uses a feature this runtime (or this model family) does not execute."""


class NonFinite(RuntimeErrorBase):
    """A job's latents or decoded image hold NaN or infinity: it fails, and no image is written."""
