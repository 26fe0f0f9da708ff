"""Model families and what the compiler must know of them (no torch here).

A *family* fixes the geometry the compiler lowers to: VAE downsampling, token size, canvas
multiple, the grids masks are needed on, and the sampler kind; and what its runtime can run: the
most entities one image may hold and the methods it implements. The check pass refuses, at the key
that asks for it, what the model's family cannot run, so `scenec validate --model M` catches it
before a build. A *model* is an alias or an id that belongs to a family and carries sampler
defaults.

Registering a family is adding it to ``FAMILIES`` and its models to ``ALIASES``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from scenec.spec.fsio import note_input

from .single_file import is_single_file

# The methods a family's runtime may implement, and what each is called in messages.
METHODS: dict[str, str] = {
    "regional": "regional attention",  # entities' prompts restricted to their regions (EliGen)
    "coupling": "coupled generation",  # `groups`: θ-weighted background and entity prompts
    "reference": "reference images",  # `reference`: COW's paste and re-noise cycles
    "sow": "SOW attention modulation",  # `reference.modulation`: attention toward/away from a reference
    "inpaint": "inpainting",  # `background.image`: keep the init image outside the regions
    "visual": "object-level visual prompts",  # `visual` (kv-mixed): image tokens in the region's attention
    "ip-adapter": "IP-Adapter visual prompts",  # `visual.mode: ip-adapter`: diffusers-format IP-Adapter weights
    "control": "ControlNet conditions",  # `control`: a ControlNet's residuals added to the denoiser's
    "tiling": "seamless tiling",  # `canvas.tiling`: circular padding in the denoiser and the VAE decoder
}
ALL_METHODS = frozenset(METHODS)


@dataclass(frozen=True)
class Family:
    name: str  # "flux" | "sd"
    vae_scale: int  # pixels per latent cell
    token_px: int  # pixels per attention token at the finest attention resolution
    multiple: int  # canvas sides must be multiples of this
    sampler: str  # "flow-euler" | "ddim"
    # grids masks are lowered to: name -> pixels per cell (ceil division on odd sizes)
    grids: tuple[tuple[str, int], ...]
    max_entities: int | None = None  # entity prompts one image may hold; None: no limit
    methods: frozenset[str] = ALL_METHODS  # names in METHODS this family's runtime implements
    solvers: tuple[str, ...] = ()  # what `sampler.solver` may name (compiler/solvers.py); `sampler` is the default


# The runtime's token layouts (runtime/layout.py) key each token by an int64 bitmask of the prompts it
# may see: bit 0 is the global prompt, so 62 entity prompts fit beside it in the non-negative range.
# Both families' regional attention is built on them.
MAX_ENTITIES = 62
DDPM_SOLVERS = ("ddim", "dpm++2m", "dpm++2m-karras", "euler", "euler-karras", "euler-a", "unipc", "unipc-karras",
                "dpm++2m-sde", "dpm++2m-sde-karras")
# Flux: no seamless tiling (its patch embedding has no padding to wrap and RoPE numbers the positions)
FLUX = Family("flux", vae_scale=8, token_px=16, multiple=16, sampler="flow-euler",
              grids=(("latent", 8), ("token", 16)), max_entities=MAX_ENTITIES, solvers=("flow-euler",),
              methods=ALL_METHODS - {"tiling"})
SD = Family("sd", vae_scale=8, token_px=8, multiple=8, sampler="ddim",
            grids=(("latent", 8), ("a16", 16), ("a32", 32), ("a64", 64)), max_entities=MAX_ENTITIES,
            solvers=DDPM_SOLVERS)
# SDXL: SD's UNet geometry (attention at 1/16 and 1/32 of the canvas on the released models; the
# other grids cost nothing), two text encoders, a pooled vector and size micro-conditioning
SDXL = Family("sdxl", vae_scale=8, token_px=8, multiple=8, sampler="ddim",
              grids=(("latent", 8), ("a16", 16), ("a32", 32), ("a64", 64)), max_entities=MAX_ENTITIES,
              solvers=DDPM_SOLVERS)
FAMILIES = {"flux": FLUX, "sd": SD, "sdxl": SDXL}
# a diffusers model directory's `model_index.json` names its pipeline class: the family it runs on
PIPELINE_FAMILIES = {"FluxPipeline": FLUX, "StableDiffusionPipeline": SD, "StableDiffusionXLPipeline": SDXL}


@dataclass(frozen=True)
class ModelInfo:
    spec: str  # what the user wrote
    family: Family
    source: str  # "alias" | "local" | "hub" | "unknown" (a spec no family was found for: the default stands in)
    repo: str | None  # hub id or local directory the runtime loads
    steps: int
    guidance: float
    max_sequence_length: int = 512  # T5 tokens of the global prompt (Flux)
    # a single-file checkpoint (source "file", repo: the file): where its diffusers configs come from (a local
    # directory's absolute path or a hub id) and the file's content digest
    config: str | None = None
    sha256: str | None = None


ALIASES: dict[str, ModelInfo] = {
    "flux-dev": ModelInfo("flux-dev", FLUX, "alias", "black-forest-labs/FLUX.1-dev", steps=28, guidance=3.5),
    "flux-schnell": ModelInfo("flux-schnell", FLUX, "alias", "black-forest-labs/FLUX.1-schnell", steps=4,
                              guidance=0.0, max_sequence_length=256),
    "tiny": ModelInfo("tiny", FLUX, "alias", None, steps=4, guidance=3.5, max_sequence_length=128),
    "sd15": ModelInfo("sd15", SD, "alias", "stable-diffusion-v1-5/stable-diffusion-v1-5", steps=50, guidance=7.5),
    "sd21": ModelInfo("sd21", SD, "alias", "stabilityai/stable-diffusion-2-1-base", steps=50, guidance=7.5),
    "tiny-sd": ModelInfo("tiny-sd", SD, "alias", None, steps=4, guidance=7.5),
    "sdxl": ModelInfo("sdxl", SDXL, "alias", "stabilityai/stable-diffusion-xl-base-1.0", steps=30, guidance=5.0),
    "sdxl-turbo": ModelInfo("sdxl-turbo", SDXL, "alias", "stabilityai/sdxl-turbo", steps=4, guidance=0.0),
    "tiny-sdxl": ModelInfo("tiny-sdxl", SDXL, "alias", None, steps=4, guidance=5.0),
}
# the sampler defaults of a family's model that is not an alias (a hub id or a local directory)
FAMILY_DEFAULTS = {"flux": "flux-dev", "sd": "sd15", "sdxl": "sdxl"}


class UnknownModel(ValueError):
    """A model whose family scenec cannot tell (one sentence on how to make it known). ``at``: the key of
    ``model`` the sentence is about (``"config"``), or None for the model itself."""

    def __init__(self, message: str, at: str | None = None):
        super().__init__(message)
        self.at = at

DEFAULT_MODEL = "flux-dev"  # what compile assumes when neither scene nor project names a model


def model_info(spec: str | None, base_dir: Path | None = None, config: str | None = None) -> ModelInfo:
    """Resolve a model spec: an alias, a local diffusers directory, a hub id, or a single-file checkpoint.

    The family of a directory or hub id is the pipeline class its ``model_index.json`` names (a hub
    id's is read from the Hugging Face cache, never downloaded); an alias's repository is known; a
    checkpoint file's is told from its tensors (compiler/single_file.py), ``config`` naming where its
    diffusers configs come from. A model whose family cannot be told raises :class:`UnknownModel`: it is
    never guessed from a name."""
    spec = spec or DEFAULT_MODEL
    local = Path(spec) if Path(spec).is_absolute() or base_dir is None else base_dir / spec
    if is_single_file(spec):
        return _single_file(spec, local, config, base_dir)
    if config is not None:
        raise UnknownModel(f"`config` applies to a single-file checkpoint (`.safetensors`); `{spec}` is not one, "
                           "and its own configs load with it", at="config")
    if spec in ALIASES:
        return ALIASES[spec]
    note_input(local / "model_index.json")  # a local model directory appearing changes the family
    if local.is_dir() and (local / "model_index.json").is_file():
        return _with_family(spec, "local", str(local.resolve()), local / "model_index.json")
    if local.exists() or spec.startswith((".", "/", "~")):
        raise UnknownModel(f"`{spec}` is not a diffusers model directory (no model_index.json); point it at a "
                           "directory saved with save_pretrained, or use an alias: " + ", ".join(ALIASES))
    for a in ALIASES.values():
        if a.repo == spec:  # an alias's repository, named by its id
            return ModelInfo(spec, a.family, "hub", spec, a.steps, a.guidance, a.max_sequence_length)
    if "/" not in spec:  # a hub id is ORG/NAME: no download can make this one a model
        from scenec.spec.diagnostics import did_you_mean

        close = did_you_mean(spec, ALIASES)
        raise UnknownModel(f"`{spec}` is no alias, local diffusers directory or hub id (ORG/NAME)"
                           + (f": {close}" if close else "; aliases: " + ", ".join(ALIASES)))
    index = cached_hub_file(spec, "model_index.json")
    if index is None:
        raise UnknownModel(f"the model family of `{spec}` is unknown until its weights are here: `hf download "
                           f"{spec}` (after `hf auth login` if it is gated), or point it at a local diffusers "
                           "directory, or use an alias: " + ", ".join(ALIASES))
    return _with_family(spec, "hub", spec, index)


def _single_file(spec: str, path: Path, config: str | None, base_dir: Path | None) -> ModelInfo:
    """A single-file checkpoint: its family from its header, its configs from ``config`` or diffusers' default
    repository for its type (in the Hugging Face cache), its content hashed once per (path, size, mtime)."""
    from scenec.spec.fsio import sha256_big_file

    from .single_file import PICKLED, SUFFIX_HINT, inspect

    note_input(path)
    if spec.lower().endswith(PICKLED):
        raise UnknownModel(f"`{spec}` is a pickle checkpoint: loading one runs whatever code it holds, so scenec "
                           f"loads safetensors only; use the model's `.safetensors` release ({SUFFIX_HINT})")
    if not path.is_file():
        raise UnknownModel(f"`{spec}` does not exist" + (" (it is a directory)" if path.is_dir() else "")
                           + f"; `model` names {SUFFIX_HINT}, a diffusers directory, a hub id or an alias")
    got = inspect(path)
    if isinstance(got, str):
        raise UnknownModel(f"`{spec}` {got}")
    if got.family is None:
        raise UnknownModel(f"`{spec}` {got.problem}")
    if not got.has_vae:  # a "no-VAE" release: diffusers' from_single_file refuses it (SingleFileComponentError)
        raise UnknownModel(f"`{spec}` holds no VAE (no `first_stage_model.…` tensors: a release without its VAE); "
                           "scenec loads single-file checkpoints with their VAE baked in: use that release (a "
                           "`vae` key cannot stand in for it yet)")
    fam = FAMILIES[got.family]
    where = _config_source(config if config is not None else got.default_config, base_dir, config is None, spec)
    index = Path(where) / "model_index.json" if Path(where).is_absolute() else \
        cached_hub_file(where, "model_index.json")
    try:
        cls = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        cls = ""
    if PIPELINE_FAMILIES.get(cls) is not fam:
        raise UnknownModel(f"`config: {config}` is a {cls or 'diffusers'} model, but `{spec}` is a {fam.name} "
                           f"checkpoint ({got.model_type}): name a {fam.name} diffusers directory or hub id",
                           at="config")
    d = ALIASES[FAMILY_DEFAULTS[fam.name]]
    return ModelInfo(spec, fam, "file", str(path.resolve()), d.steps, d.guidance, d.max_sequence_length,
                     config=where, sha256=sha256_big_file(path))


def _config_source(config: str, base_dir: Path | None, default: bool, spec: str) -> str:
    """Where a checkpoint's diffusers configs are: a local directory's absolute path, or a hub id whose
    ``model_index.json`` the Hugging Face cache holds (never downloaded here)."""
    if config in ALIASES:
        if ALIASES[config].repo is None:
            raise UnknownModel(f"`{config}` is built in code and has no config files; save it with "
                               "save_pretrained and name that directory", at="config")
        config = ALIASES[config].repo
    local = Path(config).expanduser()
    local = local if local.is_absolute() or base_dir is None else base_dir / config
    note_input(local / "model_index.json")
    if local.is_dir() and (local / "model_index.json").is_file():
        return str(local.resolve())
    if local.exists() or config.startswith((".", "/", "~")) or config.count("/") != 1:
        raise UnknownModel(f"`config: {config}` is no diffusers model directory (no model_index.json) or hub id "
                           "(ORG/NAME)", at="config")
    if cached_hub_file(config, "model_index.json") is None:
        get = f"`hf download {config} --include \"*.json\" --include \"*.txt\"` (configs and tokenizers, no weights)"
        if default:
            raise UnknownModel(f"`{spec}` loads with the configs of `{config}`, which are not here: {get}, or set "
                               "`model: {id: FILE, config: DIR}` to a local diffusers directory of the same "
                               "architecture")
        raise UnknownModel(f"the configs of `{config}` are not here: {get}, or name a local diffusers directory",
                           at="config")
    return config


def _with_family(spec: str, source: str, repo: str, index: Path) -> ModelInfo:
    try:
        cls = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        cls = ""
    fam = PIPELINE_FAMILIES.get(cls)
    if fam is None:
        raise UnknownModel(f"`{spec}` is a {cls or 'diffusers'} model; scenec runs "
                           + ", ".join(PIPELINE_FAMILIES) + " models")
    d = ALIASES[FAMILY_DEFAULTS[fam.name]]
    return ModelInfo(spec, fam, source, repo, d.steps, d.guidance, d.max_sequence_length)


def config_home(info: ModelInfo) -> tuple[str, str | None]:
    """(source, repo) of where a model's config files are: a checkpoint file's ``config`` (a local directory,
    "local", or a hub id, "hub"); any other model's own."""
    if info.source == "file" and info.config:
        return ("local" if Path(info.config).is_absolute() else "hub"), info.config
    return info.source, info.repo


def cached_hub_file(repo: str, filename: str) -> Path | None:
    """A hub repository's file from the local Hugging Face cache, if it is there: the compiler never downloads
    (model indexes, scheduler configs, LoRAs, ControlNets); None for anything else, a malformed id included."""
    if repo.count("/") != 1:
        return None
    try:
        from huggingface_hub import constants, try_to_load_from_cache

        # the revision `main` resolves to: a new `hf download` moves it, and what was found here with it (a
        # snapshot's path in the plan: a VAE's, a LoRA's), so a compile memo must not outlive it
        note_input(Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / "main")
        hit = try_to_load_from_cache(repo, filename)
    except (ImportError, ValueError):  # ValueError: not a valid repo id
        return None
    return Path(hit) if isinstance(hit, str) else None


def check_family(ls, info: ModelInfo, diags) -> None:
    """What the scene asks of its model's family and the family lacks, at the key that asks for it:
    a method the family's runtime does not implement, or more entities in one image than it allows
    (with groups an image holds its variant's prompt and entities)."""
    fam = info.family
    sc = ls.scene
    by = f"{fam.name} models such as `{info.spec}`"

    def lacks(method: str, path: tuple, what: str, hint: str | None = None) -> bool:
        if method in fam.methods:
            return False
        can = ", ".join(METHODS[x] for x in METHODS if x in fam.methods) or "none of scenec's methods"
        diags.error(ls.key_pos(path), f"{what} {METHODS[method]}, which {by} do not run",
                    hint=hint or f"{fam.name} models run: {can}")
        return True

    if sc.entities:
        lacks("regional", ("entities",), "`entities` need")
    if sc.groups:
        lacks("coupling", ("groups",), "`groups` need")
    if sc.background.image is not None:
        lacks("inpaint", ("background", "image"), "`background.image` needs")
    if sc.control:
        lacks("control", ("control",), "`control` needs")
    if sc.canvas.tiling != "none":
        lacks("tiling", ("canvas", "tiling"), "`canvas.tiling` needs",
              hint="tile with an SD or SDXL model")
    for i, e in enumerate(sc.entities):
        r, path = e.reference, ("entities", i, "reference")
        if r is not None and not lacks("reference", path, "`reference` needs") and r.modulation is not False \
                and r.cycles > 0:
            lacks("sow", path + ("modulation",), "`reference.modulation` needs",
                  hint="set `modulation: false` to use the reference without it")
        if e.visual is not None and not lacks("visual", ("entities", i, "visual"), "`visual` needs") \
                and e.visual.mode == "ip-adapter":
            lacks("ip-adapter", ("entities", i, "visual", "mode"), "`mode: ip-adapter` needs",
                  hint="use `mode: kv-mixed` with a kv-mixed adapter")
    limit = fam.max_entities
    if limit is None:
        return
    if not sc.groups and len(sc.entities) > limit:
        diags.error(ls.pos(("entities", limit)), f"the scene has {len(sc.entities)} entities, more than the {limit} "
                    f"{by} allow in one image", hint="use `groups` so that each image shows fewer, or split the scene")
    ids = {e.id for e in sc.entities}
    for gi, g in enumerate(sc.groups):
        for vi, v in enumerate(g.variants):
            own = 1 if v.prompt is not None else 0
            shown: dict[str, int] = {}  # entity id → its index in the variant's list (first mention)
            for k, eid in enumerate(v.entities or []):
                if eid in ids:
                    shown.setdefault(eid, k)
            if own + len(shown) > limit:
                first_over = list(shown.values())[max(0, limit - own)]
                diags.error(ls.pos(("groups", gi, "variants", vi, "entities", first_over)),
                            f"variant `{v.id}` shows {own + len(shown)} entity prompts"
                            + (" (its own prompt and its entities)" if own else "")
                            + f", more than the {limit} {by} allow in one image",
                            hint="move some of its entities to another variant")


def grid_size(canvas: tuple[int, int], px: int) -> tuple[int, int]:
    """(height, width) of a grid with ``px`` pixels per cell; partial cells count (ceil)."""
    w, h = canvas
    return (-(-h // px), -(-w // px))
