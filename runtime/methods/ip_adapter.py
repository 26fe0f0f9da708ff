"""IP-Adapter weights for ``visual.mode: ip-adapter`` (Ye et al., arXiv 2308.06721): the adapter's image
projection and each attention layer's key/value projections, read from the checkpoint formats diffusers'
``load_ip_adapter`` reads, and what the visual-prompt method (runtime/methods/visual.py) needs to attend
with them in a region:

- **UNets** (SD, SDXL; h94/IP-Adapter's ``image_proj.*``, ``ip_adapter.<i>.to_{k,v}_ip.weight``):
  decoupled cross-attention (§3.2) on every ``attn2``, added to the attention's output before its output
  projection (diffusers' ``IPAdapterAttnProcessor2_0``);
- **Flux** (XLabs' ``ip_adapter_proj_model.*``, ``double_blocks.<i>.processor.ip_adapter_double_stream_
  {k,v}_proj.{weight,bias}``): an attention from the dual-stream blocks' image queries (after QK-norm,
  before RoPE) to the adapter's tokens, added to the block's image stream after its feed-forward
  (diffusers' ``FluxIPAdapterAttnProcessor`` and ``FluxTransformerBlock``).

Both go through the one dispatcher as :class:`~scenec.runtime.attention.ExtraKV` (``decoupled``; Flux's
``residual``), so each visual prompt acts on its entity's region only.
"""

from __future__ import annotations

import torch
from torch import nn

from scenec.spec.errors import PlanError

XLABS_PROJ, XLABS_BLOCKS = "ip_adapter_proj_model.", "double_blocks."  # XLabs' Flux IP-Adapter key names


def layer_key(name: str) -> str:
    """A module path as a ModuleDict key (no dots)."""
    return name.replace(".", "__")


class IPAdapterKV(nn.Module):
    """An IP-Adapter: the image projection diffusers' own conversion builds from the checkpoint
    (``_convert_ip_adapter_image_proj_to_diffusers`` of the UNet or the Flux transformer: IP-Adapter, Plus,
    Full Face, …) and one ``to_k_ip``/``to_v_ip`` pair per attention layer it serves (``layers``: module path
    → the checkpoint's weights of that pair, ``{"to_k_ip.weight": …, …}``). Keys and values come from the same
    tokens. The negative (guidance) branch: on UNets a zero embedding (IP-Adapter) or a zero image's grid
    (Plus), as ``StableDiffusionPipeline.prepare_ip_adapter_image_embeds`` does; on Flux (``black_negative``)
    the embedding of an all-black image, as ``FluxPipeline`` makes ``negative_ip_adapter_image``.

    ``sites``: the attention sites of its layers; ``residual``: its attention joins the block's residual
    stream (Flux) rather than the attention's output (UNets)."""

    def __init__(self, model, proj: dict[str, torch.Tensor], layers: dict[str, dict[str, torch.Tensor]], path: str,
                 black_negative: bool = False, residual: bool = False):
        from diffusers.models.embeddings import ImageProjection

        super().__init__()
        try:
            self.image_proj = model._convert_ip_adapter_image_proj_to_diffusers(proj, low_cpu_mem_usage=False)
        except (AttributeError, KeyError, RuntimeError) as e:  # a projection kind this model's loader lacks
            raise PlanError(f"IP-Adapter {path}: its image projection does not load for this model ({e})") from None
        # diffusers' pipelines: all but the plain projection read the encoder's penultimate grid features
        self.grid_input = not isinstance(self.image_proj, ImageProjection)
        self.black_negative, self.residual = black_negative, residual
        self.sites: frozenset[str] = frozenset()
        self.to_k, self.to_v = nn.ModuleDict(), nn.ModuleDict()
        for name, w in layers.items():
            for kv, dest in (("to_k_ip", self.to_k), ("to_v_ip", self.to_v)):
                weight, bias = w[f"{kv}.weight"], w.get(f"{kv}.bias")
                dest[layer_key(name)] = lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
                lin.weight.data.copy_(weight)
                if bias is not None:
                    lin.bias.data.copy_(bias)

    def pair(self, pos, neg) -> tuple[tuple, tuple]:
        """(key, value) tokens of the image's encoder output ``pos`` and of the negative input's ``neg``."""
        try:
            if self.grid_input:
                toks = [self.image_proj(h.hidden_states[-2]) for h in (pos, neg)]
            elif self.black_negative:
                toks = [self.image_proj(h.image_embeds) for h in (pos, neg)]
            else:
                toks = [self.image_proj(e) for e in (pos.image_embeds, torch.zeros_like(pos.image_embeds))]
        except RuntimeError as e:  # shapes: an encoder of another width than the adapter was trained with
            raise PlanError(f"the IP-Adapter's image encoder does not fit its image projection ({e}): put the "
                            "encoder the adapter was trained with in the image_encoder/ directory beside it") from None
        return (toks[0], toks[0]), (toks[1], toks[1])


def _read(path: str, sha256: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from scenec.spec.fsio import sha256_file

    try:
        if sha256_file(path) != sha256:
            raise PlanError(f"adapter {path} changed since the plan was compiled (compile again)")
        return load_file(path)
    except (OSError, ValueError) as e:
        raise PlanError(f"adapter {path}: {e}") from None


def _pair_of(state: dict, prefix: str, layer: str, what: str, path: str, inner: int, bias: bool) -> dict:
    """The ``to_k_ip``/``to_v_ip`` weights (and biases) under ``prefix`` for one layer of inner width ``inner``."""
    out = {}
    for kv in ("to_k_ip", "to_v_ip"):
        for p in ("weight", "bias") if bias else ("weight",):
            t = state.get(f"{prefix}{kv}.{p}")
            if t is None or t.shape[0] != inner:
                raise PlanError(f"IP-Adapter {path} has no {kv}.{p} of width {inner} for {what} ({layer}): it was "
                                "made for another model")
            out[f"{kv}.{p}"] = t
    return out


def load_ip_adapter(path: str, sha256: str, model) -> tuple[IPAdapterKV, dict[str, nn.Module]]:
    """An IP-Adapter file (digest checked) for this model's layers; and those layers. A UNet: its
    cross-attention layer k (in ``attn_processors`` order) has the projections of entry 2k + 1, as
    ``UNet2DConditionModel._convert_ip_adapter_attn_to_diffusers`` reads them. A Flux transformer: dual-stream
    block i has entry i (XLabs' names renamed as ``FluxIPAdapterMixin.load_ip_adapter`` does)."""
    state = _read(path, sha256)
    mods = dict(model.named_modules())
    if hasattr(model, "transformer_blocks"):  # Flux
        state = {_xlabs_name(k): v for k, v in state.items()}
        names = [f"transformer_blocks.{i}.attn" for i in range(len(model.transformer_blocks))]
        layers = {n: _pair_of(state, f"ip_adapter.{i}.", n, f"dual-stream block {i}", path,
                              mods[n].to_k.out_features, True) for i, n in enumerate(names)}
        kw = dict(black_negative=True, residual=True)
    else:
        names = [k[:-len(".processor")] for k in model.attn_processors if k.endswith("attn2.processor")]
        layers = {n: _pair_of(state, f"ip_adapter.{2 * i + 1}.", n, f"cross-attention {i}", path,
                              mods[n].to_k.out_features, False) for i, n in enumerate(names)}
        kw = {}
    proj = {k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")}
    adapter = IPAdapterKV(model, proj, layers, path, **kw).eval().requires_grad_(False)
    return adapter, {n: mods[n] for n in names}


def _xlabs_name(key: str) -> str:
    """XLabs' Flux key → the checkpoint format's (``image_proj.*``, ``ip_adapter.<i>.to_{k,v}_ip.*``)."""
    if key.startswith(XLABS_PROJ):
        return "image_proj." + key[len(XLABS_PROJ):]
    if key.startswith(XLABS_BLOCKS):
        rest = key[len(XLABS_BLOCKS):].replace("processor.", "")
        rest = rest.replace("ip_adapter_double_stream_k_proj", "to_k_ip").replace("ip_adapter_double_stream_v_proj",
                                                                                   "to_v_ip")
        return "ip_adapter." + rest
    return key


def load_ip(vp, model, tiny: bool) -> tuple[IPAdapterKV, str | None, dict[str, nn.Module]]:
    """A visual prompt's IP-Adapter for ``model``: the adapter, its image encoder's directory (None: the tiny
    models' random one stands in) and the attention layers it serves."""
    from pathlib import Path

    adapter, used = load_ip_adapter(vp.adapter, vp.adapter_sha256, model)
    adapter.sites = frozenset(m.processor.site.name for m in used.values())  # the families' processors' sites
    enc = Path(vp.adapter).parent / "image_encoder"  # h94/IP-Adapter's layout: models/image_encoder
    if not enc.is_dir() and tiny:
        return adapter, None, used
    return adapter, str(enc), used
