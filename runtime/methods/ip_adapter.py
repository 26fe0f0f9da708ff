"""IP-Adapter weights for ``visual.mode: ip-adapter`` (Ye et al., arXiv 2308.06721): the adapter's image
projection and each attention layer's key/value projections, read from diffusers' checkpoint format, and
what the visual-prompt method (runtime/methods/visual.py) needs to attend with them in a region."""

from __future__ import annotations

import torch
from torch import nn

from scenec.spec.errors import PlanError


def layer_key(name: str) -> str:
    """A module path as a ModuleDict key (no dots)."""
    return name.replace(".", "__")


class IPAdapterKV(nn.Module):
    """An IP-Adapter (Ye et al., arXiv 2308.06721) in the original/diffusers checkpoint format
    (``image_proj.*``, ``ip_adapter.<i>.to_k_ip.weight``): diffusers' own conversion builds the image
    projection (``UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers``: IP-Adapter, Plus,
    Full Face, …); cross-attention layer k (in ``attn_processors`` order) has the projections of entry
    2k + 1, as diffusers' ``_convert_ip_adapter_attn_to_diffusers`` reads them. Keys and values come from
    the same tokens; the negative branch sees a zero embedding (IP-Adapter) or a zero image's grid (Plus),
    as ``StableDiffusionPipeline.prepare_ip_adapter_image_embeds`` does."""

    def __init__(self, unet, state: dict[str, torch.Tensor], names: list[str], path: str):
        super().__init__()
        proj = {k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")}
        self.image_proj = unet._convert_ip_adapter_image_proj_to_diffusers(proj, low_cpu_mem_usage=False)
        self.grid_input = "latents" in proj  # Plus: the resampler reads the penultimate grid features
        self.to_k, self.to_v = nn.ModuleDict(), nn.ModuleDict()
        for i, name in enumerate(names):
            for kv, dest in (("to_k_ip", self.to_k), ("to_v_ip", self.to_v)):
                w = state.get(f"ip_adapter.{2 * i + 1}.{kv}.weight")
                if w is None:
                    raise PlanError(f"IP-Adapter {path} has no {kv} for cross-attention {i} ({name}): it was made "
                                    "for another model")
                dest[layer_key(name)] = nn.Linear(w.shape[1], w.shape[0], bias=False)
                dest[layer_key(name)].weight.data.copy_(w)

    def pair(self, pos, neg) -> tuple[tuple, tuple]:
        if self.grid_input:
            toks = [self.image_proj(h.hidden_states[-2]) for h in (pos, neg)]
        else:
            toks = [self.image_proj(e) for e in (pos.image_embeds, torch.zeros_like(pos.image_embeds))]
        return (toks[0], toks[0]), (toks[1], toks[1])


def load_ip_adapter(path: str, sha256: str, unet) -> tuple[IPAdapterKV, dict[str, nn.Module]]:
    """An IP-Adapter file (digest checked) for this UNet's cross-attention layers; and those layers."""
    from safetensors.torch import load_file

    from scenec.spec.fsio import sha256_file

    try:
        if sha256_file(path) != sha256:
            raise PlanError(f"adapter {path} changed since the plan was compiled (compile again)")
        state = load_file(path)
    except (OSError, ValueError) as e:
        raise PlanError(f"adapter {path}: {e}") from None
    names = [k[:-len(".processor")] for k in unet.attn_processors if k.endswith("attn2.processor")]
    mods = dict(unet.named_modules())
    return IPAdapterKV(unet, state, names, path).eval().requires_grad_(False), {n: mods[n] for n in names}


def load_ip(vp, model, tiny: bool) -> tuple[IPAdapterKV, str | None, dict[str, nn.Module]]:
    """A visual prompt's IP-Adapter for ``model``: the adapter, its image encoder's directory (None: the tiny
    models' random one stands in) and the attention layers it serves."""
    from pathlib import Path

    adapter, used = load_ip_adapter(vp.adapter, vp.adapter_sha256, model)
    enc = Path(vp.adapter).parent / "image_encoder"  # h94/IP-Adapter's layout: models/image_encoder
    if not enc.is_dir() and tiny:
        return adapter, None, used
    return adapter, str(enc), used
