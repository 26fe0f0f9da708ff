"""Regional attention (EliGen, arXiv 2501.01097, §3.2): each entity prompt attends only to its region.

The text of a call with entity streams has a token layout (runtime/attention.py); on ``regional``
ops this method adds the layout's ``regional`` mask at every site where text meets image —
restricted by ``attention.blocks`` to dual- or single-stream blocks on families that have them. The
mask is built once per layout and reused by every block and step. After ``attention.until`` the ops
are not regional and calls run without it (padding still masked, runtime/sampler.py).
"""

from __future__ import annotations

from ..attention import BLOCK_KINDS
from .base import Method


def regional_sites(run) -> list[str]:
    """The family's sites where text meets image, under ``attention.blocks``."""
    kinds = BLOCK_KINDS[run.plan.attention.blocks]
    return [s.name for s in run.backend.sites if s.text and (s.block is None or s.block in kinds)]


class Regional(Method):
    name = "regional"

    @classmethod
    def wants(cls, plan, job) -> bool:
        return bool(job.entities)

    def modifiers(self, call) -> list:
        if not call.regional or not call.cond.needs("regional"):
            return []
        be = self.run.backend
        return [call.cond.mask("regional", be.mask_impl, be.device, regional_sites(self.run))]
