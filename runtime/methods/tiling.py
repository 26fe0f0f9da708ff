"""Seamless tiling (``canvas.tiling``): the denoiser's and the VAE decoder's convolutions pad circularly for the
run, its decode included (runtime/tiling.py)."""

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
        tiling = run.rows[0].plan.doc.canvas.tiling  # rows share the canvas
        self.holds = [Circular(run.backend.denoiser, tiling), Circular(run.backend.pipe.vae.decoder, tiling)]

    def close(self) -> None:
        for hold in getattr(self, "holds", ()):
            hold.close()
