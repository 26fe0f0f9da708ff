"""The Stable Diffusion backend: UNet + DDIM, executing plan jobs of the ``sd`` family.

Our loop interprets the job's step program but computes each step as diffusers'
``StableDiffusionPipeline`` does (same initial latents from ``prepare_latents`` with a CPU generator,
same DDIM timesteps, CFG over a batch [negative, positive], ``DDIMScheduler.step``), so a job without
entities reproduces ``StableDiffusionPipeline(...)``. On top of that:

- regional prompts (EliGen's layout on SD's cross-attention): the key sequence is
  ``[global prompt (77 tokens) | entity 0 | … ]``, entity prompts at their real CLIP length; an entity's
  keys are visible only to the queries of its region, the global keys to every query. The mask is
  built once per job and grid and picked per attention call by the query's token count
  (plan grids ``latent``/``a16``/``a32``/``a64``);
- per-entity negatives: the CFG negative pass has the same structure over the negative texts;
- inpainting fusion: outside the entity regions the latent is replaced after every step by the init
  latent noised to that level with fixed noise, and by the init latent itself at the end;
- COW (runtime/cow.py): DDIM inversion, DDPM re-noise, paste, preserve, DDIM η;
- SOW (runtime/cow.SowGrids): a bias on the UNet's self-attention (``attn1``) logits at every
  resolution, inside the cycles; without it ``attn1`` runs its own (stock) processor unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import cow as cowmod
from .cache import TextCache
from .errors import ModelUnavailable, PlanError, Unsupported
from .flux import JobResult, _default_device, _dtype
from .plan import Plan

SD_ALIASES = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd21": "stabilityai/stable-diffusion-2-1-base"}


@dataclass
class SDCondition:
    """One CFG branch: text keys [1, L, D] and the regional masks per query count (None = plain)."""

    seq: torch.Tensor
    masks: dict[int, torch.Tensor] | None  # query tokens → bool [1, 1, n_q, L]


class RegionalCross:
    """Controller of the regional cross-attention processors (one per UNet ``attn2``) and of the SOW
    self-attention processors (one per ``attn1``, wrapping the processor that was there)."""

    def __init__(self, unet):
        self.unet = unet
        self.current: dict[int, torch.Tensor] | None = None
        self.probe: list | None = None  # tests: set to a list to record attention weights
        self.sow = None  # runtime/cow.SowGrids while inside COW cycles (SOW), else None
        procs = {}
        for name in unet.attn_processors:
            if name.endswith("attn2.processor"):
                procs[name] = RegionalCrossAttnProcessor(self)
            elif name.endswith("attn1.processor"):
                procs[name] = SowSelfAttnProcessor(self, unet.attn_processors[name])
            else:
                procs[name] = unet.attn_processors[name]
        unet.set_attn_processor(procs)

    def mask_for(self, n_q: int, n_k: int) -> torch.Tensor | None:
        if self.current is None:
            return None
        m = self.current.get(n_q)
        if m is None:
            raise PlanError(f"no regional grid has {n_q} tokens (grids: {sorted(self.current)})")
        if m.shape[-1] != n_k:
            raise PlanError(f"cross-attention over {n_k} text tokens but the mask is for {m.shape[-1]}")
        return m


class RegionalCrossAttnProcessor:
    """SD cross-attention (``attn2``) with the regional key mask; diffusers' ``AttnProcessor2_0`` otherwise."""

    def __init__(self, ctl: RegionalCross):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.ctl = ctl
        self.plain = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **kw):
        mask = None
        if encoder_hidden_states is not None and hidden_states.ndim == 3:
            mask = self.ctl.mask_for(hidden_states.shape[1], encoder_hidden_states.shape[1])
        if mask is None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        b = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        hd = key.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, hd).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if self.ctl.probe is not None:
            logits = (q.float() @ k.float().transpose(-1, -2)) / (hd ** 0.5)
            w = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
            self.ctl.probe.append({"n_q": q.shape[2], "weights": w, "allow": mask[0, 0],
                                   "expected": w @ v.float(), "out": out.float()})
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * hd).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class SowSelfAttnProcessor:
    """SD self-attention (``attn1``) with SOW's additive bias (runtime/cow.SowGrids) on its logits.

    Without an armed SOW (and for anything but plain 3-d self-attention) it calls the processor that
    was installed before (diffusers' ``AttnProcessor2_0``), so such forwards are exactly diffusers'.
    """

    def __init__(self, ctl: RegionalCross, plain):
        self.ctl = ctl
        self.plain = plain

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **kw):
        sow = self.ctl.sow
        if sow is None or encoder_hidden_states is not None or attention_mask is not None or \
                hidden_states.ndim != 3 or attn.spatial_norm is not None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *a, **kw)
        residual = hidden_states
        b = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        hd = key.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, hd).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = sow.attend(q, k, v, self.ctl.probe)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * hd).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class SDBackend:
    """A loaded SD model (UNet + DDIM). Build with :func:`load_sd_backend`; reuse across plans."""

    family = "sd"

    def __init__(self, pipe, model_id: str, device, dtype):
        from diffusers import DDIMScheduler

        self.pipe = pipe
        if not isinstance(pipe.scheduler, DDIMScheduler):  # the plan's sampler is "ddim"
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.model_id = model_id
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = pipe.unet
        self.regional = RegionalCross(self.unet)
        self._cache = TextCache()  # kept across plans of a batch build (runtime/cache.py)

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- text --------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_global(self, text: str) -> torch.Tensor:
        """CLIP last hidden state, padded to 77 tokens: exactly StableDiffusionPipeline.encode_prompt."""
        key = ("global", text)
        if key not in self._cache:
            self._cache[key] = self.pipe.encode_prompt(text, self.device, 1, False)[0]
        return self._cache[key]

    @torch.inference_mode()
    def encode_entity(self, text: str) -> torch.Tensor:
        """CLIP over the entity's real tokens only (with start/end tokens), no padding."""
        key = ("entity", text)
        if key not in self._cache:
            tok, te = self.pipe.tokenizer, self.pipe.text_encoder
            ids = tok(text, padding=False, max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            self._cache[key] = te(ids.to(te.device))[0].to(dtype=self.dtype, device=self.device)
        return self._cache[key]

    def _condition(self, plan: Plan, job: dict, negative: bool) -> SDCondition:
        which = "negative" if negative else "prompt"
        g = self.encode_global(plan.prompt(job["global"][which]))
        ents = job.get("entities") or []
        if not ents:
            return SDCondition(g, None)
        parts = [g] + [self.encode_entity(plan.prompt(e[which])) for e in ents]
        lens = [p.shape[1] for p in parts]
        seq = torch.cat(parts, 1)
        masks = {}
        for gname in ("latent", "a16", "a32", "a64"):
            if gname not in plan.json["grids"]:
                continue
            h, w = plan.grid(gname)
            n_q = h * w
            allow = torch.zeros(n_q, seq.shape[1], dtype=torch.bool)
            allow[:, :lens[0]] = True  # the global prompt: every query
            start = lens[0]
            for e, n in zip(ents, lens[1:]):
                m = plan.mask(e.get("masks"), gname)
                inside = torch.ones(n_q, dtype=torch.bool) if m is None else torch.from_numpy(
                    np.ascontiguousarray(m > 0).reshape(-1))
                if m is not None and m.shape != (h, w):
                    raise PlanError(f"{gname} mask of {e['id']!r} is {list(m.shape)}, the grid is {[h, w]}")
                allow[:, start:start + n] = inside[:, None]
                start += n
            masks[n_q] = allow.to(self.device)[None, None]
        return SDCondition(seq, masks)

    def _stack(self, conds: list[SDCondition], regional: bool = True) -> SDCondition:
        """One condition for a batch: row b is ``conds[b]``, its text padded to the longest row.

        Without entities and padding in any row, no mask (the pipeline's path, as alone). Otherwise
        every row gets its own allow-matrix per grid (a row without entities: every query sees its
        global prompt) and the padding keys are masked out, so a row attends as it would alone.
        ``regional=False`` (after ``attention.until``): each row sees all of its own text, unmasked,
        as a job alone does then.
        """
        lens = [c.seq.shape[1] for c in conds]
        L = max(lens)
        seq = torch.cat([c.seq if n == L else torch.cat([c.seq, c.seq.new_zeros(1, L - n, c.seq.shape[2])], 1)
                         for c, n in zip(conds, lens)])
        grids = next((c.masks for c in conds if c.masks is not None), None)
        if (grids is None or not regional) and len(set(lens)) == 1:
            return SDCondition(seq, None)
        if grids is None:  # rows without entities all have the global prompt's 77 tokens
            raise PlanError(f"batch rows without entities have different text lengths {lens}")
        masks = {}
        for n_q in sorted(grids):
            rows = []
            for c, n in zip(conds, lens):
                if regional and c.masks is not None:
                    m = c.masks[n_q][0, 0]
                else:
                    m = torch.ones(n_q, n, dtype=torch.bool, device=self.device)
                rows.append(torch.cat([m, m.new_zeros(m.shape[0], L - n)], 1) if n < L else m)
            masks[n_q] = torch.stack(rows)[:, None]  # [B, 1, n_q, L]
        return SDCondition(seq, masks)

    def _check_program(self, job: dict, steps: int) -> None:
        for op in job["program"]:
            kind = op.get("op")
            if kind in ("paste", "renoise"):
                continue
            if kind != "denoise":
                raise Unsupported(f"job {job['id']!r}: step op {kind!r} (coupling groups) is not supported by "
                                  "the SD runtime yet")
            if op.get("theta") is not None:
                raise Unsupported(f"job {job['id']!r}: coupled generation (theta) is not supported by the SD "
                                  "runtime yet")
            if not isinstance(op.get("from"), int) or op.get("to") != op.get("from") + 1 or \
                    not 0 <= op["from"] < steps:
                raise PlanError(f"job {job['id']!r}: denoise op needs integers from, to = from + 1 in 0..{steps}: "
                                f"{op!r}")
        cowmod.check_cow_ops(job, steps)

    # -- pieces of a job ---------------------------------------------------------------------------
    def alpha(self, timesteps, level: int) -> float:
        """ᾱ at a plan level: ᾱ(t_level) for level < N, the scheduler's final ᾱ at N."""
        s = self.pipe.scheduler
        if level >= len(timesteps):
            return float(s.final_alpha_cumprod)
        return float(s.alphas_cumprod[int(timesteps[level])])

    def _fuse(self, latents, z0, m, fixed, timesteps, level: int):
        """Inpainting fusion (EliGen): outside the regions (m = 0) the init latent z₀ noised to ``level``
        with the job's fixed noise, inside the model's latent; ``level`` = N: z₀ itself."""
        if level >= len(timesteps):
            keep = z0
        else:
            a = self.alpha(timesteps, level)
            keep = (a ** 0.5) * z0 + ((1 - a) ** 0.5) * fixed.to(z0.dtype)
        # m is float32: cast back, or fp16/bf16 latents turn float32 and the UNet's next forward fails
        # on mixed dtypes
        return torch.where(m == 0, keep, m * latents + (1 - m) * keep).to(latents.dtype)

    def _init(self, plan: Plan, job: dict, height: int, width: int, shape, gen):
        """(z₀, float mask [1, 1, h, w], fixed noise) of a job's init image; the noise is drawn from the
        job's generator right after its initial latents, as in run_job."""
        arr = np.asarray(plan.tensor(job["init_image"]))
        if arr.dtype != np.uint8 or arr.shape != (height, width, 3):
            raise PlanError(f"init image {job['init_image']!r}: need uint8 [{height}, {width}, 3], "
                            f"got {arr.dtype} {list(arr.shape)}")
        z0 = self.encode_image(arr, height, width)
        lh, lw = shape[2:]
        mm = plan.mask(job.get("inpaint_mask"), "latent")
        if mm is None or mm.shape != (lh, lw):
            raise PlanError(f"job {job['id']!r}: init image needs an inpaint_mask on the latent grid {[lh, lw]}")
        m = torch.from_numpy(np.ascontiguousarray(mm, np.float32)).to(self.device)[None, None]
        fixed = torch.randn(shape, generator=gen, dtype=torch.float32).to(self.device)
        return z0, m, fixed

    @torch.inference_mode()
    def encode_image(self, arr: np.ndarray, height: int, width: int) -> torch.Tensor:
        """uint8 [H, W, 3] → scaled latent (the VAE distribution's mode: deterministic)."""
        from PIL import Image

        pipe = self.pipe
        img = pipe.image_processor.preprocess(Image.fromarray(arr), height=height, width=width)
        z = pipe.vae.encode(img.to(self.device, pipe.vae.dtype)).latent_dist.mode()
        return (z * pipe.vae.config.scaling_factor).to(self.dtype)

    def eps(self, pos: SDCondition, neg: SDCondition | None, x, t, guidance: float, regional: bool = True):
        """The UNet's CFG output: one batched forward [neg, pos] when plain (as the pipeline), else two."""
        unet, sched = self.unet, self.pipe.scheduler
        if neg is None:
            self.regional.current = pos.masks if regional else None
            return unet(sched.scale_model_input(x, t), t, encoder_hidden_states=pos.seq, return_dict=False)[0]
        sow = self.regional.sow
        if (pos.masks is None or not regional) and pos.seq.shape == neg.seq.shape:
            self.regional.current = None
            if sow is not None:  # SOW's indicator reads the positive rows of the batch
                sow.rows = slice(x.shape[0], 2 * x.shape[0])
            xin = sched.scale_model_input(torch.cat([x] * 2), t)
            e = unet(xin, t, encoder_hidden_states=torch.cat([neg.seq, pos.seq]), return_dict=False)[0]
            e_u, e_c = e.chunk(2)
        elif sow is not None:  # the positive pass first: SOW's indicator is measured in it
            xin = sched.scale_model_input(x, t)
            self.regional.current = pos.masks if regional else None
            e_c = unet(xin, t, encoder_hidden_states=pos.seq, return_dict=False)[0]
            self.regional.current = neg.masks if regional else None
            e_u = unet(xin, t, encoder_hidden_states=neg.seq, return_dict=False)[0]
        else:
            xin = sched.scale_model_input(x, t)
            self.regional.current = neg.masks if regional else None
            e_u = unet(xin, t, encoder_hidden_states=neg.seq, return_dict=False)[0]
            self.regional.current = pos.masks if regional else None
            e_c = unet(xin, t, encoder_hidden_states=pos.seq, return_dict=False)[0]
        return e_u + guidance * (e_c - e_u)

    # -- one job -------------------------------------------------------------------------------
    @torch.inference_mode()
    def run_job(self, plan: Plan, job: dict, progress: Callable[[int], None] | None = None,
                decode: bool = True, **_) -> JobResult:
        """Sample one job (see the module docstring) and decode it."""
        t_start = time.perf_counter()
        pipe, sched = self.pipe, self.pipe.scheduler
        width, height = plan.canvas
        steps = int(plan.sampler["steps"])
        self._check_program(job, steps)
        guidance = float(plan.sampler.get("guidance", 7.5))
        cfg = guidance > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        pos = self._condition(plan, job, negative=False)
        neg = self._condition(plan, job, negative=True) if cfg else None
        t_enc = time.perf_counter()

        gen = torch.Generator("cpu").manual_seed(int(job["seed"]))
        latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, height, width, pos.seq.dtype,
                                       self.device, gen)
        lh, lw = latents.shape[2:]
        if plan.grid("latent") != (lh, lw):
            raise PlanError(f"latent grid {plan.grid('latent')} does not match the canvas ({lh}, {lw})")
        sched.set_timesteps(steps, device=self.device)
        timesteps = sched.timesteps
        if len(timesteps) != steps:
            raise PlanError(f"scheduler gave {len(timesteps)} steps, the plan has {steps}")

        z0 = m = fixed = None
        if job.get("init_image"):
            z0, m, fixed = self._init(plan, job, height, width, latents.shape, gen)

        cow = None
        if job.get("conditions") or any(op.get("op") in ("paste", "renoise") or op.get("eta")
                                         for op in job["program"]):
            cow = SDCow(self, plan, job, timesteps, guidance, height, width)

        try:
            for n, op in enumerate(job["program"]):
                kind = op["op"]
                if kind == "paste":
                    ci, at = op["condition"], op["at"]
                    latents = cowmod.paste(latents, cow.refs[ci][at], cow.masks[ci])
                elif kind == "renoise":
                    a, b = op["from"], op["to"]
                    x = cowmod.renoise_ddpm(latents, self.alpha(timesteps, a), self.alpha(timesteps, b),
                                            cowmod.randn_like(latents, cow.gen))
                    latents = x.to(latents.dtype)
                else:
                    i, j = op["from"], op["to"]
                    t = timesteps[i]
                    if cow is not None:
                        cow.arm(n, op)  # SOW inside the cycles, else off
                    e = self.eps(pos, neg, latents, t, guidance, bool(op.get("regional", True)))
                    eta = float(op.get("eta") or 0.0)
                    kw = {}
                    if eta > 0 and cow is not None:
                        kw = {"eta": eta, "variance_noise": cowmod.randn_like(latents, cow.gen).to(latents.dtype)}
                    latents = sched.step(e, t, latents, return_dict=False, **kw)[0]
                    if z0 is not None:
                        latents = self._fuse(latents, z0, m, fixed, timesteps, j)
                if progress is not None:
                    progress(n + 1)
        finally:
            self.regional.current = None
            self.regional.sow = None
        t_den = time.perf_counter()
        image = self.decode(latents) if decode else None
        t_dec = time.perf_counter()
        return JobResult(image, latents, {"encode_s": t_enc - t_start, "denoise_s": t_den - t_enc,
                                          "decode_s": t_dec - t_den, "total_s": t_dec - t_start})

    @torch.inference_mode()
    def run_batch(self, plan_jobs: list[tuple[Plan, dict]], progress: Callable[[int], None] | None = None,
                  ) -> list[JobResult | Exception]:
        """Sample batch-compatible jobs (runtime/batching.batch_key), possibly of different plans, as the
        rows of one batch: one UNet forward per step for all of them, CFG's two branches included
        ([negatives | positives], as StableDiffusionPipeline batches them).

        Each row keeps its own noise (its seed's generator, as alone), text, regions and init image;
        texts are padded to the longest row and the padding masked out (:meth:`_stack`), so a row
        computes what it computes alone, up to float rounding of batched kernels. One JobResult per
        row, or the row's error (a row whose plan data is bad fails alone).
        """
        from .batching import require_compatible, row_timings

        if not plan_jobs:
            return []
        require_compatible(plan_jobs)
        t_start = time.perf_counter()
        pipe, sched = self.pipe, self.pipe.scheduler
        plan0 = plan_jobs[0][0]
        width, height = plan0.canvas
        steps = int(plan0.sampler["steps"])
        guidance = float(plan0.sampler.get("guidance", 7.5))
        cfg = guidance > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        out: list[JobResult | Exception | None] = [None] * len(plan_jobs)
        rows = []  # (index, plan, job, pos, neg)
        for k, (plan, job) in enumerate(plan_jobs):
            try:
                self._check_program(job, steps)
                rows.append((k, plan, job, self._condition(plan, job, negative=False),
                             self._condition(plan, job, negative=True) if cfg else None))
            except (PlanError, Unsupported) as e:
                out[k] = e
        if not rows:
            return out
        sched.set_timesteps(steps, device=self.device)
        timesteps = sched.timesteps
        if len(timesteps) != steps:
            raise PlanError(f"scheduler gave {len(timesteps)} steps, the plan has {steps}")
        lat, inits, live = [], [], []
        for r in rows:
            k, plan, job = r[:3]
            gen = torch.Generator("cpu").manual_seed(int(job["seed"]))  # the same noise as alone
            x = pipe.prepare_latents(1, pipe.unet.config.in_channels, height, width, r[3].seq.dtype,
                                     self.device, gen)
            if plan.grid("latent") != tuple(x.shape[2:]):
                raise PlanError(f"latent grid {plan.grid('latent')} does not match the canvas {tuple(x.shape[2:])}")
            try:  # a bad init image fails its row alone
                inits.append(self._init(plan, job, height, width, x.shape, gen) if job.get("init_image") else None)
            except PlanError as e:
                out[k] = e
                continue
            lat.append(x)
            live.append(r)
        rows = live
        if not rows:
            return out
        conds = ([r[4] for r in rows] if cfg else []) + [r[3] for r in rows]
        stacked = {True: self._stack(conds, regional=True), False: self._stack(conds, regional=False)}
        t_enc = time.perf_counter()
        latents = torch.cat(lat)
        B = len(rows)
        fuse = None
        if any(i is not None for i in inits):  # rows without an init image: m ≡ 1, the latent as it is
            ones = torch.ones_like(latents[:1], dtype=torch.float32)[:, :1]
            zero = torch.zeros_like(latents[:1])
            fuse = [torch.cat([i[n] if i is not None else d for i in inits]) for n, d in
                    enumerate((zero, ones, zero.float()))]

        try:
            for n, op in enumerate(rows[0][2]["program"]):
                t = timesteps[op["from"]]
                c = stacked[bool(op.get("regional", True))]
                self.regional.current = c.masks
                xin = sched.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
                e = self.unet(xin, t, encoder_hidden_states=c.seq, return_dict=False)[0]
                if cfg:
                    e_u, e_c = e.chunk(2)
                    e = e_u + guidance * (e_c - e_u)
                latents = sched.step(e, t, latents, return_dict=False)[0]
                if fuse is not None:
                    latents = self._fuse(latents, fuse[0], fuse[1], fuse[2], timesteps, op["to"])
                if progress is not None:
                    progress(n + 1)
        finally:
            self.regional.current = None
        t_den = time.perf_counter()
        for b, r in enumerate(rows):
            t0 = time.perf_counter()
            image = self.decode(latents[b:b + 1])
            out[r[0]] = JobResult(image, latents[b:b + 1],
                                  row_timings(t_enc - t_start, t_den - t_enc, time.perf_counter() - t0, B))
        return out

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor):
        pipe = self.pipe
        img = pipe.vae.decode((latents / pipe.vae.config.scaling_factor).to(pipe.vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(img, output_type="pil")[0]


class SDCow:
    """COW/SOW state of one SD job: inverted references (DDIM inversion), masks, the noise stream and
    the SOW modulation on every UNet grid (runtime/cow.SowGrids)."""

    def __init__(self, be: SDBackend, plan: Plan, job: dict, timesteps, guidance: float, height: int, width: int,
                 cache: cowmod.InversionCache | None = None):
        self.be, self.plan, self.job = be, plan, job
        self.gen = cowmod.noise_generator(job["seed"])
        self.cache = cowmod.CACHE if cache is None else cache
        self.timesteps = timesteps
        self.guidance = guidance
        lh, lw = plan.grid("latent")
        self.refs: dict[int, dict[int, torch.Tensor]] = {}
        self.masks: dict[int, torch.Tensor] = {}
        conds = job.get("conditions") or []
        for ci, levels in cowmod.paste_levels(job).items():
            cond = conds[ci]
            mm = cowmod.latent_mask(plan, cond.get("masks"), (lh, lw), f"condition {cond.get('entity')!r}")
            self.masks[ci] = torch.from_numpy(np.ascontiguousarray(mm, np.float32)).to(be.device)[None, None]
            self.refs[ci] = self._inverted(cond, mm, levels, height, width)
        self.conds = conds
        self.sow = cowmod.sow_grids(plan, job, ("latent", "a16", "a32", "a64"), be.device)

    def arm(self, n: int, op: dict) -> None:
        """Before denoise op n: install SOW when a modulated condition is inside its cycles, else none."""
        reg = self.be.regional
        reg.sow = None
        if self.sow is not None:
            inside = [cowmod.inside_cycles(self.conds[ci], op) for ci in self.sow.index]
            if self.sow.begin_step(cowmod.cycle_index(self.job["program"], n), inside):
                reg.sow = self.sow

    def _inverted(self, cond, mm, levels, height, width) -> dict[int, torch.Tensor]:
        from scenec import __version__

        be, plan, job = self.be, self.plan, self.job
        parts = {"family": "sd", "model": be.model_id, "dtype": str(be.dtype), "version": __version__,
                 "prompt": plan.prompt(job["global"]["prompt"]), "negative": plan.prompt(job["global"]["negative"]),
                 "guidance": self.guidance, "timesteps": [int(t) for t in self.timesteps],
                 "scheduler": dict(be.pipe.scheduler.config), "levels": levels, "canvas": [width, height],
                 "solver": "ddim-inversion", "refine": [cowmod.INVERSION_REFINE, cowmod.INVERSION_TOL]}
        key = cowmod.inversion_key(parts, {"rgba": np.asarray(plan.tensor(cond["image"])), "mask": mm})
        hit = self.cache.get(key)
        if hit is not None and all(lv in hit for lv in levels):
            return {lv: hit[lv].to(be.device, be.dtype) for lv in levels}
        z = be.encode_image(cowmod.reference_rgb(plan, cond, height, width), height, width)
        out = invert_ddim(be, plan, job, z, self.timesteps, levels, self.guidance)
        self.cache.stats["inverted"] += 1
        self.cache.put(key, out)
        return {lv: x.to(be.dtype) for lv, x in out.items()}


@torch.inference_mode()
def invert_ddim(be: SDBackend, plan: Plan, job: dict, z: torch.Tensor, timesteps, levels: list[int],
                guidance: float, refine: int | None = None) -> dict[int, torch.Tensor]:
    """DDIM inversion on the global prompt (with the sampler's CFG, no regions), levels N → min(levels).

    Guess: x̂₀, ε̂ from the model at (x_{i+1}, t_i), x_i = √ᾱ_i·x̂₀ + √(1−ᾱ_i)·ε̂; then up to ``refine``
    Anderson-accelerated fixed-point iterations so that the sampler's own DDIM step maps x_i to x_{i+1}.
    """
    sched = be.pipe.scheduler
    refine = cowmod.INVERSION_REFINE if refine is None else refine
    n = len(timesteps)
    pos = SDCondition(be.encode_global(plan.prompt(job["global"]["prompt"])), None)
    cfg = guidance > 1.0 and be.unet.config.time_cond_proj_dim is None
    neg = SDCondition(be.encode_global(plan.prompt(job["global"]["negative"])), None) if cfg else None
    pred = sched.config.prediction_type
    saved_sow, be.regional.sow = be.regional.sow, None  # the plain model: no modulation
    out: dict[int, torch.Tensor] = {}
    x = z.to(torch.float32)
    if n in levels:
        out[n] = x.clone()
    for i in range(n - 1, min(levels) - 1, -1):
        t = timesteps[i]
        a_i, a_next = be.alpha(timesteps, i), be.alpha(timesteps, i + 1)
        e = be.eps(pos, neg, x.to(be.dtype), t, guidance).to(torch.float32)
        if pred == "v_prediction":  # ε from v at the current point
            e = (a_next ** 0.5) * e + ((1 - a_next) ** 0.5) * x
        x0 = (x - (1 - a_next) ** 0.5 * e) / a_next ** 0.5
        guess = a_i ** 0.5 * x0 + (1 - a_i) ** 0.5 * e
        if refine > 0:
            def step(y, t=t):
                yy = y.to(be.dtype)
                return sched.step(be.eps(pos, neg, yy, t, guidance), t, yy, return_dict=False)[0].to(torch.float32)

            guess = cowmod.refine_step(x, guess, step, refine, cowmod.INVERSION_TOL)
        x = guess
        if i in levels:
            out[i] = x.clone()
    be.regional.current = None
    be.regional.sow = saved_sow
    return out


def load_sd_backend(model: dict | str, device=None, dtype=None) -> SDBackend:
    """Load an SD model once: ``tiny-sd`` built in code; ``sd15``/``sd21``, hub ids and local diffusers
    directories via ``StableDiffusionPipeline.from_pretrained(..., use_safetensors=True)``."""
    from diffusers import StableDiffusionPipeline

    if isinstance(model, str):
        model = {"spec": model, "family": "sd", "repo": None if model == "tiny-sd" else SD_ALIASES.get(model, model)}
    dev = torch.device(device) if device is not None else _default_device()
    dt = _dtype(dtype) if dtype is not None else (torch.float16 if dev.type == "cuda" else torch.float32)
    spec = model.get("spec") or "tiny-sd"
    if spec == "tiny-sd" and not model.get("repo"):
        from .tiny_sd import build_tiny_sd

        pipe = StableDiffusionPipeline(**build_tiny_sd(dtype=dt, device=dev))
        model_id = "tiny-sd"
    else:
        repo = model.get("repo") or SD_ALIASES.get(spec, spec)
        pipe = _from_pretrained_sd(StableDiffusionPipeline, repo, dt)
        pipe.to(dev)
        model_id = repo
    pipe.set_progress_bar_config(disable=True)
    return SDBackend(pipe, model_id, dev, dt)


def _from_pretrained_sd(cls, repo: str, dtype):
    looks_local = repo.startswith((".", "/", "~")) or Path(repo).exists()
    if looks_local:
        p = Path(repo).expanduser()
        if not (p / "model_index.json").is_file():
            raise ModelUnavailable(f"{repo}: not a diffusers model directory (no model_index.json); point --model "
                                   "at a directory saved with save_pretrained or a hub id")
        repo = str(p)
    try:
        return cls.from_pretrained(repo, torch_dtype=dtype, use_safetensors=True, safety_checker=None,
                                   requires_safety_checker=False)
    except (OSError, EnvironmentError, ValueError) as e:
        hub = "" if looks_local else f"`huggingface-cli download {repo}`, or "
        raise ModelUnavailable(f"weights of {repo!r} are not available here ({type(e).__name__}); get them with "
                               f"{hub}point --model at a local diffusers directory") from e
