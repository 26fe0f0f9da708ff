"""Memory modes: how a model is placed and stored (``scenec build --offload``, ``--quantize``; docs/models.md).

- ``--offload model``: diffusers' ``enable_model_cpu_offload`` — each component (text encoders,
  transformer or UNet, VAE) moves to the GPU for its own forward and back; the GPU holds one at a time.
- ``--offload sequential``: ``enable_sequential_cpu_offload`` — submodule by submodule (accelerate's
  hooks); the least GPU memory, and the slowest.
- ``--quantize nf4 | int8 | fp8``: the transformer or UNet, and Flux's T5, are quantised as they load,
  through diffusers' ``PipelineQuantizationConfig`` (nf4 and int8: bitsandbytes; fp8: torchao's
  float8 weight-only), an optional extra (``pip install 'scenec[quant]'``).
- Canvases above 1024² px decode with the VAE tiled (``vae.enable_tiling``): the decoder's activations
  are the largest single allocation at that size.

A mode that cannot run here (no CUDA, the extra not installed) is one sentence (:func:`problem`), which
the command line prints before anything loads (exit 2). :func:`peak` is what each image's sidecar records.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager

OFFLOAD = ("none", "model", "sequential")
QUANTIZE = ("none", "nf4", "int8", "fp8")
QUANT_EXTRA = "pip install 'scenec[quant]' (in a clone: pip install -e '.[quant]')"
QUANT_LIBRARY = {"nf4": "bitsandbytes", "int8": "bitsandbytes", "fp8": "torchao"}
QUANTIZED = {"flux": ("transformer", "text_encoder_2"), "sd": ("unet",), "sdxl": ("unet",)}  # components
TILE_ABOVE = 1024 * 1024  # canvases with more pixels decode tiled
FP8_CAPABILITY = (8, 9)  # float8 matmuls: Ada and Hopper


def problem(offload: str, quantize: str, device: str | None, values_only: bool = False) -> str | None:
    """Why ``--offload``/``--quantize`` cannot run here, in one sentence; None when they can. ``values_only``:
    check the values alone (a dry run, which loads no model)."""
    if offload not in OFFLOAD:
        return f"--offload must be none, model or sequential, not `{offload}`"
    if quantize not in QUANTIZE:
        return f"--quantize must be none, nf4, int8 or fp8, not `{quantize}`"
    if offload == "none" and quantize == "none":
        return None if values_only else device_problem(device)
    asked = " and ".join(f"--{k} {v}" for k, v in (("offload", offload), ("quantize", quantize)) if v != "none")
    if device is not None and not device.startswith("cuda"):
        return f"{asked} needs a CUDA device, not --device {device}"
    if values_only:
        return None
    import torch

    if not torch.cuda.is_available():
        return f"{asked} needs a CUDA GPU, and torch sees none here"
    if quantize != "none":
        lib = QUANT_LIBRARY[quantize]
        if importlib.util.find_spec(lib) is None:
            return f"--quantize {quantize} needs {lib}, which is not installed: {QUANT_EXTRA}"
        if quantize == "fp8" and torch.cuda.get_device_capability(torch.device(device or "cuda")) < FP8_CAPABILITY:
            return "--quantize fp8 needs a GPU of compute capability 8.9 or higher (Ada, Hopper); use nf4 or int8"
    return None


def device_problem(device: str | None) -> str | None:
    """Why ``--device`` cannot be used here, in one sentence (a CUDA device torch cannot see); None when it
    can, or when it is left to the default (CUDA if available, else the CPU)."""
    if device is None or not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return f"--device {device} needs a CUDA GPU, and torch {torch.__version__} sees none here (use --device cpu)"
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        return f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s) (cuda:0 …)"
    return None


def quantization_config(quantize: str, family: str, dtype):
    """diffusers' ``PipelineQuantizationConfig`` for ``quantize`` on a family's pipeline, or None.

    Given as a ``quant_mapping`` (component → its library's config: diffusers' for the transformer or
    UNet, transformers' for T5): diffusers' ``quant_backend`` shorthand refuses to run when the two
    libraries' config classes differ in signature, as they do with transformers 5."""
    if quantize == "none":
        return None
    import diffusers
    import transformers
    from diffusers.quantizers import PipelineQuantizationConfig

    def config(lib):
        if quantize == "nf4":
            return lib.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        if quantize == "int8":
            return lib.BitsAndBytesConfig(load_in_8bit=True)
        return lib.TorchAoConfig("float8wo_e4m3") if lib is diffusers else lib.TorchAoConfig(quant_type="float8wo_e4m3")

    mapping = {c: config(transformers if c.startswith("text_encoder") else diffusers) for c in QUANTIZED[family]}
    return PipelineQuantizationConfig(quant_mapping=mapping)


def place(pipe, device, offload: str) -> None:
    """Put a loaded pipeline on ``device`` (``none``), or hand it to diffusers' CPU offload."""
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)


def place_module(module, device, offload: str):
    """A model outside the pipeline (a ControlNet) placed as diffusers' offload places the modules of a
    pipeline that are not in its offload sequence: on ``device`` (``none``); under ``model`` with its own
    ``cpu_offload_with_hook`` — on the device from its first call until the hook's ``offload()``, which the
    caller runs when the run ends (diffusers: ``maybe_free_model_hooks`` at the end of the call); under
    ``sequential`` streamed from the CPU with ``cpu_offload``. Returns the hook to release, or None."""
    if offload == "model":
        from accelerate import cpu_offload_with_hook

        return cpu_offload_with_hook(module, device)[1]
    if offload == "sequential":
        from accelerate import cpu_offload

        cpu_offload(module, execution_device=device)
    else:
        module.to(device)
    return None


def vae_tiling(pipe, width: int, height: int) -> None:
    """Tile the VAE's decoder for canvases above 1024² px (and not below)."""
    vae = getattr(pipe, "vae", None)
    if vae is None or not hasattr(vae, "enable_tiling"):
        return
    if width * height > TILE_ABOVE:
        vae.enable_tiling()
    else:
        vae.disable_tiling()


@contextmanager
def tiled_decode(pipe, width: int, height: int):
    """A decode at ``width`` × ``height``: the VAE tiled inside (:func:`vae_tiling`), untiled again after. The
    tiling flag also tiles ``vae.encode`` of images larger than the VAE's tile: left on by a large canvas's
    decode, it changed the next smaller plan's encodings (its control image, init image, references), so an
    image depended on what the process had built before it."""
    vae_tiling(pipe, width, height)
    try:
        yield
    finally:
        vae_tiling(pipe, 0, 0)


def peak(device) -> dict:
    """The peak memory since the last :func:`reset_peak`: CUDA's allocator on a GPU, else the process's
    maximum resident set (which never goes down)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return {"kind": "cuda-allocated", "bytes": int(torch.cuda.max_memory_allocated(dev))}
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": "process-rss", "bytes": int(rss if sys.platform == "darwin" else rss * 1024)}


def reset_peak(device) -> None:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
