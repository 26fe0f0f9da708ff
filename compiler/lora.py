"""LoRAs at compile time (no torch): which LoRAs a scene asks for, and what their files hold.

A scene names LoRAs in ``model: {id, lora: [...]}`` (or ``default_model`` as a table in
``scenec.toml``), on the command line (``--lora PATH[:SCALE]``) and per entity (``entities[].lora``).
Each is checked from its safetensors header alone (``safe_open(..., framework="numpy")``: keys and
shapes, no tensor is read): the file exists and is safetensors; its keys are LoRA keys in one of the
formats scenec loads — diffusers/peft, kohya, xlabs (the formats diffusers' ``lora_state_dict``
converts) and DiffSynth-Studio's (EliGen's own, mapped here to diffusers' Flux names); every key names
a layer of the model's family; each low-rank pair has one rank (A ``[r, in]``, B ``[out, r]``). What
needs the model itself (a layer's in/out sizes, a block index the model lacks) is checked when the
build loads it (runtime/lora.py), in one line.

The plan carries each LoRA's content digest and scale (``spec.plan.Lora``): they are part of every
``job_hash`` they affect, so changing one rebuilds exactly the images that use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from scenec.spec.diagnostics import Diagnostics, Pos, display_path
from scenec.spec.fsio import note_input, sha256_file
from scenec.spec.plan import Lora

from .caps import cached_hub_file

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights
EXAMPLE_KEYS = 3  # unknown keys named in a message

# The layers of each family's denoiser, by diffusers' module names.
FLUX_LAYER = re.compile(
    r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear|norm1_context\.linear)"
    r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear)"
    r"|time_text_embed\.(timestep_embedder|guidance_embedder|text_embedder)\.linear_[12]"
    r"|context_embedder|x_embedder|norm_out\.linear|proj_out)")
UNET_LAYER = re.compile(
    r"(conv_in|conv_out|time_embedding\.linear_[12]|add_embedding\.linear_[12]"
    r"|(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.(attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))"
    r"|resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|downsamplers\.0\.conv|upsamplers\.0\.conv))")
# kohya names: underscores for dots; Flux's in BFL's own naming, UNets' in diffusers' or SGM's
KOHYA_FLUX = re.compile(r"(double_blocks_\d+_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2|mod_lin)"
                        r"|single_blocks_\d+_(linear1|linear2|modulation_lin)|final_layer_(linear|adaLN_modulation_1)"
                        r"|img_in|txt_in|(time|vector|guidance)_in_(in|out)_layer)")
KOHYA_UNET = re.compile(r"(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block|conv_in|conv_out"
                        r"|time_embedding|time_embed|add_embedding|label_emb)(_\w+)?")
XLABS = re.compile(r"(double_blocks\.\d+\.processor\.(qkv|proj)_lora[12]"
                   r"|single_blocks\.\d+\.processor\.(qkv|proj)_lora)")
FAMILY_OF_FORMAT = {"diffsynth": "flux", "xlabs": "flux"}
FAMILY_NAMES = {"flux": "a Flux model", "sd": "an SD model", "sdxl": "an SDXL model"}

# --- DiffSynth-Studio's Flux DiT names → diffusers' ----------------------------------------------
# DiffSynth's FluxDiT fuses q, k, v (a_to_qkv: image, b_to_qkv: text) and, in single-stream blocks,
# q, k, v and the MLP's input (to_qkv_mlp: [q | k | v | mlp], the MLP 4× the width). A fused LoRA
# keeps one A for all parts; B's rows split into the parts. Its final AdaLayerNorm orders its output
# [shift | scale], diffusers' norm_out [scale | shift]: the halves of B swap.
_QKV = ((0, 1, 3), (1, 2, 3), (2, 3, 3))
DIFFSYNTH_DOUBLE = {
    "attn.a_to_qkv": (("attn.to_q", _QKV[0]), ("attn.to_k", _QKV[1]), ("attn.to_v", _QKV[2])),
    "attn.b_to_qkv": (("attn.add_q_proj", _QKV[0]), ("attn.add_k_proj", _QKV[1]), ("attn.add_v_proj", _QKV[2])),
    "attn.a_to_q": (("attn.to_q", None),), "attn.a_to_k": (("attn.to_k", None),), "attn.a_to_v": (("attn.to_v", None),),
    "attn.b_to_q": (("attn.add_q_proj", None),), "attn.b_to_k": (("attn.add_k_proj", None),),
    "attn.b_to_v": (("attn.add_v_proj", None),),
    "attn.a_to_out": (("attn.to_out.0", None),), "attn.b_to_out": (("attn.to_add_out", None),),
    "ff_a.0": (("ff.net.0.proj", None),), "ff_a.2": (("ff.net.2", None),),
    "ff_b.0": (("ff_context.net.0.proj", None),), "ff_b.2": (("ff_context.net.2", None),),
    "norm1_a.linear": (("norm1.linear", None),), "norm1_b.linear": (("norm1_context.linear", None),),
}
DIFFSYNTH_SINGLE = {
    "to_qkv_mlp": (("attn.to_q", (0, 1, 7)), ("attn.to_k", (1, 2, 7)), ("attn.to_v", (2, 3, 7)),
                   ("proj_mlp", (3, 7, 7))),
    "a_to_qkv": (("attn.to_q", _QKV[0]), ("attn.to_k", _QKV[1]), ("attn.to_v", _QKV[2])),
    "a_to_q": (("attn.to_q", None),), "a_to_k": (("attn.to_k", None),), "a_to_v": (("attn.to_v", None),),
    "proj_in_besides_attn": (("proj_mlp", None),), "proj_out": (("proj_out", None),),
    "norm.linear": (("norm.linear", None),),
}
DIFFSYNTH_GLOBAL = {
    "time_embedder.timestep_embedder.0": (("time_text_embed.timestep_embedder.linear_1", None),),
    "time_embedder.timestep_embedder.2": (("time_text_embed.timestep_embedder.linear_2", None),),
    "guidance_embedder.timestep_embedder.0": (("time_text_embed.guidance_embedder.linear_1", None),),
    "guidance_embedder.timestep_embedder.2": (("time_text_embed.guidance_embedder.linear_2", None),),
    "pooled_text_embedder.0": (("time_text_embed.text_embedder.linear_1", None),),
    "pooled_text_embedder.2": (("time_text_embed.text_embedder.linear_2", None),),
    "context_embedder": (("context_embedder", None),), "x_embedder": (("x_embedder", None),),
    "final_norm_out.linear": (("norm_out.linear", "swap"),), "final_proj_out": (("proj_out", None),),
}
_DS_PREFIXES = ("pipe.dit.", "diffusion_model.", "dit.")


def diffsynth_targets(module: str) -> tuple[tuple[str, tuple[int, int, int] | str | None], ...] | None:
    """The diffusers Flux modules a DiffSynth-named module stands for, each with the part of B's rows it
    takes: ``(lo, hi, parts)`` = rows ``[lo·n/parts, hi·n/parts)``, ``"swap"`` (B's halves swapped) or None
    (all of B). None: not a DiffSynth Flux module."""
    for p in _DS_PREFIXES:
        module = module.removeprefix(p)
    m = re.fullmatch(r"(blocks|single_blocks)\.(\d+)\.(.+)", module)
    if m is None:
        return DIFFSYNTH_GLOBAL.get(module)
    table, prefix = (DIFFSYNTH_DOUBLE, "transformer_blocks") if m[1] == "blocks" else \
        (DIFFSYNTH_SINGLE, "single_transformer_blocks")
    parts = table.get(m[3])
    return None if parts is None else tuple((f"{prefix}.{m[2]}.{name}", part) for name, part in parts)


# --- keys -----------------------------------------------------------------------------------------
_PAIR = re.compile(r"^(?P<module>.+?)\.(?P<role>lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|down|up)"
                   r"(\.default)?\.weight$")
_TE_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_", "lora_te")


def split_key(key: str) -> tuple[str, str] | None:
    """``(module, "A" | "B" | "alpha")`` of a LoRA key, or None when it is not one."""
    if key.endswith(".alpha"):
        return key[:-len(".alpha")], "alpha"
    m = _PAIR.match(key)
    if m is None:
        return None
    role = m["role"]
    return m["module"], "A" if role in ("lora_A", "lora_down", "lora.down", "down") else "B"


def detect_format(modules: list[str]) -> str:
    """diffusers | kohya | xlabs | diffsynth, from the module names of a LoRA's keys."""
    if any(m.startswith(("lora_unet_", "lora_te")) for m in modules):
        return "kohya"
    if any(".processor." in m and XLABS.fullmatch(m) for m in modules):
        return "xlabs"
    if any(diffsynth_targets(m) is not None and not FLUX_LAYER.fullmatch(m) for m in modules):
        return "diffsynth"
    return "diffusers"


def _denoiser_name(module: str, fmt: str) -> tuple[str | None, str | None]:
    """(the family kind the module belongs to: "flux" | "unet", or "te" for a text encoder, or None when it
    names no layer; a normalised name)."""
    if module.startswith(_TE_PREFIXES):
        return "te", module
    if fmt == "kohya":
        rest = module.removeprefix("lora_unet_")
        if KOHYA_FLUX.fullmatch(rest):
            return "flux", rest
        return ("unet", rest) if KOHYA_UNET.fullmatch(rest) else (None, module)
    if fmt == "xlabs":
        return ("flux", module) if XLABS.fullmatch(module) else (None, module)
    if fmt == "diffsynth":
        t = diffsynth_targets(module)
        return ("flux", t[0][0]) if t else (None, module)
    for p in ("base_model.model.", "transformer.", "unet."):
        if module.startswith(p):
            module = module[len(p):]
            break
    module = re.sub(r"\.processor\.(to_q|to_k|to_v)_lora$", r".\1", module)
    module = re.sub(r"\.processor\.to_out_lora$", ".to_out.0", module)
    if FLUX_LAYER.fullmatch(module):
        return "flux", module
    return ("unet", module) if UNET_LAYER.fullmatch(module) else (None, module)


@dataclass(frozen=True)
class LoraFile:
    """What a LoRA file's header says: its format, the family kind it adapts, its layer counts."""

    sha256: str
    format: str
    kind: str | None  # "flux" | "unet" | None (only text-encoder layers)
    layers: int  # denoiser layers it adapts
    text_layers: int  # text-encoder layers (they act for whole-image LoRAs on SD and SDXL)
    problems: tuple[str, ...]  # what is wrong, one sentence each


_inspected: dict[tuple, LoraFile] = {}


def inspect_file(path: Path) -> LoraFile | str:
    """Read a LoRA file's safetensors header (keys and shapes only) and hash its content; a sentence
    when it is not a safetensors file. Cached by (path, size, mtime)."""
    try:
        st = path.stat()
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _inspected:
        return _inspected[key]
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not iterable)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        return f"is not a safetensors file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})".rstrip()
    result = _inspect_keys(shapes, sha256_file(path))
    _inspected[key] = result
    return result


def _inspect_keys(shapes: dict[str, tuple], sha256: str) -> LoraFile:
    pairs: dict[str, dict[str, tuple]] = {}
    problems: list[str] = []
    not_lora = [k for k in shapes if split_key(k) is None]
    if not_lora:
        problems.append(_some(not_lora, "is not a LoRA key", "are not LoRA keys") +
                        " (a LoRA holds lora_A/lora_B, lora_down/lora_up or .alpha keys)")
    for k, shape in shapes.items():
        s = split_key(k)
        if s is not None:
            pairs.setdefault(s[0], {})[s[1]] = shape
    fmt = detect_format(list(pairs))
    kinds: dict[str, int] = {}
    unknown, text = [], 0
    for module, roles in pairs.items():
        kind, _ = _denoiser_name(module, fmt)
        if kind is None:
            unknown.append(module)
            continue
        if kind == "te":
            text += 1
            continue
        kinds[kind] = kinds.get(kind, 0) + 1
        a, b = roles.get("A"), roles.get("B")
        if a is None or b is None:
            problems.append(f"layer `{module}` has {'no down (A)' if a is None else 'no up (B)'} matrix")
        elif len(a) < 2 or len(b) < 2 or a[0] != b[1]:
            problems.append(f"layer `{module}` has ranks that disagree: A {list(a)}, B {list(b)} "
                            "(A must be [rank, in], B [out, rank])")
    if unknown:
        problems.append(_some(unknown, "names no layer", "name no layer") + " of a Flux or UNet denoiser")
    if len(kinds) > 1:
        problems.append("its keys name layers of both Flux and UNet models")
    kind = max(kinds, key=kinds.get) if kinds else None
    if not kinds and not text and not problems:
        problems.append("it holds no LoRA layers")
    return LoraFile(sha256, fmt, kind, sum(kinds.values()), text, tuple(problems))


def _some(items: list[str], one: str, many: str) -> str:
    shown = ", ".join(f"`{x}`" for x in items[:EXAMPLE_KEYS])
    more = f" and {len(items) - EXAMPLE_KEYS} more" if len(items) > EXAMPLE_KEYS else ""
    return f"{shown}{more} {one if len(items) == 1 else many}"


# --- the scene's LoRAs ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Asked:
    """One LoRA as asked for: its fields, where they were written, and how its paths resolve."""

    spec: object  # spec.models.Lora
    pos: Pos  # the entry (messages about the whole LoRA)
    file_pos: Pos  # its `file` (or `repo`) value
    base: Path | None  # paths resolve against this directory, inside ``root``; None: as given (--lora)
    label: str  # how messages name it


def parse_cli_lora(arg: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` → (path, scale); ValueError with a sentence when SCALE is not a number."""
    path, sep, tail = arg.rpartition(":")
    if sep and path and re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", tail):
        if not -16.0 <= float(tail) <= 16.0:
            raise ValueError(f"--lora {arg}: the scale must lie in [-16, 16]")
        return path, float(tail)
    if sep and path.endswith(".safetensors"):
        raise ValueError(f"--lora {arg}: the scale after `:` must be a number")
    return arg, 1.0


def cli_lora_problems(cli_lora) -> list[str]:
    """What is wrong with the command line's ``--lora`` arguments, one sentence each, checked once before
    any scene (the arguments do not depend on a scene; which family a LoRA fits is the scene's check)."""
    out = []
    for arg in cli_lora or ():
        try:
            value, _scale = parse_cli_lora(arg)
        except ValueError as e:
            out.append(str(e))
            continue
        p = Path(value).expanduser().resolve()  # as the scenes' check resolves it: one inspect_file per file
        if not p.is_file():
            out.append(f"--lora {arg}: {'not found' if not p.exists() else 'not a file'} (looked for {p})")
        elif p.suffix != ".safetensors":
            out.append(f"--lora {arg}: not a .safetensors file: scenec loads safetensors only")
        else:
            got = inspect_file(p)
            if isinstance(got, str):
                out.append(f"--lora {arg}: {got}")
            else:
                out += [f"--lora {arg}: {problem}" for problem in got.problems]
    return out


def asked_model_loras(ls, model_override: str | None, cli_lora, diags: Diagnostics) -> list[Asked]:
    """The LoRAs of the whole image: the scene's ``model.lora`` (unless ``--model`` replaces the model), or
    the ``default_model`` table's of scenec.toml when the scene names no model, then each ``--lora``."""
    from scenec.spec import models as m

    out: list[Asked] = []
    sc_model = ls.scene.model
    if model_override is None and isinstance(sc_model, m.ModelSpec):
        for i, lo in enumerate(sc_model.lora):
            path = ("model", "lora", i)
            out.append(Asked(lo, ls.pos(path), ls.pos(path + ("file" if lo.file else "repo",))
                             if (lo.file or lo.repo) else ls.pos(path), ls.base_dir(path + ("file",)),
                             lo.file or lo.repo or "lora"))
    elif model_override is None and sc_model is None:
        out += _toml_loras(ls, diags)
    elif isinstance(sc_model, m.ModelSpec) and sc_model.lora:
        n = len(sc_model.lora)
        diags.warning(ls.pos(("model", "lora")), f"--model replaces the scene's model, and with it its "
                      f"{n} LoRA{'s' if n > 1 else ''}: not applied (give {'them' if n > 1 else 'it'} with --lora)")
    for arg in cli_lora or ():
        try:
            path, scale = parse_cli_lora(arg)
        except ValueError as e:
            diags.error(Pos(ls.display), str(e))
            continue
        where = Pos(ls.display)
        out.append(Asked(m.Lora(file=path, scale=scale), where, where, None, f"--lora {path}"))
    return out


def _toml_loras(ls, diags: Diagnostics) -> list[Asked]:
    from pydantic import ValidationError

    from scenec.spec import models as m
    from scenec.spec.paths import project_config

    try:
        table = project_config(ls.root).get("default_model")
    except ValueError:
        return []  # reported by resolve_model
    if not isinstance(table, dict):
        return []
    toml = ls.root / "scenec.toml"
    try:  # TOML carries no positions: the line that sets default_model
        line = next((i for i, t in enumerate(toml.read_text(encoding="utf-8").splitlines(), 1)
                     if re.match(r"\s*default_model\s*=", t)), 1)
    except (OSError, UnicodeDecodeError):
        line = 1
    pos = Pos(display_path(toml), line, 1)
    try:
        spec = m.ModelSpec.model_validate(table)
    except ValidationError as e:
        for err in e.errors(include_url=False):
            where = ".".join(["default_model", *(str(p) for p in err["loc"])])
            diags.error(pos, f"`{where}`: {err['msg'][:1].lower()}{err['msg'][1:]}, found `{err.get('input')}`")
        return []
    return [Asked(lo, pos, pos, ls.root, f"default_model.lora[{i}]") for i, lo in enumerate(spec.lora)]


TEXT_ENCODER_FAMILIES = ("sd", "sdxl")  # whole-image LoRAs adapt their CLIP text encoders too


def resolve(ls, asked: Asked, family: str, diags: Diagnostics, whole_image: bool = True) -> Lora | None:
    """One asked LoRA as the plan's :class:`spec.plan.Lora`, or None with its problems in ``diags``. A
    whole-image LoRA on a UNet model (SD, SDXL) adapts the text encoders too, as diffusers' ``load_lora_weights``
    and A1111 do; an entity's LoRA, and any on Flux, acts in the denoiser only (its text layers left out)."""
    lo = asked.spec
    if (lo.file is None) == (lo.repo is None):
        diags.error(asked.pos, "a LoRA needs exactly one of `file` and `repo`",
                    hint="`file: loras/style.safetensors`, or `repo: org/name` with `weight_name`")
        return None
    if lo.weight_name is not None and lo.repo is None:
        diags.error(asked.pos, "`weight_name` names a file of `repo`; with `file` leave it out")
        return None
    if lo.file is not None:
        path = _resolve_file(ls, asked, diags)
        name = lo.file
    else:
        weight = lo.weight_name or DEFAULT_WEIGHT_NAME
        path = cached_hub_file(lo.repo, weight)
        if path is not None:
            note_input(path)
        name = f"{lo.repo}/{weight}"
        if path is None:
            diags.error(asked.file_pos, f"LoRA `{name}` is not downloaded", hint=f"hf download {lo.repo} {weight}")
            return None
    if path is None:
        return None
    if path.suffix != ".safetensors":
        diags.error(asked.file_pos, f"LoRA `{name}` is not a .safetensors file: scenec loads safetensors only",
                    hint="convert it with safetensors (never load pickled weights)")
        return None
    got = inspect_file(path)
    if isinstance(got, str):
        diags.error(asked.file_pos, f"LoRA `{name}` {got}")
        return None
    for p in got.problems:
        diags.error(asked.file_pos, f"LoRA `{name}`: {p}")
    want = "flux" if family == "flux" else "unet"
    fam_of = FAMILY_OF_FORMAT.get(got.format, got.kind)
    if not got.problems and fam_of is not None and fam_of != want:
        diags.error(asked.file_pos, f"LoRA `{name}` adapts {'Flux' if fam_of == 'flux' else 'UNet (SD, SDXL)'} "
                    f"layers; this scene's model is {FAMILY_NAMES.get(family, family)}")
        return None
    if got.problems:
        return None
    text = bool(got.text_layers) and whole_image and family in TEXT_ENCODER_FAMILIES
    if got.text_layers and not text:
        where = "on Flux models" if family not in TEXT_ENCODER_FAMILIES else "for an entity's LoRA (its prompt and " \
            "region)"
        if not got.layers:  # nothing of it would act: the runtime would find no layer to adapt
            diags.error(asked.file_pos, f"LoRA `{name}` adapts only text-encoder layers; {where} scenec applies "
                        "LoRAs to the transformer or UNet only, so it would do nothing",
                        hint="use it as a whole-image LoRA (`model.lora`) on SD or SDXL, or leave it out")
            return None
        diags.warning(asked.file_pos, f"LoRA `{name}` also adapts {got.text_layers} text-encoder "
                      f"layer{'s' if got.text_layers > 1 else ''}; {where} scenec applies LoRAs to the transformer "
                      "or UNet only, so those are left out")
    return Lora(name=name, path=str(path), sha256=got.sha256, scale=float(lo.scale), format=got.format,
                text_encoder=text)


def _resolve_file(ls, asked: Asked, diags: Diagnostics) -> Path | None:
    from scenec.spec.paths import PathProblem, not_found_hint, resolve_inside

    value = asked.spec.file
    if asked.base is None:  # --lora: a path as the user gave it
        p = Path(value).expanduser().resolve()
        note_input(p)
    else:
        try:
            p = resolve_inside(value, asked.base, ls.root)
        except PathProblem as e:
            diags.error(asked.file_pos, e.message, e.hint)
            return None
        note_input(p)
    if not p.is_file():
        diags.error(asked.file_pos, f"LoRA `{value}` not found" if not p.exists() else f"LoRA `{value}` is not a file",
                    hint=f"looked for {p}" if p.exists() or asked.base is None else
                    not_found_hint(p, value, asked.base, ls.root))
        return None
    return p


def check_loras(ls, family: str, diags: Diagnostics, model_override: str | None = None,
                cli_lora=()) -> tuple[list[Lora], dict[str, list[Lora]]]:
    """Every LoRA of a scene, checked: (the whole image's, each entity's by id). Problems go to ``diags``."""
    glob = [r for a in asked_model_loras(ls, model_override, cli_lora, diags)
            if (r := resolve(ls, a, family, diags)) is not None]
    by_entity: dict[str, list[Lora]] = {}
    for i, e in enumerate(ls.scene.entities):
        for k, lo in enumerate(e.lora or ()):
            path = ("entities", i, "lora", k)
            asked = Asked(lo, ls.pos(path), ls.pos(path + ("file" if lo.file else "repo",)),
                          ls.base_dir(path + ("file",)), lo.file or lo.repo or "lora")
            r = resolve(ls, asked, family, diags, whole_image=False)
            if r is not None:
                by_entity.setdefault(e.id, []).append(r)
    return glob, by_entity


def eligen_padding(ls, loras: list[Lora], family: str) -> int | None:
    """EliGen's 512-token padding of entity prompts when a DiffSynth-named LoRA (EliGen's) is loaded on a
    Flux model and the scene does not set ``attention.pad_prompts`` itself; else None (keep the scene's)."""
    if family != "flux" or not any(lo.format == "diffsynth" for lo in loras):
        return None
    if ("attention", "pad_prompts") in ls.smap.values:
        return None
    return 512


def identity(node: dict) -> dict:
    """A plan model or entity as its ``job_hash`` sees it: each LoRA by what affects images (digest, scale,
    format), not where its file is; without LoRAs, no ``lora`` key at all (the hash of a plan without
    LoRAs is what it was before plans had them)."""
    from .text_options import identity as text_identity

    loras = node.get("lora") or []
    out = {k: v for k, v in node.items() if k != "lora"}
    if node.get("embeddings"):  # by digest and token, as LoRAs by digest
        out["embeddings"] = text_identity(node["embeddings"])
    if loras:
        out["lora"] = [{k: lo[k] for k in ("sha256", "scale", "format", "text_encoder") if k in lo} for lo in loras]
    return out
