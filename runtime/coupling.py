"""Coupled generation for Flux ("Controllable Coupled Image Generation via Diffusion Models", arXiv 2506.06826).

A coupled job has two streams: the background (the job's global prompt, gain 1 − θ) and the entity
stream(s) (the variant's entities and/or its whole-canvas prompt, gain θ). θ comes from each denoise
op (the group's θ table). One coupled forward:

- double-stream blocks attend over ``[bg | ent… | pad | img]`` with the background keys × (1 − θ) and
  the entity keys × θ (the published method). When the entity streams have regions, EliGen's
  regional structure is kept (entity prompt ↔ its region only, prompts never see each other, the
  background ↔ every image token), i.e. the job's regional mask plus key scaling;
- single-stream blocks run two branches, ``[bg | img]`` and ``[ent… | pad | img]`` (the latter regional
  when there are regions), and mix the image outputs (1 − θ)·h_bg + θ·h_ent; each branch's text
  tokens continue in their own branch;
- the pooled (CLIP) conditioning is (1 − θ)·pooled_bg + θ·pooled_ent.

Exact endpoints (beyond the paper): at θ = 0 exactly the entity tokens and branch are dropped — the
forward is the plain model on the background prompt (diffusers' path); at θ = 1 exactly the
background is dropped — the entity stream(s) alone, regional if they have regions, else plain. Key
scaling by 0 leaves logits at 0 rather than −∞, so the published formula misses "entity only" at
θ = 1; the endpoints here are exact and cheaper.

Fused single-stream blocks. Both branches of a single-stream block see the same image tokens with
the same modulation, so their per-token work (norm, QKV, MLP) is identical: we compute it once over
``[bg | ent | img]`` and run only the attention twice. The block's output projection and residual
are affine in the attention output, so mixing the two branches' attention outputs,
(1 − θ)·a_bg + θ·a_ent, before ``proj_out`` equals mixing the block outputs after it (up to float
rounding). The result is the published two-branch formula at ≈1.3× instead of 2× a plain block.

Entity stream encoding: a single whole-canvas prompt (a variant ``prompt``) is encoded like a global
prompt (T5 padded to ``max_sequence_length``, CLIP pooled), so at θ = 1 the job is exactly the plain
scene with that prompt. Otherwise each entity prompt is encoded as EliGen does (its own T5 tokens);
the entity stream's pooled is the CLIP pooled of its first whole-canvas prompt, or, for region-only
entity streams (which have no global description), the background's pooled.

Shared prefix: see :func:`run_group`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .attention import BLOCK_KINDS, BuiltMask, RegionalLayout, _flex, region_membership
from .errors import PlanError, RuntimeErrorBase, Unsupported

BG_GAINS = (None, "1-theta")
ENT_GAINS = (None, "theta")


# -- conditions ------------------------------------------------------------------------------

@dataclass
class CoupledCondition:
    """Everything a coupled job's forwards need (one per job and positive/negative)."""

    bg: object  # flux.Condition: the background alone (plain path)
    ent: object | None  # flux.Condition: the entity stream(s) alone (regional mask or None); None = no entity streams
    bg_seq: torch.Tensor  # [1, n_bg, D]
    ent_seq: torch.Tensor | None  # [1, n_ent, D] real entity tokens (no pad)
    joint_mask: BuiltMask | None  # layout [bg | ent… | pad | img] for double-stream blocks; None = no regions


def is_coupled(job: dict) -> bool:
    """A job whose step program carries θ (a member of a coupling group)."""
    return any(op.get("op") == "denoise" and op.get("theta") is not None for op in job.get("program") or [])


def coupled_condition(backend, plan, job: dict, negative: bool) -> CoupledCondition:
    """Background and entity streams of a coupled job, encoded once (the backend caches texts)."""
    from .flux import Condition

    which = "negative" if negative else "prompt"
    msl = int(plan.model.get("max_sequence_length") or 512)
    att = plan.attention
    if job["global"].get("gain") not in BG_GAINS:
        raise Unsupported(f"job {job['id']!r}: background gain {job['global'].get('gain')!r} in a coupled job")
    ents = job.get("entities") or []
    for e in ents:
        if e.get("gain") not in ENT_GAINS:
            raise Unsupported(f"job {job['id']!r}: entity {e.get('id')!r} with gain {e.get('gain')!r} in a coupled "
                              "job (every entity stream of a coupled job has gain theta)")
    te_dtype = backend.pipe.text_encoder.dtype
    dev = backend.device

    def ids(n: int) -> torch.Tensor:
        return torch.zeros(n, 3, device=dev, dtype=te_dtype)  # Flux: text ids are zeros

    g = backend.encode_global(plan.prompt(job["global"][which]), msl)
    bg = Condition(g.seq, g.pooled, ids(g.seq.shape[1]), None)
    if not ents:  # a variant without entity streams: background at every θ
        return CoupledCondition(bg, None, g.seq, None, None)
    masks = [plan.mask(e.get("masks"), "token") for e in ents]
    if len(ents) == 1 and masks[0] is None:
        # one whole-canvas prompt: the published method, the prompt encoded as a global prompt
        p = backend.encode_global(plan.prompt(ents[0][which]), msl)
        ent = Condition(p.seq, p.pooled, ids(p.seq.shape[1]), None)
        return CoupledCondition(bg, ent, g.seq, p.seq, None)
    pad = att.get("pad_prompts")
    parts = [backend.encode_entity(plan.prompt(e[which]), msl, pad).seq for e in ents]
    pooled = g.pooled
    for e, m in zip(ents, masks):
        if m is None:
            pooled = backend.encode_global(plan.prompt(e[which]), msl).pooled
            break
    regions = region_membership(masks, plan.grid("token"))
    lens = [p.shape[1] for p in parts]
    image_self = att.get("image_self", "open")
    ent_layout = RegionalLayout([0] + lens, regions, image_self, backend.pad_multiple)
    joint_layout = RegionalLayout([g.seq.shape[1]] + lens, regions, image_self, backend.pad_multiple)
    ent_seq = torch.cat(parts, dim=1)
    seq = ent_seq if not ent_layout.n_pad else torch.cat([ent_seq, ent_seq.new_zeros(1, ent_layout.n_pad,
                                                                                     ent_seq.shape[2])], 1)
    ent = Condition(seq, pooled, ids(seq.shape[1]), backend.regional.build(ent_layout, dev))
    return CoupledCondition(bg, ent, g.seq, ent_seq, backend.regional.build(joint_layout, dev))


# -- the coupled forward ---------------------------------------------------------------------

def _kernel(q, k, v, built: BuiltMask | None) -> torch.Tensor:
    """Attention over [B, N, H, D] tensors with an optional regional mask; returns [B, N, H, D]."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if built is None:
        out = F.scaled_dot_product_attention(qt, kt, vt)
    else:
        if qt.shape[2] != built.layout.N:
            raise PlanError(f"sequence of {qt.shape[2]} tokens but the region mask is for {built.layout.N}")
        if built.impl == "flex":
            out = _flex()(qt, kt, vt, block_mask=built.mask)
        else:
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=built.mask)
    return out.transpose(1, 2)


class KeyScaledAttnProcessor:
    """Double-stream attention over [bg | ent… | pad | img] with text keys scaled (bg × (1−θ), ent × θ).

    ``scale``: float ``[n_text]`` per text token (pad tokens 1); ``mask``: the regional mask or None.
    """

    def __init__(self, scale: torch.Tensor, mask: BuiltMask | None = None):
        self.scale, self.mask = scale, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections, apply_rotary_emb

        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        ek = ek * self.scale.to(ek.dtype)[None, :, None, None]
        q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = _kernel(q, k, v, self.mask).flatten(2, 3).to(q.dtype)
        n_txt = encoder_hidden_states.shape[1]
        e, h = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
        return attn.to_out[1](attn.to_out[0](h.contiguous())), attn.to_add_out(e.contiguous())


def coupled_single_block(blk, hidden, enc_bg, enc_ent, temb, rope, theta: float, ent_mask: BuiltMask | None = None):
    """One single-stream block, two branches [bg | img] and [ent | img], image outputs mixed by θ.

    Fused: per-token work once over [bg | ent | img], attention twice, the branches' attention outputs
    mixed before the (affine) output projection — equal to (1−θ)·block(bg) + θ·block(ent) on the image
    tokens. ``rope`` covers [bg | ent | img] (text positions are zero). Returns (enc_bg, enc_ent, hidden).
    """
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections, apply_rotary_emb

    nb, ne = enc_bg.shape[1], enc_ent.shape[1]
    x = torch.cat([enc_bg, enc_ent, hidden], dim=1)
    residual = x
    nx, gate = blk.norm(x, emb=temb)
    mlp = blk.act_mlp(blk.proj_mlp(nx))
    attn = blk.attn
    q, k, v = _get_qkv_projections(attn, nx)[:3]
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if rope is not None:
        q = apply_rotary_emb(q, rope, sequence_dim=1)
        k = apply_rotary_emb(k, rope, sequence_dim=1)

    def bg_part(t):
        return torch.cat([t[:, :nb], t[:, nb + ne:]], dim=1)

    a_bg = _kernel(bg_part(q), bg_part(k), bg_part(v), None)
    a_ent = _kernel(q[:, nb:], k[:, nb:], v[:, nb:], ent_mask)
    img = (1 - theta) * a_bg[:, nb:] + theta * a_ent[:, ne:]
    out = torch.cat([a_bg[:, :nb], a_ent[:, :ne], img], dim=1).flatten(2, 3).to(q.dtype)
    h = residual + gate.unsqueeze(1) * blk.proj_out(torch.cat([out, mlp], dim=2))
    if h.dtype == torch.float16:
        h = h.clip(-65504, 65504)
    return h[:, :nb], h[:, nb:nb + ne], h[:, nb + ne:]


def coupled_forward(transformer, hidden_states, timestep, guidance, img_ids, bg_seq, bg_pooled, ent_seq, ent_pooled,
                    theta: float, joint_mask: BuiltMask | None = None, ent_mask: BuiltMask | None = None):
    """The coupled method's forward (noise prediction for the image tokens), 0 < θ < 1.

    ``bg_seq`` / ``ent_seq``: T5 sequences (batch 1 or B; real tokens only — pad tokens for the masks
    are added here). ``timestep`` in [0, 1] (as FluxTransformer2DModel takes it). ``joint_mask``: the
    regional mask over [bg | ent | pad | img] for double-stream blocks; ``ent_mask``: over
    [ent | pad | img] for the single-stream entity branch; None = unmasked (the published method).
    """
    tr = transformer
    B = hidden_states.shape[0]
    hidden = tr.x_embedder(hidden_states)
    ts = timestep.to(hidden.dtype) * 1000
    pooled = (1 - theta) * bg_pooled + theta * ent_pooled
    if pooled.shape[0] != B:
        pooled = pooled.expand(B, -1)
    if guidance is not None:
        temb = tr.time_text_embed(ts, guidance.to(hidden.dtype) * 1000, pooled)
    else:
        temb = tr.time_text_embed(ts, pooled)
    nb, ne = bg_seq.shape[1], ent_seq.shape[1]
    jpad = joint_mask.layout.n_pad if joint_mask is not None else 0
    epad = ent_mask.layout.n_pad if ent_mask is not None else 0
    bg_seq, ent_seq = bg_seq.expand(B, -1, -1), ent_seq.expand(B, -1, -1)
    text = [bg_seq, ent_seq] + ([ent_seq.new_zeros(B, jpad, ent_seq.shape[2])] if jpad else [])
    enc = tr.context_embedder(torch.cat(text, dim=1))

    def rope(n_text: int):
        ids = torch.cat([torch.zeros(n_text, 3, device=img_ids.device, dtype=img_ids.dtype), img_ids], 0)
        return tr.pos_embed(ids)

    scale = torch.ones(enc.shape[1], device=enc.device, dtype=torch.float32)
    scale[:nb] = 1 - theta
    scale[nb:nb + ne] = theta
    proc = KeyScaledAttnProcessor(scale, joint_mask)
    rope_joint = rope(enc.shape[1])
    saved = [b.attn.processor for b in tr.transformer_blocks]
    try:
        for b in tr.transformer_blocks:
            b.attn.processor = proc
        for b in tr.transformer_blocks:
            # .forward: eager even when the block is torch.compiled (a per-step processor would recompile)
            enc, hidden = b.forward(hidden_states=hidden, encoder_hidden_states=enc, temb=temb,
                                    image_rotary_emb=rope_joint)
    finally:
        for b, p in zip(tr.transformer_blocks, saved):
            b.attn.processor = p
    enc_bg, enc_ent = enc[:, :nb], enc[:, nb:nb + ne]
    if epad:  # pad tokens carry nothing (they see only each other): any values do
        enc_ent = torch.cat([enc_ent, enc_ent.new_zeros(B, epad, enc_ent.shape[2])], dim=1)
    rope_single = rope(nb + enc_ent.shape[1])
    for b in tr.single_transformer_blocks:
        enc_bg, enc_ent, hidden = coupled_single_block(b, hidden, enc_bg, enc_ent, temb, rope_single, theta, ent_mask)
    hidden = tr.norm_out(hidden, temb)
    return tr.proj_out(hidden)


def velocity(backend, cond: CoupledCondition, x, t, guidance, img_ids, theta: float, regional: bool, blocks: str,
             plain: Callable) -> torch.Tensor:
    """The velocity of a coupled job at θ: exact endpoints, the coupled forward in between.

    ``plain(condition, x, t, regional)`` is the backend's ordinary forward (regional or diffusers' path).
    """
    theta = float(theta)
    if theta <= 0.0 or cond.ent is None:
        return plain(cond.bg, x, t, regional)
    if theta >= 1.0:
        return plain(cond.ent, x, t, regional)
    kinds = BLOCK_KINDS.get(blocks, BLOCK_KINDS["all"]) if regional else ()
    backend.regional.use(None)  # blocks other than ours run the stock path
    return coupled_forward(backend.transformer, x, t / 1000, guidance, img_ids, cond.bg_seq, cond.bg.pooled,
                           cond.ent_seq, cond.ent.pooled, theta,
                           joint_mask=cond.joint_mask if "double" in kinds else None,
                           ent_mask=cond.ent.mask if "single" in kinds else None)


# -- groups: shared prefix -------------------------------------------------------------------

def sharing_enabled(share: bool | None = None) -> bool:
    """``share`` if given, else the environment: SCENEC_SHARED_PREFIX=0 turns sharing off."""
    if share is not None:
        return bool(share)
    return os.environ.get("SCENEC_SHARED_PREFIX", "1").strip().lower() not in ("0", "false", "no", "off")


def _prefix(job: dict) -> list[dict] | None:
    """The ops before the job's ``fork``, if they are all θ = 0 deterministic denoise steps."""
    prog = job.get("program") or []
    k = next((i for i, op in enumerate(prog) if op.get("op") == "fork"), None)
    if not k:
        return None
    pre = prog[:k]
    if all(op.get("op") == "denoise" and op.get("theta") == 0.0 and not op.get("eta") for op in pre):
        return pre
    return None


def _share_key(job: dict):
    """What the prefix of a job depends on: jobs with equal keys and prefixes compute it identically."""
    import json

    if job.get("conditions"):
        return None  # reference conditions act on the latent during sampling: never shared
    pre = _prefix(job)
    if pre is None:
        return None
    g = job["global"]
    return json.dumps([job["seed"], g.get("prompt"), g.get("negative"), job.get("init_image"),
                       job.get("inpaint_mask"), pre], sort_keys=True)


def run_group(backend, plan, group: dict, jobs: list[dict], progress: Callable[[str, int], None] | None = None,
              share: bool | None = None, decode: bool = True) -> Iterator[tuple[dict, object]]:
    """Run a coupling group's jobs together; yields ``(job, JobResult | RuntimeErrorBase)`` per job.

    Jobs whose leading θ = 0 steps are the same computation (same seed, background prompt and
    negative, init image and inpaint mask, the same prefix ops before the ``fork`` op, no reference
    conditions) run that prefix once, at batch 1; each then continues from a copy of the latent.
    With sharing off (``share=False`` or SCENEC_SHARED_PREFIX=0) every job runs alone; the images
    are identical either way. A failure fails only its job (a failing prefix: each job runs alone).
    ``progress(job_id, ops_done)``.
    """
    share = sharing_enabled(share)
    buckets: dict[str, list[dict]] = {}
    order: list[tuple[str | None, dict]] = []
    for job in jobs:
        key = _share_key(job) if share and int(group.get("shared_prefix") or 0) > 0 else None
        if key is not None:
            if key not in buckets:
                buckets[key] = []
                order.append((key, job))
            buckets[key].append(job)
        else:
            order.append((None, job))

    def cb(job):
        if progress is None:
            return None
        return lambda k, _id=job["id"]: progress(_id, k)

    def alone(job):
        try:
            return backend.run_job(plan, job, progress=cb(job), decode=decode)
        except RuntimeErrorBase as e:
            return e

    for key, job in order:
        if key is None or len(buckets[key]) < 2:
            for j in ([job] if key is None else buckets[key]):
                yield j, alone(j)
            continue
        members = buckets[key]
        t0 = time.perf_counter()
        try:
            head = backend.run_job(plan, members[0], stop_at_fork=True, decode=False)
        except RuntimeErrorBase:
            for j in members:
                yield j, alone(j)
            continue
        shared_s = time.perf_counter() - t0
        fork = next(i for i, op in enumerate(members[0]["program"]) if op.get("op") == "fork")
        for j in members:
            if progress is not None:
                progress(j["id"], fork + 1)
            try:
                r = backend.run_job(plan, j, progress=cb(j), decode=decode, resume=(fork + 1, head.latents))
                r.timings["shared_prefix_s"] = shared_s
                r.timings["shared_prefix_steps"] = fork
                r.timings["shared_with"] = len(members)
            except RuntimeErrorBase as e:
                r = e
            yield j, r
