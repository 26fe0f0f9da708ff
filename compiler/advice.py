"""Warnings about what a valid scene asks for and will not get (part of the ``check`` pass): negative
prompts that cannot act, prompts longer than the model reads, a ``background.image`` that nothing
changes. Each is reported once, at the value it is about."""

from __future__ import annotations

import re
from typing import Iterator

from scenec.spec.diagnostics import Diagnostics
from scenec.spec.load import LoadedScene

from .caps import ModelInfo

CLIP_TOKENS = 77  # CLIP's context, BOS and EOS included (SD, SDXL)
_PIECE = re.compile(r"\w+|[^\w\s]")  # words and punctuation: each is at least one token of CLIP's or T5's


def check_advice(ls: LoadedScene, info: ModelInfo, diags: Diagnostics) -> None:
    check_strength(ls, diags)
    check_negatives(ls, info, diags)
    check_prompt_lengths(ls, info, diags)
    check_background_image(ls, diags)


def prompt_texts(ls: LoadedScene, key: str) -> Iterator[tuple[tuple, str]]:
    """(path, text) of every non-empty ``key`` (prompt or negative): background, entities, variants."""
    sc = ls.scene
    if getattr(sc.background, key):
        yield ("background", key), getattr(sc.background, key)
    for i, e in enumerate(sc.entities):
        if getattr(e, key):
            yield ("entities", i, key), getattr(e, key)
    for g, grp in enumerate(sc.groups):
        for v, var in enumerate(grp.variants):
            if getattr(var, key):
                yield ("groups", g, "variants", v, key), getattr(var, key)


def check_negatives(ls: LoadedScene, info: ModelInfo, diags: Diagnostics) -> None:
    """A negative prompt acts only through a negative pass: Flux's true CFG (``true_cfg > 1``), or CFG on
    SD models (``guidance > 1``)."""
    sc = ls.scene
    if info.family.name == "flux":
        if sc.sampler.true_cfg > 1:
            return
        why = f"Flux runs no negative pass at `sampler.true_cfg: {sc.sampler.true_cfg:g}`"
        hint = "set `sampler.true_cfg` above 1 (e.g. 4: one more model call per step), or remove the negative"
    else:
        g = sc.sampler.guidance if sc.sampler.guidance is not None else info.guidance
        if g > 1:
            return
        why = f"classifier-free guidance is off at `sampler.guidance: {g:g}`"
        hint = "set `sampler.guidance` above 1, or remove the negative"
    where = [ls.pos(path) for path, _ in prompt_texts(ls, "negative")]
    where = sorted(set(where), key=lambda p: (p.file != ls.display, p.file, p.line, p.col))
    if not where:
        return
    first, rest = where[0], where[1:]
    others = "" if not rest else f" (and {len(rest)} more: " + ", ".join(
        f"line {p.line}" if p.file == first.file else str(p) for p in rest) + ")"
    diags.warning(first, f"negative prompts have no effect{others}: {why}", hint)


def token_floor(text: str) -> int:
    """A lower bound of the tokens ``text`` takes in CLIP's or T5's tokenizer, without either (the
    compiler loads no tokenizer): every word and every punctuation mark is at least one token."""
    return len(_PIECE.findall(text))


def check_prompt_lengths(ls: LoadedScene, info: ModelInfo, diags: Diagnostics) -> None:
    """A prompt longer than its text encoder reads is cut: say so, with the count and where. Under A1111's or
    ComfyUI's syntax CLIP reads a long prompt in chunks (nothing is cut), and T5 counts the text without it."""
    from scenec.spec.prompt_editing import variants
    from scenec.spec.prompt_syntax import parse

    from .resolve import prompt_syntax

    syntax = prompt_syntax(ls)
    if info.family.name != "flux" and syntax != "plain":
        return
    if info.family.name == "flux":
        limit, special, encoder = info.max_sequence_length, 1, f"T5 (max_sequence_length {info.max_sequence_length})"
    else:
        limit, special, encoder = CLIP_TOKENS, 2, f"CLIP ({CLIP_TOKENS} tokens)"
    room = limit - special
    steps = ls.scene.sampler.steps or info.steps
    for path, text in prompt_texts(ls, "prompt"):
        if syntax == "a1111":  # A1111's prompt editing: the longest text a step reads
            text = max(variants(text, steps), key=len)
        text = parse(text, syntax).text
        pieces = list(_PIECE.finditer(text))
        if len(pieces) <= room:
            continue
        cut = pieces[room].start()
        before = text[max(0, cut - 30):cut].lstrip()
        diags.warning(ls.pos(path), f"this prompt is at least {len(pieces) + special} tokens; {encoder} reads "
                                    f"{limit}: the text from character {cut + 1} on (after `…{before}`) is cut, "
                                    "if not earlier", "shorten it, or move details into entity prompts"
                      + ("" if info.family.name == "flux" else "; `prompt_syntax: a1111` reads long prompts in chunks"))


def check_strength(ls: LoadedScene, diags: Diagnostics) -> None:
    """``background.strength`` (img2img) needs the image it starts from, and runs the last steps only, which
    coupling groups (θ over every step) and references (cycles at fixed levels) do not."""
    sc = ls.scene
    if sc.background.strength is None:
        if sc.background.repaint is not None:
            diags.error(ls.pos(("background", "repaint")), "`background.repaint` needs `background.strength`",
                        hint="without `strength` only the entities' regions are repainted, from noise")
        return
    pos = ls.pos(("background", "strength"))
    outpaints = sc.background.fit != "stretch" or sc.background.box is not None
    if sc.background.repaint == "regions" and not sc.entities and not outpaints:
        diags.warning(ls.pos(("background", "repaint")), "`repaint: regions` with no entities: nothing is repainted",
                      hint="add entities (the regions to repaint), or use `repaint: all` (img2img)")
    if outpaints and sc.background.image is not None:
        diags.warning(pos, "with `strength` the canvas around the placed image starts from neutral grey noised to "
                      "this level, not from noise: it comes out greyish",
                      hint="leave `strength` out to outpaint (the image kept, the rest painted from noise)")
    if sc.background.image is None:
        diags.error(pos, "`background.strength` needs `background.image` (the image img2img starts from)")
    if sc.groups:
        diags.error(ls.key_pos(("groups",)), "`groups` cannot be combined with `background.strength`",
                    hint="remove `strength`: the regions are then painted from noise and the rest kept (inpainting)")
    for i, e in enumerate(sc.entities):
        if e.reference is not None:
            diags.error(ls.key_pos(("entities", i, "reference")),
                        "a `reference` cannot be combined with `background.strength`")
            break


def check_background_image(ls: LoadedScene, diags: Diagnostics) -> None:
    """``background.image`` keeps everything outside the entity regions: with none, the output is the input,
    unless ``background.strength`` asks for img2img."""
    sc = ls.scene
    bg = sc.background
    for key in ("fit", "box"):
        if key in bg.model_fields_set and bg.image is None:
            diags.error(ls.key_pos(("background", key)), f"`background.{key}` places `background.image`, which is not "
                        "given", hint="add `image`, or remove the key")
    if bg.box is not None and not (bg.box[0] < bg.box[2] and bg.box[1] < bg.box[3]):
        diags.error(ls.pos(("background", "box")), f"`box` {list(bg.box)} is empty: it needs x0 < x1 and y0 < y1")
    if bg.overlay and bg.image is None:
        diags.error(ls.key_pos(("background", "overlay")), "`background.overlay` pastes back `background.image`, "
                    "which is not given", hint="add `image`, or remove the key")
    elif bg.overlay and sc.hires is not None:
        diags.error(ls.key_pos(("background", "overlay")), "`background.overlay` cannot be combined with `hires` yet",
                    hint="the second pass repaints the enlarged first image, not the image itself")
    elif bg.overlay and bg.strength is not None and bg.repaint != "regions":
        diags.warning(ls.key_pos(("background", "overlay")), "`overlay` with img2img (`strength` repainting "
                      "everything): nothing is kept to paste back", hint="use `repaint: regions`, or remove `overlay`")
    if bg.fit != "stretch" or bg.box is not None:  # outpainting: the canvas outside the image changes
        return
    if bg.image is None or getattr(bg, "strength", None) is not None or sc.hires is not None:
        return
    if sc.entities or any(v.prompt for g in sc.groups for v in g.variants):
        return
    diags.warning(ls.pos(("background", "image")), "with no entities nothing changes: every image is this one",
                  "add entities to repaint their regions, or set `background.strength` (0–1) to repaint "
                  "the whole image from it (img2img)")
