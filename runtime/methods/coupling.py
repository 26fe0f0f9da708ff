"""Coupled generation ("Controllable Coupled Image Generation via Diffusion Models", arXiv 2506.06826).

A coupled job has two streams: the background (the job's global prompt, gain 1 − θ) and the entity
stream(s) (the variant's entities and/or its whole-canvas prompt, gain θ); θ comes from each denoise
op (the group's θ table). For 0 < θ < 1 a model call holds both, ``[bg | ent… | pad]``, and:

- at sites where the text keeps its own weights (Flux dual-stream blocks, UNet cross-attention) the
  keys are scaled, background × (1 − θ) and entity × θ (§3.2, Eq. 4) — with regions, on top of
  EliGen's regional mask (runtime/methods/regional.py);
- at single-stream sites two attention branches, ``[bg | img]`` and ``[ent… | pad | img]`` (regional
  when the entities have regions), mix their image outputs (1 − θ)·a_bg + θ·a_ent (§3.2), each
  branch's text continuing in its own rows (:class:`runtime.attention.Branches`);
- a family's pooled vector is (1 − θ)·pooled_bg + θ·pooled_ent.

Exact endpoints (beyond the paper): at θ = 0 the call holds the background alone (the plain model on
the background prompt); at θ = 1 a single whole-canvas prompt alone, encoded as a global prompt, so
θ ≡ 1 is exactly the plain image of the variant's prompt; and entity streams with regions as EliGen's
job of those entities with the background as global prompt (image tokens outside every region keep a
prompt). Key scaling by 0 leaves logits at 0 rather than −∞, so the published formula misses "entity
only" at θ = 1; the endpoints here are exact and cheaper.

Entity streams: one whole-canvas prompt (a variant ``prompt``) is encoded like a global prompt;
otherwise each entity prompt as EliGen encodes it. The entity stream's pooled vector is that of its
first whole-canvas prompt or, for region-only entity streams (no global description), the
background's. The shared θ = 0 prefix of a group is the sampler's (runtime/sampler.run_group).
"""

from __future__ import annotations

import torch

from scenec.spec.errors import Unsupported

from ..attention import Branches, KeyScale
from ..backend import Stream, TextSpec
from ..layout import RegionalLayout, build_mask
from .base import Method
from .regional import regional_sites

BG_GAINS = (None, "1-theta")
ENT_GAINS = (None, "theta")


class Coupling(Method):
    name = "coupling"
    batchable = False

    @classmethod
    def wants(cls, plan, job) -> bool:
        return job.coupled

    def setup(self) -> None:
        job = self.run.job
        g = job.global_
        if g.gain not in BG_GAINS:
            raise Unsupported(f"job {job.id!r}: background gain {g.gain!r} in a coupled job")
        for e in job.entities:
            if e.gain not in ENT_GAINS:
                raise Unsupported(f"job {job.id!r}: entity {e.id!r} with gain {e.gain!r} in a coupled job "
                                  "(every entity stream of a coupled job has gain theta)")
        bg = Stream(g.prompt, g.negative, as_global=True)
        self.bg = TextSpec(bg, (), (bg,))
        self.ent = self.joint = None  # no entity streams: the background at every θ
        ents = job.entities
        if len(ents) == 1 and ents[0].masks is None:  # one whole-canvas prompt: the published method
            e = Stream.entity(ents[0], as_global=True)  # keeps the entity's LoRAs
            self.ent, self.joint = TextSpec(e, (), (e,)), TextSpec(bg, (e,), (bg, e))
        elif ents:
            streams = tuple(Stream.entity(e) for e in ents)
            whole = next((Stream(e.prompt, e.negative, as_global=True) for e in ents if e.masks is None), bg)
            # θ = 1 with regions: EliGen's job of the variant's entities with the background as global prompt,
            # so image tokens outside every region keep a prompt
            self.ent, self.joint = TextSpec(bg, streams, (whole,)), TextSpec(bg, streams, (bg, whole))
        self._branch_masks: dict = {}

    @staticmethod
    def theta(call) -> float:
        return float(call.theta or 0.0)

    def shape(self, call) -> None:
        th = self.theta(call)
        if th <= 0.0 or self.ent is None:
            call.specs = [self.bg]
        elif th >= 1.0:
            call.specs = [self.ent]
        else:
            call.specs = [self.joint]
            call.pooled_weights = (1 - th, th)

    def modifiers(self, call) -> list:
        th = self.theta(call)
        if call.specs[0] is not self.joint or not 0.0 < th < 1.0:
            return []
        cond, be = call.cond, self.run.backend
        nb, ne = cond.lengths[0], sum(cond.lengths[1:])
        scale = torch.ones(cond.n_text, device=cond.seq.device, dtype=torch.float32)
        scale[:nb] = 1 - th
        scale[nb:nb + ne] = th
        mods = [KeyScale(scale, frozenset(s.name for s in be.sites if s.text and not s.single_stream))]
        single = frozenset(s.name for s in be.sites if s.single_stream)
        if single:
            mods.append(Branches(nb, th, self._branch_mask(call, single), single))
        return mods

    def _branch_mask(self, call, single: frozenset[str]):
        """The entity branch's mask over ``[ent… | pad | img]`` (the joint text without the background):
        regional on regional ops where the blocks option covers single-stream sites, else only the
        padding masked; None when nothing needs masking."""
        cond, be = call.cond, self.run.backend
        rule = "regional" if call.regional and single & set(regional_sites(self.run)) else "open"
        key = (id(cond), rule)
        if key not in self._branch_masks:
            lay = next(iter(cond.layouts.values()), None)
            sub = None if lay is None else RegionalLayout([0] + lay.text_lengths[1:], lay.regions, lay.image_self,
                                                          n_text_to=lay.n_text - cond.lengths[0])
            self._branch_masks[key] = (cond, None if sub is None or not sub.needs_mask(rule)
                                       else build_mask(sub, be.mask_impl, be.device, rule))
        return self._branch_masks[key][1]
