"""ControlNet conditions (``control``) in the compiler: checks at FILE:LINE:COL and lowering to the plan.

ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models", arXiv
2302.05543, §3.2): a trainable copy of the UNet's encoder reads a control image (edges, depth, pose…) and
adds its outputs, through zero convolutions, to the UNet's skip connections and middle block. A scene names
the control image, the ControlNet (a diffusers ``ControlNetModel`` directory or hub id, never downloaded
here), its scale and the noise levels it acts between; the plan carries the image at canvas size (resized
as diffusers' control image processor does: RGB, Lanczos) and the model's directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from scenec.spec.diagnostics import Diagnostics
from scenec.spec.fsio import note_input
from scenec.spec.load import LoadedScene
from scenec.spec.paths import PathProblem
from scenec.spec.plan_control import Control

from .caps import ModelInfo, cached_hub_file
from .files import open_image, to_rgb
from .levels import first_step, level_index, noise_levels, window_ok
from .visual import builtin_adapter


def control_model(ls: LoadedScene, path: tuple, spec: str) -> tuple[str | None, str | None]:
    """(the absolute directory of a ControlNet named by ``spec``, None) or (None, a sentence why not): a local
    diffusers directory under the project root, or a hub id whose files are in the Hugging Face cache."""
    local = None
    try:
        local = ls.resolve(path, spec)
    except PathProblem:
        pass
    if local is not None and local.exists():
        if not (local / "config.json").is_file():
            return None, f"`{spec}` is not a diffusers ControlNetModel directory (no config.json)"
        if not any(local.glob("*.safetensors")):
            return None, f"`{spec}` has no .safetensors weights (scenec loads safetensors only)"
        return str(local.resolve()), None
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        hit = cached_hub_file(spec, "config.json")
        if hit is not None:
            note_input(hit)
            hit = str(hit.parent)
            if not any(Path(hit).glob("*.safetensors")):
                return None, f"ControlNet `{spec}` has no .safetensors weights in the Hugging Face cache (scenec " \
                    "loads safetensors only)"
            return hit, None
        return None, f"ControlNet `{spec}` is not downloaded: `hf download {spec}` (or give a local directory)"
    return None, f"`{spec}` is no directory under the project and no hub id (ORG/NAME)"


def check_controls(ls: LoadedScene, info: ModelInfo, diags: Diagnostics, steps: int | None = None) -> None:
    """Every ``control`` entry: its image, its model (needed except on the tiny models) and its window; all
    problems at the keys that have them. (A family without ControlNet is refused by ``check_family``.)"""
    if "control" not in info.family.methods:
        return
    kinds: dict[tuple, tuple] = {}  # Flux: what residuals each control's ControlNet gives -> its path
    for i, c in enumerate(ls.scene.control):
        path = ("control", i)
        open_image(ls, path + ("image",), c.image, diags, "control image")
        if info.source == "unknown":  # one error at `model` (compiler/resolve.py): which ControlNet fits is unknown
            why = None if c.model is None else control_model(ls, path + ("model",), c.model)[1]
            if why:
                diags.error(ls.pos(path + ("model",)), why, hint="docs/controlnet.md says which models fit")
            window_ok(ls, path, c.window, "control", diags)
            continue
        flux = info.family.name == "flux"
        config = {}
        if c.model is not None:
            where, why = control_model(ls, path + ("model",), c.model)
            if why:
                diags.error(ls.pos(path + ("model",)), why, hint="docs/controlnet.md says which models fit")
            else:
                config = controlnet_config(where)
                why = _wrong_class(config, flux, info.spec)
                if why:
                    diags.error(ls.pos(path + ("model",)), why, hint="docs/controlnet.md says which models fit")
                    config = {}
        elif not builtin_adapter(info):  # the tiny models build a random ControlNet in code
            diags.error(ls.pos(path), f"`control` on `{info.spec}` needs `model`: a diffusers "
                        f"{'FluxControlNetModel' if flux else 'ControlNetModel'} for it (only the tiny models build "
                        "one in code)", hint="e.g. `model: " + ("InstantX/FLUX.1-dev-Controlnet-Canny" if flux else
                                                                "lllyasviel/control_v11p_sd15_canny")
                        + "` after `hf download` it")
        _check_mode(ls, path, c, flux, config, c.model is None or bool(config), diags)
        if c.region is not None and c.region not in {e.id for e in ls.scene.entities}:
            from scenec.spec.diagnostics import did_you_mean

            ids = [e.id for e in ls.scene.entities]
            diags.error(ls.pos(path + ("region",)), f"`region: {c.region}` names no entity of the scene",
                        hint=did_you_mean(c.region, ids) or (f"its entities: {', '.join(ids)}" if ids else
                                                              "add an entity with that id (its shape is the region)"))
        if flux and (c.model is None or config):
            _check_kind(ls, path + (("model",) if c.model else ()), config, kinds, diags)
        if window_ok(ls, path, c.window, "control", diags) and steps and c.scale > 0:
            hi, lo = c.window
            table = noise_levels(info, (ls.scene.canvas.width, ls.scene.canvas.height), steps, ls.scene.sampler.solver)
            start, why = first_step(ls, table, steps)
            if level_index(hi, table) == level_index(lo, table, end=True):
                diags.warning(ls.pos(path + ("window",)), f"control window [{hi:g}, {lo:g}] covers no sampler step "
                              f"at {steps} steps; the control does nothing", hint="widen the window or use more steps")
            elif 0 < start < steps and level_index(lo, table, end=True) <= start:
                diags.warning(ls.pos(path + ("window",)), f"control window [{hi:g}, {lo:g}] ends before the steps "
                              f"that run: {why}; the control does nothing",
                              hint="end the window later (e.g. [1.0, 0.0])")


def controlnet_config(directory: str) -> dict:
    """A ControlNet directory's ``config.json`` ({} when unreadable: loading it says what is wrong)."""
    try:
        out = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def other_kind(config: dict, flux: bool) -> tuple[str, str] | None:
    """(its class, the class the model needs) of a ControlNet config made for the other kind of model (a Flux
    one on SD/SDXL or the other way round), else None. The runtime asks it too (runtime/methods/control.py)."""
    name = config.get("_class_name")
    want = "FluxControlNetModel" if flux else "ControlNetModel"
    return (name, want) if isinstance(name, str) and name != want else None


def _wrong_class(config: dict, flux: bool, model: str) -> str | None:
    """A ControlNet for the other kind of model: one sentence."""
    kind = other_kind(config, flux)
    return None if kind is None else f"this ControlNet is a {kind[0]}; `{model}` needs a {kind[1]}"


def _check_mode(ls: LoadedScene, path: tuple, c, flux: bool, config: dict, known: bool, diags: Diagnostics) -> None:
    """``mode``: Flux Union ControlNets only (their config's ``num_mode``), required by them, within range."""
    num = config.get("num_mode")
    if c.mode is not None and not flux:
        diags.error(ls.pos(path + ("mode",)), "`mode` picks a Flux Union ControlNet's control type; SD and SDXL "
                    "ControlNets have none", hint="remove `mode`")
    elif c.mode is not None and known and num is None:
        diags.error(ls.pos(path + ("mode",)), "`mode` applies to Union ControlNets (a `num_mode` in their "
                    "config.json); this one is not", hint="remove `mode`")
    elif isinstance(num, int) and (c.mode is None or c.mode >= num):
        at = path if c.mode is None else path + ("mode",)
        diags.error(ls.pos(at), f"this Union ControlNet needs `mode`: its control type, 0..{num - 1}"
                    + ("" if c.mode is None else f" (got {c.mode})"), hint="its model card lists the types")


def _check_kind(ls: LoadedScene, at: tuple, config: dict, kinds: dict, diags: Diagnostics) -> None:
    """Flux controls add their ControlNets' residuals block by block (diffusers' FluxMultiControlNetModel): each
    must give as many dual- and single-stream ones, of one kind (XLabs' hint block or not), as the first."""
    kind = (1, 1, False)  # {}: the tiny built-in (runtime/methods/control_flux.py); else FluxControlNetModel's defaults
    if config:
        kind = (config.get("num_layers", 19), config.get("num_single_layers", 38),
                config.get("conditioning_embedding_channels") is not None)
    kinds.setdefault(kind, at)
    first = next(iter(kinds))
    if kind != first:
        def say(k):
            return f"{k[0]} dual- and {k[1]} single-stream residuals" + (" (XLabs' kind, repeated)" if k[2] else "")

        diags.error(ls.pos(at), f"this ControlNet gives {say(kind)}, control[{kinds[first][1]}]'s {say(first)}: "
                    "Flux adds several controls' residuals block by block, so they must match",
                    hint="use ControlNets of one family (e.g. two InstantX ones, or one Union ControlNet twice)")


def lower_controls(ir, tensors: dict) -> list[Control]:
    """The scene's controls, the same for every job (lowered once per plan): images at canvas size (RGB,
    Lanczos, uint8) and step windows."""
    from PIL import Image

    from scenec.spec.fsio import sha256_file

    out = []
    table = noise_levels(ir.info, ir.canvas, ir.steps, ir.solver)
    w, h = ir.canvas
    for i, c in enumerate(ir.scene.scene.control):
        path = ("control", i)
        p = ir.scene.resolve(path + ("image",), c.image)
        name = f"control/{i}/image"
        with Image.open(p) as im:
            tensors[name] = np.asarray(to_rgb(im).resize((w, h), Image.LANCZOS), np.uint8)
        model = None if c.model is None else control_model(ir.scene, path + ("model",), c.model)[0]
        out.append(Control(image=name, sha256=sha256_file(p), model=model, model_spec=c.model, scale=c.scale,
                           mode=c.mode,
                           window=(level_index(c.window[0], table), level_index(c.window[1], table, end=True)),
                           region=c.region))
    return out
