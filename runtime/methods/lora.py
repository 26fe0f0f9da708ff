"""LoRAs: the whole image's (``model.lora``) and each entity's, region-masked (``entities[].lora``).

A global LoRA adds its delta s·B·A·x on every token of every layer it adapts. An entity's LoRA adds it
only for the tokens of that entity: its prompt tokens (the tokens of its stream in the call's text, in
the negative branch its negative's) and its region's image tokens, weighted by the region's coverage
(soft where feathered); every other token sees the base weights. It is one extra low-rank product per
adapted layer and LoRA file — forward hooks on the adapted layers (runtime/lora.py), no extra forward
pass. Which tokens a layer sees is the family's to say (``Backend.token_kind``): Flux's dual-stream
blocks have separate text and image projections, its single-stream blocks see the joint sequence; a
UNet's ``attn2.to_k``/``to_v`` see text, its other layers image tokens. Layers that see no tokens (time
embedding, AdaLN modulation) keep the base weights for an entity LoRA.

Per call, :meth:`Lora.modifiers` builds the token weights from the call's assembled text
(``Call.cond``: each text token's owner stream from its layouts, each entity's region on every plan
grid) and hands them over as a :class:`runtime.lora.TokenWeights` among the call's modifiers, so they
hold for exactly that forward; a call without them (the plain model, e.g. COW's inversion) sees the
global LoRAs only. The plan's model section and each entity's ``lora`` carry the LoRAs' digests and
scales, so they are part of every ``job_hash`` they change.

Exact by construction: a LoRA of scale 0 installs nothing (the model's own computation); an entity
LoRA whose region covers the whole canvas weighs each image token 1.0, so on layers that see image
tokens only it adds the very delta the global LoRA adds; a region covering nothing weighs every image
token 0, leaving those layers' outputs exactly the base layers'.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import torch

from ..lora import Hooks, TokenWeights, read_adapter
from .base import Method

ADAPTERS_KEPT = 8  # LoRA files kept loaded per backend (by digest), least recently used first out
_adapters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adapter(backend, lora):
    """The backend's :class:`runtime.lora.Adapter` of a plan LoRA, read once per file content."""
    cache = _adapters.setdefault(backend, OrderedDict())
    key = (lora.sha256, lora.text_encoder)  # read with its text-encoder layers or without
    if key not in cache:
        cache[key] = read_adapter(lora, backend)
        while len(cache) > ADAPTERS_KEPT:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


class Lora(Method):
    name = "lora"

    @classmethod
    def wants(cls, plan, job) -> bool:
        return bool(plan.model.lora) or any(e.lora for e in job.entities)

    def capabilities(self) -> tuple[str, ...]:
        return ()  # every family declares token_kind

    def setup(self) -> None:
        run = self.run
        be = run.backend
        self.hooks = None
        self.text_hooks: list[Hooks] = []
        scale: dict[str, float] = {}
        used: dict[str, object] = {}
        text: set[str] = set()  # whole-image LoRAs whose text-encoder layers act (plan `Lora.text_encoder`)
        for lo in run.plan.model.lora:  # batch rows share the model section (runtime/batching.py)
            scale[lo.sha256] = scale.get(lo.sha256, 0.0) + float(lo.scale)
            used.setdefault(lo.sha256, lo)
            if lo.text_encoder:
                used[lo.sha256] = lo
                text.add(lo.sha256)
        self.entity = False
        for row in run.rows:
            for e in row.job.entities:
                for lo in e.lora:
                    if lo.scale != 0.0:
                        used.setdefault(lo.sha256, lo)
                        scale.setdefault(lo.sha256, 0.0)
                        self.entity = True
        live = {sha: lo for sha, lo in used.items() if scale[sha] != 0.0 or self._entity_uses(sha)}
        if not live:
            return  # every LoRA at scale 0: the model as it is
        adapters = {sha: adapter(be, lo) for sha, lo in live.items()}
        self.hooks = Hooks(be.denoiser, adapters, {sha: scale[sha] for sha in live}, be.token_kind, self._current)
        self._text_hooks(adapters, {sha: scale[sha] for sha in live if scale[sha] != 0.0 and sha in text})

    def _text_hooks(self, adapters: dict, scale: dict[str, float]) -> None:
        """The whole-image LoRAs' text-encoder layers (plan ``Lora.text_encoder``), at their scale on every
        token of every prompt, as diffusers' ``load_lora_weights`` + ``fuse_lora(lora_scale)`` applies them. The
        backend's text cache holds encodings made without them: it is emptied now and when the run ends."""
        be = self.run.backend
        comps = {c for sha in scale for c in adapters[sha].text}
        for comp in sorted(comps):
            ads = {sha: SimpleNamespace(layers=adapters[sha].text[comp]) for sha in scale if comp in adapters[sha].text}
            self.text_hooks.append(Hooks(getattr(be.pipe, comp), ads, scale, lambda _n: None, lambda: None))
        if self.text_hooks and hasattr(be, "clear_cache"):
            be.clear_cache()

    def _entity_uses(self, sha: str) -> bool:
        return any(lo.sha256 == sha and lo.scale != 0.0 for row in self.run.rows for e in row.job.entities
                   for lo in e.lora)

    def _current(self):
        for m in self.run.backend.attn.mods:
            if isinstance(m, TokenWeights):
                return m
        return None

    def close(self) -> None:
        if getattr(self, "hooks", None) is not None:
            self.hooks.remove()
            self.hooks = None
        if getattr(self, "text_hooks", None):
            for h in self.text_hooks:
                h.remove()
            self.text_hooks = []
            self.run.backend.clear_cache()  # encodings made under them

    def modifiers(self, call) -> list:
        if self.hooks is None or not self.entity:
            return []
        tw = self.weights(call)
        return [tw] if tw is not None else []

    def weights(self, call) -> TokenWeights | None:
        """The call's per-token weights of each entity LoRA (``TokenWeights``), or None when none acts."""
        run, cond = self.run, call.cond
        B, n_text = len(call.rows), cond.n_text
        lay = next(iter(cond.layouts.values()), None)
        owners = [lay.rows[b].owner[:n_text] for b in range(B)] if lay is not None else \
            [torch.zeros(n_text, dtype=torch.long)] * B  # no entity streams: the text is the global slot's
        text: dict[str, torch.Tensor] = {}
        image: dict[str, dict[int, torch.Tensor]] = {}
        device = cond.seq.device
        for b, (r, spec) in enumerate(zip(call.rows, call.specs)):
            plan = run.rows[r].plan
            for p, stream in enumerate([spec.global_, *spec.entities]):
                if stream is None or not stream.lora:
                    continue
                mine = (owners[b] == p).to(torch.float32)
                for sha, s in stream.lora:
                    if s == 0.0:
                        continue
                    # on the owners' device: a flex mask moves the layout to the GPU before this runs
                    t = text.setdefault(sha, torch.zeros(B, n_text, device=mine.device))
                    t[b] += s * mine
                    per = image.setdefault(sha, {})
                    for g in plan.doc.grids:
                        h, w = plan.grid(g)
                        cov = plan.mask(stream.mask_ref, g)
                        cov = np.ones((h, w), np.float32) if cov is None else cov
                        acc = per.setdefault(h * w, torch.zeros(B, h * w))
                        acc[b] += s * torch.from_numpy(np.ascontiguousarray(cov, np.float32).reshape(-1))
        if not text:
            return None
        return TokenWeights({k: v.to(device) for k, v in text.items()},
                            {k: {n: v.to(device) for n, v in d.items()} for k, d in image.items()})
