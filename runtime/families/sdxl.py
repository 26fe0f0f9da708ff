"""The Stable Diffusion XL family (SDXL base, SDXL-Turbo, and the offline ``tiny-sdxl``).

SDXL is SD's UNet family (runtime/families/sd.py: cross-attention sites for regional masks and
coupling, self-attention sites for SOW, DDIM, CFG) with three differences, all here:

- **two text encoders**: a text's keys are both encoders' penultimate hidden states, concatenated
  (``StableDiffusionXLPipeline.encode_prompt``); an entity prompt keeps its real tokens of both;
- **a pooled vector** (the second encoder's projection) and **size micro-conditioning**
  (original size, crop, target size = the canvas) enter the UNet as added conditions; coupling mixes
  the pooled vectors as on Flux, (1 − θ)·pooled_bg + θ·pooled_ent;
- an **empty negative** is zeros, embeddings and pooled alike, as the pipeline does for a missing
  negative prompt (``force_zeros_for_empty_prompt``).

So a job without entities reproduces ``StableDiffusionXLPipeline(...)`` with DDIM.
"""

from __future__ import annotations

import numpy as np
import torch

from scenec.spec.errors import Unsupported

from ..backend import Call, load_pipeline, mix_pooled
from ..prompt_weights import ClipText
from ..textual_inversion import hidden
from .sd import SDBackend

SDXL_ALIASES = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "sdxl-turbo": "stabilityai/sdxl-turbo"}


class SDXLBackend(SDBackend):
    """A loaded SDXL model. Build with :func:`load`; reuse across plans."""

    family = "sdxl"

    def _zero_negative(self, text: str, negative: bool) -> bool:
        return negative and not text and bool(self.pipe.config.get("force_zeros_for_empty_prompt", True))

    @torch.no_grad()
    def _encode(self, text: str, negative: bool) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("global", text, self._zero_negative(text, negative), self._text_key)
        if key not in self._cache:
            text = self._weighted(text, pad=True)
            if isinstance(text, ClipText):  # weighted or long (runtime/prompt_weights.py)
                self._cache[key] = (text.seq, text.pooled)
                return self._cache[key]
            seq, _, pooled, _ = self.pipe.encode_prompt(prompt=text, device=self.device, num_images_per_prompt=1,
                                                        do_classifier_free_guidance=False,
                                                        clip_skip=self._text_key[1])
            if key[2]:
                seq, pooled = torch.zeros_like(seq), torch.zeros_like(pooled)
            self._cache[key] = (seq, pooled)
        return self._cache[key]

    def encode_global(self, text: str, negative: bool = False) -> torch.Tensor:
        """Both encoders' penultimate hidden states over 77 tokens: StableDiffusionXLPipeline.encode_prompt."""
        return self._encode(text, negative)[0]

    def pooled_of(self, text: str, negative: bool) -> torch.Tensor:
        return self._encode(text, negative)[1]

    @torch.no_grad()
    def encode_entity(self, text: str) -> torch.Tensor:
        """Both encoders over the entity's real tokens only (with start/end tokens; an embedding's word as its
        tokens), concatenated; ``clip_skip`` as the pipeline's."""
        key = ("entity", text, self._text_key)
        if key not in self._cache:
            text = self._weighted(text, pad=False)
            if isinstance(text, ClipText):
                self._cache[key] = text.seq
                return text.seq
            seqs = []
            for tok, te in ((self.pipe.tokenizer, self.pipe.text_encoder),
                            (self.pipe.tokenizer_2, self.pipe.text_encoder_2)):
                ids = tok(self.pipe.maybe_convert_prompt(text, tok), padding=False, max_length=tok.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
                seqs.append(hidden(te, ids.to(te.device), self._text_key[1], sdxl=True))
            if seqs[0].shape[1] != seqs[1].shape[1]:
                raise Unsupported(f"the two text encoders split {text!r} into different token counts")
            self._cache[key] = torch.cat(seqs, -1).to(dtype=self.dtype, device=self.device)
        return self._cache[key]

    def unet_kwargs(self, plan, call: Call, batch: int) -> dict:
        """The pooled vector and the size micro-conditioning (original = target = the canvas, no crop)."""
        w, h = plan.canvas
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=call.cond.seq.dtype, device=self.device)
        return {"added_cond_kwargs": {"text_embeds": mix_pooled(call, batch), "time_ids": ids.repeat(batch, 1)}}

    def _vae(self):
        """The VAE in a dtype it does not overflow in: float32 when the model asks for it in fp16."""
        vae = self.pipe.vae
        if vae.dtype == torch.float16 and vae.config.force_upcast:
            vae.to(torch.float32)
        return vae

    @torch.no_grad()
    def encode_image(self, rgb: np.ndarray) -> torch.Tensor:
        self._vae()
        return super().encode_image(rgb)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, plan=None):
        self._vae()
        return super().decode(latents, plan)


def load(model, device=None, dtype=None, offload: str = "none", quantize: str = "none") -> SDXLBackend:
    """Load an SDXL model once: ``tiny-sdxl`` built in code; ``sdxl``/``sdxl-turbo``, hub ids and local
    diffusers directories via ``StableDiffusionXLPipeline.from_pretrained(..., use_safetensors=True)``."""
    from diffusers import StableDiffusionXLPipeline

    if model.family != "sdxl":
        raise Unsupported(f"model family {model.family!r} ({model.spec}) is not the SDXL family")

    def build_tiny(dt, dev):
        from ..tiny_sdxl import build_tiny_sdxl

        return build_tiny_sdxl(dtype=dt, device=dev)

    repo = model.repo or SDXL_ALIASES.get(model.spec, model.spec)
    pipe, model_id, dev, dt = load_pipeline(StableDiffusionXLPipeline, model, device, dtype, torch.float16,
                                            "tiny-sdxl", build_tiny, repo, offload, quantize)
    return SDXLBackend(pipe, model_id, dev, dt)
