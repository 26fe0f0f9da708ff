"""Single-file checkpoints (A1111/ComfyUI's ``model.safetensors``: UNet, VAE and text encoders in the original
LDM key layout): the family told from the file's safetensors header, and the diffusers configs it loads with.

No torch: the header is read with the standard library (8-byte little-endian length, then JSON). The model
type follows diffusers' own ``diffusers.loaders.single_file_utils.infer_diffusers_model_type`` (0.42), the
function ``StableDiffusionPipeline.from_single_file`` runs on the same file, so the compiler and the loader
agree; the configs default to the repository diffusers itself picks for that type
(``DIFFUSERS_DEFAULT_PIPELINE_PATHS``), read from the local Hugging Face cache, never downloaded here.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

# file suffixes that name a single-file checkpoint rather than a diffusers directory or a hub id
SAFETENSORS = (".safetensors",)
PICKLED = (".ckpt", ".pt", ".pth", ".bin")
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header

# diffusers' CHECKPOINT_KEY_NAMES, the entries infer_diffusers_model_type reads for the SD family
V1 = "model.diffusion_model.output_blocks.11.0.skip_connection.weight"
V2 = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
XL_BASE = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
XL_REFINER = "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"
IN_CONV = "model.diffusion_model.input_blocks.0.0.weight"  # the UNet's first conv: its input channels
PLAYGROUND = "edm_mean"
UPSCALE = "model.diffusion_model.input_blocks.10.0.skip_connection.bias"
SD3 = ("joint_blocks.0.context_block.adaLN_modulation.1.bias",
       "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias")
FLUX = ("double_blocks.0.img_attn.norm.key_norm.scale",
        "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale")
CONTROLNET = ("control_model.time_embed.0.weight", "controlnet_cond_embedding.conv_in.weight")

# model type -> (family, the repository whose configs diffusers loads it with: DIFFUSERS_DEFAULT_PIPELINE_PATHS)
RUNS = {
    "v1": ("sd", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "v2": ("sd", "stabilityai/stable-diffusion-2-1"),
    "xl_base": ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0"),
}
# what a refused type is, in words
REFUSED = {
    "inpainting": "an SD 1.x inpainting UNet (9 input channels)",
    "inpainting_v2": "an SD 2.x inpainting UNet (9 input channels)",
    "xl_inpaint": "an SDXL inpainting UNet (9 input channels)",
    "instruct-pix2pix": "an InstructPix2Pix UNet (8 input channels)",
    "xl_refiner": "an SDXL refiner",
    "playground-v2-5": "a Playground v2.5 model",
    "upscale": "an SD x4 upscaler",
    "controlnet": "a ControlNet (name it under `control`, as a diffusers directory)",
    "sd3": "an SD3 transformer",
    "flux": "a Flux transformer (scenec loads Flux from a diffusers directory or hub id)",
}
SUFFIX_HINT = "a `.safetensors` checkpoint in the original (LDM) layout of SD 1.x, SD 2.x or SDXL base"


@dataclass(frozen=True)
class Checkpoint:
    """What a single-file checkpoint's header says: diffusers' model type and the family that runs it."""

    model_type: str
    family: str | None  # "sd" | "sdxl"; None: refused (``problem`` says why)
    default_config: str | None  # the hub repository diffusers takes its configs from
    problem: str | None = None
    has_vae: bool = True  # whether it holds a VAE (``first_stage_model.…``): diffusers cannot load it without one


def is_single_file(spec: str) -> bool:
    """Whether a model spec names a checkpoint file (by its suffix) rather than a directory or a hub id."""
    return spec.lower().endswith(SAFETENSORS + PICKLED)


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]] | str:
    """A safetensors file's tensors as {name: (dtype, shape)}, from its header alone (no tensor is read); a
    sentence when the file is not a safetensors file (or is cut short: its data ends before its last tensor's)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "is not a safetensors file (shorter than its 8-byte header length)"
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER or 8 + n > size:
                return "is not a safetensors file (its first 8 bytes are no header length)"
            raw = f.read(n)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "is not a safetensors file (its header is not JSON)"
    if not isinstance(doc, dict):
        return "is not a safetensors file (its header is not a JSON object)"
    out, end = {}, 0
    for name, t in doc.items():
        if name == "__metadata__":
            continue
        if not isinstance(t, dict) or not all(isinstance(t.get(x), list) for x in ("shape", "data_offsets")):
            return f"is not a safetensors file (tensor `{name}` has no shape or data offsets)"
        out[name] = (str(t.get("dtype")), tuple(int(x) for x in t["shape"]))
        end = max([end, *(int(x) for x in t["data_offsets"])])
    if 8 + n + end > size:
        return f"is cut short ({size} bytes; its tensors end at byte {8 + n + end}): download it again"
    return out


def model_type(shapes: dict[str, tuple[str, tuple[int, ...]]]) -> str | None:
    """diffusers' ``infer_diffusers_model_type`` on a header, for what scenec needs to tell apart: the SD
    family's types in diffusers' order, and what else a file may be; None for a file that holds no SD UNet."""
    def shape(k):
        return shapes[k][1]

    if IN_CONV in shapes and len(shape(IN_CONV)) > 1 and shape(IN_CONV)[1] == 9:
        if V2 in shapes and shape(V2)[-1] == 1024:
            return "inpainting_v2"
        return "xl_inpaint" if XL_BASE in shapes else "inpainting"
    if V2 in shapes and shape(V2)[-1] == 1024:
        return "v2"
    if PLAYGROUND in shapes:
        return "playground-v2-5"
    if XL_BASE in shapes:
        return "xl_base"
    if XL_REFINER in shapes:
        return "xl_refiner"
    if UPSCALE in shapes:
        return "upscale"
    if any(k in shapes for k in CONTROLNET):
        return "controlnet"
    if any(k in shapes for k in SD3):
        return "sd3"
    if any(k in shapes for k in FLUX):
        return "flux"
    if IN_CONV in shapes and len(shape(IN_CONV)) > 1 and shape(IN_CONV)[1] == 8:
        return "instruct-pix2pix"
    # diffusers' last branch: anything else is "v1". scenec asks that it hold an LDM UNet at least (a LoRA,
    # a VAE or a text encoder alone is no model), and tells SDXL's layout that diffusers' 10-layer key misses
    # (fewer text-encoder layers, as in a small test model) by its second text encoder
    if IN_CONV not in shapes:
        return None
    if any(k.startswith("conditioner.embedders.1.") for k in shapes):
        return "xl_base"
    return "v1"


def inspect(path: Path) -> Checkpoint | str:
    """A checkpoint file's model type and family, or a sentence on why it is none scenec runs."""
    shapes = read_header(path)
    if isinstance(shapes, str):
        return shapes
    kind = model_type(shapes)
    if kind is None:
        if any(k.endswith("decoder.conv_in.weight") for k in shapes):  # A1111's models/VAE/, ComfyUI's models/vae/
            return "holds no Stable Diffusion UNet, only an autoencoder: it is a VAE: name it as " \
                   "`model: {id: MODEL, vae: FILE}`"
        return "holds no Stable Diffusion UNet in the original (LDM) layout (`model.diffusion_model.…`): " \
               "it is no single-file SD or SDXL checkpoint"
    if kind in RUNS:
        fam, repo = RUNS[kind]
        return Checkpoint(kind, fam, repo, has_vae=any(k.startswith("first_stage_model.") for k in shapes))
    return Checkpoint(kind, None, None, f"is {REFUSED.get(kind, kind)}; scenec runs single-file SD 1.x, SD 2.x "
                      "and SDXL base checkpoints")
