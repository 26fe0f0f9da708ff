"""What a model family provides to the sampler and the methods: the :class:`Backend` protocol.

A family (runtime/families/) is one module with one class implementing this protocol, registered by
name in runtime/families/__init__.py. It holds only what is model-specific: loading, text encoders
and how text sequences are assembled, latent layout (packing), the model call under the current
attention modifiers, the solver over its noise levels, and the VAE. Everything a method does is
written once against this protocol (runtime/methods/), and the loop that runs a job is one
(runtime/sampler.py).

The types the two sides exchange live here too: a model call asks for text by :class:`TextSpec`
(which streams, in which order) and gets a :class:`Cond` back (the sequence, pooled vectors and the
token layouts the attention masks are built from).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from scenec.spec.errors import ModelUnavailable, PlanError

from .attention import Attention, Mask, Site
from .layout import BatchLayout, BuiltMask, RegionalLayout, build_mask, region_membership, text_bucket


@dataclass(frozen=True)
class Stream:
    """One text condition: its prompt and negative (prompt indices), how it is encoded, and its region.

    ``as_global``: encoded like a global prompt (padded to the model's text length, with a pooled
    vector); otherwise like an EliGen entity prompt (its real tokens, or ``pad_prompts``)."""

    prompt: int
    negative: int
    as_global: bool = False
    masks: tuple[tuple[str, str], ...] | None = None  # the region: (grid, tensor name) pairs; None = whole canvas
    lora: tuple[tuple[str, float], ...] = ()  # the entity's LoRAs: (sha256, scale) (runtime/methods/lora.py)

    @classmethod
    def entity(cls, e, as_global: bool = False) -> "Stream":
        """The stream of a plan entity (``spec.plan.EntityStream``)."""
        return cls(e.prompt, e.negative, as_global, None if e.masks is None else tuple(sorted(e.masks.items())),
                   tuple((lo.sha256, lo.scale) for lo in e.lora))

    def text(self, negative: bool) -> int:
        return self.negative if negative else self.prompt

    @property
    def mask_ref(self) -> dict | None:
        return None if self.masks is None else dict(self.masks)


@dataclass(frozen=True)
class TextSpec:
    """The text of one model call, in sequence order: ``[global | entities… | pad]``.

    ``global_`` None leaves the global slot empty (image tokens outside every region see no text).
    ``pooled`` names the streams whose pooled vectors condition the call (families with one, e.g.
    Flux's CLIP); a call mixes several with weights (coupling)."""

    global_: Stream | None
    entities: tuple[Stream, ...] = ()
    pooled: tuple[Stream, ...] = ()

    @property
    def regional(self) -> bool:
        """Whether the text has entity-encoded streams: then it has a token layout (and padding)."""
        return any(not e.as_global for e in self.entities)


@dataclass
class Cond:
    """The text of one model call for every batch row, assembled by the family.

    ``seq``: ``[B, L, D]`` with padding; ``pooled``: one ``[B, Dp]`` per ``TextSpec.pooled`` stream
    (empty when the family has none); ``lengths``: tokens per stream of row 0, the global slot first;
    ``layouts``: image token count → layout (one per attention grid), or empty without entity streams.
    Masks are built from the layouts once, on first use, and kept."""

    seq: torch.Tensor
    pooled: list[torch.Tensor]
    lengths: list[int]
    layouts: dict[int, Any] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # family-specific (Flux: txt_ids)
    _masks: dict = field(default_factory=dict, repr=False)

    @property
    def n_text(self) -> int:
        return self.seq.shape[1]

    def needs(self, rule: str) -> bool:
        """Whether attention under ``rule`` masks anything: ``regional`` with entity streams, ``open``
        only where there is padding."""
        return any(lay.needs_mask(rule) for lay in self.layouts.values())

    def mask(self, rule: str, impl: str, device, sites) -> Mask:
        """The layouts' masks under ``rule`` for ``sites`` (built once per rule and kernel)."""
        key = (rule, impl)
        if key not in self._masks:
            self._masks[key] = {n: build_mask(lay, impl, device, rule) for n, lay in self.layouts.items()}
        return Mask(self._masks[key], frozenset(sites))


@dataclass
class Call:
    """One model call as the methods shape it, then the family runs it.

    ``rows``/``negatives``: which batch rows the call holds and, per row, whether it is the negative
    (guidance) branch. The sampler fills ``specs`` (each row's job streams), ``level``, ``regional`` and
    ``theta`` from the op; methods may change ``specs`` and ``pooled_weights`` (coupling), and add
    ``mods`` (attention modifiers) once ``cond`` is assembled."""

    rows: list[int]
    negatives: list[bool]
    specs: list[TextSpec]
    level: int
    regional: bool = True
    theta: float | None = None
    pooled_weights: tuple[float, ...] | None = None  # mix of Cond.pooled (None: the first as is)
    cond: Cond | None = None
    mods: list = field(default_factory=list)
    # methods' ``denoiser_inputs`` for this call: the family calls each with (call, model input, t, kwargs so far)
    inputs: list = field(default_factory=list)


class Backend(Protocol):
    """A loaded model of one family (see the module docstring)."""

    family: str
    model_id: str
    device: torch.device
    dtype: torch.dtype
    attn: Attention
    sites: tuple[Site, ...]  # the family's attention sites
    image_grids: tuple[str, ...]  # plan grids with image–image attention (SOW biases live there)
    mask_impl: str  # the kernel form of masks over text ("sdpa" | "flex" | "cross")
    denoiser: Any  # the transformer or UNet (LoRAs adapt its layers, runtime/lora.py)

    def token_kind(self, module: str) -> str | None:
        """Which tokens a layer of the denoiser sees (``module`` relative to it): "text", "image" (an image
        grid's tokens), "joint" (the call's text, then its image tokens), or None (no tokens, e.g. the
        time embedding and AdaLN modulation). An entity LoRA acts on its own tokens only through it."""

    def clear_cache(self) -> None:
        """Drop cached text encodings (after a plan, unless a batch build keeps them)."""

    def solver(self, plan) -> Any:
        """The solver over the plan's noise levels (runtime/solvers.py)."""

    def prepare_latents(self, plan, seed: int) -> tuple[torch.Tensor, torch.Generator]:
        """One row's initial noise as the family's pipeline draws it, and the generator after it."""

    def guided(self, plan) -> bool:
        """Whether a negative (guidance) branch runs besides the positive one."""

    def cond(self, rows: list[tuple[Any, TextSpec, bool]]) -> Cond:
        """Encode (cached) and assemble the text of one call: ``(plan, spec, negative)`` per batch row."""

    def predict(self, run, x: torch.Tensor, level: int, call: Callable[[list[tuple[int, bool]]], Call]) -> torch.Tensor:
        """The guided model output at ``level``. ``call(rows)`` gives a shaped :class:`Call` for the given
        ``(row, negative)`` pairs; the family makes the calls it needs (a guidance branch, or both
        batched) and runs each under its modifiers."""

    def encode_image(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 ``[H, W, 3]`` → latent in the family's layout and the model's dtype (VAE mode)."""

    def latent_mask(self, m: np.ndarray) -> torch.Tensor:
        """A float mask on the latent grid → a tensor that broadcasts against the latents."""

    def decode(self, x: torch.Tensor, plan) -> Any:
        """One row's final latent → PIL image, as the family's pipeline decodes."""

    def latent_image(self, x: torch.Tensor, plan) -> torch.Tensor:
        """One row's latent in the family's layout → ``[1, C, h, w]`` on the plan's latent grid (the VAE's latent
        image: what is resized in latent space, runtime/hires.py)."""

    def latent_layout(self, z: torch.Tensor) -> torch.Tensor:
        """The reverse of :meth:`latent_image`: ``[1, C, h, w]`` → the family's layout."""


# --- shared by the families ------------------------------------------------------------------------

def parse_dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    try:
        return table[str(d).lower()]
    except KeyError:
        raise PlanError(f"unknown dtype {d!r} (use bf16, fp16 or fp32)") from None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def from_single_file(cls, path: str, config: str, dtype, **kw):
    """``cls.from_single_file``: a single-file checkpoint in the original (LDM) layout with the diffusers
    configs of ``config`` (a local directory, or a hub id whose config files the compiler found in the Hugging
    Face cache: ``local_files_only``; diffusers fetches the missing JSON/tokenizer files, never weights).
    Safetensors only (the compiler refuses pickle files); one sentence when it does not load."""
    import warnings

    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from diffusers.utils import logging as diffusers_logging

    level, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components…"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pipe = cls.from_single_file(path, config=config, torch_dtype=dtype, local_files_only=True, **kw)
    except SingleFileComponentError as e:  # a component's weights are not in the file (a "no-VAE" release)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelUnavailable(f"{path} does not load as a single-file checkpoint: {first[:200]}") from e
    except (OSError, EnvironmentError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelUnavailable(f"{path} does not load as a single-file checkpoint with the configs of {config!r} "
                               f"({type(e).__name__}: {first[:200]}); check that `config` names a model of the "
                               "checkpoint's architecture") from e
    finally:
        diffusers_logging.set_verbosity(level)
        if bars:
            diffusers_logging.enable_progress_bar()
    # diffusers leaves a tensor the file lacks (for configs of another architecture) on the meta device, unloaded
    missing = [f"{name}.{k}" for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)
               for k, t in [*m.named_parameters(), *m.named_buffers()] if t.is_meta]
    if missing:
        raise ModelUnavailable(f"{path} does not fit the configs of {config!r}: {len(missing)} of the model's tensors "
                               f"are not in the file (the first: {missing[0]}); name configs of the checkpoint's "
                               "architecture with `config`")
    return pipe


def from_pretrained(cls, repo: str, dtype, **kw):
    """``cls.from_pretrained`` from a hub id or a local diffusers directory, safetensors only, with one
    sentence on how to get the weights when they are not here."""
    looks_local = repo.startswith((".", "/", "~")) or Path(repo).exists()
    if looks_local:
        p = Path(repo).expanduser()
        if not (p / "model_index.json").is_file():
            raise ModelUnavailable(f"{repo}: not a diffusers model directory (no model_index.json); "
                                   "point --model at a directory saved with save_pretrained or a hub id")
        repo = str(p)
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging

    level, d_level = hub_logging.get_verbosity(), diffusers_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # no retry chatter: one sentence below says what to do
    diffusers_logging.set_verbosity_error()  # "Couldn't connect to the Hub … will try the local cache"
    bars = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components…"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return cls.from_pretrained(repo, torch_dtype=dtype, use_safetensors=True, **kw)
    except (OSError, EnvironmentError, ValueError) as e:
        if looks_local:
            raise ModelUnavailable(f"weights of {repo!r} are not available here ({type(e).__name__}): the directory "
                                   "is not a complete diffusers model; point --model at one saved with "
                                   "save_pretrained, or at a hub id") from e
        raise ModelUnavailable(f"weights of {repo!r} are not available here ({type(e).__name__}); get them with "
                               f"`hf download {repo}` (after `hf auth login` and accepting its licence on the hub "
                               "if it is gated, as FLUX.1-dev is), or point --model at a local diffusers "
                               "directory") from e
    finally:
        hub_logging.set_verbosity(level)
        diffusers_logging.set_verbosity(d_level)
        if bars:
            diffusers_logging.enable_progress_bar()


def load_pipeline(cls, model, device, dtype, cuda_dtype: torch.dtype, tiny: str, build_tiny: Callable, repo: str,
                  offload: str = "none", quantize: str = "none", **kw) -> tuple[Any, str, torch.device, torch.dtype]:
    """A family's diffusers pipeline for a plan's model: (pipe, model id, device, dtype).

    Device defaults to CUDA when available; dtype to ``cuda_dtype`` on CUDA and fp32 on CPU. The
    offline ``tiny`` model of the family is built in code (``build_tiny(dtype, device)`` gives the
    pipeline's components); anything else loads with :func:`from_pretrained` from ``repo``. ``offload``
    and ``quantize``: the memory modes (runtime/memory.py; a quantised ``tiny`` is saved to a temporary
    directory and loaded back through the quantiser, as real weights are)."""
    from . import memory

    dev = torch.device(device) if device is not None else default_device()
    dt = parse_dtype(dtype) if dtype is not None else (cuda_dtype if dev.type == "cuda" else torch.float32)
    quant = memory.quantization_config(quantize, model.family, dt)
    if quant is not None:
        kw["quantization_config"] = quant
    is_tiny = (model.spec or tiny) == tiny and not model.repo
    if is_tiny and quant is None:
        pipe, model_id = cls(**build_tiny(dt, torch.device("cpu") if offload != "none" else dev)), tiny
        if offload != "none":
            memory.place(pipe, dev, offload)
    elif is_tiny:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="scenec-tiny-") as tmp:
            cls(**build_tiny(dt, torch.device("cpu"))).save_pretrained(tmp)
            pipe, model_id = from_pretrained(cls, tmp, dt, **kw), tiny
            memory.place(pipe, dev, offload)
    elif model.config is not None and quant is not None:
        # from_single_file takes no pipeline quantisation: through a diffusers directory, as the tiny models
        import tempfile

        kw.pop("quantization_config")
        with tempfile.TemporaryDirectory(prefix="scenec-single-file-") as tmp:
            from_single_file(cls, model.repo, model.config, dt, **kw).save_pretrained(tmp)
            pipe, model_id = from_pretrained(cls, tmp, dt, quantization_config=quant, **kw), model.spec
            memory.place(pipe, dev, offload)
    elif model.config is not None:  # a single-file checkpoint (compiler/single_file.py)
        pipe, model_id = from_single_file(cls, model.repo, model.config, dt, **kw), model.spec
        memory.place(pipe, dev, offload)
    else:
        pipe, model_id = from_pretrained(cls, repo, dt, **kw), repo
        memory.place(pipe, dev, offload)
    pipe.set_progress_bar_config(disable=True)
    return pipe, model_id, dev, dt


def host_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on ``device``: on a GPU through pinned memory without blocking the host (a pageable
    copy waits for every queued kernel: a sync inside the step loop); elsewhere a plain ``.to``."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def assemble(rows: list[tuple[list[torch.Tensor], dict[str, torch.Tensor | None]]], regional: bool, grids: dict,
             image_self: str, pad_multiple: int) -> tuple[torch.Tensor, list[int], dict[int, Any]]:
    """Pack each row's stream sequences back to back, pad every row to one length, and lay them out.

    ``rows``: per batch row, the stream sequences ``[1, n_s, D]`` (global slot first, possibly empty) and
    the entity regions per grid name (bool ``[k, h*w]``). Without entity streams (``regional`` False)
    rows of one length are only concatenated; rows of different lengths (a weighted prompt read in more
    77-token chunks than its negative, runtime/prompt_weights.py) are padded as below, the padding masked
    (``pad_masks``), which computes what each row alone would. Otherwise each row gets a
    :class:`RegionalLayout` per grid, its text padded to a bucket of ``pad_multiple``
    (:func:`~scenec.runtime.layout.text_bucket`) and to the longest row; several rows make a
    :class:`BatchLayout`. Returns (seq ``[B, L, D]``, row 0's stream lengths, image token count → layout)."""
    lengths = [[p.shape[1] for p in parts] for parts, _ in rows]
    if not regional and len({sum(ls) for ls in lengths}) == 1:
        return torch.cat([torch.cat(parts, dim=1) for parts, _ in rows]), lengths[0], {}
    n_to = None
    if len(rows) > 1:  # the longest row's text, padded as a row alone would be
        n_to = max(text_bucket(sum(ls), pad_multiple) for ls in lengths)
    layouts: dict[int, list] = {}
    seqs = []
    for (parts, regions), ls in zip(rows, lengths):
        lay = None
        for g, (h, w) in grids.items():
            reg = regions.get(g)
            lay = RegionalLayout(ls, reg if reg is not None else torch.zeros(0, h * w, dtype=torch.bool), image_self,
                                 pad_multiple, n_text_to=n_to)
            layouts.setdefault(h * w, []).append(lay)
        if lay is not None and lay.n_pad:
            parts = parts + [parts[0].new_zeros(1, lay.n_pad, parts[0].shape[2])]
        seqs.append(torch.cat(parts, dim=1))
    out = {n: (ls[0] if len(ls) == 1 else BatchLayout(ls)) for n, ls in layouts.items()}
    return torch.cat(seqs), lengths[0], out


def mix_pooled(call: Call, batch: int) -> torch.Tensor:
    """The call's pooled vector: the first of ``Cond.pooled``, or their mix by ``call.pooled_weights``
    (coupling: (1 − θ)·pooled_bg + θ·pooled_ent), one row per batch row."""
    pooled, w = call.cond.pooled, call.pooled_weights
    out = pooled[0]
    if w is not None:
        out = w[0] * pooled[0]
        for wi, p in zip(w[1:], pooled[1:]):
            out = out + wi * p
    return out if out.shape[0] == batch else out.expand(batch, -1)


def pad_masks(call: Call, sites, impl: str, device) -> list:
    """Padding never leaks: the ``open`` mask at every text site the methods left without a mask,
    where the call's text has padding (a padded forward then computes what the unpadded one does)."""
    cond = call.cond
    if not cond.needs("open"):
        return []
    covered = {s for m in call.mods if isinstance(m, Mask) for s in m.sites}
    free = [s.name for s in sites if s.text and s.name not in covered]
    return [cond.mask("open", impl, device, free)] if free else []


def regions_by_grid(plan, entities: tuple[Stream, ...], grids) -> dict[str, torch.Tensor]:
    """Bool ``[k, h*w]`` per grid name: which image tokens each entity stream's region holds."""
    return {g: region_membership([plan.mask(e.mask_ref, g) for e in entities], plan.grid(g)) for g in grids}


__all__ = ["Backend", "BuiltMask", "Call", "Cond", "Stream", "TextSpec", "assemble", "default_device",
           "from_pretrained", "load_pipeline", "mix_pooled", "pad_masks", "parse_dtype", "regions_by_grid"]
