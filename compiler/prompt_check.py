"""Prompt syntax at compile time (no torch, no tokenizer): how a scene's prompts are read, and what in them a
user may not have meant (spec/prompt_syntax.py; docs/language.md "Prompt weights and long prompts").

The syntax (``resolve.prompt_syntax``) is the scene's ``prompt_syntax``, else the ``prompt_syntax`` of the
project's scenec.toml, else ``plain``. Under ``a1111``/``comfy`` every prompt and negative is parsed here: a
weight that is not a number is an error (A1111 stops on it), a bracket left open or closing nothing and A1111
syntax scenec does not run (``AND``, ``<lora:…>``) are warnings at what they name. A1111's prompt editing is read
first (compiler/prompt_editing_check.py) and each text a step reads is checked. Under ``plain``, a prompt
that looks weighted (``(word:1.2)``) gets one warning: pasted from A1111 or ComfyUI, it would otherwise silently
mean something else.
"""

from __future__ import annotations

from scenec.spec.diagnostics import Diagnostics
from scenec.spec.load import LoadedScene
from scenec.spec.prompt_syntax import LOOKS_WEIGHTED, comfy_embeddings, embedding_names, parse

from . import matrix as mx
from .advice import prompt_texts
from .files import pos_in_string
from .prompt_editing_check import check_editing
from .resolve import prompt_syntax
from .schedule import img2img_start


def _filled(ls: LoadedScene, text: str) -> list[str]:
    """``text`` as each matrix combination fills it (a value may carry the syntax: `style: ["(oil:1.2)"]`)."""
    sc = ls.scene
    if not sc.matrix:
        return [text]
    return list(dict.fromkeys(mx.fill(text, combo, True) for combo in mx.combinations(sc)))


def _project_value(ls: LoadedScene):
    """scenec.toml's ``prompt_syntax`` as written (None: none, or no readable file)."""
    from scenec.spec.paths import ProjectFileError, project_config

    try:
        return project_config(ls.root).get("prompt_syntax")
    except ProjectFileError:
        return None


def check_prompt_syntax(ls: LoadedScene, diags: Diagnostics, family: str | None = None,
                        steps: int | None = None, embeddings=()) -> str:
    """Check every prompt under the scene's syntax (see the module docstring); the syntax. ``family``: the model's
    (Flux: a ``BREAK`` does nothing, T5 reads one piece); ``steps``: the sampler's (A1111's prompt editing is
    checked against them; img2img runs the last ``int(steps·strength)``); ``embeddings``: the scene's, which ComfyUI's
    ``embedding:NAME`` may name (spec/prompt_syntax.py ``comfy_embeddings``)."""
    syntax = prompt_syntax(ls, diags)
    run = steps
    if steps and ls.scene.background.strength is not None:
        run = steps - img2img_start(steps, ls.scene.background.strength)
    texts = [(path, f) for key in ("prompt", "negative") for path, t in prompt_texts(ls, key) for f in _filled(ls, t)]
    if syntax == "plain":
        if ls.scene.prompt_syntax is None and _project_value(ls) not in (None, "plain"):
            return syntax  # scenec.toml's value is wrong (an error at its line): the weights were meant
        hits = [(path, m[0]) for path, t in texts if (m := LOOKS_WEIGHTED.search(t))]
        if hits:
            more = f" (and {len(hits) - 1} more prompts)" if len(hits) > 1 else ""
            where = "the scene's `prompt_syntax`" if ls.scene.prompt_syntax is not None else \
                "`prompt_syntax: a1111` (or `comfy`) in the scene, or `prompt_syntax = \"a1111\"` in scenec.toml"
            diags.warning(ls.pos(hits[0][0]), f"`{hits[0][1]}` is read as text{more}: prompts are read plainly, "
                          "as diffusers reads them", hint=f"to weight words as A1111 or ComfyUI do, set {where}")
        return syntax
    seen = set()
    for path, text in texts:
        # A1111 reads prompt editing first: the weights of every text a step reads (spec/prompt_editing.py)
        variants = [text]
        if syntax == "a1111" and steps:
            variants = check_editing(ls, diags, path, text, steps, run, seen)
        names = embedding_names(embeddings) if syntax == "comfy" else {}
        for variant in variants:
            parsed = parse(comfy_embeddings(variant, names), syntax)
            after = 0
            for message in parsed.errors:
                if (path, message) not in seen:
                    seen.add((path, message))
                    # at the weight it names (one error per position: each its own column), where the source shows it
                    at = text.find(message.split("`")[1], after) if message.startswith("`") else -1
                    after = max(after, at + 1)
                    pos = pos_in_string(ls, path, text, at) if at >= 0 else ls.pos(path)
                    diags.error(pos, message, hint="write the weight as a number: `(word:1.2)`")
            problems = list(parsed.problems)
            if family == "flux" and any(p.brk for p in parsed.pieces):
                problems.append("`BREAK` does nothing on Flux: T5 reads the prompt in one piece (no 75-token chunks)")
            for message in dict.fromkeys(problems):
                if (path, message) not in seen:
                    seen.add((path, message))
                    # at what it names (`<lora:x:0.8>`), when the source holds it as written (no matrix filled it)
                    at = text.find(message.split("`")[1]) if message.startswith("`") and not ls.scene.matrix else -1
                    diags.warning(pos_in_string(ls, path, text, at) if at >= 0 else ls.pos(path), message)
    return syntax
