"""The Flux backend: loads a FluxPipeline's components once and executes plan jobs with them.

Our own sampling loop interprets the job's step program but computes each step exactly as
diffusers' FluxPipeline does (same latents from ``prepare_latents`` and a CPU generator, same sigma
table, same Euler update in float32, same guidance embedding), so a job without entities reproduces
``FluxPipeline(...)`` bit for bit. On top of that:

- regional attention (EliGen, arXiv 2501.01097), see ``runtime/attention.py``;
- per-entity negatives with ``true_cfg > 1``: a second forward with the same regional structure over
  the negative texts, combined as v = v_neg + s·(v_pos − v_neg) (FluxPipeline's true CFG);
- inpainting fusion (EliGen): with an init image z₀, v = m·v_model + (1−m)·(x − z₀)/σ, so outside the
  entity regions the trajectory runs straight back to z₀ and ends exactly on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .attention import BatchLayout, RegionalAttention, RegionalLayout, region_membership
from .coupling import CoupledCondition, coupled_condition, is_coupled
from .coupling import velocity as coupled_velocity
from .cache import TextCache
from .errors import ModelUnavailable, PlanError, Unsupported
from .plan import Plan

SUPPORTED_OPS = {"denoise", "fork"}  # fork: end of a coupling group's shared prefix (runtime/coupling.py)
COW_OPS = {"paste", "renoise"}  # reference conditions (COW/SOW): runtime/cow.py


@dataclass
class Encoded:
    """One text condition of a forward: T5 sequence, CLIP pooled (global prompts only), lengths."""

    seq: torch.Tensor  # [1, L, D]
    pooled: torch.Tensor | None  # [1, Dp]


@dataclass
class Condition:
    """Everything one forward needs besides the latent: text sequence, pooled, ids and region mask."""

    seq: torch.Tensor
    pooled: torch.Tensor
    txt_ids: torch.Tensor
    mask: object | None  # attention.BuiltMask, or None for the model's default path


@dataclass
class JobResult:
    image: object  # PIL.Image
    latents: torch.Tensor  # packed [1, n_tokens, 64], final
    timings: dict = field(default_factory=dict)


def _dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    try:
        return table[str(d).lower()]
    except KeyError:
        raise PlanError(f"unknown dtype {d!r} (use bf16, fp16 or fp32)") from None


class FluxBackend:
    """A loaded Flux model. Build with :func:`load_backend`; reuse across plans of the same model."""

    family = "flux"

    def __init__(self, pipe, model_id: str, device: torch.device, dtype: torch.dtype,
                 attn_impl: str | None = None, pad_multiple: int | None = None):
        self.pipe = pipe
        self.model_id = model_id
        self.device = torch.device(device)
        self.dtype = dtype
        self.transformer = pipe.transformer
        self.regional = RegionalAttention(self.transformer, impl=attn_impl)
        self.regional.install()
        # text padded so image tokens start on a FlexAttention block; SDPA needs no padding
        self.pad_multiple = pad_multiple if pad_multiple is not None else (128 if self.regional.impl == "flex" else 1)
        self._cache = TextCache()  # kept across plans of a batch build (runtime/cache.py)

    # -- text --------------------------------------------------------------------------------
    def clear_cache(self) -> None:
        self._cache.clear()

    @torch.inference_mode()
    def encode_global(self, text: str, max_sequence_length: int) -> Encoded:
        """CLIP pooled + T5 padded to max_sequence_length: exactly FluxPipeline.encode_prompt."""
        key = ("global", text, max_sequence_length)
        if key not in self._cache:
            seq, pooled, _ = self.pipe.encode_prompt(prompt=text, prompt_2=None, device=self.device,
                                                     max_sequence_length=max_sequence_length)
            self._cache[key] = Encoded(seq, pooled)
        return self._cache[key]

    @torch.inference_mode()
    def encode_entity(self, text: str, max_sequence_length: int, pad_to: int | None = None) -> Encoded:
        """T5 over the entity's real tokens only (with </s>), or padded to ``pad_to`` tokens."""
        key = ("entity", text, max_sequence_length, pad_to)
        if key not in self._cache:
            tok = self.pipe.tokenizer_2
            if pad_to:
                ids = tok(text, padding="max_length", max_length=min(pad_to, max_sequence_length),
                          truncation=True, return_tensors="pt").input_ids
            else:
                ids = tok(text, padding=False, max_length=max_sequence_length, truncation=True,
                          return_tensors="pt").input_ids
            te = self.pipe.text_encoder_2
            seq = te(ids.to(te.device), output_hidden_states=False)[0].to(dtype=te.dtype, device=self.device)
            self._cache[key] = Encoded(seq, None)
        return self._cache[key]

    # -- one job -----------------------------------------------------------------------------
    def _parts(self, plan: Plan, job: dict, negative: bool) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """(text sequences [global, entity…], pooled, region membership or None without entities)."""
        which = "negative" if negative else "prompt"
        msl = int(plan.model.get("max_sequence_length") or 512)
        g = self.encode_global(plan.prompt(job["global"][which]), msl)
        ents = job.get("entities") or []
        if not ents:
            return [g.seq], g.pooled, None
        pad = plan.attention.get("pad_prompts")
        parts = [g.seq] + [self.encode_entity(plan.prompt(e[which]), msl, pad).seq for e in ents]
        regions = region_membership([plan.mask(e.get("masks"), "token") for e in ents], plan.grid("token"))
        return parts, g.pooled, regions

    def _condition(self, plan: Plan, job: dict, negative: bool) -> Condition:
        """Text sequence [global | entities | pad], pooled (global CLIP) and the job's region mask."""
        parts, pooled, regions = self._parts(plan, job, negative)
        te_dtype = self.pipe.text_encoder.dtype  # FluxPipeline.encode_prompt's text_ids dtype
        if regions is None:  # the model's default path: nothing but the global prompt, no mask
            ids = torch.zeros(parts[0].shape[1], 3, device=self.device, dtype=te_dtype)
            return Condition(parts[0], pooled, ids, None)
        layout = RegionalLayout([p.shape[1] for p in parts], regions, plan.attention.get("image_self", "open"),
                                self.pad_multiple)
        if layout.n_pad:
            parts = parts + [parts[0].new_zeros(1, layout.n_pad, parts[0].shape[2])]
        seq = torch.cat(parts, dim=1)
        ids = torch.zeros(seq.shape[1], 3, device=self.device, dtype=te_dtype)  # Flux: text ids are zeros
        return Condition(seq, pooled, ids, self.regional.build(layout, self.device))

    def _batch_condition(self, plan: Plan, rows: list[tuple]) -> Condition:
        """One Condition for a batch: row b is ``rows[b]``'s text, padded to the longest row.

        Without entities in any row, no mask (the model's default path, as alone). Otherwise every row
        gets its own layout (a row without entities: global ↔ everything) and the padding is masked
        out, so each row attends exactly as it would alone.
        """
        parts = [r[0] for r in rows]
        pooled = torch.cat([r[1] for r in rows])
        te_dtype = self.pipe.text_encoder.dtype
        if all(r[2] is None for r in rows):
            seq = torch.cat([p[0] for p in parts])  # all rows: the global prompt at max_sequence_length
            return Condition(seq, pooled, torch.zeros(seq.shape[1], 3, device=self.device, dtype=te_dtype), None)
        n_img = plan.grid("token")[0] * plan.grid("token")[1]
        image_self = plan.attention.get("image_self", "open")
        lengths = [[p.shape[1] for p in ps] for ps in parts]
        # the longest row's text, padded as RegionalLayout pads a job alone
        n_text = max(sum(ls) + (-sum(ls)) % max(1, self.pad_multiple) for ls in lengths)
        layouts, seqs = [], []
        for ps, ls, (_, _, regions) in zip(parts, lengths, rows):
            reg = regions if regions is not None else torch.zeros(0, n_img, dtype=torch.bool)
            lay = RegionalLayout(ls, reg, image_self, self.pad_multiple, n_text_to=n_text)
            layouts.append(lay)
            if lay.n_pad:
                ps = ps + [ps[0].new_zeros(1, lay.n_pad, ps[0].shape[2])]
            seqs.append(torch.cat(ps, dim=1))
        seq = torch.cat(seqs)
        ids = torch.zeros(seq.shape[1], 3, device=self.device, dtype=te_dtype)
        return Condition(seq, pooled, ids, self.regional.build(BatchLayout(layouts), self.device))

    def _check_program(self, job: dict, steps: int) -> None:
        for op in job["program"]:
            kind = op.get("op")
            if kind in COW_OPS:  # fields checked by runtime/cow.check_cow_ops
                continue
            if kind not in SUPPORTED_OPS:
                raise Unsupported(f"job {job['id']!r}: step op {kind!r} (reference conditions / coupling groups) "
                                  "is not supported by this runtime yet")
            if kind == "fork":  # a group's shared prefix ends here (runtime/coupling.run_group)
                continue
            th = op.get("theta")  # coupling weight (runtime/coupling.py)
            if th is not None and not (isinstance(th, (int, float)) and 0.0 <= float(th) <= 1.0):
                raise PlanError(f"job {job['id']!r}: theta {th!r} outside [0, 1]")
            if not isinstance(op.get("from"), int) or not isinstance(op.get("to"), int):
                raise PlanError(f"job {job['id']!r}: denoise op without integer 'from'/'to': {op!r}")
            if not (0 <= op["from"] < op["to"] <= steps):
                raise PlanError(f"job {job['id']!r}: denoise {op['from']}→{op['to']} outside 0..{steps}")

    @torch.inference_mode()
    def _encode_init(self, plan: Plan, job: dict, height: int, width: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed z₀, packed inpaint mask m) for a job with an init image (FluxImg2ImgPipeline's encoding)."""
        from PIL import Image

        pipe = self.pipe
        arr = np.asarray(plan.tensor(job["init_image"]))
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[:2] != (height, width):
            raise PlanError(f"init image {job['init_image']!r}: need uint8 [{height}, {width}, 3], "
                            f"got {arr.dtype} {list(arr.shape)}")
        img = pipe.image_processor.preprocess(Image.fromarray(arr), height=height, width=width)
        img = img.to(device=self.device, dtype=pipe.vae.dtype)
        # the distribution's mode, not a sample: deterministic, and it leaves the noise generator alone
        z = pipe.vae.encode(img).latent_dist.mode()
        z = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        c, lh, lw = z.shape[1:]
        z0 = pipe._pack_latents(z.to(dtype), 1, c, lh, lw)
        m = plan.mask(job.get("inpaint_mask"), "latent")
        if m is None:
            raise PlanError(f"job {job['id']!r} has an init image but no inpaint_mask")
        if m.shape != (lh, lw):
            raise PlanError(f"inpaint mask of shape {list(m.shape)} does not match the latent grid {[lh, lw]}")
        # each latent pixel's value goes to its 16 channels inside its token's 2x2·16 packed channels
        mt = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32)).to(self.device)
        mt = mt[None, None].expand(1, c, lh, lw).contiguous()
        return z0, pipe._pack_latents(mt, 1, c, lh, lw)

    def _timesteps(self, n_tokens: int, steps: int):
        """FluxPipeline's sigma table (linear sigmas, resolution-dependent shift mu): (timesteps, sigmas)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        sched = self.pipe.scheduler
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(sched.config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(n_tokens, sched.config.get("base_image_seq_len", 256),
                             sched.config.get("max_image_seq_len", 4096), sched.config.get("base_shift", 0.5),
                             sched.config.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(sched, steps, self.device, sigmas=sigmas, mu=mu)
        sig = sched.sigmas
        if len(sig) != steps + 1:
            raise PlanError(f"scheduler gave {len(sig) - 1} steps, the plan has {steps}")
        return timesteps, sig

    def _check_grid(self, plan: Plan, height: int, width: int) -> None:
        vs = self.pipe.vae_scale_factor
        lh, lw = 2 * (height // (vs * 2)), 2 * (width // (vs * 2))
        if plan.grid("token") != (lh // 2, lw // 2):
            raise PlanError(f"token grid {plan.grid('token')} does not match the canvas ({lh // 2}, {lw // 2})")

    def _guidance(self, plan: Plan, batch: int):
        if not self.transformer.config.guidance_embeds:
            return None
        return torch.full([1], float(plan.sampler.get("guidance", 3.5)), device=self.device,
                          dtype=torch.float32).expand(batch)

    @torch.inference_mode()
    def run_job(self, plan: Plan, job: dict, progress: Callable[[int], None] | None = None,
                decode: bool = True, stop_at_fork: bool = False,
                resume: tuple[int, torch.Tensor] | None = None) -> JobResult:
        """Sample one job of the plan and decode it; see the module docstring for what is computed.

        Coupling groups (runtime/coupling.py): ``stop_at_fork`` ends at the program's ``fork`` op (the
        shared prefix's latent, not decoded); ``resume=(op index, latents)`` starts there with a copy.
        """
        t_start = time.perf_counter()
        pipe = self.pipe
        width, height = plan.canvas
        sampler = plan.sampler
        steps = int(sampler["steps"])
        self._check_program(job, steps)
        true_cfg = float(sampler.get("true_cfg") or 1.0)

        if is_coupled(job):  # a coupling group's job: background + entity streams (runtime/coupling.py)
            pos = coupled_condition(self, plan, job, negative=False)
            neg = coupled_condition(self, plan, job, negative=True) if true_cfg > 1 else None
        else:
            pos = self._condition(plan, job, negative=False)
            neg = self._condition(plan, job, negative=True) if true_cfg > 1 else None
        t_enc = time.perf_counter()

        gen = torch.Generator("cpu").manual_seed(int(job["seed"]))
        n_lat = self.transformer.config.in_channels // 4
        seq_dtype = (pos.bg if isinstance(pos, CoupledCondition) else pos).seq.dtype
        latents, img_ids = pipe.prepare_latents(1, n_lat, height, width, seq_dtype, self.device, gen)
        start = 0
        if resume is not None:  # the group's shared prefix ran already (runtime/coupling.run_group)
            start, latents = int(resume[0]), resume[1].clone()
        self._check_grid(plan, height, width)
        timesteps, sig = self._timesteps(latents.shape[1], steps)
        guidance = self._guidance(plan, latents.shape[0])

        z0 = m = None
        if job.get("init_image"):
            z0, m = self._encode_init(plan, job, height, width, latents.dtype)

        cow = None  # reference conditions (COW/SOW), stochastic steps: runtime/cow.py
        if job.get("conditions") or any(op.get("op") in COW_OPS or op.get("eta") for op in job["program"]):
            from .cow import FluxCow

            cow = FluxCow(self, plan, job, sig, guidance, img_ids, latents, height, width)

        latents = self._sample(plan, job["program"], pos, neg, latents, img_ids, timesteps, sig, guidance,
                               z0, m, cow=cow, start=start, stop_at_fork=stop_at_fork, progress=progress)
        t_den = time.perf_counter()

        image = None
        if decode:
            image = self.decode(latents, height, width)
        t_dec = time.perf_counter()
        timings = {"encode_s": t_enc - t_start, "denoise_s": t_den - t_enc, "decode_s": t_dec - t_den,
                   "total_s": t_dec - t_start}
        return JobResult(image, latents, timings)

    def _sample(self, plan: Plan, program: list[dict], pos, neg, latents, img_ids, timesteps, sig, guidance,
                z0=None, m=None, cow=None, start: int = 0, stop_at_fork: bool = False,
                progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Interpret a step program: flow-match Euler (FluxPipeline's update), true CFG, inpainting fusion.

        ``latents`` may hold several rows (a batch, run_batch): then ``pos``/``neg`` are batched too,
        and z₀/m have one row per job (m ≡ 1 and z₀ = 0 for a row without an init image: v unchanged).
        """
        true_cfg = float(plan.sampler.get("true_cfg") or 1.0)
        blocks = plan.attention.get("blocks", "all")

        def velocity(cond: Condition, x, t, regional: bool, theta=None):
            if isinstance(cond, CoupledCondition):  # θ-weighted streams, exact endpoints
                return coupled_velocity(self, cond, x, t, guidance, img_ids, theta or 0.0, regional, blocks, velocity)
            self.regional.use(cond.mask if regional else None, blocks)
            return self.transformer(hidden_states=x, timestep=t / 1000, guidance=guidance,
                                    pooled_projections=cond.pooled, encoder_hidden_states=cond.seq,
                                    txt_ids=cond.txt_ids, img_ids=img_ids, joint_attention_kwargs={},
                                    return_dict=False)[0]

        try:
            for n, op in enumerate(program):
                if n < start:
                    continue
                if op.get("op") == "fork":  # end of a group's shared prefix (runtime/coupling.run_group)
                    if stop_at_fork:
                        break
                    if progress is not None:
                        progress(n + 1)
                    continue
                if cow is not None:
                    latents, done = cow.before(n, op, latents)
                    if done:  # paste / renoise
                        if progress is not None:
                            progress(n + 1)
                        continue
                i, j = int(op["from"]), int(op["to"])
                t = timesteps[i].expand(latents.shape[0]).to(latents.dtype)
                regional = bool(op.get("regional", True))
                v = velocity(pos, latents, t, regional, op.get("theta"))
                if neg is not None:
                    v_neg = velocity(neg, latents, t, regional, op.get("theta"))
                    v = v_neg + true_cfg * (v - v_neg)
                s_from, s_to = sig[i], sig[j]
                x32 = latents.to(torch.float32)
                if z0 is None:
                    # FlowMatchEulerDiscreteScheduler.step: float32 sample, x + (σ_to − σ_from)·v
                    new = (x32 + (s_to - s_from) * v).to(v.dtype)
                    if op.get("eta") and cow is not None:  # COW cycles: stochastic step
                        new = cow.step_eta(x32, v, s_from, s_to, float(op["eta"])).to(v.dtype)
                else:
                    # inpainting fusion (EliGen): outside the regions, the velocity that leads to z₀
                    zf = z0.to(torch.float32)
                    v_keep = (x32 - zf) / s_from
                    vf = m * v.to(torch.float32) + (1 - m) * v_keep
                    new = (x32 + (s_to - s_from) * vf)
                    if op.get("eta") and cow is not None:  # COW cycles: stochastic step
                        new = cow.step_eta(x32, vf, s_from, s_to, float(op["eta"]))
                    if float(s_to) == 0.0:
                        new = torch.where(m == 0, zf, new)  # exactly the init image outside
                    new = new.to(v.dtype)
                latents = new
                if progress is not None:
                    progress(n + 1)
        finally:
            self.regional.use(None)
            self.regional.modulation = None
        return latents

    @torch.inference_mode()
    def run_batch(self, plan_jobs: list[tuple[Plan, dict]], progress: Callable[[int], None] | None = None,
                  ) -> list[JobResult | Exception]:
        """Sample batch-compatible jobs (runtime/batching.batch_key), possibly of different plans, as the
        rows of one batch: one transformer forward per step for all of them.

        Each row gets its own noise (its seed's generator, as alone), its own text, regions and init
        image; texts are padded to the longest row and the padding masked out (attention.BatchLayout),
        so a row computes what it computes alone, up to float rounding of batched kernels. Returns one
        JobResult per row, or the row's error (a row whose plan data is bad fails alone).
        """
        from .batching import require_compatible, row_timings

        if not plan_jobs:
            return []
        require_compatible(plan_jobs)
        t_start = time.perf_counter()
        plan0 = plan_jobs[0][0]
        pipe = self.pipe
        width, height = plan0.canvas
        steps = int(plan0.sampler["steps"])
        true_cfg = float(plan0.sampler.get("true_cfg") or 1.0)
        out: list[JobResult | Exception | None] = [None] * len(plan_jobs)
        rows = []  # (index, plan, job, pos parts, neg parts)
        for k, (plan, job) in enumerate(plan_jobs):
            try:
                self._check_program(job, steps)
                pos = self._parts(plan, job, negative=False)
                neg = self._parts(plan, job, negative=True) if true_cfg > 1 else None
                rows.append((k, plan, job, pos, neg))
            except (PlanError, Unsupported) as e:
                out[k] = e
        if not rows:
            return out
        pos = self._batch_condition(plan0, [r[3] for r in rows])
        neg = self._batch_condition(plan0, [r[4] for r in rows]) if true_cfg > 1 else None
        t_enc = time.perf_counter()

        n_lat = self.transformer.config.in_channels // 4
        lat, img_ids = [], None
        for _, _, job, _, _ in rows:  # each row's own generator: the same noise as alone
            gen = torch.Generator("cpu").manual_seed(int(job["seed"]))
            x, img_ids = pipe.prepare_latents(1, n_lat, height, width, pos.seq.dtype, self.device, gen)
            lat.append(x)
        latents = torch.cat(lat)
        self._check_grid(plan0, height, width)
        timesteps, sig = self._timesteps(latents.shape[1], steps)
        guidance = self._guidance(plan0, latents.shape[0])
        z0 = m = None
        if any(r[2].get("init_image") for r in rows):
            zs, ms = [], []
            for _, plan, job, _, _ in rows:
                if job.get("init_image"):
                    z, mm = self._encode_init(plan, job, height, width, latents.dtype)
                else:  # m ≡ 1: the model's velocity everywhere, exactly as without fusion
                    z, mm = torch.zeros_like(latents[:1]), torch.ones_like(latents[:1], dtype=torch.float32)
                zs.append(z)
                ms.append(mm)
            z0, m = torch.cat(zs), torch.cat(ms)
        latents = self._sample(plan0, rows[0][2]["program"], pos, neg, latents, img_ids, timesteps, sig, guidance,
                               z0, m, progress=progress)
        t_den = time.perf_counter()
        B = len(rows)
        for b, (k, _, _, _, _) in enumerate(rows):
            t0 = time.perf_counter()
            image = self.decode(latents[b:b + 1], height, width)
            out[k] = JobResult(image, latents[b:b + 1],
                               row_timings(t_enc - t_start, t_den - t_enc, time.perf_counter() - t0, B))
        return out

    def run_group(self, plan: Plan, group: dict, jobs: list[dict], progress: Callable[[str, int], None] | None = None,
                  share: bool | None = None, decode: bool = True):
        """Run a coupling group's jobs together, sharing their θ = 0 prefix; yields ``(job, JobResult | error)``.

        See runtime/coupling.run_group (``share=None``: on unless SCENEC_SHARED_PREFIX=0)."""
        from .coupling import run_group

        return run_group(self, plan, group, jobs, progress=progress, share=share, decode=decode)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, height: int, width: int):
        """Packed latents → PIL image, as FluxPipeline does (unpack, unscale/unshift, VAE decode)."""
        pipe = self.pipe
        x = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        x = (x / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        img = pipe.vae.decode(x.to(pipe.vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(img, output_type="pil")[0]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_backend(model: dict | str, device=None, dtype=None, attn_impl: str | None = None,
                 compile_blocks: bool = False) -> FluxBackend:
    """Load a Flux model once: ``tiny`` is built in code; anything else via ``FluxPipeline.from_pretrained``.

    ``model`` is the plan's ``model`` dict (``spec``, ``family``, ``repo``) or a spec string.
    Device defaults to CUDA when available; dtype to bf16 on CUDA and fp32 on CPU.
    """
    from diffusers import FluxPipeline

    if isinstance(model, str):
        model = {"spec": model, "family": "flux", "repo": None if model == "tiny" else model}
    family = model.get("family", "flux")
    if family != "flux":
        raise Unsupported(f"model family {family!r} ({model.get('spec')}) is not supported by this runtime yet; "
                          "use a Flux model")
    dev = torch.device(device) if device is not None else _default_device()
    dt = _dtype(dtype) if dtype is not None else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    spec = model.get("spec") or "tiny"
    if spec == "tiny" and not model.get("repo"):
        from .tiny import build_tiny_flux

        pipe = FluxPipeline(**build_tiny_flux(dtype=dt, device=dev).components())
        model_id = "tiny"
    else:
        repo = model.get("repo") or spec
        pipe = _from_pretrained(FluxPipeline, repo, dt)
        pipe.to(dev)
        model_id = repo
    pipe.set_progress_bar_config(disable=True)
    backend = FluxBackend(pipe, model_id, dev, dt, attn_impl=attn_impl)
    if compile_blocks:
        for b in list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks):
            b.compile()
    return backend


def _from_pretrained(cls, repo: str, dtype):
    looks_local = repo.startswith((".", "/", "~")) or Path(repo).exists()
    if looks_local:
        p = Path(repo).expanduser()
        if not (p / "model_index.json").is_file():
            raise ModelUnavailable(f"{repo}: not a diffusers model directory (no model_index.json); "
                                   "point --model at a directory saved with save_pretrained or a hub id")
        repo = str(p)
    try:
        return cls.from_pretrained(repo, torch_dtype=dtype, use_safetensors=True)
    except (OSError, EnvironmentError, ValueError) as e:
        hub = "" if looks_local else f"`huggingface-cli download {repo}` (accepting its licence on the hub), or "
        raise ModelUnavailable(f"weights of {repo!r} are not available here ({type(e).__name__}); get them with "
                               f"{hub}point --model at a local diffusers directory") from e
