"""Prompt weights as A1111 and ComfyUI write them (``prompt_syntax: a1111 | comfy``; docs/language.md).

Both UIs read emphasis inside the prompt text: ``(word)`` multiplies the attention a word gets by 1.1,
``(word:1.3)`` by 1.3, and an escaped ``\\(`` is a literal parenthesis. They differ in the details, which are
kept here so that a prompt pasted from either UI means what it meant there:

- **a1111** (AUTOMATIC1111 webui, ``modules/prompt_parser.py``): ``[word]`` divides by 1.1; nested brackets
  multiply, an explicit ``:W`` included (``((a:1.3))`` is 1.3 × 1.1); a bracket left open weights the rest of
  the prompt, a stray closing one is text; ``BREAK`` (upper case, a word of its own) ends the current
  75-token chunk; ``\\[``, ``\\]`` and ``\\\\`` are literal too. Prompt editing and alternation (``[from:to:when]``,
  ``[a|b]``) are read before, into one text per step (spec/prompt_editing.py); this parse reads each of them.
- **comfy** (ComfyUI, ``comfy/sd1_clip.py``): round brackets only (``[`` is text); an explicit ``:W`` *replaces*
  the weight of its bracket (``((a:1.3))`` is 1.3), a ``:W`` that is not a number stays text; a bracket left
  open is literal text; no ``BREAK``.

The parse is pure text (the compiler checks prompts with it, no tokenizer); the runtime turns the pieces into
weighted token chunks (runtime/prompt_weights.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

SYNTAXES = ("plain", "a1111", "comfy")
EMPHASIS = 1.1  # both UIs: one pair of round brackets


@dataclass(frozen=True)
class Piece:
    """A run of prompt text and the weight of its tokens; ``brk`` marks A1111's ``BREAK`` (no text)."""

    text: str
    weight: float = 1.0
    brk: bool = False


@dataclass
class Parsed:
    pieces: list[Piece]
    problems: list[str] = field(default_factory=list)  # what a user may not have meant (compile-time warnings)
    errors: list[str] = field(default_factory=list)  # what neither UI can read (A1111 stops on a bad weight)

    @property
    def text(self) -> str:
        """The text with the syntax taken out (what a tokenizer reads, pooled encoders included); a ``BREAK``
        still separates the words on either side (its regex takes the spaces around it)."""
        return "".join(" " if p.brk else p.text for p in self.pieces).strip() if any(p.brk for p in self.pieces) \
            else "".join(p.text for p in self.pieces)

    @property
    def weighted(self) -> bool:
        """Whether anything differs from encoding :attr:`text` plainly (a weight other than 1, a ``BREAK``)."""
        return any(p.brk or p.weight != 1.0 for p in self.pieces)


def parse(text: str, syntax: str) -> Parsed:
    """The pieces of ``text`` under ``syntax`` (``plain``: the text itself, weight 1)."""
    if syntax == "a1111":
        return _a1111(text)
    if syntax == "comfy":
        return _comfy(text)
    if syntax == "plain":
        return Parsed([Piece(text)])
    raise ValueError(f"prompt syntax {syntax!r}: one of {', '.join(SYNTAXES)}")


# --- A1111 ------------------------------------------------------------------------------------------------
# One alternative per lexeme: an escape, a bracket, a `:W)` closing a round bracket with a weight, a run of
# plain text, a lone `\`, or a lone `:`. A1111 matches the same lexemes in this order.
_A1111_LEX = re.compile(r"""
    (?P<esc>\\[()\[\]\\])
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
  | (?P<close>[)\]])
  | (?P<lone>\\)
  | (?P<text>[^\\()\[\]:]+ | :)
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_EXTRA = re.compile(r"<(?:lora|lyco|hypernet):[^>]*>")  # A1111's extra networks, not text
_AND = re.compile(r"\bAND\b")  # A1111's composable diffusion: one prompt per part, their predictions summed
_COMFY_EMBEDDING = re.compile(r"\bembedding:[^\s,():]+")  # ComfyUI loads `embedding:NAME` from models/embeddings


def _a1111(text: str) -> Parsed:
    out: list[list] = []  # [text, weight, brk]
    stacks: dict[str, list[int]] = {"(": [], "[": []}
    errors, problems = [], []

    def scale(start: int, by: float) -> None:
        for item in out[start:]:
            item[1] *= by

    for m in _A1111_LEX.finditer(text):
        if m["esc"] or m["lone"]:  # a lone `\` is dropped, as A1111 drops it
            out.append([m[0][1:], 1.0, False])
        elif m["open"]:
            stacks[m["open"]].append(len(out))
        elif m["weight"] is not None and stacks["("]:
            try:
                w = float(m["weight"])
            except ValueError:
                errors.append(f"`{m[0].strip()}`: the weight `{m['weight']}` is not a number (A1111 stops on it)")
                w = 1.0
            if not math.isfinite(w):
                errors.append(f"`{m[0].strip()}`: the weight is not finite (the image would be NaN)")
                w = 1.0
            scale(stacks["("].pop(), w)
        elif m["close"] and stacks["(" if m["close"] == ")" else "["]:
            scale(stacks["(" if m["close"] == ")" else "["].pop(), EMPHASIS if m["close"] == ")" else 1 / EMPHASIS)
        else:
            if m["close"] or m["weight"] is not None:
                problems.append(f"a `{m[0].strip()[-1]}` closes no bracket: it is read as text")
            for i, part in enumerate(_BREAK.split(m[0])):
                if i:
                    out.append(["", -1.0, True])
                out.append([part, 1.0, False])
    for kind, by in (("(", EMPHASIS), ("[", 1 / EMPHASIS)):
        for start in stacks[kind]:  # A1111 closes what is left open at the end of the prompt
            scale(start, by)
        if stacks[kind]:
            n = len(stacks[kind])
            problems.append(f"{'a' if n == 1 else n} `{kind}` {'is' if n == 1 else 'are'} never closed: A1111 weights "
                            f"the rest of the prompt {'×' if kind == '(' else '÷'}1.1{' for each' if n > 1 else ''}")
    if any(brk and w != -1.0 for _, w, brk in out):
        problems.append("`BREAK` inside brackets: A1111 reads it as the word `BREAK` with a negative weight (its "
                        "BREAK test wants the weight -1); scenec ends the chunk there")
    if _AND.search(text):
        problems.append("`AND` is A1111's composable diffusion (a prompt per part, their predictions summed), which "
                        "scenec does not run: read as the word; give each part an entity instead")
    if _EXTRA.search(text):
        problems.append(f"`{_EXTRA.search(text)[0]}` is A1111's extra-network syntax: read as text; "
                        "put LoRAs under `model.lora`")
    pieces: list[Piece] = []
    for t, w, brk in out:  # runs of one weight merge (as A1111 does), BREAKs stay apart
        if brk:
            pieces.append(Piece("", 1.0, True))
        elif pieces and not pieces[-1].brk and pieces[-1].weight == w:
            pieces[-1] = Piece(pieces[-1].text + t, w)
        elif t:
            pieces.append(Piece(t, w))
    return Parsed(pieces or [Piece("")], problems, errors)


# --- ComfyUI ----------------------------------------------------------------------------------------------
_ESC_OPEN, _ESC_CLOSE = "\0\2", "\0\1"  # escaped brackets, hidden from the bracket matching


def _groups(text: str) -> tuple[list[str], int]:
    """ComfyUI's split into top-level bracket groups and text between them (a group keeps its brackets);
    the nesting depth left at the end (> 0: an open bracket, < 0: a stray closing one)."""
    out, cur, depth = [], "", 0
    for ch in text:
        if ch == "(":
            if depth == 0:
                if cur:
                    out.append(cur)
                cur = ""
            cur += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                out.append(cur + ch)
                cur = ""
            else:
                cur += ch
        else:
            cur += ch
    if cur:
        out.append(cur)
    return out, depth


def _comfy_pieces(text: str, weight: float, problems: list[str], errors: list[str]) -> list[Piece]:
    groups, depth = _groups(text)
    if depth > 0:
        problems.append("a `(` never closed: ComfyUI pairs the brackets from the outside in and reads a `(` as text "
                        "(`(a (b)` is `a` and `(b`, both ×1.1)")
    elif depth < 0:
        problems.append("a `)` closes no bracket: ComfyUI reads the text after it without weights")
    out = []
    for g in groups:
        if len(g) >= 2 and g[0] == "(" and g[-1] == ")":
            inner, w = g[1:-1], weight * EMPHASIS
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    w = float(inner[colon + 1:])  # replaces, not multiplies (ComfyUI)
                    inner = inner[:colon]
                except ValueError:
                    pass
                else:
                    if not math.isfinite(w):
                        errors.append(f"`{inner}:{g[1:-1][colon + 1:]}`: the weight is not finite (the image "
                                      "would be NaN)")
                        w = 1.0
            out += _comfy_pieces(inner, w, problems, errors)
        else:
            out.append(Piece(g, weight))
    return out


def _comfy(text: str) -> Parsed:
    problems: list[str] = []
    errors: list[str] = []
    hidden = text.replace("\\)", _ESC_CLOSE).replace("\\(", _ESC_OPEN)
    if _COMFY_EMBEDDING.search(text):
        problems.append(f"`{_COMFY_EMBEDDING.search(text)[0]}` names no embedding of the scene: read as text; add its "
                        "file to `model.embeddings` (then `embedding:NAME` or its token names it)")
    pieces = []
    for p in _comfy_pieces(hidden, 1.0, problems, errors):
        t = p.text.replace(_ESC_CLOSE, ")").replace(_ESC_OPEN, "(")
        if pieces and pieces[-1].weight == p.weight:
            # ComfyUI splits each segment into words on its own: `(a)(b)` is the words `a` and `b`, not `ab`
            prev = pieces[-1].text
            sep = "" if not prev or not t or prev[-1].isspace() or t[0].isspace() else " "
            pieces[-1] = Piece(prev + sep + t, p.weight)
        elif t:
            pieces.append(Piece(t, p.weight))
    return Parsed(pieces or [Piece("")], list(dict.fromkeys(problems)), errors)


# a weight as either UI writes it, in a scene that reads prompts plainly (compile-time hint)
LOOKS_WEIGHTED = re.compile(r"\([^()]*:\s*[+-]?\d*\.?\d+\s*\)")


def embedding_names(embeddings) -> dict[str, str]:
    """What ComfyUI's `embedding:NAME` may call each of the scene's embeddings (``spec.plan_text.Embedding``: its
    file as written, with or without folders and extension, or its token) → its token."""
    from pathlib import PurePosixPath

    out: dict[str, str] = {}
    for e in embeddings:
        p = PurePosixPath(str(e.name).replace("\\", "/"))
        for name in (str(p), p.name, p.stem, e.token):
            out.setdefault(name, e.token)
    return out


def comfy_embeddings(text: str, names: dict[str, str]) -> str:
    """ComfyUI's `embedding:NAME` (``comfy`` syntax) → the token of the scene's embedding it names
    (:func:`embedding_names`; ComfyUI's own lookup in models/embeddings, extension optional); a name that is none of
    them is left as it is (the compiler warns)."""
    def token(m: re.Match) -> str:
        name = m[0][len("embedding:"):]
        for key in (name, name.rsplit(".", 1)[0] if name.endswith((".pt", ".bin", ".safetensors")) else None):
            if key is not None and key in names:
                return names[key]
        return m[0]

    return _COMFY_EMBEDDING.sub(token, text) if names else text

