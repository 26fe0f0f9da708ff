"""Test-only: a diffusers SD/SDXL pipeline's weights in the original (LDM) single-file layout, the layout
A1111 and ComfyUI checkpoints use. The inverse of diffusers' ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint`` and ``convert_open_clip_checkpoint``
(diffusers.loaders.single_file_utils, 0.42) for any block layout, so a tiny model makes a tiny checkpoint that
``from_single_file`` reads back. Not part of the package: scenec only ever reads such files, through diffusers."""

from __future__ import annotations

import re

import torch

UNET, VAE = "model.diffusion_model.", "first_stage_model."
RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
       "conv_in": "input_blocks.0.0",
       "conv_norm_out": "out.0", "conv_out": "out.2", "add_embedding.linear_1": "label_emb.0.0",
       "add_embedding.linear_2": "label_emb.0.2"}


def _resnet(rest: str) -> str:
    for new, old in RESNET:
        rest = rest.replace(new, old)
    return rest


def unet_to_ldm(sd: dict, config) -> dict:
    lpb = config["layers_per_block"]
    has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    for k, v in sd.items():
        head, _, leaf = k.rpartition(".")
        if head in TOP:
            out[f"{TOP[head]}.{leaf}"] = v
            continue
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", k)
        if m:
            side, b, part, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            if side == "down":
                i = 1 + b * (lpb + 1) + (lpb if part == "downsamplers" else j)
                name = {"resnets": f"input_blocks.{i}.0.{_resnet(rest)}", "attentions": f"input_blocks.{i}.1.{rest}",
                        "downsamplers": f"input_blocks.{i}.0.op.{rest.removeprefix('conv.')}"}[part]
            else:
                i = b * (lpb + 1) + (lpb if part == "upsamplers" else j)
                up = 2 if has_attn[b] else 1
                name = {"resnets": f"output_blocks.{i}.0.{_resnet(rest)}", "attentions": f"output_blocks.{i}.1.{rest}",
                        "upsamplers": f"output_blocks.{i}.{up}.{rest}"}[part]
            out[name] = v
            continue
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)
        if m is None:
            raise KeyError(f"no LDM name for UNet key {k}")
        j = int(m[2])
        out[f"middle_block.{2 * j if m[1] == 'resnets' else 1}." + (_resnet(m[3]) if m[1] == "resnets" else m[3])] = v
    return {UNET + k: v for k, v in out.items()}


def vae_to_ldm(sd: dict, config) -> dict:
    n_up = len(config["up_block_types"])
    out = {}
    for k, v in sd.items():
        k2 = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k2)
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                    lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.", k2)
        k2 = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k2)
        if "mid_block.attentions.0." in k2:
            k2 = k2.replace("mid_block.attentions.0.", "mid.attn_1.").replace("group_norm", "norm")
            k2 = re.sub(r"to_([qkv])\.", r"\1.", k2).replace("to_out.0.", "proj_out.")
            if v.ndim == 2:  # LDM's attention projections are 1×1 convolutions
                v = v[:, :, None, None]
        out[VAE + k2] = v
    return out


def clip_to_ldm(sd: dict, prefix: str) -> dict:
    """CLIP (SD's, SDXL's first encoder): the state dict under ``prefix`` with ``text_model.`` kept."""
    return {prefix + (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in sd.items()}


def open_clip_to_ldm(sd: dict, prefix: str = "conditioner.embedders.1.model.") -> dict:
    """SDXL's second encoder in OpenCLIP's layout: q/k/v fused into ``in_proj``, the projection transposed."""
    sd = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}
    top = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
           "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    out = {prefix + "text_projection": sd["text_projection.weight"].T.contiguous()}
    for k, v in sd.items():
        if k in top:
            out[prefix + top[k]] = v
            continue
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", k)
        if m is None:
            continue
        n, rest = m[1], m[2]
        if re.match(r"self_attn\.[qkv]_proj\.", rest):
            if rest.startswith("self_attn.q_proj."):
                leaf = rest.rsplit(".", 1)[1]
                fused = torch.cat([sd[f"text_model.encoder.layers.{n}.self_attn.{x}_proj.{leaf}"] for x in "qkv"])
                out[f"{prefix}transformer.resblocks.{n}.attn.in_proj_{leaf}"] = fused
            continue
        rest = rest.replace("self_attn.", "attn.").replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2") \
            .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj")
        out[f"{prefix}transformer.resblocks.{n}.{rest}"] = v
    return out


def pipeline_to_ldm(pipe) -> dict:
    """One state dict in the single-file layout: UNet, VAE and the text encoder(s), contiguous CPU tensors."""
    out = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    out.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    if getattr(pipe, "text_encoder_2", None) is not None:
        out.update(clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        out.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict()))
    else:
        out.update(clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}
