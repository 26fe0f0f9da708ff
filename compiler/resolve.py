"""Light helpers shared by the checks and the passes (no networkx: `scenec validate` starts fast)."""

from __future__ import annotations

import re
from dataclasses import replace

from scenec.spec.diagnostics import Diagnostics, Pos, did_you_mean, display_path
from scenec.spec.load import LoadedScene
from scenec.spec.paths import (
    PROJECT_FILE,
    ProjectFileError,
    not_found_hint,
    project_config,
    project_key_line,
    project_problems,
)
from scenec.spec.prompt_syntax import SYNTAXES

from .caps import ModelInfo, UnknownModel, model_info

PLACEHOLDERS = ("scene", "group", "variant", "seed", "index")


def resolve_model(ls: LoadedScene, override: str | None, diags: Diagnostics) -> tuple[str | None, ModelInfo]:
    """Model resolution order: --model, the scene's `model`, scenec.toml's default_model, else none."""
    scene_model = ls.scene.model
    spec = override or (scene_model.id if hasattr(scene_model, "id") else scene_model)
    # a checkpoint's `config` belongs to its `id`: --model replaces both
    config = getattr(scene_model, "config", None) if override is None else None
    toml = display_path(ls.root / PROJECT_FILE)
    for line, message, hint in project_problems(ls.root):
        diags.error(Pos(toml, line), message, hint=hint)
    base = ls.file.parent
    if spec is None:
        base = ls.root  # scenec.toml's paths are relative to the project root, as its LoRAs' and VAE's
        try:
            spec = project_config(ls.root).get("default_model")
        except ProjectFileError as e:
            diags.error(Pos(toml, e.line, e.col), str(e))
        if isinstance(spec, dict):  # {id = "...", lora = [...]}: the LoRAs are compiler/lora.py's
            config = spec.get("config") if isinstance(spec.get("config"), str) else None
            spec = spec.get("id")
        if spec is not None and not isinstance(spec, str):
            diags.error(Pos(toml, project_key_line(ls.root, "default_model")), "`default_model` must be a string "
                        "or a table {id = \"...\", lora = [...]}")
            spec = None
    try:
        return spec, model_info(spec, base, config)
    except UnknownModel as e:
        at_config = e.at == "config" and override is None and scene_model is not None
        hint = None
        if "does not exist" in str(e) and override is None and scene_model is not None and not at_config:
            hint = not_found_hint(base / spec, spec, base, ls.root)  # written from the project root?
            hint = hint if "did you mean" in hint else None
        if override is not None and "`model: {id: FILE, config: DIR}`" in str(e):  # which --model replaces
            hint = ("--model takes no `config`: name the checkpoint with its configs in the scene (`model: {id: FILE, "
                    "config: DIR}`) or in scenec.toml's `default_model`, and leave --model out")
        diags.error(ls.pos(("model", "config")) if at_config else model_pos(ls, override, spec), str(e), hint)
        # the default's geometry stands in so the other checks run; "unknown" tells the checks that depend on
        # the family to stay quiet (a canvas multiple or a method of a model nobody asked for is no news)
        return spec, replace(model_info(None), spec=str(spec), source="unknown")


def model_pos(ls: LoadedScene, override: str | None, spec) -> Pos:
    """Where the model was named: the scene's `model`, scenec.toml's `default_model`, or --model (at the flag,
    line 0, as every value set on the command line is, not at FILE:1:1)."""
    if override is not None:
        return Pos(f"--model {spec}", 0, 0)
    if ls.scene.model is not None:
        return ls.pos(("model",))
    return Pos(display_path(ls.root / PROJECT_FILE), project_key_line(ls.root, "default_model"))


def render_name(template: str, values: dict, dedupe: bool = False) -> str:
    """Fill output-name placeholders; an empty part is dropped with one separator next to it. ``dedupe``
    (the default name): a part that repeats the end of the name so far is dropped too, so scene
    ``harbor`` with group ``harbor`` makes ``harbor-boat-7``, not ``harbor-harbor-boat-7``."""
    if dedupe:
        values, so_far = dict(values), ""
        for key in re.findall(r"\{([^{}]*)\}", template):
            val = values.get(key)
            if val is None or val == "" or key == "seed":
                continue
            val = str(val)
            if so_far == val or so_far.endswith("-" + val):
                values[key] = None
                continue
            so_far = f"{so_far}-{val}" if so_far else val
    out = template
    for key in [*PLACEHOLDERS, *(k for k in values if k not in PLACEHOLDERS)]:  # then matrix keys
        val = values.get(key)
        if val is None or val == "":
            out = re.sub(r"[-_.]\{%s\}" % key, "", out)
            out = re.sub(r"\{%s\}[-_.]?" % key, "", out)
        else:
            out = out.replace("{%s}" % key, str(val))
    return out


def prompt_syntax(ls: LoadedScene, diags: Diagnostics | None = None) -> str:
    """The syntax ``ls``'s prompts are read in (a bad scenec.toml value: an error in ``diags``, then plain)."""
    if ls.scene.prompt_syntax is not None:
        return ls.scene.prompt_syntax
    try:
        value = project_config(ls.root).get("prompt_syntax")
    except ProjectFileError:  # resolve_model reports it
        return "plain"
    if value is None:
        return "plain"
    if value not in SYNTAXES:
        if diags is not None:
            diags.error(Pos(display_path(ls.root / PROJECT_FILE), project_key_line(ls.root, "prompt_syntax")),
                        f"`prompt_syntax` must be one of {', '.join(repr(s) for s in SYNTAXES)}, not {value!r}",
                        hint=did_you_mean(value, SYNTAXES) if isinstance(value, str) else None)
        return "plain"
    return value
