"""Runtime errors: each carries one sentence a user can act on (no tracebacks for expected failures)."""

from __future__ import annotations


class RuntimeErrorBase(Exception):
    """Base of the runtime's expected errors (reported, not raised as tracebacks, by the CLI)."""


class PlanError(RuntimeErrorBase):
    """The plan is malformed or of an unknown format."""


class ModelUnavailable(RuntimeErrorBase):
    """The model's weights are not available locally and cannot be fetched."""


class Unsupported(RuntimeErrorBase, NotImplementedError):
    """The plan uses a feature this runtime does not execute yet."""
