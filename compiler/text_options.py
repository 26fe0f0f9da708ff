"""Text options at compile time (no torch): a scene's textual-inversion embeddings and CLIP skip.

``model: {id, embeddings: [{file, token}], clip_skip}`` (docs/language.md, docs/models.md). Each embedding is
checked from its safetensors header alone (keys and shapes, ``safe_open(..., framework="numpy")``): one tensor
``[vectors, width]`` for SD's one text encoder (diffusers' format, A1111's ``emb_params``), or ``clip_l`` and
``clip_g`` for SDXL's two (the format diffusers' SDXL example loads key by key); its widths against the model's
encoders; its token (default: the file's stem, as A1111 names it) against the other embeddings' and, where the
model's tokenizer files are on disk, the vocabulary (diffusers' ``load_textual_inversion`` refuses a word it
already has). ``clip_skip`` against the encoders' layer counts: diffusers' SD pipeline reads
``hidden_states[-(clip_skip + 1)]``, its SDXL pipeline ``hidden_states[-(clip_skip + 2)]``.

The plan's model section carries each embedding's digest and token (``spec.plan_text.Embedding``), part of every
``job_hash``; the runtime loads them (runtime/textual_inversion.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from scenec.spec.diagnostics import Diagnostics, Pos
from scenec.spec.fsio import note_input, sha256_file
from scenec.spec.plan_text import Embedding

from .caps import cached_hub_file, config_home

DEFAULT_WEIGHT_NAME = "learned_embeds.safetensors"  # diffusers' TEXT_INVERSION_NAME_SAFE
TEXT_FAMILIES = ("sd", "sdxl")
# the other UIs' settings as clip_skip: A1111 and ComfyUI read SD's text through the final layer norm at
# hidden_states[-N] (A1111's "Clip skip N", ComfyUI's "CLIP Set Last Layer" −N: diffusers' clip_skip N − 1); on SDXL
# ComfyUI reads hidden_states[-N] of both encoders (default −2: clip_skip 0) and A1111 always the penultimate layer
# (its "Clip skip" leaves SDXL alone unless its option `sdxl_clip_l_skip` is on)
A1111_HINT = {"sd": "A1111's \"Clip skip 2\" is `clip_skip: 1`",
              "sdxl": "on SDXL, ComfyUI's \"CLIP Set Last Layer\" −N is `clip_skip: N − 2` (−2, its default, is 0); "
                      "A1111 reads SDXL's penultimate layer whatever its \"Clip skip\": 0"}


@dataclass(frozen=True)
class Encoder:
    """What the compiler knows of one CLIP text encoder: its width, layer count and vocabulary file."""

    width: int
    layers: int
    vocab: Path | None = None


# the built-in models' encoders (their configs: hidden_size, num_hidden_layers)
KNOWN = {
    "sd15": ((768, 12),), "sd21": ((1024, 23),), "tiny-sd": ((32, 2),),
    "sdxl": ((768, 12), (1280, 32)), "sdxl-turbo": ((768, 12), (1280, 32)), "tiny-sdxl": ((32, 2), (32, 2)),
}
SUBFOLDERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


def _model_file(info, rel: str) -> Path | None:
    source, repo = config_home(info)  # a checkpoint file's: its `config`'s
    if repo is None:
        return None
    if source == "local":
        p = Path(repo) / rel
        note_input(p)
        return p if p.is_file() else None
    return cached_hub_file(repo, rel)


def encoders(info) -> list[Encoder] | None:
    """The model's text encoders as far as the compiler can tell (None: unknown until the build loads it)."""
    n = 2 if info.family.name == "sdxl" else 1
    vocabs = [_model_file(info, f"{tok}/vocab.json") for _, tok in SUBFOLDERS[:n]]
    if info.spec in KNOWN:
        return [Encoder(w, layers, v) for (w, layers), v in zip(KNOWN[info.spec], vocabs)]
    out = []
    for (te, _), v in zip(SUBFOLDERS[:n], vocabs):
        cfg = _model_file(info, f"{te}/config.json")
        try:
            d = json.loads(cfg.read_text()) if cfg is not None else None
            out.append(Encoder(int(d["hidden_size"]), int(d["num_hidden_layers"]), v))
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return out


def read_header(path: Path) -> dict[str, tuple] | str:
    """An embedding file's tensors (name → shape), or a sentence when it is not a safetensors file."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not iterable)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        return f"is not a safetensors file ({type(e).__name__})"


def layout(shapes: dict[str, tuple], family: str) -> tuple[list[str], list[int], int] | str:
    """(its tensor per text encoder, their widths, its vector count), or a sentence saying what is wrong."""
    if family == "sdxl":
        if set(shapes) != {"clip_l", "clip_g"}:
            return (f"holds {_names(shapes)}; an SDXL embedding holds `clip_l` and `clip_g` (one tensor per text "
                    "encoder)")
        keys = ["clip_l", "clip_g"]
    else:
        if len(shapes) != 1:
            return (f"holds {_names(shapes)}; an SD embedding holds one tensor `[vectors, width]`"
                    + (" (this one is SDXL's: `clip_l` and `clip_g`)" if set(shapes) == {"clip_l", "clip_g"} else ""))
        keys = list(shapes)
    dims = [shapes[k] for k in keys]
    if any(len(d) not in (1, 2) or 0 in d for d in dims):
        return "has a tensor of shape " + " and ".join(str(list(d)) for d in dims) + "; embeddings are [vectors, width]"
    vectors = {1 if len(d) == 1 else d[0] for d in dims}
    if len(vectors) > 1:
        return f"has {' and '.join(str(d[0]) for d in dims)} vectors in its two tensors; they must agree"
    return keys, [d[-1] for d in dims], vectors.pop()


def _names(shapes: dict) -> str:
    if not shapes:
        return "no tensor"
    shown = ", ".join(f"`{k}`" for k in list(shapes)[:3])
    return shown + (f" and {len(shapes) - 3} more" if len(shapes) > 3 else "")


def _vocab(path: Path | None) -> set[str]:
    if path is None:
        return set()
    try:
        return set(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return set()


def _model_spec(ls, model_override, diags: Diagnostics):
    """The scene's ``model`` mapping when its text options apply (``--model`` replaces them, with a warning)."""
    from scenec.spec import models as m

    sc = ls.scene.model
    if not isinstance(sc, m.ModelSpec):
        return None
    if model_override is not None:
        if sc.embeddings or sc.clip_skip is not None:
            diags.warning(ls.pos(("model",)), "--model replaces the scene's model, and with it its embeddings and "
                          "clip_skip: not applied")
        return None
    return sc


def check_text_options(ls, info, diags: Diagnostics, model_override: str | None = None
                       ) -> tuple[list[Embedding], int | None]:
    """The scene's embeddings and CLIP skip, checked: (the plan's embeddings, clip_skip or None). Problems go to
    ``diags`` at the keys that name them."""
    _toml_options(ls, diags)
    spec = _model_spec(ls, model_override, diags)
    if spec is None:
        return [], None
    family = info.family.name
    known = info.source != "unknown"
    if family not in TEXT_FAMILIES and known:
        for key, present in (("embeddings", bool(spec.embeddings)), ("clip_skip", spec.clip_skip is not None)):
            if present:
                diags.error(ls.key_pos(("model", key)), f"`{key}` acts on CLIP text encoders: SD and SDXL models; this "
                            f"scene's model is a {family.capitalize()} model",
                            hint=f"leave `{key}` out, or use an SD or SDXL model (`id: sd15`, `id: sdxl`)")
        return [], None
    encs = encoders(info) if known else None
    clip_skip = _clip_skip(ls, spec.clip_skip, family, encs, diags)
    out: list[Embedding] = []
    taken: dict[str, int] = {}  # token → the embedding that made it
    vocabs = [_vocab(e.vocab) for e in encs] if encs else []
    for i, emb in enumerate(spec.embeddings):
        got = _embedding(ls, i, emb, family, encs, diags)
        if got is None:
            continue
        where = ls.pos(("model", "embeddings", i, "token")) if emb.token else ls.pos(("model", "embeddings", i))
        words = [got.token] + [f"{got.token}_{k}" for k in range(1, got.vectors)]
        clash = next((w for w in words if w in taken), None)
        if clash is not None:
            diags.error(where, f"token `{clash}` is also embedding {taken[clash] + 1}'s"
                        + (" (a multi-vector embedding's `TOKEN_1`, `TOKEN_2`… are taken too)" if got.vectors > 1
                           or clash != got.token else ""), hint="give each embedding its own `token`")
            continue
        in_vocab = next((w for w in words if any(w in v for v in vocabs)), None)
        if in_vocab is not None:
            diags.error(where, f"token `{in_vocab}` is already a word of the model's tokenizer: the embedding would "
                        "not be its own word", hint="choose a token the model does not know, e.g. `<name>`")
            continue
        taken.update((w, i) for w in words)
        out.append(got)
    _inside_words(ls, [e.token for e in out], diags)
    return out, clip_skip


def _prompts(sc):
    """(key path, text) of every prompt and negative a scene writes."""
    yield ("background", "prompt"), sc.background.prompt
    yield ("background", "negative"), sc.background.negative
    for i, e in enumerate(sc.entities):
        yield ("entities", i, "prompt"), e.prompt
        yield ("entities", i, "negative"), e.negative
    for g, group in enumerate(sc.groups):
        for v, var in enumerate(group.variants):
            yield ("groups", g, "variants", v, "prompt"), getattr(var, "prompt", None)
            yield ("groups", g, "variants", v, "negative"), getattr(var, "negative", None)


def _inside_words(ls, tokens: list[str], diags: Diagnostics) -> None:
    """A warning where an embedding's token is part of a longer word of a prompt: the tokenizer splits an added
    word out wherever it occurs (diffusers, and so scenec), so the embedding acts inside that word too, where
    A1111 would match whole words only."""
    for token in tokens:
        pattern = re.compile(r"\w*" + re.escape(token) + r"\w*", re.IGNORECASE)
        for path, text in _prompts(ls.scene):
            word = next((m.group(0) for m in pattern.finditer(text or "") if m.group(0).lower() != token.lower()),
                        None)
            if word is not None:
                diags.warning(ls.pos(path), f"embedding token `{token}` is inside the word `{word}`: the tokenizer "
                              "splits it out of the word, so the embedding acts there too",
                              hint=f"use a token no word contains, e.g. `<{token}>`")


def _clip_skip(ls, value: int | None, family: str, encs, diags: Diagnostics) -> int | None:
    if not value:
        return None  # 0: the pipeline's own layer
    if encs:
        # SD: hidden_states[-(k + 1)] of layers + 1 states; SDXL: hidden_states[-(k + 2)]
        most = min(e.layers for e in encs) - (1 if family == "sdxl" else 0)
        if value > most:
            diags.error(ls.pos(("model", "clip_skip")), f"clip_skip {value} is out of range: this model's text "
                        f"encoder{'s have' if len(encs) > 1 else ' has'} {min(e.layers for e in encs)} layers, so "
                        f"clip_skip is 0 – {most}", hint=A1111_HINT[family])
            return None
    return value


def _embedding(ls, i: int, emb, family: str, encs, diags: Diagnostics) -> Embedding | None:
    path = ("model", "embeddings", i)
    at = ls.pos(path)
    if (emb.file is None) == (emb.repo is None):
        diags.error(at, "an embedding needs exactly one of `file` and `repo`",
                    hint="`file: embeddings/badhands.safetensors`, or `repo: org/name` with `weight_name`")
        return None
    if emb.weight_name is not None and emb.repo is None:
        diags.error(at, "`weight_name` names a file of `repo`; with `file` leave it out")
        return None
    file_pos = ls.pos(path + ("file" if emb.file else "repo",))
    if emb.file is not None:
        name = emb.file
        p = _resolve_file(ls, path, emb.file, file_pos, diags)
        if p is None:
            return None
    else:
        weight = emb.weight_name or DEFAULT_WEIGHT_NAME
        name = f"{emb.repo}/{weight}"
        p = cached_hub_file(emb.repo, weight)
        if p is None:
            diags.error(file_pos, f"embedding `{name}` is not downloaded", hint=f"hf download {emb.repo} {weight}")
            return None
        note_input(p)
    if p.suffix != ".safetensors":
        diags.error(file_pos, f"embedding `{name}` is not a .safetensors file: scenec loads safetensors only",
                    hint="convert it with safetensors (never load pickled weights)")
        return None
    shapes = read_header(p)
    got = shapes if isinstance(shapes, str) else layout(shapes, family)
    if isinstance(got, str):
        diags.error(file_pos, f"embedding `{name}` {got}")
        return None
    keys, widths, vectors = got
    if encs and [e.width for e in encs] != widths:
        want = " and ".join(str(e.width) for e in encs)
        diags.error(file_pos, f"embedding `{name}` is {' and '.join(map(str, widths))} wide; this model's text "
                    f"encoder{'s take' if len(encs) > 1 else ' takes'} {want}: it was made for another model",
                    hint="use an embedding trained for this model (SD 1.x: 768, SD 2.x: 1024, SDXL: 768 and 1280)")
        return None
    token = emb.token or Path(name).stem
    if not re.fullmatch(r"\S+", token):
        diags.error(file_pos, f"the file's stem `{token}` is no token (it holds spaces)", hint="set `token:`")
        return None
    return Embedding(name=name, path=str(p), sha256=sha256_file(p), token=token, vectors=vectors, keys=keys)


def _resolve_file(ls, path: tuple, value: str, file_pos: Pos, diags: Diagnostics) -> Path | None:
    from scenec.spec.paths import PathProblem, not_found_hint, resolve_inside

    try:
        p = resolve_inside(value, ls.base_dir(path + ("file",)), ls.root)
    except PathProblem as e:
        diags.error(file_pos, e.message, e.hint)
        return None
    note_input(p)
    if not p.is_file():
        diags.error(file_pos, f"embedding `{value}` not found" if not p.exists() else
                    f"embedding `{value}` is not a file",
                    hint=not_found_hint(p, value, ls.base_dir(path + ("file",)), ls.root) if not p.exists() else
                    f"looked for {p}")
        return None
    return p


def _toml_options(ls, diags: Diagnostics) -> None:
    """``default_model`` in scenec.toml takes an id, configs, a VAE and LoRAs; text options are the scene's (refused
    there)."""
    from scenec.spec.diagnostics import display_path
    from scenec.spec.paths import project_config, project_key_line

    if ls.scene.model is not None:
        return
    try:
        table = project_config(ls.root).get("default_model")
    except ValueError:
        return
    if isinstance(table, dict) and ("embeddings" in table or "clip_skip" in table):
        diags.error(Pos(display_path(ls.root / "scenec.toml"), project_key_line(ls.root, "default_model"), 1),
                    "`default_model` in scenec.toml takes `id`, `config`, `vae` and `lora`; `embeddings` and "
                    "`clip_skip` go in the scene's `model`",
                    hint="model: {id: sd15, embeddings: [...], clip_skip: 1}")


def identity(embeddings: list[dict]) -> list[dict]:
    """The plan's embeddings as a ``job_hash`` sees them: what they do (digest, token), not where they lie."""
    return [{k: e[k] for k in ("sha256", "token")} for e in embeddings]
