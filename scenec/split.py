"""``scenec split``: N full prompts → one shared background prompt + N entity prompts, as a scene.

The default is a deterministic heuristic (no model): each prompt is cut into phrases at commas and
before prepositions that usually start a setting ("in", "on", "at", "under", …); the phrases every
prompt has (compared case- and space-insensitively) are the background, in the first prompt's order,
without a leading preposition; what is left of each prompt is its subject. With ``--llm MODEL`` a
local transformers causal LM does the split instead (greedy decoding, a fixed instruction, JSON out).

This module never imports torch unless the LLM path runs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SCHEMA_PATH = "schemas/scene.schema.json"  # under the project root, written beside the scene by `scenec split`
PREPOSITIONS = ("in", "on", "at", "under", "over", "beneath", "below", "above", "near", "beside", "inside",
                "amid", "amidst", "among", "along", "behind", "across", "through", "against", "during", "underneath")
_PREP_RE = re.compile(r"\s+(?=(?:%s)\s)" % "|".join(PREPOSITIONS), re.IGNORECASE)
_ARTICLES = {"a", "an", "the", "one", "two", "three", "some", "this", "that", "his", "her", "their", "its"}

Generate = Callable[[str], str]  # instruction + prompts → the model's continuation


class SplitError(Exception):
    """One sentence a user can act on."""


@dataclass
class Split:
    background: str
    entities: list[str]
    ids: list[str]
    prompts: list[str]
    warnings: list[str] = field(default_factory=list)


def _norm(s: str) -> str:
    return " ".join(s.lower().split()).strip(" .;")


def phrases(prompt: str) -> list[tuple[str, str]]:
    """A prompt → phrases ``(separator, text)``: cut at commas (separator ", ") and before prepositions
    (separator " "; the preposition stays with the phrase it opens)."""
    out: list[tuple[str, str]] = []
    for ci, part in enumerate(p.strip() for p in prompt.strip().rstrip(".").split(",")):
        if not part:
            continue
        for pi, ph in enumerate(x.strip() for x in _PREP_RE.split(part)):
            if ph:
                out.append((", " if ci and not pi else " ", ph))
    if out:
        out[0] = ("", out[0][1])
    return out


def _join(parts: list[tuple[str, str]]) -> str:
    text = ""
    for sep, ph in parts:
        text += (sep if text else "") + ph
    return text.strip()


def _strip_preposition(text: str) -> str:
    words = text.split(None, 1)
    if len(words) == 2 and words[0].lower() in PREPOSITIONS:
        return words[1]
    return text


def subject_id(subject: str) -> str:
    """An id for a subject: the last word before its first -ing word or preposition ("a red fox running"
    → fox), lower-case, [a-z0-9_-]."""
    words = [re.sub(r"[^a-z0-9_-]", "", w.lower()) for w in subject.replace(",", " ").split()]
    words = [w for w in words if w]
    head = []
    for w in words:
        if head and (w in PREPOSITIONS or (w.endswith("ing") and len(w) > 4) or w in ("with", "and", "who")):
            break
        head.append(w)
    head = [w for w in head if w not in _ARTICLES] or words or ["subject"]
    return head[-1][:40].strip("-_") or "subject"


def _unique_ids(ids: list[str]) -> list[str]:
    out, seen = [], {}
    for i in ids:
        n = seen.get(i, 0)
        seen[i] = n + 1
        out.append(i if n == 0 else f"{i}-{n + 1}")
    # a later plain id may collide with an earlier suffixed one
    while len(set(out)) < len(out):
        out = [x if out.count(x) == 1 or k == out.index(x) else f"{x}-{k + 1}" for k, x in enumerate(out)]
    return out


def heuristic_split(prompts: list[str]) -> Split:
    """Shared phrases → background; the rest of each prompt → its subject (see the module docstring)."""
    prompts = [p.strip() for p in prompts if p.strip()]
    if len(prompts) < 2:
        raise SplitError("split needs at least two prompts (one per line)")
    parsed = [phrases(p) for p in prompts]
    common = set.intersection(*({_norm(t) for _, t in ph} for ph in parsed))
    warns: list[str] = []
    bg_parts = [(sep, t) for sep, t in parsed[0] if _norm(t) in common]
    background = _strip_preposition(_join(bg_parts))
    entities = []
    for p, ph in zip(prompts, parsed):
        rest = [(sep, t) for sep, t in ph if _norm(t) not in common]
        subj = _join(rest)
        if not subj:
            warns.append(f"`{p}` has nothing besides the shared background; its entity prompt is the whole prompt")
            subj = p
        entities.append(subj)
    if not background:
        warns.append("the prompts share no phrase; the background prompt is empty and each entity prompt is a "
                     "whole prompt")
        entities = prompts
    return Split(background, entities, _unique_ids([subject_id(e) for e in entities]), prompts, warns)


# --- LLM ---------------------------------------------------------------------------------------------

INSTRUCTION = """You split image prompts that show different subjects in one shared setting.
Given the prompts, answer with JSON only: {"background": "<the shared setting, as a prompt>", "entities": ["<subject of prompt 1>", "<subject of prompt 2>", ...]}.
The background must describe only what all prompts share; each entity only what is particular to its prompt.

Prompts:
"""  # noqa: E501 (the instruction is read by the model as written)


def llm_instruction(prompts: list[str]) -> str:
    return INSTRUCTION + "".join(f"{i + 1}. {p}\n" for i, p in enumerate(prompts)) + "JSON:"


def llm_split(prompts: list[str], generate: Generate) -> Split:
    """Split with a text generator ``generate(instruction) -> text`` (greedy LM); the first JSON object in its
    answer must hold ``background`` and one ``entities`` string per prompt."""
    prompts = [p.strip() for p in prompts if p.strip()]
    if len(prompts) < 2:
        raise SplitError("split needs at least two prompts (one per line)")
    text = generate(llm_instruction(prompts))
    doc = _first_json_object(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("background"), str) \
            or not isinstance(doc.get("entities"), list) or not all(isinstance(e, str) for e in doc["entities"]):
        raise SplitError("the language model's answer is not the JSON asked for "
                         f"({text.strip()[:120]!r}); try another --llm model or the default heuristic")
    ents = [e.strip() for e in doc["entities"]]
    if len(ents) != len(prompts) or not all(ents):
        raise SplitError(f"the language model gave {len(ents)} entity prompts for {len(prompts)} prompts")
    return Split(doc["background"].strip(), ents, _unique_ids([subject_id(e) for e in ents]), prompts)


def _first_json_object(text: str):
    dec = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            return dec.raw_decode(text[m.start():])[0]
        except ValueError:
            continue
    return None


def transformers_generator(model: str, max_new_tokens: int = 256) -> Generate:
    """A greedy text generator from a local transformers causal LM (no remote code)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - both are dependencies
        raise SplitError(f"--llm needs torch and transformers ({e})") from None
    try:
        tok = AutoTokenizer.from_pretrained(model)
        lm = AutoModelForCausalLM.from_pretrained(model).eval()
    except (OSError, ValueError) as e:
        raise SplitError(f"language model `{model}` is not available here ({type(e).__name__}); "
                         "pass --llm a local directory or a downloaded hub id") from None

    def generate(prompt: str) -> str:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = lm.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    return generate


# --- the scene --------------------------------------------------------------------------------------

def _q(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def scene_text(split: Split, model: str = "tiny", width: int = 1024, height: int = 1024,
               group: str = "split", source: str | None = None, schema: str = SCHEMA_PATH) -> str:
    """The scene file: the schema modeline first (``schema``: a path relative to the scene file), one group
    with one ``prompt:`` variant per prompt."""
    lines = [f"# yaml-language-server: $schema={schema}",
             f"# Written by `scenec split`{f' from {source}' if source else ''}: one shared background, "
             "one variant per prompt.",
             "scenec: 1",
             f"model: {model if re.fullmatch(r'[A-Za-z][A-Za-z0-9._/-]*', model) else _q(model)}",
             f"canvas: {{width: {width}, height: {height}}}",
             "background:",
             f"  prompt: {_q(split.background)}",
             "groups:",
             f"  - id: {group}",
             "    variants:"]
    for vid, ent, full in zip(split.ids, split.entities, split.prompts):
        lines.append(f"      # {full}")
        lines.append(f"      - {{id: {vid}, prompt: {_q(ent)}}}")
    return "\n".join(lines) + "\n"


def write_schema_for(scene: Path) -> str:
    """Write the scene schema under the project root of ``scene`` (the nearest ancestor of its directory
    holding scenec.toml, else that directory), as ``scenec init`` does; the modeline's path to it,
    relative to the scene's directory."""
    import os

    from scenec.spec.fsio import atomic_write
    from scenec.spec.paths import PROJECT_FILE
    from scenec.spec.schema import scene_schema_text

    here = scene.resolve().parent
    root = next((d for d in (here, *here.parents) if (d / PROJECT_FILE).is_file()), here)
    target = root / SCHEMA_PATH
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, scene_schema_text().encode())  # generated: this scenec's schema, as init writes it
    return Path(os.path.relpath(target, here)).as_posix()


def read_prompts(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SplitError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SplitError(f"{path}: is a directory, not a text file of prompts") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SplitError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def check_group_id(group: str) -> str:
    """``--group``: an id as the scene language takes it (so the scene written validates)."""
    from scenec.spec.models import ID_PATTERN

    if not re.fullmatch(ID_PATTERN.strip("^$"), group or "") or len(group) > 64:
        raise SplitError(f"--group `{group}` is not a valid id: use 1 to 64 lowercase letters, digits, `_` and `-`")
    return group


def parse_canvas(text: str, model: str | None = None) -> tuple[int, int]:
    """``WIDTHxHEIGHT``, each side what the scene's model accepts (so the scene written validates)."""
    from scenec.compiler.caps import UnknownModel, model_info
    from scenec.spec.models import MAX_CANVAS

    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text or "")
    if not m:
        raise SplitError(f"--canvas must be WIDTHxHEIGHT, e.g. 1024x768, not `{text}`")
    try:
        fam = model_info(model).family if model else None
    except UnknownModel:
        fam = None  # a model not here yet: the scene's `validate` will tell
    k = fam.multiple if fam else 1
    for side, v in (("width", int(m.group(1))), ("height", int(m.group(2)))):
        if not 16 <= v <= MAX_CANVAS or v % k:
            near = [x for x in (v // k * k, v // k * k + k) if 16 <= x <= MAX_CANVAS]
            raise SplitError(f"--canvas {text}: the {side} {v} must be " + (f"a multiple of {k} " if k > 1 else "")
                             + f"from 16 to {MAX_CANVAS}" + (f" ({fam.name} models such as `{model}`)" if fam else "")
                             + (f"; nearest: {' or '.join(map(str, near))}" if near and v % k else ""))
    return int(m.group(1)), int(m.group(2))
