"""The Stable Diffusion family (SD 1.5 / 2.1, and the offline ``tiny-sd``): a UNet with CLIP text,
classifier-free guidance and DDIM.

Each step is computed as diffusers' ``StableDiffusionPipeline`` does (the same initial latents from
``prepare_latents`` with a CPU generator, the same DDIM timesteps, CFG over a batch [negative,
positive], ``DDIMScheduler.step``), so a job without entities reproduces the pipeline. Text: the
global prompt as the pipeline encodes it (77 CLIP tokens); entity prompts keep their real CLIP tokens,
packed after it. Attention sites: every ``attn2`` (cross-attention: image queries, text keys — where
regional masks and coupling's key scaling act, picked per call by the query's token count, one mask
per UNet resolution ``latent``/``a16``/``a32``/``a64``) and every ``attn1`` (self-attention: where
SOW's bias acts). Without a modifier a processor runs the one that was installed (diffusers' own).
"""

from __future__ import annotations

import numpy as np
import torch

from scenec.spec.errors import PlanError, Unsupported

from ..attention import CROSS, SELF, Attention, ExtraKV, KeyScale, Mask, Site, attend
from ..backend import Call, Cond, TextSpec, assemble, load_pipeline, regions_by_grid
from ..cache import TextCache
from ..euler import euler_solver
from ..finite import require_finite
from ..memory import tiled_decode
from ..prompt_weights import ClipText, encode_clip
from ..solvers import DDIM, ddpm_solver
from ..textual_inversion import TextOptions, check_layers, encode_skipped, hidden

SD_ALIASES = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd21": "stabilityai/stable-diffusion-2-1-base"}
UNET_GRIDS = ("latent", "a16", "a32", "a64")


class SDProcessor:
    """A UNet attention (``attn1`` self or ``attn2`` cross) through the one dispatcher; the processor
    that was installed before (diffusers' ``AttnProcessor2_0``) when no modifier applies."""

    def __init__(self, ctl: Attention, site: Site, plain):
        self.ctl, self.site, self.plain = ctl, site, plain

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **kw):
        mods = self.ctl.for_site(self.site)
        cross = encoder_hidden_states is not None
        if not mods or cross != self.site.text:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *a, **kw)
        if attention_mask is not None or hidden_states.ndim != 3 or attn.spatial_norm is not None:
            raise Unsupported(f"this UNet's {self.site.name}-attention (an attention mask, spatial norm or "
                              "4-d hidden states) cannot take regional masks, coupling or SOW")
        residual = hidden_states
        b = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        ctx = hidden_states
        if cross:
            ctx = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        key, value = attn.to_k(ctx), attn.to_v(ctx)
        hd = key.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, hd).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        self.ctl.module = attn  # layer-specific extra tokens (ExtraKV.project)
        out = attend(self.ctl, self.site, q, k, v, mods)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * hd).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class SDBackend:
    """A loaded SD model (UNet + DDIM). Build with :func:`load`; reuse across plans."""

    family = "sd"
    sites = (CROSS, SELF)
    image_grids = UNET_GRIDS
    mask_impl = "cross"

    def __init__(self, pipe, model_id: str, device, dtype):
        from diffusers import DDIMScheduler

        self.pipe = pipe
        if not isinstance(pipe.scheduler, DDIMScheduler):  # the plan's sampler is "ddim"
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.model_id = model_id
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = self.denoiser = pipe.unet
        self.attn = Attention("sdpa")  # the sequences are short: dense masks and biases on every device
        procs = {}
        for name, p in self.unet.attn_processors.items():
            site = CROSS if name.endswith("attn2.processor") else SELF if name.endswith("attn1.processor") else None
            procs[name] = p if site is None else SDProcessor(self.attn, site, p)
        self.unet.set_attn_processor(procs)
        self._cache = TextCache()  # kept across plans of a batch build (runtime/cache.py)
        # the plan's embeddings and clip_skip (runtime/textual_inversion.py): part of every text cache key
        self.text = TextOptions(pipe, 2 if getattr(pipe, "text_encoder_2", None) is not None else 1)
        self._text_key: tuple = ((), None, "plain")  # (embeddings, clip_skip, prompt_syntax)
        self._freeu: tuple | None = None  # FreeU's (s1, s2, b1, b2) on the UNet now; None: the UNet as loaded

    def clear_cache(self) -> None:
        self._cache.clear()

    @staticmethod
    def token_kind(module: str) -> str | None:
        """Cross-attention keys and values (``attn2.to_k``/``to_v``) see text; the time and added
        embeddings (and each resnet's projection of them) no tokens; every other layer image tokens
        (convolutions on the image grid of their output)."""
        if module.endswith(("attn2.to_k", "attn2.to_v")):
            return "text"
        if module.startswith(("time_embedding.", "add_embedding.")) or module.endswith("time_emb_proj"):
            return None
        return "image"

    # -- text ----------------------------------------------------------------------------------------
    def use_text_options(self, plan) -> None:
        """Load the plan's embeddings (unloading another plan's) and take its clip_skip and prompt syntax for what
        is encoded next."""
        model = plan.model
        for _, te in self.text.pairs:
            check_layers(getattr(self.pipe, te), model.clip_skip, self.family == "sdxl")
        self._text_key = (self.text.use(model.embeddings), model.clip_skip, model.prompt_syntax)

    def _weighted(self, text: str, pad: bool):
        """``text`` under the plan's prompt syntax (runtime/prompt_weights.py): its weighted chunks, or the plain
        text to encode as the pipeline does."""
        _, skip, syntax = self._text_key
        if syntax == "plain":
            return text
        return encode_clip(self.pipe, self.text.pairs, text, syntax, skip, sdxl=self.family == "sdxl", pad=pad,
                           dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def encode_global(self, text: str, negative: bool = False) -> torch.Tensor:
        """CLIP last hidden state (or ``clip_skip`` layers before it), padded to 77 tokens: exactly
        StableDiffusionPipeline.encode_prompt; a weighted or long prompt in 77-token chunks."""
        key = ("global", text, self._text_key)
        if key not in self._cache:
            text = self._weighted(text, pad=True)
            if isinstance(text, ClipText):
                self._cache[key] = text.seq
                return text.seq
            skip = self._text_key[1]
            self._cache[key] = self.pipe.encode_prompt(text, self.device, 1, False)[0] if skip is None else \
                encode_skipped(self.pipe, text, skip, self.device)
        return self._cache[key]

    @torch.no_grad()
    def encode_entity(self, text: str) -> torch.Tensor:
        """CLIP over the entity's real tokens only (with start/end tokens; a multi-vector embedding's word as its
        tokens, ``maybe_convert_prompt``), no padding; ``clip_skip`` as the pipeline's."""
        key = ("entity", text, self._text_key)
        if key not in self._cache:
            text = self._weighted(text, pad=False)
            if isinstance(text, ClipText):
                self._cache[key] = text.seq
                return text.seq
            tok, te = self.pipe.tokenizer, self.pipe.text_encoder
            ids = tok(self.pipe.maybe_convert_prompt(text, tok), padding=False, max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
            out = hidden(te, ids.to(te.device), self._text_key[1], sdxl=False)
            self._cache[key] = out.to(dtype=self.dtype, device=self.device)
        return self._cache[key]

    def pooled_of(self, text: str, negative: bool) -> torch.Tensor | None:
        """A text's pooled vector, for families that condition on one (SD has none)."""
        return None

    def grids(self, plan) -> dict[str, tuple[int, int]]:
        return {g: plan.grid(g) for g in UNET_GRIDS if g in plan.doc.grids}

    def cond(self, rows: list[tuple[object, TextSpec, bool]]) -> Cond:
        """The keys of a call for each batch row: ``[global (77) | entities…]``, padded to the longest row."""
        plan0 = rows[0][0]
        self.use_text_options(plan0)  # batch rows share the model section (runtime/batching.py)
        regional = any(spec.regional for _, spec, _ in rows)
        parts, pooled = [], []
        for plan, spec, negative in rows:
            seqs = []
            if spec.global_ is not None:
                seqs.append(self.encode_global(plan.prompt(spec.global_.text(negative)), negative))
            else:
                width = self.unet.config.cross_attention_dim
                seqs.append(torch.zeros(1, 0, width, device=self.device, dtype=self.dtype))
            for e in spec.entities:
                text = plan.prompt(e.text(negative))
                seqs.append(self.encode_global(text, negative) if e.as_global else self.encode_entity(text))
            parts.append((seqs, regions_by_grid(plan, spec.entities, self.grids(plan)) if regional else {}))
            pooled.append([self.pooled_of(plan.prompt(s.text(negative)), negative) for s in spec.pooled])
        seq, lengths, layouts = assemble(parts, regional, self.grids(plan0), plan0.attention.image_self, 1)
        has_pooled = all(p is not None for row in pooled for p in row)
        return Cond(seq, [torch.cat(ps) for ps in zip(*pooled)] if has_pooled else [], lengths, layouts)

    # -- latents, solver, model ------------------------------------------------------------------------
    def prepare_latents(self, plan, seed: int) -> tuple[torch.Tensor, torch.Generator]:
        width, height = plan.canvas
        gen = torch.Generator("cpu").manual_seed(int(seed))
        x = self.pipe.prepare_latents(1, self.unet.config.in_channels, height, width, self.pipe.text_encoder.dtype,
                                      self.device, gen)
        if plan.grid("latent") != tuple(x.shape[2:]):
            raise PlanError(f"latent grid {plan.grid('latent')} does not match the canvas {tuple(x.shape[2:])}")
        return x, gen

    def solver(self, plan) -> DDIM:
        """The plan's solver (``sampler.kind``: ddim, dpm++2m, dpm++2m-karras, dpm++2m-sde, dpm++2m-sde-karras,
        unipc, unipc-karras (runtime/solvers.py); euler, euler-karras, euler-a (runtime/euler.py))."""
        if plan.sampler.kind in ("euler", "euler-karras", "euler-a"):
            return euler_solver(plan.sampler.kind, self.pipe.scheduler.config, plan.steps, self.device)
        return ddpm_solver(plan.sampler.kind, self.pipe.scheduler, plan.steps, self.device)

    def guided(self, plan) -> bool:
        return float(plan.sampler.guidance) > 1.0 and self.unet.config.time_cond_proj_dim is None

    def unet_kwargs(self, plan, call: Call, batch: int) -> dict:
        """What the UNet takes besides the latents, timestep and text keys (SD: nothing)."""
        return {}

    def _unet(self, plan, x, t, call: Call, rows: slice = slice(None)) -> torch.Tensor:
        self.attn.set(call.mods, rows=rows)
        try:
            xin = self.pipe.scheduler.scale_model_input(x, t)
            kw = self.unet_kwargs(plan, call, x.shape[0])
            for f in call.inputs:  # methods' extra inputs (a ControlNet's residuals)
                kw.update(f(call, xin, t, kw))
            return self.unet(xin, t, encoder_hidden_states=call.cond.seq, return_dict=False, **kw)[0]
        finally:
            self.attn.clear()

    def use_freeu(self, plan) -> None:
        """The plan's FreeU on the UNet (``sampler.freeu``: diffusers' ``unet.enable_freeu(s1, s2, b1, b2)``, Si et
        al. 2023, arXiv 2309.11497), or off (``unet.disable_freeu()``) for a plan without it: the backend is reused
        across the plans of a batch build, and a plan without FreeU runs on the UNet as it was loaded."""
        f = plan.sampler.freeu
        want = None if f is None else (f.s1, f.s2, f.b1, f.b2)
        if want != self._freeu:
            if want is None:
                self.unet.disable_freeu()
            else:
                self.unet.enable_freeu(*want)
            self._freeu = want

    @staticmethod
    def cfg(plan, e_u: torch.Tensor, e_c: torch.Tensor) -> torch.Tensor:
        """CFG's output e_u + g·(e_c − e_u) as the pipeline computes it; with ``sampler.cfg_rescale`` R > 0,
        rescaled as the pipeline's ``guidance_rescale`` (diffusers' own ``rescale_noise_cfg``: Lin et al. 2023,
        arXiv 2305.08891, Eq. 15-16): each row's output times std(e_c)/std(output) over all but the batch dim,
        mixed with the output by R. It acts on the combined prediction of each row, whatever calls made it."""
        out = e_u + float(plan.sampler.guidance) * (e_c - e_u)
        r = float(plan.sampler.cfg_rescale)
        if r > 0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

            out = rescale_noise_cfg(out, e_c, guidance_rescale=r)
        return out

    def predict(self, run, x: torch.Tensor, level: int, call) -> torch.Tensor:
        """The UNet's CFG output (:meth:`cfg`): one batched forward [negative, positive] when both
        branches take the same keys unmasked (as the pipeline), else one forward per branch (the
        positive first when a modifier measures something in it, e.g. SOW's indicator). Several rows
        always run as one forward of [negatives | positives]."""
        t = run.solver.model_time(level, x.shape[0], x.dtype, self.device)
        B = x.shape[0]
        rows = range(B)
        plan = run.plan
        self.use_freeu(plan)  # batch rows share the sampler section (runtime/batching.py)
        if not self.guided(plan):
            return self._unet(plan, x, t, call([(r, False) for r in rows]))
        if B > 1:
            c = call([(r, True) for r in rows] + [(r, False) for r in rows])
            e_u, e_c = self._unet(plan, torch.cat([x] * 2), t, c, rows=slice(B, 2 * B)).chunk(2)
            return self.cfg(plan, e_u, e_c)
        pos, neg = call([(0, False)]), call([(0, True)])
        masked = any(isinstance(m, Mask) for m in pos.mods + neg.mods)
        # key scales and LoRA token weights are laid out on the positive branch's text
        scaled = any(isinstance(m, KeyScale) or getattr(m, "rows_bound", False) for m in pos.mods)
        one_call = not masked and pos.cond.seq.shape == neg.cond.seq.shape and \
            (not scaled or pos.cond.lengths == neg.cond.lengths)
        # tokens made per branch (visual prompts: the negative sees the no-image input's) are never the
        # positive's reused on the negative row: one call shaped for both rows by the methods, as a batch's
        per_branch = any(isinstance(m, ExtraKV) and m.project is not None for m in pos.mods)
        if one_call and per_branch and not scaled:
            c = call([(0, True), (0, False)])
            e_u, e_c = self._unet(plan, torch.cat([x] * 2), t, c, rows=slice(B, 2 * B)).chunk(2)
            return self.cfg(plan, e_u, e_c)
        if one_call and not per_branch:
            pooled = [torch.cat([n, p]) for n, p in zip(neg.cond.pooled, pos.cond.pooled)]
            both = Call(neg.rows + pos.rows, [True, False], neg.specs + pos.specs, level,
                        pooled_weights=pos.pooled_weights, mods=pos.mods, inputs=pos.inputs,
                        cond=Cond(torch.cat([neg.cond.seq, pos.cond.seq]), pooled, pos.cond.lengths))
            e_u, e_c = self._unet(plan, torch.cat([x] * 2), t, both, rows=slice(B, 2 * B)).chunk(2)
        elif any(hasattr(m, "observe") for m in pos.mods):
            e_c = self._unet(plan, x, t, pos)  # SOW's indicator is measured in the positive pass
            e_u = self._unet(plan, x, t, neg)
        else:
            e_u = self._unet(plan, x, t, neg)
            e_c = self._unet(plan, x, t, pos)
        return self.cfg(plan, e_u, e_c)

    # -- images ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 ``[H, W, 3]`` → scaled latent (the VAE distribution's mode: deterministic)."""
        from PIL import Image

        pipe = self.pipe
        h, w = rgb.shape[:2]
        img = pipe.image_processor.preprocess(Image.fromarray(np.asarray(rgb)), height=h, width=w)
        z = pipe.vae.encode(img.to(self.device, pipe.vae.dtype)).latent_dist.mode()
        return (z * pipe.vae.config.scaling_factor).to(self.dtype)

    def latent_mask(self, m: np.ndarray) -> torch.Tensor:
        # a copy: a plan's arrays may be read-only (Ray's shared memory), which torch.from_numpy warns about
        return torch.from_numpy(np.array(m, np.float32)).to(self.device)[None, None]

    def latent_image(self, x: torch.Tensor, plan) -> torch.Tensor:
        return x  # the UNet's latents are the VAE's latent image

    def latent_layout(self, z: torch.Tensor) -> torch.Tensor:
        return z

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, plan=None):
        pipe = self.pipe
        f = pipe.vae_scale_factor
        tiling = plan.doc.canvas.tiling if plan is not None else "none"
        # a seamless image (its decoder wrapped by methods/tiling.py) is decoded whole: VAE tiles would have edges
        size = (0, 0) if tiling != "none" else (latents.shape[-1] * f, latents.shape[-2] * f)
        with tiled_decode(pipe, *size):
            img = pipe.vae.decode((latents / pipe.vae.config.scaling_factor).to(pipe.vae.dtype),
                                  return_dict=False)[0]
        require_finite(img, "the decoded image")  # NaN would become black pixels
        return pipe.image_processor.postprocess(img, output_type="pil")[0]


def load(model, device=None, dtype=None, offload: str = "none", quantize: str = "none") -> SDBackend:
    """Load an SD model once: ``tiny-sd`` built in code; ``sd15``/``sd21``, hub ids and local diffusers
    directories via ``StableDiffusionPipeline.from_pretrained(..., use_safetensors=True)``."""
    from diffusers import StableDiffusionPipeline

    if model.family != "sd":
        raise Unsupported(f"model family {model.family!r} ({model.spec}) is not the SD family")

    def build_tiny(dt, dev):
        from ..tiny_sd import build_tiny_sd

        return build_tiny_sd(dtype=dt, device=dev)

    repo = model.repo or SD_ALIASES.get(model.spec, model.spec)
    pipe, model_id, dev, dt = load_pipeline(StableDiffusionPipeline, model, device, dtype, torch.float16, "tiny-sd",
                                            build_tiny, repo, offload, quantize, safety_checker=None,
                                            requires_safety_checker=False)
    return SDBackend(pipe, model_id, dev, dt)
