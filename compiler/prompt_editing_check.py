"""A1111's prompt editing at compile time (``prompt_syntax: a1111``; the schedule: spec/prompt_editing.py).

What A1111 runs but a user may not have meant, each a warning where it is written: a ``[from:to:word]`` or
``[from:to]`` whose step is not a number (A1111 reads it as text in square brackets, ÷1.1); a switch that never
comes (at or past the last step the sampler runs: A1111 counts the steps from 0, so ``[a:b:19]`` of 20 steps
stays ``a``) or comes before the first step; and editing A1111 turns off for the whole prompt (a ``|`` outside
``[a|b]``). The texts the steps read are returned, for their weights to be checked (compiler/prompt_check.py).
"""

from __future__ import annotations

import math
import re

from scenec.spec.diagnostics import Diagnostics
from scenec.spec.load import LoadedScene
from scenec.spec.prompt_editing import Scheduled, parse_editing, variants, when_step

from .files import pos_in_string

# what looks like editing in a prompt outside A1111's grammar (a `:` inside round brackets is a weight)
_LOOKS = re.compile(r"\[(?:[^\[\]()]|\([^()]*\))*?(?::|\|)[^\[\]]*\]")
HINT = "write the step as a number: `[from:to:10]` switches after step 10, `[from:to:0.5]` halfway"


def _in_hires(ls: LoadedScene, when: str, steps: int) -> bool:
    """Whether a switch past the first pass comes in the scene's hires pass (A1111's hires timeline: it goes on)."""
    hr = ls.scene.hires
    if hr is None:
        return False
    run = hr.steps or steps
    return 0 <= when_step(when, run, base=steps) < run - 1


def check_editing(ls: LoadedScene, diags: Diagnostics, path: tuple, text: str, steps: int, run: int,
                  seen: set) -> list[str]:
    """Warn about ``text``'s prompt editing (see the module docstring) over ``steps`` sampler steps of which
    ``run`` run (img2img: fewer); the distinct texts its steps read."""
    tree = parse_editing(text)

    def warn(at: int, message: str, hint: str | None = None) -> None:
        if (path, message) not in seen:
            seen.add((path, message))
            diags.warning(pos_in_string(ls, path, text, at), message, hint=hint)

    if not tree.ok:
        if _LOOKS.search(text):
            m = _LOOKS.search(text)
            warn(m.start(), f"`{m[0]}` is not prompt editing here: A1111 reads a prompt with a `|` outside "
                            "`[a|b]` (or a `\\` at its end) whole, without editing; this one is text in square "
                            "brackets", "write a `|` meant as text as `\\|`")
        return [text]
    for start, when, end in tree.near:
        word = text[when:end - 1].strip() if when is not None else ""
        why = f"`{word}` is not a number" if word else "it has no step"
        warn(start if when is None else when, f"`{text[start:end]}` is not prompt editing: {why}; A1111 reads it "
             "as text in square brackets (÷1.1)", HINT)
    if tree.stray >= 0 and next(tree.nodes(), None) is not None:
        warn(tree.stray, f"a `{text[tree.stray]}` that pairs with nothing beside prompt editing: A1111's parser may "
             "then read the editing as text (scenec runs it)", "pair the brackets up, or escape the stray one: `\\(`")
    for node in tree.nodes():
        if not isinstance(node, Scheduled):
            continue
        snippet = text[node.start:node.end]
        w = when_step(node.when, steps)
        if not math.isfinite(float(node.when)):
            key = (path, "inf", node.at)
            if key not in seen:
                seen.add(key)
                diags.error(pos_in_string(ls, path, text, node.at), f"`{snippet}`: the step `{node.when}` is not "
                            "finite (A1111 stops on it)", hint=HINT)
        elif w <= 0:
            warn(node.at, f"`{snippet}` switches before the first step: A1111 reads what follows the switch "
                          "throughout", HINT)
        elif w >= run - 1 and not _in_hires(ls, node.when, steps):
            ran = f"img2img runs {run} of the {steps} steps" if run != steps else f"the sampler runs {steps} steps"
            after = w if "." in node.when else node.when
            warn(node.at, f"`{snippet}` never switches: {ran} (A1111 counts them from 0: the last is step "
                          f"{run - 1}, and this switch comes after step {after})",
                 f"switch at step {max(run - 2, 0)} or earlier, or at a fraction of the steps (`0.5`: halfway)")
    return variants(text, steps)
