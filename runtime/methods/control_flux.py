"""ControlNet conditions on Flux (``control``; runtime/methods/control.py runs them): diffusers'
``FluxControlNetModel`` called as ``FluxControlNetPipeline`` calls it, its residuals handed to the Flux
transformer as ``controlnet_block_samples`` / ``controlnet_single_block_samples``.

Two kinds of Flux ControlNet exist, told apart by ``input_hint_block`` (as the pipeline does): InstantX's and
Shakker-Labs' (no hint block; Union ones with ``num_mode``) read the control image as packed VAE latents, XLabs'
read the pixels (in [-1, 1]) through their own convolutional hint block and repeat their residuals over the
transformer's blocks (``controlnet_blocks_repeat``). Several controls add their residuals block by block
(diffusers' ``FluxMultiControlNetModel``).

The ControlNet reads the call's latents, timestep, guidance, pooled vector and the **global prompt's** T5
tokens (the first ``lengths[0]`` of the call's text): entity prompts act through the transformer's regional
attention, not through the ControlNet, as on SD. With true CFG (``sampler.true_cfg > 1``) the negative
forward reuses the positive forward's residuals, as ``FluxControlNetPipeline`` does.
"""

from __future__ import annotations

import numpy as np
import torch

from scenec.spec.errors import ModelUnavailable


def tiny_flux_controlnet(transformer) -> torch.nn.Module:
    """The tiny Flux's ControlNet: diffusers' ``FluxControlNetModel.from_transformer`` (one dual- and one
    single-stream block copied from ``transformer``, so each residual covers two of its blocks), its zero-initialised
    layers (``controlnet_x_embedder``, which reads the control latents, and the ``controlnet_blocks``) given small
    seeded random weights instead, so that a tiny control visibly acts, through its image."""
    from diffusers import FluxControlNetModel

    c = transformer.config
    net = FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                               attention_head_dim=c.attention_head_dim,
                                               num_attention_heads=c.num_attention_heads)
    g = torch.Generator().manual_seed(0)
    for layer in [net.controlnet_x_embedder, *net.controlnet_blocks, *net.controlnet_single_blocks]:
        for p in layer.parameters():
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def build_tiny() -> torch.nn.Module:
    """The built-in ControlNet of the ``tiny`` Flux, from a fresh tiny transformer (the same deterministic
    weights: the backend's may be offloaded or quantised)."""
    from ..tiny import tiny_flux_transformer

    with torch.random.fork_rng(devices=[]):  # seeded in there: the caller's random state untouched
        return tiny_flux_controlnet(tiny_flux_transformer())


def load(model: str, dtype) -> torch.nn.Module:
    from diffusers import FluxControlNetModel

    return FluxControlNetModel.from_pretrained(model, use_safetensors=True, torch_dtype=dtype)


def misfit(net, transformer) -> str | None:
    """Why a Flux ControlNet cannot condition ``transformer`` (another width, text or latent channels), or None."""
    a, b = net.config, transformer.config
    width = (a.num_attention_heads * a.attention_head_dim, b.num_attention_heads * b.attention_head_dim)
    if width[0] != width[1]:
        return f"its hidden width is {width[0]}, the transformer's {width[1]}"
    for key, what in (("joint_attention_dim", "text width"), ("pooled_projection_dim", "pooled width"),
                      ("in_channels", "latent channels")):
        if a.get(key) != b.get(key):
            return f"its {what} (`{key}`) is {a.get(key)}, the model's {b.get(key)}"
    return None


def kind(net) -> tuple:
    """What residuals ``net`` gives: (dual-stream count, single-stream count, repeated over the blocks)."""
    return len(net.controlnet_blocks), len(net.controlnet_single_blocks), net.input_hint_block is not None


def check_together(nets: list, names: list[str]) -> None:
    """Several controls' ControlNets add their residuals block by block: they must give the same ones."""
    kinds = {kind(n) for n in nets}
    if len(kinds) > 1:
        raise ModelUnavailable(
            "the scene's Flux ControlNets cannot be combined: " + ", ".join(
                f"{name} gives {k[0]} dual- and {k[1]} single-stream residuals" + (" (XLabs, repeated)" if k[2] else "")
                for name, k in zip(names, map(kind, nets)))
            + "; diffusers' FluxMultiControlNetModel adds them block by block, so they must match")


def control_mode(net, mode: int | None, name: str, device) -> torch.Tensor | None:
    """A Union ControlNet's ``controlnet_mode`` (``[1, 1]``), None for another; a mode it lacks is one sentence."""
    num = net.config.get("num_mode")
    if num is None:
        if mode is not None:
            raise ModelUnavailable(f"ControlNet {name} is no Union ControlNet (no `num_mode`): `mode` does not apply")
        return None
    if mode is None or not 0 <= mode < num:
        raise ModelUnavailable(f"ControlNet {name} is a Union ControlNet: `mode` must be 0..{num - 1}, got {mode}")
    return torch.tensor([[mode]], dtype=torch.long, device=device)


@torch.no_grad()
def control_input(backend, net, rgb: np.ndarray) -> torch.Tensor:
    """The control image as ``FluxControlNetPipeline`` gives it to ``net``: normalised to [-1, 1] by the
    pipeline's image processor, then (no hint block) VAE-encoded, shifted, scaled and packed to tokens. The
    VAE's mode, not a sample: the pipeline samples with the job's generator before it draws the initial noise
    (which shifts its noise too); scenec keeps FluxPipeline's noise, so a control at scale 0 is the scene
    without it."""
    from PIL import Image

    pipe = backend.pipe
    h, w = rgb.shape[:2]
    # contiguous as the pipeline's repeat_interleave leaves it (a channels-last view convolves to other roundings)
    img = pipe.image_processor.preprocess(Image.fromarray(rgb), height=h, width=w).contiguous()
    if net.input_hint_block is not None:
        return img.to(backend.device, net.dtype)
    vae = pipe.vae
    z = vae.encode(img.to(backend.device, vae.dtype)).latent_dist.mode()
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    return pipe._pack_latents(z, 1, z.shape[1], z.shape[2], z.shape[3]).to(net.dtype)


def residuals(acting: list, call, x: torch.Tensor, kw: dict, guidance_scale: float) -> dict:
    """The transformer's residual inputs for a call: the sum over ``acting`` ((control, net, input, mode, region)) of
    each ControlNet's residuals on the call's latents ``x`` (``[B, N, C]``) and the global prompt's text, a regional
    control's times its region's token weights (``[1, N, 1]``); a ControlNet with a guidance embedding reads
    ``guidance_scale`` (its own config decides, as in the pipeline)."""
    n = call.cond.lengths[0]
    text, ids = kw["encoder_hidden_states"][:, :n], kw["txt_ids"][:n]
    B = x.shape[0]
    blocks = single = None
    for c, net, cond, mode, region in acting:
        guidance = None
        if net.config.guidance_embeds:
            guidance = torch.full([B], float(guidance_scale), device=x.device, dtype=torch.float32)
        d, s = net(hidden_states=x, controlnet_cond=cond.expand(B, *cond.shape[1:]),
                   controlnet_mode=None if mode is None else mode.expand(B, 1), conditioning_scale=float(c.scale),
                   timestep=kw["timestep"], guidance=guidance, pooled_projections=kw["pooled_projections"],
                   encoder_hidden_states=text, txt_ids=ids, img_ids=kw["img_ids"], joint_attention_kwargs={},
                   return_dict=False)
        if region is not None:  # the image tokens of its region only
            d, s = (None if rs is None else [r * region.to(r.dtype) for r in rs] for rs in (d, s))
        blocks = _add(blocks, d)
        single = _add(single, s)
    return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": single,
            "controlnet_blocks_repeat": acting[0][1].input_hint_block is not None}


def _add(a, b):
    if a is None or b is None:
        return b if a is None else a
    return [p + q for p, q in zip(a, b)]
