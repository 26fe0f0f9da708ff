"""LoRAs at run time: adapters read from their files, and the forward hooks that add their deltas.

A LoRA adapts a linear (or convolution) layer W by a low-rank delta: y = W·x + b + s·B·A·x, with
s = alpha / rank (1 when the file gives no alpha) times the scene's scale. scenec never changes a
model's weights: one forward hook per adapted layer adds, for each LoRA on it, its delta times a
per-token weight — the LoRA's global scale on every token, plus each entity LoRA's scale on that
entity's tokens (runtime/methods/lora.py) — so one loaded model serves every LoRA set, and a LoRA
with weight 0 for a token leaves that token's output exactly the base layer's.

Files are read as safetensors and converted to diffusers' module names: the diffusers/peft, kohya and
xlabs formats by the pipeline's own ``lora_state_dict`` (diffusers' converters), DiffSynth-Studio's
(EliGen's) by the name table of compiler/lora.py (fused q/k/v and q/k/v/MLP split into their parts,
one A shared by the parts). Text-encoder layers are left out (the compiler warns). What the file
cannot tell at compile time — a layer the loaded model lacks, sizes that do not fit it — is one
:class:`LoraError` sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from scenec.compiler.lora import diffsynth_targets, split_key
from scenec.spec.errors import PlanError

TEXT_ENCODERS = ("text_encoder.", "text_encoder_2.", "lora_te")


class LoraError(PlanError):
    """A LoRA that cannot be applied to the loaded model (one sentence)."""


@dataclass
class Layer:
    """One adapted layer: ``A`` ``[r, in]`` (conv: ``[r, in, kh, kw]``), ``B`` ``[out, r]`` (conv:
    ``[out, r, 1, 1]``) and ``scale`` = alpha / r. Copies on each device are kept (offloading)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    _on: dict = field(default_factory=dict, repr=False)

    def tensors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.device, like.dtype)
        if key in self._on and self._on[key][0].is_inference() and not torch.is_inference_mode_enabled():
            del self._on[key]  # made under a caller's inference_mode: autograd (visual.refine) cannot save it
        if key not in self._on:
            self._on[key] = (self.A.to(like.device, like.dtype), self.B.to(like.device, like.dtype))
        return self._on[key]

    def delta(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """s·B·A·x for a Linear (``x`` ``[..., in]``) or a Conv2d (``x`` ``[B, in, H, W]``, A with the
        layer's stride, padding and dilation)."""
        a, b = self.tensors(x)
        if isinstance(module, torch.nn.Conv2d):
            h = F.conv2d(x, a, None, module.stride, module.padding, module.dilation)
            return F.conv2d(h, b) * self.scale
        return F.linear(F.linear(x, a), b) * self.scale


@dataclass
class Adapter:
    """A LoRA file's layers by module name (relative to the family's denoiser); ``text``: its text-encoder
    layers by pipeline component (``text_encoder``, ``text_encoder_2``), read when the plan asks for them."""

    sha256: str
    name: str
    layers: dict[str, Layer]
    text: dict[str, dict[str, Layer]] = field(default_factory=dict)


def read_adapter(lora, backend) -> Adapter:
    """Read a plan LoRA (``spec.plan.Lora``) for ``backend``'s denoiser and check it against the model."""
    from safetensors import safe_open

    try:
        with safe_open(lora.path, framework="pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
            meta = f.metadata() or {}
    except (OSError, RuntimeError, ValueError) as e:
        raise LoraError(f"LoRA `{lora.name}`: cannot read {lora.path} ({type(e).__name__}: {e})") from None
    text_pairs: dict = {}
    if lora.format == "diffsynth":
        pairs = _from_diffsynth(raw)
    else:
        pairs = _from_diffusers(raw, backend, lora, text_pairs)
    default_alpha = _metadata_alpha(meta)
    layers = _layers(lora, pairs, backend.denoiser, backend, default_alpha)
    text = {}
    if getattr(lora, "text_encoder", False):
        for comp, tp in text_pairs.items():
            enc = getattr(backend.pipe, comp, None)
            if enc is None:
                raise LoraError(f"LoRA `{lora.name}` adapts `{comp}`, which {backend.model_id} does not have")
            text[comp] = _layers(lora, tp, enc, backend, default_alpha)
    if not layers and not any(text.values()):  # a text-encoder-only LoRA acts through its text layers alone
        raise LoraError(f"LoRA `{lora.name}` adapts no layer of {backend.model_id}")
    return Adapter(lora.sha256, lora.name, layers, text)


def _layers(lora, pairs: dict, root: torch.nn.Module, backend, default_alpha: float | None) -> dict[str, Layer]:
    """``pairs`` (module → its A, B, alpha) as :class:`Layer` s of ``root``'s modules, checked."""
    layers = {}
    mods = dict(root.named_modules())
    for name, parts in pairs.items():
        mod = mods.get(name)
        if mod is None or not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            raise LoraError(f"LoRA `{lora.name}`: layer `{name}` is not a linear or convolution layer of "
                            f"{backend.model_id}")
        a, b = parts.get("A"), parts.get("B")
        if a is None or b is None:
            raise LoraError(f"LoRA `{lora.name}`: layer `{name}` lacks its {'A' if a is None else 'B'} matrix")
        _check_shapes(lora, name, mod, a, b, backend)
        r = a.shape[0]
        alpha = parts.get("alpha", default_alpha)
        layers[name] = Layer(a.float(), b.float(), float(alpha) / r if alpha is not None else 1.0)
    return layers


def _check_shapes(lora, name: str, mod, a: torch.Tensor, b: torch.Tensor, backend) -> None:
    if isinstance(mod, torch.nn.Linear):
        want_a, want_b = (a.shape[0], mod.in_features), (mod.out_features, a.shape[0])
        got_a, got_b = tuple(a.shape), tuple(b.shape)
    else:
        want_a, want_b = (a.shape[0], mod.in_channels, *mod.kernel_size), (mod.out_channels, a.shape[0], 1, 1)
        got_a, got_b = tuple(a.shape), tuple(b.shape)
        if len(got_a) == 2:  # a linear LoRA on a 1×1 convolution (proj_in on SD 1.x)
            got_a, got_b = got_a + (1, 1), got_b + (1, 1)
    if got_a != want_a or got_b != want_b:
        raise LoraError(f"LoRA `{lora.name}`: layer `{name}` of {backend.model_id} takes A {list(want_a)} and B "
                        f"{list(want_b)}, the LoRA has A {list(a.shape)} and B {list(b.shape)} (a LoRA for another "
                        "model?)")


def _metadata_alpha(meta: dict) -> float | None:
    """The ``lora_alpha`` a diffusers/peft file's metadata gives for all its layers, if any."""
    import json

    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    for d in [doc, *[v for v in doc.values() if isinstance(v, dict)]] if isinstance(doc, dict) else []:
        if isinstance(d.get("lora_alpha"), (int, float)):
            return float(d["lora_alpha"])
    return None


def _group(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        s = split_key(k)
        if s is not None:
            out.setdefault(s[0], {})[s[1]] = v
    return out


def _from_diffsynth(raw: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """DiffSynth-Studio's Flux DiT names → diffusers' (compiler/lora.py ``diffsynth_targets``)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for module, roles in _group(raw).items():
        targets = diffsynth_targets(module)
        if targets is None:
            raise LoraError(f"`{module}` is not a layer of DiffSynth-Studio's Flux DiT")
        b = roles.get("B")
        for name, part in targets:
            mine = dict(roles)
            if b is not None and part == "swap":
                half = b.shape[0] // 2
                mine["B"] = torch.cat([b[half:], b[:half]])
            elif b is not None and part is not None:
                lo, hi, n = part
                if b.shape[0] % n:
                    raise LoraError(f"`{module}`: B has {b.shape[0]} rows, not a multiple of its {n} fused parts")
                unit = b.shape[0] // n
                mine["B"] = b[lo * unit:hi * unit].contiguous()
            out[name] = mine
    return out


def _from_diffusers(raw: dict[str, torch.Tensor], backend, lora, text: dict | None = None
                    ) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers/peft, kohya and xlabs files through the pipeline's ``lora_state_dict`` (diffusers' own
    converters), then diffusers' older attention-processor names to module names. Text-encoder layers go to
    ``text`` (component → module → roles) in the text encoders' own module names."""
    import warnings

    from diffusers.utils.state_dict_utils import UNET_TO_DIFFUSERS

    cls = type(backend.pipe)
    kw = {"unet_config": backend.denoiser.config} if backend.family == "sdxl" else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = cls.lora_state_dict(dict(raw), **({"return_alphas": True} if backend.family == "flux" else kw))
    except (ValueError, KeyError, AssertionError, RuntimeError) as e:
        raise LoraError(f"LoRA `{lora.name}`: diffusers cannot convert its {lora.format} keys "
                        f"({type(e).__name__}: {str(e)[:200]})") from None
    state, alphas = got if isinstance(got, tuple) else (got, None)
    state = dict(state)
    for k, v in (alphas or {}).items():
        state[k if k.endswith(".alpha") else k + ".alpha"] = torch.as_tensor(v)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in state.items():
        if key.startswith(TEXT_ENCODERS):
            if text is not None:
                _text_key(key, v, text)
            continue
        for old, new in UNET_TO_DIFFUSERS.items():
            key = key.replace(old, new)
        key = key.replace(".processor.", ".")
        for p in ("transformer.", "unet.", "base_model.model."):
            if key.startswith(p):
                key = key[len(p):]
                break
        if key.endswith((".lora_A.weight.alpha", ".lora_B.weight.alpha")):
            key = key.rsplit(".lora_", 1)[0] + ".alpha"
        s = split_key(key)
        if s is None:
            raise LoraError(f"LoRA `{lora.name}`: `{key}` is not a LoRA key after conversion")
        out.setdefault(s[0], {})[s[1]] = v.float() if s[1] == "alpha" and v.ndim == 0 else v
    for roles in out.values():
        if "alpha" in roles:
            roles["alpha"] = float(roles["alpha"])
    return out


def _text_key(key: str, v: torch.Tensor, text: dict) -> None:
    """One converted text-encoder key (``text_encoder[_2].<module>…``, diffusers' older ``to_q_lora`` /
    ``lora_linear_layer`` names or peft's) into ``text[component][module][role]``."""
    from diffusers.utils.state_dict_utils import DIFFUSERS_OLD_TO_PEFT

    comp, rest = key.split(".", 1)
    if comp not in ("text_encoder", "text_encoder_2"):
        return  # kohya names diffusers could not convert: left out, as the compiler's warning says
    for old, new in DIFFUSERS_OLD_TO_PEFT.items():
        rest = rest.replace(old, new)
    if rest.endswith((".lora_A.weight.alpha", ".lora_B.weight.alpha")):
        rest = rest.rsplit(".lora_", 1)[0] + ".alpha"
    s = split_key(rest)
    if s is not None:
        text.setdefault(comp, {}).setdefault(s[0], {})[s[1]] = float(v) if s[1] == "alpha" else v


# --- applying them ------------------------------------------------------------------------------------

class TokenWeights:
    """One model call's per-token LoRA weights (runtime/methods/lora.py builds them from the call's text).

    ``text[sha]``: float ``[B, n_text]`` (text tokens of the call's sequence); ``image[sha][n]``: float
    ``[B, n]`` on the image grid of ``n`` tokens. It travels with the call's attention modifiers (for
    exactly that forward) but no attention site reads it (``sites`` is empty). ``rows_bound``: built for
    this call's rows, so a family must not run it on another call's rows (SD's batched CFG)."""

    sites: frozenset[str] = frozenset()
    rows_bound = True

    def __init__(self, text: dict, image: dict):
        self.text, self.image = text, image
        self.cache: dict = {}  # the weights as each layer shape wants them: built once per call, not per layer


class Hooks:
    """The forward hooks of a run's LoRAs on the family's denoiser (removed by :meth:`remove`).

    ``adapters``: sha256 → :class:`Adapter`; ``global_scale``: sha256 → the scale it has on every token
    (0 for an entity-only LoRA). ``kind(name)`` is the family's ``token_kind``: which tokens a layer sees
    ("text", "image", "joint" = text then image, None = no tokens: it keeps the global scale only).
    ``current()`` gives the forward's :class:`TokenWeights`, or None (then only the global scales act)."""

    def __init__(self, root: torch.nn.Module, adapters: dict[str, Adapter], global_scale: dict[str, float],
                 kind, current):
        self.global_scale, self.current = global_scale, current
        by_module: dict[str, list[tuple[str, Layer]]] = {}
        for sha, ad in adapters.items():
            for name, layer in ad.layers.items():
                by_module.setdefault(name, []).append((sha, layer))
        mods = dict(root.named_modules())
        self.handles = [mods[name].register_forward_hook(self._hook(name, kind(name), layers))
                        for name, layers in by_module.items()]

    def _hook(self, name: str, kind: str | None, layers: list[tuple[str, Layer]]):
        def hook(module, args, out):
            tw = self.current() if kind is not None else None
            x = args[0]
            for sha, layer in layers:
                w = self._weight(tw, sha, kind, out)
                if w is None:
                    continue
                out = out + layer.delta(module, x) * w
            return out
        return hook

    def _weight(self, tw: TokenWeights | None, sha: str, kind: str | None, out: torch.Tensor):
        """The weight of LoRA ``sha`` on this output: a float (every token), a tensor broadcasting against
        ``out``, or None (nothing to add). Every adapted layer of one call with the same token layout gets
        the same weight: it is built once per call (``TokenWeights.cache``)."""
        if tw is None:
            return self._build_weight(tw, sha, kind, out)
        key = (sha, kind, tuple(out.shape[1:]) if out.dim() == 4 else out.shape[1], out.dtype, out.device)
        if key not in tw.cache:
            tw.cache[key] = self._build_weight(tw, sha, kind, out)
        return tw.cache[key]

    def _build_weight(self, tw: TokenWeights | None, sha: str, kind: str | None, out: torch.Tensor):
        g = self.global_scale.get(sha, 0.0)
        text = tw.text.get(sha) if tw is not None else None
        image = tw.image.get(sha) if tw is not None else None
        if text is None and image is None:
            return g if g != 0.0 else None
        if out.dim() == 4:  # a convolution: image tokens on its output grid
            n = out.shape[-2] * out.shape[-1]
            w = _image(image, n, out)
            return None if w is None else (g + w).reshape(w.shape[0], 1, *out.shape[-2:]).to(out.dtype)
        n = out.shape[1]
        if kind == "text":
            w = text if text is not None and text.shape[1] == n else None
        elif kind == "image":
            w = _image(image, n, out)
        else:  # joint: the call's text, then its image tokens
            nt = text.shape[1] if text is not None else None
            if nt is None or nt > n:
                w = None
            else:
                img = _image(image, n - nt, out)
                w = torch.cat([text, img if img is not None else text.new_zeros(text.shape[0], n - nt)], 1)
        if w is None:
            return g if g != 0.0 else None
        return (g + w)[..., None].to(out.dtype)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _image(image: dict | None, n: int, out: torch.Tensor) -> torch.Tensor | None:
    if not image or n not in image:
        return None
    return image[n].to(out.device)
