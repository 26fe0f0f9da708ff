"""A1111's prompt editing and alternation (``prompt_syntax: a1111``; docs/language.md "Prompt weights and
long prompts").

AUTOMATIC1111 webui (``modules/prompt_parser.py``, ``get_learned_conditioning_prompt_schedules``) reads, before
the emphasis:

- ``[from:to:when]``: ``from`` until step ``when``, then ``to``; ``[to:when]`` adds ``to`` after ``when``;
  ``[from::when]`` removes ``from`` after it. ``when`` written with a ``.`` is a fraction of the steps
  (``int(when·steps)``), without one a step number (A1111's default timeline, its "old prompt editing
  timelines" setting off: ``1.0`` is all the steps, not step 1); either is capped at the steps;
- ``[a|b|c]``: a different one every step;
- both nest, and hold emphasis, ``BREAK`` and each other (``[(red:1.2):blue:5]``); the text each step reads is
  then weighted as usual (spec/prompt_syntax.py): emphasis and ``BREAK`` act on each variant.

A1111's grammar (a Lark grammar there, a recursive descent here with the same language): a prompt is plain text
(anything but ``[ ] ( ) : |``, or a backslash escape), ``( prompt )``, ``( prompt : prompt )``, ``[ prompt ]``,
``[ [prompt :] prompt : NUMBER ]`` and ``[ prompt | [prompt] … ]``; at the top level a bracket or ``:`` that
closes nothing is text. A prompt outside that language (a ``|`` outside ``[…]``, a trailing lone backslash) is read
without editing, whole, as A1111 reads it. Where a bracket pairs with nothing, A1111's grammar is ambiguous and
Lark's choice may read an edit beside it as text (``[a:b:2]))``); scenec runs the edit, and the compiler warns.

The schedule (A1111's ``collect_steps``/``at_step``): the steps where some text changes, each with the text up to
it; sampling step ``k``, counted from 0 at the first step that runs (img2img too: A1111's ``CFGDenoiser.step``),
takes the first entry whose step is ≥ ``k`` (``reconstruct_cond_batch``). So ``[a:b:10]`` reads ``a`` for the
steps 0…10 and ``b`` after; ``[a|b]`` reads ``a`` for the steps 0 and 1, then ``b``, ``a``, …

Pure text (the compiler checks prompts with it; the runtime switches the encoded text with it).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # A1111's `plain` (`.`: not a newline, as Lark's regex)
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")  # Lark's SIGNED_NUMBER
_WS = re.compile(r"\s*")
_RAW = "[]():"  # what the top level reads as text where it closes or opens nothing


@dataclass
class Scheduled:
    before: list | None  # None: ``[to:when]``
    after: list
    when: str  # as written
    start: int  # offsets in the prompt: the ``[``, the ``when``
    at: int
    end: int  # past the ``]``


@dataclass
class Alternate:
    options: list[list]
    start: int
    end: int


@dataclass
class Tree:
    """A prompt as A1111's schedule parser reads it: text pieces, :class:`Scheduled` and :class:`Alternate`."""

    items: list
    ok: bool = True  # False: outside A1111's grammar (read whole, without editing)
    # `[a:b:c]`, `[a:b]`: (start, where the `when` is or None, end) of each `[…:…]` that is not editing
    near: list[tuple[int, int | None, int]] = field(default_factory=list)
    # the first bracket that pairs with nothing (text at the top level), or -1: there A1111's parser (Lark's Earley,
    # ambiguous) may read an edit next to it as text too, where this one runs it (`[a:b:2]))`)
    stray: int = -1

    def nodes(self):
        """Every :class:`Scheduled` and :class:`Alternate`, outer before inner."""
        stack = [self.items]
        while stack:
            for it in stack.pop():
                if isinstance(it, Scheduled):
                    yield it
                    stack += [it.after] + ([it.before] if it.before is not None else [])
                elif isinstance(it, Alternate):
                    yield it
                    stack += it.options
                elif isinstance(it, list):
                    stack.append(it)


class _Parser:
    def __init__(self, text: str):
        self.s = text
        self.near: list[tuple[int, int | None, int]] = []

    def prompt(self, i: int) -> tuple[list, int]:
        """``prompt``: as many items as follow ``i``; stops before anything else."""
        s, out = self.s, []
        while i < len(s):
            c = s[i]
            if c in "([":
                got = self.paren(i) if c == "(" else self.square(i)
                if got is None:
                    break
                item, i = got
                out.append(item)
                continue
            m = _PLAIN.match(s, i)
            if not m:
                break
            out.append(m[0])
            i = m.end()
        return out, i

    def paren(self, i: int):
        s = self.s
        inner, j = self.prompt(i + 1)
        if s[j:j + 1] == ")":
            return ["(", inner, ")"], j + 1
        if s[j:j + 1] == ":":
            weight, k = self.prompt(j + 1)
            if s[k:k + 1] == ")":
                return ["(", inner, ":", weight, ")"], k + 1
        return None

    def number(self, i: int):
        """``[WHITESPACE] NUMBER [WHITESPACE] "]"`` at ``i``: (the number, its offset, past the ``]``) or None."""
        s = self.s
        j = _WS.match(s, i).end()
        m = _NUMBER.match(s, j)
        if not m:
            return None
        k = _WS.match(s, m.end()).end()
        return (m[0], j, k + 1) if s[k:k + 1] == "]" else None

    def square(self, i: int):
        s = self.s
        first, j = self.prompt(i + 1)
        c = s[j:j + 1]
        if c == "]":
            return ["[", first, "]"], j + 1
        if c == "|":
            options = [first]
            while s[j:j + 1] == "|":
                opt, j = self.prompt(j + 1)
                options.append(opt)
            return (Alternate(options, i, j + 1), j + 1) if s[j:j + 1] == "]" else None
        if c != ":":
            return None
        n = self.number(j + 1)
        if n is not None:  # [to:when]
            return Scheduled(None, first, n[0], i, n[1], n[2]), n[2]
        second, k = self.prompt(j + 1)
        if s[k:k + 1] != ":":
            return self._near(i, None, k)  # `[from:to]`: no `when`
        n = self.number(k + 1)
        if n is None:
            return self._near(i, k + 1, k + 1)  # `[from:to:word]`: a `when` that is not a number
        return Scheduled(first, second, n[0], i, n[1], n[2]), n[2]

    def _near(self, start: int, when: int | None, after: int) -> None:
        """Note a ``[…:…]`` that is not editing (the compiler warns): ``(start, its when or None, past the ]``)``,
        when only text is between ``after`` and the ``]``."""
        end = self.s.find("]", after)
        if end >= 0 and not any(ch in self.s[after:end] for ch in "[]()|") and \
                all(n[0] != start for n in self.near):
            self.near.append((start, when, end + 1))
        return None

    def start(self) -> Tree:
        s, items, i, raw = self.s, [], 0, []
        while i < len(s):
            got, j = self.prompt(i)
            items += got
            if j < len(s):
                if s[j] not in _RAW:  # a `|` outside `[…]`, a lone `\` at the end: not A1111's grammar
                    return Tree([s], ok=False, near=self.near)
                items.append(s[j])
                if s[j] != ":":
                    raw.append(j)
                j += 1
            i = j
        inside = {k for start, _, end in self.near for k in range(start, end)}  # a `[a:b]`'s own: warned as such
        return Tree(items, near=self.near, stray=next((j for j in raw if j not in inside), -1))


@functools.lru_cache(maxsize=4096)
def parse_editing(text: str) -> Tree:
    """``text`` as A1111's schedule parser reads it (see the module docstring). Brackets nested past Python's
    recursion limit (hundreds deep: no prompt anyone writes) are read without editing, whole."""
    try:
        return _Parser(text).start()
    except RecursionError:
        return Tree([text], ok=False)


def when_step(when: str, steps: int, base: int | None = None) -> int:
    """The step a ``when`` stands for (A1111's ``collect_steps``, default timeline): written with a ``.``, a fraction
    of ``steps``; else a step; truncated to an int and capped at ``steps``. ``base``: in a hires pass of ``steps``
    steps after a first pass of ``base`` (A1111's ``hires_steps``), the timeline goes on from the first pass: a
    fraction ``f`` is ``(f − 1)·steps``, a step ``n`` is ``n − base`` (before 0: switched already)."""
    v = float(when)
    if not math.isfinite(v):  # `1e999`: A1111's int() raises (the compiler says so); past every step or before
        return steps if v > 0 else -1
    if base is not None:
        return min(steps, int((v - 1.0) * steps if "." in when else v - base))
    return min(steps, int(v * steps if "." in when else v))


def _text(items: list, step: int, steps: int, base: int | None = None) -> str:
    out = []
    for it in items:
        if isinstance(it, str):
            out.append(it)
        elif isinstance(it, Scheduled):
            part = (it.before or []) if step <= when_step(it.when, steps, base) else it.after
            out.append(_text(part, step, steps, base))
        elif isinstance(it, Alternate):
            out.append(_text(it.options[(step - 1) % len(it.options)], step, steps, base))
        else:
            out.append(_text(it, step, steps, base))
    return "".join(out)


@functools.lru_cache(maxsize=4096)
def schedule(text: str, steps: int, base: int | None = None) -> tuple[tuple[int, str], ...]:
    """A1111's prompt schedule of ``text`` over ``steps``: ``(end step, text up to it)``, the last ending at
    ``steps`` (``get_learned_conditioning_prompt_schedules``; ``base``: a hires pass's, :func:`when_step`). Without
    editing: ``((steps, text),)``."""
    tree = parse_editing(text)
    if not tree.ok:
        return ((steps, text),)
    ends = {steps}
    for node in tree.nodes():
        if isinstance(node, Scheduled):
            w = when_step(node.when, steps, base)
            if w >= 1:
                ends.add(w)
        else:
            ends.update(range(1, steps + 1))
    return tuple((t, _text(tree.items, t, steps, base)) for t in sorted(ends))


def text_at(text: str, steps: int, step: int, base: int | None = None) -> str:
    """The text sampling step ``step`` (from 0 at the first step run) reads: the first schedule entry ending at or
    after it, else the first (A1111's ``reconstruct_cond_batch``; ``base``: in a hires pass, :func:`when_step`)."""
    sched = schedule(text, steps, base)
    if len(sched) == 1:
        return sched[0][1]
    return next((t for end, t in sched if step <= end), sched[0][1])


def variants(text: str, steps: int) -> list[str]:
    """The distinct texts ``text`` reads over ``steps`` steps, in order."""
    return list(dict.fromkeys(t for _, t in schedule(text, steps)))


def has_editing(text: str) -> bool:
    """Whether ``text`` has prompt editing or alternation that A1111 runs."""
    tree = parse_editing(text)
    return tree.ok and next(tree.nodes(), None) is not None
