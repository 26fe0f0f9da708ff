"""Seamless tiling (``canvas.tiling``): the denoiser's convolutions pad circularly for the run (runtime/tiling.py);
the family's decode wraps the VAE decoder the same way."""

from __future__ import annotations

from ..tiling import Circular
from .base import Method


class Tiling(Method):
    name = "tiling"

    @classmethod
    def wants(cls, plan, job) -> bool:
        return plan.doc.canvas.tiling != "none"

    def setup(self) -> None:
        run = self.run
        self.hold = Circular(run.backend.denoiser, run.rows[0].plan.doc.canvas.tiling)  # rows share the canvas

    def close(self) -> None:
        hold = getattr(self, "hold", None)
        if hold is not None:
            hold.close()
