"""The scenec runtime: reads plans and executes them on diffusers backends."""

# Light entry points only (no torch at import): runtime.flux / runtime.outputs import torch themselves.
from .errors import ModelUnavailable, PlanError, RuntimeErrorBase, Unsupported  # noqa: E402,F401
from .plan import Plan, load_plan  # noqa: E402,F401
