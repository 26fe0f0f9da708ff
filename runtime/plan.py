"""Plans as the runtime sees them: ``plan.json`` + ``tensors.safetensors`` (docs/plan-format.md).

No torch and no YAML here: the runtime reads only what the compiler wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import PlanError

FORMAT = "scenec-plan/1"


@dataclass
class Plan:
    """A plan in memory: the JSON document and its tensors (name → numpy array)."""

    json: dict
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        fmt = self.json.get("format")
        if fmt != FORMAT:
            raise PlanError(f"unknown plan format {fmt!r}; this runtime reads {FORMAT!r}")

    @classmethod
    def of(cls, obj: Any) -> "Plan":
        """Accept a runtime Plan or any plan-like object with ``.json`` and ``.tensors`` (the compiler's)."""
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, (str, Path)):
            return load_plan(obj)
        try:
            return cls(obj.json, dict(obj.tensors))
        except AttributeError:
            raise PlanError(f"not a plan: {type(obj).__name__} (needs .json and .tensors)") from None

    # -- plan-wide settings ------------------------------------------------------------------
    @property
    def plan_hash(self) -> str:
        return self.json.get("plan_hash", "")

    @property
    def model(self) -> dict:
        return self.json["model"]

    @property
    def canvas(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        c = self.json["canvas"]
        return int(c["width"]), int(c["height"])

    @property
    def sampler(self) -> dict:
        return self.json["sampler"]

    @property
    def attention(self) -> dict:
        return self.json.get("attention") or {}

    @property
    def prompts(self) -> list[str]:
        return self.json["prompts"]

    def prompt(self, index: int) -> str:
        try:
            return self.json["prompts"][index]
        except (IndexError, TypeError):
            raise PlanError(f"prompt index {index!r} out of range") from None

    @property
    def jobs(self) -> list[dict]:
        return self.json["jobs"]

    def job(self, job_id: str) -> dict:
        for j in self.jobs:
            if j["id"] == job_id:
                return j
        raise PlanError(f"no job {job_id!r} in plan")

    def __iter__(self) -> Iterator[dict]:
        return iter(self.jobs)

    # -- tensors -----------------------------------------------------------------------------
    def tensor(self, name: str) -> np.ndarray:
        try:
            return self.tensors[name]
        except KeyError:
            raise PlanError(f"plan names tensor {name!r} but tensors.safetensors lacks it") from None

    def mask(self, masks: dict | None, grid: str) -> np.ndarray | None:
        """A mask of a ``masks`` dict (``{"latent": name, "token": name}``) on ``grid``, float32, or None."""
        if not masks:
            return None
        name = masks.get(grid)
        if name is None:
            raise PlanError(f"mask dict {masks!r} has no {grid!r} grid")
        return np.asarray(self.tensor(name), dtype=np.float32)

    def grid(self, name: str) -> tuple[int, int]:
        h, w = self.json["grids"][name]
        return int(h), int(w)


def load_plan(directory: str | Path) -> Plan:
    """Read ``plan.json`` and ``tensors.safetensors`` from a plan directory."""
    from safetensors.numpy import load_file

    d = Path(directory)
    try:
        doc = json.loads((d / "plan.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanError(f"{d}: no plan.json (compile the scene first: scenec compile)") from None
    except ValueError as e:
        raise PlanError(f"{d / 'plan.json'}: not valid JSON ({e})") from None
    tpath = d / "tensors.safetensors"
    tensors = load_file(str(tpath)) if tpath.is_file() else {}
    return Plan(doc, tensors)
