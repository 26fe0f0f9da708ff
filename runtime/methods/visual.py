"""Object-level visual prompts (Parmar et al., arXiv 2501.01424): an entity's look from an image.

KV-mixed cross-attention (the paper's §3): the object's image goes through an image encoder (CLIP
vision, transformers' ``CLIPVisionModel``); a **coarse** adapter (a linear map of the pooled embedding
to a few tokens, diffusers' ``ImageProjection``: a narrow bottleneck, where the object goes) gives the
**keys**, and a **fine** adapter (a Perceiver resampler over the encoder's grid features, diffusers'
``IPAdapterPlusImageProjection``: a wide bottleneck, what it looks like) gives the **values**; each
attention layer projects them with its own pair of linear maps (``to_k``/``to_v`` per layer in the
adapter). The tokens join the attention of the image tokens of the entity's region only — the
paper's compositional guidance (§3.4) confines each visual prompt's attention to its object's segment;
the scene gives the layout, so the segment is the known region — scaled by ``scale``, on the denoise
ops inside ``window``:

- Flux (joint attention): extra key/value tokens in the one softmax, visible only to the region's image
  queries, logits + log(scale) (:class:`~scenec.runtime.attention.ExtraKV`);
- SD/SDXL (cross-attention): decoupled cross-attention as IP-Adapter (arXiv 2308.06721, §3.2),
  ``out + scale·m·softmax(q k_vᵀ/√d) v_v`` with m the region (``ExtraKV(decoupled=True)``).

The negative (guidance) branch sees the tokens of an all-zero input image, as IP-Adapter's
unconditional branch does. Adapters load from ``.safetensors`` (``format: scenec-kv-mixed/1`` in the
metadata, the configuration beside it, the image encoder as a local directory); the offline tiny
models build a deterministic random adapter and image encoder in code (docs/visual-prompts.md).
``ip-adapter`` mode loads IP-Adapter weights in the checkpoint formats diffusers reads instead (h94's on
SD/SDXL, XLabs' on Flux's dual-stream blocks): keys and values from one adapter's tokens, region-masked
(runtime/methods/ip_adapter.py). The paper's test-time refinement of the value tokens (``visual.refine``)
is runtime/methods/visual_refine.py.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from scenec.spec.errors import PlanError

from ..cache import dir_stamp, file_stamp
from ..layout import region_membership
from .base import Method
from .ip_adapter import layer_key, load_ip

MAX_LOADED = 4  # adapters (with their image encoders) kept per loaded model
FORMAT = "scenec-kv-mixed/1"  # compiler/visual.py KV_MIXED_FORMAT: what the check pass accepts
TINY_SEED = 20250401


class KVMixedAdapter(nn.Module):
    """The coarse and fine adapters and each attention layer's key/value projections (module docstring).

    ``config``: ``tokens`` (M), ``dim`` (C, the tokens' width), ``embed_dim`` (the image encoder's width),
    ``hidden_dim``, ``depth``, ``heads``, ``dim_head`` (the resampler) and ``layers`` (module path → the
    layer's inner width)."""

    def __init__(self, config: dict):
        from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

        super().__init__()
        c = self.config = dict(config)
        self.coarse = ImageProjection(image_embed_dim=c["embed_dim"], cross_attention_dim=c["dim"],
                                      num_image_text_embeds=c["tokens"])
        self.fine = IPAdapterPlusImageProjection(
            embed_dims=c["embed_dim"], output_dims=c["dim"], hidden_dims=c["hidden_dim"], depth=c["depth"],
            dim_head=c["dim_head"], heads=c["heads"], num_queries=c["tokens"], ffn_ratio=2)
        self.to_k = nn.ModuleDict({layer_key(n): nn.Linear(c["dim"], d, bias=False) for n, d in c["layers"].items()})
        self.to_v = nn.ModuleDict({layer_key(n): nn.Linear(c["dim"], d, bias=False) for n, d in c["layers"].items()})

    def forward(self, pooled: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(coarse tokens, fine tokens), each ``[B, M, C]``, from the pooled embedding and the grid features."""
        return self.coarse(pooled), self.fine(grid)

    def pair(self, pos, neg) -> tuple[tuple, tuple]:
        """The (key, value) tokens of the image's encoder output and of the all-zero input's."""
        return tuple(self(h.pooler_output, h.hidden_states[-2]) for h in (pos, neg))


def attention_layers(model: nn.Module, sites: set[str]) -> dict[str, nn.Module]:
    """The attention modules whose processors serve ``sites`` (the families' processors carry their site)."""
    out = {}
    for name, mod in model.named_modules():
        site = getattr(getattr(mod, "processor", None), "site", None)
        if site is not None and site.name in sites:
            out[name] = mod
    return out


def tiny_adapter(layers: dict[str, nn.Module], embed_dim: int) -> KVMixedAdapter:
    """The tiny models' adapter: random, seeded (the same bytes every run; the caller's RNG untouched)."""
    config = dict(tokens=4, dim=32, embed_dim=embed_dim, hidden_dim=32, depth=1, heads=2, dim_head=8,
                  layers={n: m.to_k.out_features for n, m in layers.items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return KVMixedAdapter(config).eval().requires_grad_(False)


def save_adapter(adapter: KVMixedAdapter, path, image_encoder: str, extra: dict | None = None) -> None:
    """Write an adapter as ``.safetensors`` with its format, configuration and image encoder in the metadata
    (a relative image encoder is read relative to the file's directory); ``extra``: more metadata strings."""
    from safetensors.torch import save_file

    meta = {**(extra or {}), "format": FORMAT, "config": json.dumps(adapter.config, sort_keys=True),
            "image_encoder": image_encoder}
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, str(path), metadata=meta)


def load_adapter(path: str, sha256: str, layers: dict[str, nn.Module]) -> tuple[KVMixedAdapter, str]:
    """An adapter file as the plan names it (its digest checked) for these attention layers; and its image
    encoder's directory (a relative one resolved against the adapter file's directory)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from scenec.spec.fsio import sha256_file

    try:
        if sha256_file(path) != sha256:
            raise PlanError(f"adapter {path} changed since the plan was compiled (compile again)")
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        state = load_file(path)
    except (OSError, ValueError) as e:
        raise PlanError(f"adapter {path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise PlanError(f"adapter {path} is not a {FORMAT} adapter")
    config = json.loads(meta.get("config", "{}"))
    missing = sorted(set(layers) - set(config.get("layers", {})))
    if missing:
        raise PlanError(f"adapter {path} has no projections for this model's layer {missing[0]} "
                        f"({len(missing)} missing): it was made for another model")
    config["layers"] = {n: config["layers"][n] for n in layers}
    adapter = KVMixedAdapter(config)
    keep = {k: v for k, v in state.items() if not k.startswith(("to_k.", "to_v.")) or k.split(".")[1] in
            {layer_key(n) for n in layers}}
    adapter.load_state_dict(keep, strict=True)
    enc = meta.get("image_encoder", "")
    if enc and not os.path.isabs(enc):  # beside the file: an adapter's folder can move as a whole
        enc = os.path.join(os.path.dirname(os.path.abspath(path)), enc)
    return adapter.eval().requires_grad_(False), enc


def image_encoder(spec: str, projection: bool = False):
    """(CLIPVisionModel, CLIPImageProcessor) from a local directory (safetensors only, never downloaded);
    ``projection``: CLIPVisionModelWithProjection (IP-Adapter's)."""
    from pathlib import Path

    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    d = Path(spec)
    if not (d / "config.json").is_file():
        raise PlanError(f"the adapter's image encoder `{spec}` is not a local CLIPVisionModel directory")
    cls = CLIPVisionModelWithProjection if projection else CLIPVisionModel
    try:
        raw = json.loads((d / "config.json").read_text(encoding="utf-8"))
        config = None
        if raw.get("model_type") == "clip" and isinstance(raw.get("vision_config"), dict):
            # a whole CLIPModel (openai/clip-vit-large-patch14, Flux IP-Adapter's encoder): its vision tower, with
            # the model's projection width (a vision_config may lack it)
            config = CLIPVisionConfig(**{**raw["vision_config"], "projection_dim": raw.get("projection_dim", 512)})
        from transformers.utils import logging as hf_logging

        level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # a whole CLIPModel's text tower is reported as unexpected weights
        hf_logging.disable_progress_bar()  # "Loading weights": the build has its own display
        try:
            model = cls.from_pretrained(str(d), config=config, use_safetensors=True, local_files_only=True)
        finally:
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()
    except (OSError, ValueError, RuntimeError) as e:
        raise PlanError(f"the adapter's image encoder `{spec}` does not load: {e}") from None
    if (d / "preprocessor_config.json").is_file():
        proc = CLIPImageProcessor.from_pretrained(str(d), local_files_only=True)
    else:
        s = model.config.image_size
        proc = CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    return model.eval().requires_grad_(False), proc


class VisualPrompt:
    """One visual prompt ready to attend: its coarse/fine tokens (positive and negative), the region per
    grid, and the per-layer projections (cached per layer and row pattern)."""

    def __init__(self, vp, adapter: KVMixedAdapter, pos: tuple, neg: tuple, visible: dict[int, torch.Tensor],
                 names: dict[int, str], encoder=None):
        self.vp, self.adapter, self.pos, self.neg, self.visible, self.names = vp, adapter, pos, neg, visible, names
        self.encoder = encoder  # (image encoder, its processor): what visual.refine compares with
        self._kv: dict = {}
        self.cached = True  # False: projected at every call (visual.refine's checkpointed blocks recompute them)

    def set_fine(self, fine: torch.Tensor) -> None:
        """New positive value (fine) tokens (``visual.refine``): the per-layer projections are made again."""
        self.pos = (self.pos[0], fine)
        self._kv.clear()

    def project(self, negatives: tuple[bool, ...], module) -> tuple[torch.Tensor, torch.Tensor]:
        key = (id(module), negatives)
        if not self.cached or key not in self._kv:
            name = self.names[id(module)]
            coarse = torch.cat([self.neg[0] if n else self.pos[0] for n in negatives])
            fine = torch.cat([self.neg[1] if n else self.pos[1] for n in negatives])
            k = self.adapter.to_k[name](coarse)
            v = self.adapter.to_v[name](fine)
            heads = module.heads
            self._kv[key] = tuple(t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (k, v))
        return self._kv[key]


class VisualPrompts(Method):
    """The visual prompts of a job (module docstring)."""

    name = "visual"
    batchable = False

    @classmethod
    def wants(cls, plan, job) -> bool:
        return bool(getattr(job, "visuals", None))

    def capabilities(self) -> tuple[str, ...]:
        return ("visual",) + (("ip-adapter",) if any(v.mode == "ip-adapter" for v in self.run.job.visuals) else ())

    def setup(self) -> None:
        run, be = self.run, self.run.backend
        model = be.transformer if getattr(be, "transformer", None) is not None else be.unet  # Flux | UNet
        self.joint = {s.name for s in be.sites if s.text and s.image_keys}
        self.cross = {s.name for s in be.sites if s.text and not s.image_keys}
        self.single = {s.name for s in be.sites if s.single_stream}  # coupling mixes two branches there
        layers = attention_layers(model, self.joint | self.cross)
        self.prompts = []
        # adapters and encoders are read once per loaded model, not once per job (a batch build reuses them);
        # the few most recent only (an image encoder is up to ~2.5 GB in bf16: ViT-bigG for SDXL's)
        loaded = be.__dict__.setdefault("visual_models", OrderedDict())
        # the encoder in the model's dtype on a GPU (its outputs are upcast), float32 on the CPU
        enc_dtype = be.dtype if be.device.type == "cuda" else torch.float32
        for vp in run.job.visuals:
            # a changed file (the adapter, or its image encoder's) is read again
            key = (vp.mode, vp.adapter_sha256, vp.adapter, file_stamp(vp.adapter), dir_stamp(vp.encoder))
            if key not in loaded:
                for old in [k for k in loaded if k[2] == vp.adapter and k[0] == vp.mode]:
                    del loaded[old]  # the same file before it changed
                adapter, encoder, proc, used = self._load(vp, layers, model)
                adapter.to(device=be.device, dtype=torch.float32)
                encoder.to(device=be.device, dtype=enc_dtype)
                loaded[key] = adapter, encoder, proc, used
                while len(loaded) > MAX_LOADED:
                    loaded.popitem(last=False)
            loaded.move_to_end(key)
            adapter, encoder, proc, used = loaded[key]
            names = {id(mod): layer_key(name) for name, mod in used.items()}
            # the image's tokens once per adapter and image, not once per job (a scene's seeds share them)
            tokens = be.__dict__.setdefault("visual_tokens", OrderedDict())
            tkey = (key, vp.sha256)
            if tkey not in tokens:
                tokens[tkey] = _encode(encoder, proc, adapter, run.plan.tensor(vp.image), be.device)
                while len(tokens) > 8 * MAX_LOADED:
                    tokens.popitem(last=False)
            pos, neg = tokens[tkey]
            visible = {}
            for g in be.image_grids:
                h, w = run.plan.grid(g)
                visible[h * w] = region_membership([run.plan.mask(vp.masks, g)], (h, w))[0].to(be.device)
            self.prompts.append(VisualPrompt(vp, adapter, pos, neg, visible, names, (encoder, proc)))

    def _load(self, vp, layers, model):
        """(adapter, image encoder, its processor, the attention layers it serves)."""
        from ..tiny import tiny_clip_vision

        tiny = getattr(self.run.backend, "model_id", "") in ("tiny", "tiny-sd", "tiny-sdxl")
        if vp.mode == "ip-adapter":
            if vp.adapter is None:
                raise PlanError(f"visual prompt {vp.entity!r}: ip-adapter mode needs an adapter")
            adapter, enc, used = load_ip(vp, model, tiny)
            return (adapter, *(tiny_clip_vision(projection=True) if enc is None else image_encoder(enc, True)), used)
        if vp.adapter is None:
            if not tiny:
                raise PlanError(f"visual prompt {vp.entity!r}: no adapter, and only the tiny models build one")
            encoder, proc = tiny_clip_vision()
            return tiny_adapter(layers, encoder.config.hidden_size), encoder, proc, layers
        adapter, enc = load_adapter(vp.adapter, vp.adapter_sha256, layers)
        return (adapter, *image_encoder(enc), layers)

    def before_denoise(self, n: int, op) -> None:
        from .visual_refine import refine

        for p in self.prompts:
            if p.vp.refines(op.from_):
                if coupled_weight(self.run.job, op) <= 0:  # the compiler refuses it; a hand-made plan may not
                    raise PlanError(f"visual prompt {p.vp.entity!r}: refine at step {op.from_}, where the "
                                    "group's θ is 0 (the tokens act on nothing there)")
                refine(self.run, p, op)

    def modifiers(self, call) -> list:
        from ..attention import ExtraKV

        mods = []
        negatives = tuple(call.negatives)
        th = coupled_weight(self.run.job, call)
        if th <= 0:  # a coupling group's θ = 0 steps: the background alone (its images stay identical)
            return mods
        for p in self.prompts:
            if not p.vp.acts(call.level):
                continue
            # kv-mixed: one softmax on joint sites, decoupled on cross ones; IP-Adapter: decoupled on its layers'
            # sites (Flux: added to the block's residual stream)
            ip = p.vp.mode == "ip-adapter"
            kinds = ((p.adapter.sites, True, p.adapter.residual),) if ip else \
                ((self.joint, False, False), (self.cross, True, False))
            for sites, decoupled, residual in kinds:
                # coupled (0 < θ < 1): the tokens are the entity stream's — weight θ where coupling scales the
                # entity keys, their own scale inside the entity branch of single-stream blocks (mixed by θ)
                parts = ((sites, p.vp.scale),) if th >= 1 else \
                    ((sites & self.single, p.vp.scale), (sites - self.single, p.vp.scale * th))
                for part, scale in parts:
                    if part:
                        mods.append(ExtraKV(None, None, p.visible, scale, frozenset(part),
                                            project=partial(p.project, negatives), decoupled=decoupled,
                                            residual=residual))
        return mods


def coupled_weight(job, call) -> float:
    """The entity stream's weight in a call: θ in a coupled job (arXiv 2506.06826; 0 before its θ rises),
    else 1."""
    return min(1.0, float(call.theta or 0.0)) if job.coupled else 1.0


def negative_pixels(adapter, proc, pix: torch.Tensor, rgb: np.ndarray) -> torch.Tensor:
    """The negative (guidance) branch's encoder input for an image of pixel values ``pix`` (``rgb``): zero
    pixel values (SD's IP-Adapter, and kv-mixed adapters), or an all-black image (Flux's IP-Adapter, as
    FluxPipeline). The kv-mixed trainer drops the image with this input (condition dropout)."""
    from PIL import Image

    if getattr(adapter, "black_negative", False):
        black = Image.fromarray(np.zeros_like(np.asarray(rgb, np.uint8)))
        return proc(images=black, return_tensors="pt").pixel_values.to(pix.device)
    return torch.zeros_like(pix)


@torch.no_grad()  # the tokens are inputs: refine makes its own leaf of the values
def _encode(encoder, proc, adapter, rgb: np.ndarray, device) -> tuple[tuple, tuple]:
    """(key, value) tokens of the image and of the negative branch (the adapter's ``pair``), float32."""
    from PIL import Image

    def pixels(a):
        return proc(images=Image.fromarray(np.asarray(a, np.uint8)), return_tensors="pt").pixel_values.to(device)

    pix = pixels(rgb)
    blank = negative_pixels(adapter, proc, pix, rgb)
    pos, neg = (_upcast(encoder(pixel_values=x.to(encoder.dtype), output_hidden_states=True)) for x in (pix, blank))
    return adapter.pair(pos, neg)


def _upcast(out) -> SimpleNamespace:
    """An encoder's outputs in float32 (the adapters' dtype), whatever the encoder ran in."""
    return SimpleNamespace(**{k: tuple(t.float() for t in v) if isinstance(v, tuple) else v.float()
                              for k, v in out.items()})
