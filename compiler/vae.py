"""A VAE replacing the model's (``model: {id, vae}``), checked at compile time (no torch).

What A1111 calls "SD VAE" and diffusers does with ``AutoencoderKL.from_pretrained(...)`` passed as the pipeline's
``vae``: SD 1.x fine-tunes are run with ``vae-ft-mse-840000-ema-pruned``, SDXL in fp16 with
``madebyollin/sdxl-vae-fp16-fix`` (also scenec.toml's ``default_model = {id, vae}``, relative to the project root,
A1111's global setting). ``vae`` names a local diffusers ``AutoencoderKL`` directory (``config.json`` +
``.safetensors``), a hub id read from the local Hugging Face cache (never downloaded here), or a single
``.safetensors`` VAE file (A1111's or ComfyUI's ``models/vae/``, the LDM layout or diffusers'), which the runtime
reads with ``AutoencoderKL.from_single_file`` and the model's own VAE config. Checked: it exists, is safetensors,
is an ``AutoencoderKL`` and its latent channels are the family's (4 SD/SDXL, 16 Flux). A file's sha256 is part
of the plan; a directory is digested by the build's cache key, as the model's own directory is.
"""

from __future__ import annotations

import json
from pathlib import Path

from scenec.spec.diagnostics import Diagnostics
from scenec.spec.fsio import note_input, sha256_big_file
from scenec.spec.load import LoadedScene
from scenec.spec.paths import PathProblem, not_found_hint, resolve_inside

from .caps import ModelInfo, cached_hub_file
from .single_file import PICKLED, read_header

LATENT_CHANNELS = {"flux": 16, "sd": 4, "sdxl": 4}
DECODER_IN = "decoder.conv_in.weight"  # [channels, latent channels, 3, 3] in both layouts


def check_vae(ls: LoadedScene, info: ModelInfo, diags: Diagnostics,
              model_override: str | None = None) -> tuple[str | None, str | None]:
    """The scene's ``model.vae``: (the directory or file the runtime loads, the file's sha256 or None), or
    (None, None) without one; problems go to ``diags`` at the key."""
    spec, base, pos = getattr(ls.scene.model, "vae", None), None, None
    if spec is None and ls.scene.model is None:  # scenec.toml's default_model table, paths from the project root
        spec, pos = _toml_vae(ls)
        base = ls.root
    if spec is None:
        return None, None
    path = ("model", "vae")
    if model_override is not None:
        if base is None:
            diags.warning(ls.pos(("model",)), "--model replaces the scene's model, and with it its `vae`: not applied")
        return None, None
    where, why, hint = _locate(ls, path, spec, base)
    if why is not None and hint is None and "not found" in why:  # written from the project root?
        b = base or ls.base_dir(path)
        alt = not_found_hint(b / spec, spec, b, ls.root)
        hint = alt.split("; ", 1)[1] if "did you mean" in alt else None
    if why is None and info.source != "unknown":  # an unknown model's family is a stand-in
        why = _misfit(Path(where), info)
    if why is not None:
        diags.error(pos or ls.pos(path), why, hint=hint or "a diffusers AutoencoderKL directory, a cached hub id "
                    "(`hf download madebyollin/sdxl-vae-fp16-fix`) or a .safetensors VAE file")
        return None, None
    if info.source != "unknown":
        note = _scale_mismatch(Path(where), info)
        if note is not None:
            diags.warning(pos or ls.pos(path), note)
    return where, sha256_big_file(where) if Path(where).is_file() else None


SCALE_KEYS = (("scaling_factor", 0.18215), ("shift_factor", None))  # AutoencoderKL's defaults


def _scale_mismatch(where: Path, info: ModelInfo) -> str | None:
    """Why a VAE directory's latent scale is not the model's (its config's ``scaling_factor``/``shift_factor``),
    or None (a file is read with the model's own config; a model whose VAE config is not on disk: unknown)."""
    if where.is_file():
        return None
    src = info.config if info.source == "file" else info.repo
    if not src:
        return None
    theirs = Path(src) / "vae" / "config.json" if Path(src).is_dir() else cached_hub_file(src, "vae/config.json")
    try:
        mine = json.loads((where / "config.json").read_text(encoding="utf-8"))
        model = json.loads(theirs.read_text(encoding="utf-8")) if theirs is not None else None
    except (OSError, ValueError):
        return None
    if not isinstance(mine, dict) or not isinstance(model, dict):
        return None
    for key, default in SCALE_KEYS:
        a, b = mine.get(key, default), model.get(key, default)
        if a != b:
            return f"this VAE's {key} is {a}, the model's {b}: the runtime scales latents by the VAE's (as " \
                   "diffusers does; A1111 and ComfyUI by the model's), so images decode off — a VAE of another model?"
    return None


def _toml_vae(ls: LoadedScene):
    """(``default_model.vae`` of scenec.toml, its position), or (None, None)."""
    from scenec.spec.diagnostics import Pos, display_path
    from scenec.spec.paths import PROJECT_FILE, ProjectFileError, project_config, project_key_line

    try:
        table = project_config(ls.root).get("default_model")
    except ProjectFileError:  # resolve_model reports it
        return None, None
    vae = table.get("vae") if isinstance(table, dict) else None
    if not isinstance(vae, str) or not vae:
        return None, None
    return vae, Pos(display_path(ls.root / PROJECT_FILE), project_key_line(ls.root, "default_model"))


def _locate(ls: LoadedScene, path: tuple, spec: str,
            base: Path | None = None) -> tuple[str | None, str | None, str | None]:
    """(what to load, None, None) or (None, why not, a hint or None); a relative path from ``base`` (default: the
    file naming it)."""
    if spec.lower().endswith(PICKLED):
        return None, f"`{spec}` is a pickle file, which can run code when loaded; scenec loads .safetensors only " \
            "(convert it, or use the model's .safetensors release)", None
    hub_like = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and \
        not spec.lower().endswith(".safetensors")
    local = None
    try:
        local = resolve_inside(spec, base or ls.base_dir(path), ls.root)
    except PathProblem as e:  # out of the project (`../vae.safetensors`): that, not "no hub id"
        if not hub_like:
            return None, e.message, e.hint
    if local is not None:
        note_input(local)
        if local.is_file():
            return str(local.resolve()), None, None
        if local.is_dir():
            if not (local / "config.json").is_file():
                sub = " (a model directory: its VAE is `" + spec.rstrip("/") + "/vae`)" \
                    if (local / "vae" / "config.json").is_file() else ""
                return None, f"`{spec}` is not a diffusers AutoencoderKL directory (no config.json){sub}", None
            if not any(local.glob("*.safetensors")):
                return None, f"`{spec}` has no .safetensors weights (scenec loads safetensors only)", None
            return str(local.resolve()), None, None
    if hub_like:
        hit = cached_hub_file(spec, "config.json")
        if hit is None:
            looked = f"no file or directory {local}, and " if local is not None else ""
            return None, f"VAE `{spec}` not found: {looked}no hub id `{spec}` in the Hugging Face cache " \
                f"(`hf download {spec}`)", None
        note_input(hit)
        if not any(hit.parent.glob("*.safetensors")):
            return None, f"VAE `{spec}` has no .safetensors weights in the Hugging Face cache", None
        return str(hit.parent), None, None
    return None, f"VAE `{spec}` not found (looked for {local})" if local is not None else \
        f"`{spec}` is no file or directory under the project and no hub id (ORG/NAME)", None


def _misfit(where: Path, info: ModelInfo) -> str | None:
    """Why the VAE at ``where`` cannot replace this family's, or None."""
    want = LATENT_CHANNELS[info.family.name]
    if where.is_file():
        shapes = read_header(where)
        if isinstance(shapes, str):
            return f"`{where.name}` {shapes}"
        key = next((k for k in shapes if k.endswith(DECODER_IN)), None)
        if key is None:
            return f"`{where.name}` holds no VAE decoder (no `{DECODER_IN}`): is it a VAE file?"
        shape = shapes[key][1]
        have = shape[1] if len(shape) == 4 else None
    else:
        try:
            config = json.loads((where / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "its config.json is not readable JSON"
        name = config.get("_class_name") if isinstance(config, dict) else None
        if not isinstance(config, dict):
            return "its config.json is not a JSON object"
        if name not in (None, "AutoencoderKL"):
            return f"this is a {name}, not an AutoencoderKL"
        have = config.get("latent_channels")
    if have is not None and have != want:
        return f"this VAE has {have} latent channels; {info.family.name} models such as `{info.spec}` use {want}"
    return None
