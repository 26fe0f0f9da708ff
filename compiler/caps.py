"""Model families and what the compiler must know of them (no torch here).

A *family* fixes the geometry the compiler lowers to: VAE downsampling, token size, canvas
multiple, the grids masks are needed on, and the sampler kind. A *model* is an alias or an id
that belongs to a family and carries sampler defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from scenec.spec.fsio import note_input


@dataclass(frozen=True)
class Family:
    name: str  # "flux" | "sd"
    vae_scale: int  # pixels per latent cell
    token_px: int  # pixels per attention token at the finest attention resolution
    multiple: int  # canvas sides must be multiples of this
    sampler: str  # "flow-euler" | "ddim"
    # grids masks are lowered to: name -> pixels per cell (ceil division on odd sizes)
    grids: tuple[tuple[str, int], ...]


FLUX = Family("flux", vae_scale=8, token_px=16, multiple=16, sampler="flow-euler",
              grids=(("latent", 8), ("token", 16)))
SD = Family("sd", vae_scale=8, token_px=8, multiple=8, sampler="ddim",
            grids=(("latent", 8), ("a16", 16), ("a32", 32), ("a64", 64)))
FAMILIES = {"flux": FLUX, "sd": SD}


@dataclass(frozen=True)
class ModelInfo:
    spec: str  # what the user wrote
    family: Family
    source: str  # "alias" | "local" | "hub"
    repo: str | None  # hub id or local directory the runtime loads
    steps: int
    guidance: float
    max_sequence_length: int = 512  # T5 tokens of the global prompt (Flux)


ALIASES: dict[str, ModelInfo] = {
    "flux-dev": ModelInfo("flux-dev", FLUX, "alias", "black-forest-labs/FLUX.1-dev", steps=28, guidance=3.5),
    "flux-schnell": ModelInfo("flux-schnell", FLUX, "alias", "black-forest-labs/FLUX.1-schnell", steps=4,
                              guidance=0.0, max_sequence_length=256),
    "tiny": ModelInfo("tiny", FLUX, "alias", None, steps=4, guidance=3.5, max_sequence_length=128),
    "sd15": ModelInfo("sd15", SD, "alias", "stable-diffusion-v1-5/stable-diffusion-v1-5", steps=50, guidance=7.5),
    "sd21": ModelInfo("sd21", SD, "alias", "stabilityai/stable-diffusion-2-1-base", steps=50, guidance=7.5),
    "tiny-sd": ModelInfo("tiny-sd", SD, "alias", None, steps=4, guidance=7.5),
}

DEFAULT_MODEL = "flux-dev"  # what compile assumes when neither scene nor project names a model


def model_info(spec: str | None, base_dir: Path | None = None) -> ModelInfo:
    """Resolve a model spec: an alias, a local diffusers directory, or a hub id (family guessed)."""
    spec = spec or DEFAULT_MODEL
    if spec in ALIASES:
        return ALIASES[spec]
    local = Path(spec) if Path(spec).is_absolute() or base_dir is None else base_dir / spec
    note_input(local / "model_index.json")  # a local model directory appearing changes the family
    if local.is_dir() and (local / "model_index.json").is_file():
        try:
            cls = json.loads((local / "model_index.json").read_text()).get("_class_name", "")
        except (OSError, ValueError):
            cls = ""
        fam = FLUX if "Flux" in cls else SD
        d = ALIASES["flux-dev"] if fam is FLUX else ALIASES["sd15"]
        return ModelInfo(spec, fam, "local", str(local.resolve()), d.steps, d.guidance, d.max_sequence_length)
    low = spec.lower()
    if "flux" in low:
        d = ALIASES["flux-schnell"] if "schnell" in low else ALIASES["flux-dev"]
        return ModelInfo(spec, FLUX, "hub", spec, d.steps, d.guidance, d.max_sequence_length)
    d = ALIASES["sd15"]
    return ModelInfo(spec, SD, "hub", spec, d.steps, d.guidance)


def grid_size(canvas: tuple[int, int], px: int) -> tuple[int, int]:
    """(height, width) of a grid with ``px`` pixels per cell; partial cells count (ceil)."""
    w, h = canvas
    return (-(-h // px), -(-w // px))
