"""The Flux family (FLUX.1-dev / -schnell, and the offline ``tiny``): a rectified-flow DiT with joint
text–image attention, T5 text, a CLIP pooled vector and a guidance embedding.

Each step is computed exactly as diffusers' ``FluxPipeline`` does (the same initial latents from
``prepare_latents`` and a CPU generator, the same shifted sigma table, the same Euler update in
float32, the same guidance embedding), so a job without entities reproduces ``FluxPipeline(...)``
bit for bit. Text: the global prompt as ``FluxPipeline.encode_prompt`` encodes it (T5 padded to the
model's length, CLIP pooled); entity prompts keep only their real T5 tokens (``attention.pad_prompts``
pads each to EliGen's length), packed back to back, and the whole text is padded to a multiple of 128
on the FlexAttention path (image tokens then start on a block). True CFG (``sampler.true_cfg > 1``)
runs a second forward over the negative texts: v = v_neg + s·(v_pos − v_neg).

The attention processors (installed once on every block) run diffusers' own processor unless a
modifier applies at their site (runtime/attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from scenec.spec.errors import PlanError, Unsupported
from scenec.spec.prompt_syntax import parse

from ..attention import DOUBLE, SINGLE, Attention, Site, attend, residual_extra
from ..backend import Call, Cond, TextSpec, assemble, load_pipeline, mix_pooled, regions_by_grid
from ..cache import TextCache
from ..finite import require_finite
from ..memory import tiled_decode
from ..prompt_weights import encode_t5
from ..solvers import FlowEuler


@dataclass
class Encoded:
    """One encoded text: T5 sequence ``[1, L, D]`` and, for global prompts, CLIP pooled ``[1, Dp]``."""

    seq: torch.Tensor
    pooled: torch.Tensor | None


class FluxProcessor:
    """Flux attention (a double- or single-stream block) through the one dispatcher.

    Same projections, QK-norm and RoPE as diffusers' ``FluxAttnProcessor``; without a modifier for its
    site it calls that processor, so such forwards are diffusers' own."""

    def __init__(self, ctl: Attention, site: Site):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        self.ctl, self.site = ctl, site
        self.plain = FluxAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        mods = self.ctl.for_site(self.site)
        if not mods:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections, apply_rotary_emb

        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        q_img = q  # the image queries before RoPE: what a residual adapter attends from
        if attn.added_kv_proj_dim is not None:
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        self.ctl.module = attn  # layer-specific extra tokens (ExtraKV.project)
        out = attend(self.ctl, self.site, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mods)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        ip = residual_extra(self.ctl, self.site, q_img.transpose(1, 2), mods)
        if encoder_hidden_states is not None:
            n_txt = encoder_hidden_states.shape[1]
            e, h = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
            h = attn.to_out[1](attn.to_out[0](h.contiguous()))
            if ip is not None:  # the block adds the third output after its feed-forward (FluxTransformerBlock)
                return h, attn.to_add_out(e.contiguous()), ip.transpose(1, 2).flatten(2, 3).to(h.dtype)
            return h, attn.to_add_out(e.contiguous())
        if ip is not None:
            raise Unsupported("residual extra tokens on a single-stream block (only dual-stream blocks add them)")
        return out


class FluxBackend:
    """A loaded Flux model (see the module docstring). Build with :func:`load`; reuse across plans."""

    family = "flux"
    sites = (DOUBLE, SINGLE)
    image_grids = ("token",)

    def __init__(self, pipe, model_id: str, device, dtype: torch.dtype, attn_impl: str | None = None,
                 pad_multiple: int | None = None):
        self.pipe = pipe
        self.model_id = model_id
        self.device = torch.device(device)
        self.dtype = dtype
        self.transformer = self.denoiser = pipe.transformer
        self.attn = Attention(attn_impl or ("flex" if self.device.type == "cuda" else "sdpa"))
        self.mask_impl = self.attn.impl
        for b in self.transformer.transformer_blocks:
            b.attn.processor = FluxProcessor(self.attn, DOUBLE)
        for b in self.transformer.single_transformer_blocks:
            b.attn.processor = FluxProcessor(self.attn, SINGLE)
        # text padded so image tokens start on a FlexAttention block; SDPA needs no padding
        self.pad_multiple = pad_multiple if pad_multiple is not None else (128 if self.attn.impl == "flex" else 1)
        self._cache = TextCache()  # kept across plans of a batch build (runtime/cache.py)
        self._img_ids: dict = {}
        self._syntax = "plain"  # the plan's prompt_syntax, taken in cond() (runtime/prompt_weights.py)

    @staticmethod
    def token_kind(module: str) -> str | None:
        """Dual-stream blocks: image projections (to_q/k/v, to_out, ff) and text ones (add_*_proj,
        to_add_out, ff_context); single-stream blocks: the joint sequence; the embedders of text and
        image, the final projection of image tokens; AdaLN modulation and the time embeddings: no tokens."""
        if ".norm" in module or module.startswith(("time_text_embed.", "norm_out.")):
            return None
        if module.startswith("single_transformer_blocks."):
            return "joint"
        if module.startswith("transformer_blocks."):
            text = (".add_q_proj", ".add_k_proj", ".add_v_proj", ".to_add_out", ".ff_context.")
            return "text" if any(t in module for t in text) else "image"
        return {"context_embedder": "text", "x_embedder": "image", "proj_out": "image"}.get(module)

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype FluxPipeline gives its latents: the T5 embeddings'."""
        return self.pipe.text_encoder_2.dtype

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- text ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_global(self, text: str, max_sequence_length: int) -> Encoded:
        """CLIP pooled + T5 padded to max_sequence_length: exactly FluxPipeline.encode_prompt."""
        key = ("global", text, max_sequence_length, self._syntax)
        if key not in self._cache:
            seq = encode_t5(self.pipe, text, self._syntax, max_sequence_length, max_sequence_length,
                            dtype=self.pipe.text_encoder_2.dtype, device=self.device)
            if isinstance(seq, str):  # nothing weighted: the pipeline's own encoding of the text without the syntax
                seq, pooled, _ = self.pipe.encode_prompt(prompt=seq, prompt_2=None, device=self.device,
                                                         max_sequence_length=max_sequence_length)
            else:  # T5 read with its weights already: CLIP alone for the pooled vector of the unweighted text
                pooled = self.pipe._get_clip_prompt_embeds(prompt=parse(text, self._syntax).text, device=self.device)
            self._cache[key] = Encoded(seq, pooled)
        return self._cache[key]

    @torch.no_grad()
    def encode_entity(self, text: str, max_sequence_length: int, pad_to: int | None = None) -> Encoded:
        """T5 over the entity's real tokens only (with </s>), or padded to ``pad_to`` tokens."""
        key = ("entity", text, max_sequence_length, pad_to, self._syntax)
        if key not in self._cache:
            weighted = encode_t5(self.pipe, text, self._syntax, max_sequence_length, pad_to,
                                 dtype=self.pipe.text_encoder_2.dtype, device=self.device)
            if not isinstance(weighted, str):
                self._cache[key] = Encoded(weighted, None)
                return self._cache[key]
            text = weighted
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

    def cond(self, rows: list[tuple[object, TextSpec, bool]]) -> Cond:
        """The text of a call for each batch row: ``[global | entities… | pad]``, pooled vectors, layouts."""
        plan0 = rows[0][0]
        if plan0.model.embeddings or plan0.model.clip_skip:  # the compiler refuses them on Flux
            raise Unsupported("textual-inversion embeddings and clip_skip act on SD and SDXL models only")
        self._syntax = plan0.model.prompt_syntax  # batch rows share the model section (runtime/batching.py)
        regional = any(spec.regional for _, spec, _ in rows)
        parts, pooled = [], []
        for plan, spec, negative in rows:
            msl = int(plan.model.max_sequence_length or 512)
            pad = plan.attention.pad_prompts
            seqs = []
            if spec.global_ is not None:
                seqs.append(self.encode_global(plan.prompt(spec.global_.text(negative)), msl).seq)
            for e in spec.entities:
                text = plan.prompt(e.text(negative))
                enc = self.encode_global(text, msl) if e.as_global else self.encode_entity(text, msl, pad)
                seqs.append(enc.seq)
            if spec.global_ is None:  # an empty global slot
                width = self.transformer.config.joint_attention_dim
                seqs.insert(0, torch.zeros(1, 0, width, device=self.device, dtype=self.pipe.text_encoder_2.dtype))
            regions = regions_by_grid(plan, spec.entities, self.image_grids) if regional else {}
            parts.append((seqs, regions))
            pooled.append([self.encode_global(plan.prompt(s.text(negative)), msl).pooled for s in spec.pooled])
        seq, lengths, layouts = assemble(parts, regional, {"token": plan0.grid("token")}, plan0.attention.image_self,
                                         self.pad_multiple)
        # Flux: text ids are zeros
        ids = torch.zeros(seq.shape[1], 3, device=self.device, dtype=self.pipe.text_encoder.dtype)
        return Cond(seq, [torch.cat(ps) for ps in zip(*pooled)], lengths, layouts, {"txt_ids": ids})

    # -- latents, solver, model ------------------------------------------------------------------------
    def _grid(self, plan) -> tuple[int, int]:
        width, height = plan.canvas
        vs = self.pipe.vae_scale_factor
        lh, lw = 2 * (height // (vs * 2)), 2 * (width // (vs * 2))
        if plan.grid("token") != (lh // 2, lw // 2):
            raise PlanError(f"token grid {plan.grid('token')} does not match the canvas ({lh // 2}, {lw // 2})")
        return lh, lw

    def prepare_latents(self, plan, seed: int) -> tuple[torch.Tensor, torch.Generator]:
        """FluxPipeline.prepare_latents with a CPU generator seeded with the job's seed."""
        width, height = plan.canvas
        self._grid(plan)
        gen = torch.Generator("cpu").manual_seed(int(seed))
        n_lat = self.transformer.config.in_channels // 4
        x, ids = self.pipe.prepare_latents(1, n_lat, height, width, self.latent_dtype, self.device, gen)
        self._img_ids[(height, width)] = ids
        return x, gen

    def solver(self, plan) -> FlowEuler:
        """FluxPipeline's sigma table (linear sigmas, resolution-dependent shift μ)."""
        if plan.sampler.kind != "flow-euler":
            raise PlanError(f"solver {plan.sampler.kind!r} does not run on Flux models (flow-euler)")
        if plan.sampler.cfg_rescale > 0 or plan.sampler.freeu is not None:  # the SD family's (compiler/guidance.py)
            raise Unsupported("sampler.cfg_rescale and sampler.freeu are not supported by flux models (SD, SDXL)")
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        lh, lw = self._grid(plan)
        steps = plan.steps
        sched = self.pipe.scheduler
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(sched.config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift((lh // 2) * (lw // 2), sched.config.get("base_image_seq_len", 256),
                             sched.config.get("max_image_seq_len", 4096), sched.config.get("base_shift", 0.5),
                             sched.config.get("max_shift", 1.15))
        retrieve_timesteps(sched, steps, self.device, sigmas=sigmas, mu=mu)
        if len(sched.sigmas) != steps + 1:
            raise PlanError(f"scheduler gave {len(sched.sigmas) - 1} steps, the plan has {steps}")
        return FlowEuler(sched.sigmas)

    def _forward(self, run, x: torch.Tensor, call: Call, t: torch.Tensor) -> torch.Tensor:
        cond = call.cond
        pooled = mix_pooled(call, x.shape[0])
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], float(run.plan.sampler.guidance), device=self.device,
                                  dtype=torch.float32).expand(x.shape[0])
        width, height = run.plan.canvas
        kw = dict(timestep=t / 1000, guidance=guidance, pooled_projections=pooled, encoder_hidden_states=cond.seq,
                  txt_ids=cond.extra["txt_ids"], img_ids=self._img_ids[(height, width)], joint_attention_kwargs={})
        for f in call.inputs:  # methods' extra inputs (a ControlNet's residuals), before the modifiers are set
            kw.update(f(call, x, t, kw))
        self.attn.set(call.mods, n_img=x.shape[1])
        try:
            return self.transformer(hidden_states=x, return_dict=False, **kw)[0]
        finally:
            self.attn.clear()

    def guided(self, plan) -> bool:
        return float(plan.sampler.true_cfg or 1.0) > 1

    def predict(self, run, x: torch.Tensor, level: int, call) -> torch.Tensor:
        """The velocity at ``level``; with ``true_cfg > 1`` true CFG, v_neg + s·(v_pos − v_neg)."""
        t = run.solver.model_time(level, x.shape[0], x.dtype, self.device)
        rows = range(x.shape[0])
        v = self._forward(run, x, call([(r, False) for r in rows]), t)
        if self.guided(run.plan):
            v_neg = self._forward(run, x, call([(r, True) for r in rows]), t)
            v = v_neg + float(run.plan.sampler.true_cfg) * (v - v_neg)
        return v

    # -- images ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 ``[H, W, 3]`` → packed latent (FluxImg2ImgPipeline's encoding, the VAE's mode: deterministic)."""
        from PIL import Image

        pipe = self.pipe
        h, w = rgb.shape[:2]
        img = pipe.image_processor.preprocess(Image.fromarray(rgb), height=h, width=w)
        z = pipe.vae.encode(img.to(device=self.device, dtype=pipe.vae.dtype)).latent_dist.mode()
        z = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        c, lh, lw = z.shape[1:]
        return pipe._pack_latents(z.to(self.latent_dtype), 1, c, lh, lw)

    def latent_mask(self, m: np.ndarray) -> torch.Tensor:
        """A latent-grid mask packed like the latents: each cell's value in its 16 channels of its
        token's 2×2·16 packed channels."""
        c = self.transformer.config.in_channels // 4
        lh, lw = m.shape
        mt = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32)).to(self.device)
        mt = mt[None, None].expand(1, c, lh, lw).contiguous()
        return self.pipe._pack_latents(mt, 1, c, lh, lw)

    def latent_image(self, x: torch.Tensor, plan) -> torch.Tensor:
        """Packed 2×2 patches → the VAE's latent image (FluxPipeline._unpack_latents)."""
        width, height = plan.canvas
        return self.pipe._unpack_latents(x, height, width, self.pipe.vae_scale_factor)

    def latent_layout(self, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        return self.pipe._pack_latents(z, b, c, h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, plan):
        """Packed latents → PIL image, as FluxPipeline does (unpack, unscale/unshift, VAE decode)."""
        pipe = self.pipe
        width, height = plan.canvas
        x = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        x = (x / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        with tiled_decode(pipe, width, height):
            img = pipe.vae.decode(x.to(pipe.vae.dtype), return_dict=False)[0]
        require_finite(img, "the decoded image")  # NaN would become black pixels
        return pipe.image_processor.postprocess(img, output_type="pil")[0]


def load(model, device=None, dtype=None, attn_impl: str | None = None, offload: str = "none",
         quantize: str = "none") -> FluxBackend:
    """Load a Flux model once: ``tiny`` is built in code; anything else via ``FluxPipeline.from_pretrained``.

    Device defaults to CUDA when available; dtype to bf16 on CUDA and fp32 on CPU."""
    from diffusers import FluxPipeline

    if model.family != "flux":
        raise Unsupported(f"model family {model.family!r} ({model.spec}) is not the Flux family")

    def build_tiny(dt, dev):
        from ..tiny import build_tiny_flux

        return build_tiny_flux(dtype=dt, device=dev).components()

    pipe, model_id, dev, dt = load_pipeline(FluxPipeline, model, device, dtype, torch.bfloat16, "tiny", build_tiny,
                                            model.repo or model.spec, offload, quantize)
    if dt == torch.float16:
        import sys

        print("scenec: warning: Flux overflows in fp16 (its activations exceed 65504): images may come out black "
              "or noisy; use --dtype bf16 (the default on CUDA) or fp32", file=sys.stderr)
    return FluxBackend(pipe, model_id, dev, dt, attn_impl=attn_impl)
