"""YAML with source positions, for untrusted files.

PyYAML's ``SafeLoader`` composes the node graph (no arbitrary tags, no Python objects); we then
build plain Python data ourselves so that every key and value keeps its line and column, and so
that limits hold: file size, node count after alias expansion (alias bombs), nesting depth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .diagnostics import Diagnostics, Pos
from .fsio import note_input

MAX_FILE_BYTES = 1 << 20  # 1 MiB: a scene is text a person writes
MAX_NODES = 50_000  # counted with aliases expanded, so a billion-laughs file stops early
MAX_DEPTH = 64
MAX_REPORTED = 10  # positions reported of one kind of byte-level problem (bad UTF-8, control characters)
# what YAML forbids in a stream (PyYAML's Reader.NON_PRINTABLE): NUL and other control characters
_NON_PRINTABLE = re.compile("[^\x09\x0A\x0D\x20-\x7E\x85\xA0-\uD7FF\uE000-\uFFFD\U00010000-\U0010ffff]")

# libyaml's composer when PyYAML was built with it (10x faster); same node graph, same marks
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Path_ = tuple  # a path into the data: keys and list indices


@dataclass
class SourceMap:
    """Where each value (and each mapping key) of a document was written."""

    values: dict[tuple, Pos] = field(default_factory=dict)
    keys: dict[tuple, Pos] = field(default_factory=dict)

    def value(self, path: tuple, default: Pos | None = None) -> Pos:
        """Position of the value at ``path``, or of its nearest ancestor that has one."""
        p = tuple(path)
        while p:
            if p in self.values:
                return self.values[p]
            p = p[:-1]
        return self.values.get((), default or Pos("<unknown>"))

    def key(self, path: tuple) -> Pos:
        """Position of the key naming ``path`` (falls back to the value's position)."""
        p = tuple(path)
        while p:
            if p in self.keys:
                return self.keys[p]
            if p in self.values:
                return self.values[p]
            p = p[:-1]
        return self.value(())

    def graft(self, other: "SourceMap", src: tuple, dst: tuple) -> None:
        """Copy positions under ``src`` in ``other`` to ``dst`` here (used when applying defs)."""
        n = len(src)
        for table, mine in ((other.values, self.values), (other.keys, self.keys)):
            for p, pos in list(table.items()):
                if p[:n] == src:
                    mine.setdefault(dst + p[n:], pos)


# PyYAML's words for an indentation mistake, and what they mean: (its text, what happened, how to fix)
_INDENT_HINT = "keys of one mapping start in the same column; a value on the next line is indented under its key"
_YAML_WORDS = (
    ("mapping values are not allowed here", "a `key:` where no mapping can start: a line indented too far, or "
     "`: ` inside an unquoted value", _INDENT_HINT + "; quote a value that holds `: `"),
    ("expected <block end>", "this line is indented less or more than the mapping or list it continues",
     _INDENT_HINT),
    ("did not find expected key", "this line is indented less or more than the mapping it continues",
     _INDENT_HINT),
    ("could not find expected ':'", "a line that is not `key: value` inside a mapping (a value continued "
     "without indenting it, or a missing `:`)", "indent a continued value further than its key, or quote it"),
    ("found character '\\t' that cannot start any token", "a tab: YAML indents with spaces only",
     "replace the tab with spaces"),
    ("found unknown escape character", "a `\\` in double quotes that YAML does not know as an escape",
     "in double quotes `\\` starts an escape: write the prompt in single quotes ('a \\(b\\)') or without quotes, "
     "or double the backslash (`\\\\(`)"),
)


def _problem(e: Exception, node: yaml.Node) -> str:
    if isinstance(e, yaml.YAMLError):
        return str(getattr(e, "problem", None) or e)
    return f"`{node.value}` is not a valid {node.tag.rsplit(':', 1)[-1]}"


class _Limit(Exception):
    def __init__(self, pos: Pos, message: str):
        self.pos, self.message = pos, message


def _pos(file: str, mark: Any) -> Pos:
    return Pos(file, mark.line + 1, mark.column + 1)


_constructor = yaml.SafeLoader.__new__(yaml.SafeLoader)
yaml.constructor.SafeConstructor.__init__(_constructor)


class _Builder:
    def __init__(self, file: str, diags: Diagnostics):
        self.file, self.diags = file, diags
        self.smap = SourceMap()
        self.count = 0
        self.seen: set[int] = set()  # composed nodes built once; a node met again is an alias's copy
        self.copies = 0

    def build(self, node: yaml.Node, path: tuple, depth: int = 0) -> Any:
        self.count += 1
        if id(node) in self.seen:
            self.copies += 1
        else:
            self.seen.add(id(node))
        if self.count > MAX_NODES:
            if self.copies:
                raise _Limit(_pos(self.file, node.start_mark), f"document expands to more than {MAX_NODES} values "
                             f"through aliases ({self.copies} copies so far; an alias bomb?)")
            raise _Limit(_pos(self.file, node.start_mark),
                         f"document has more than {MAX_NODES} values, more than a scene may hold")
        if depth > MAX_DEPTH:
            raise _Limit(_pos(self.file, node.start_mark), f"nesting deeper than {MAX_DEPTH} levels")
        self.smap.values.setdefault(path, _pos(self.file, node.start_mark))
        if isinstance(node, yaml.ScalarNode):
            try:
                return _constructor.construct_object(node, deep=True)
            except (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:
                # explicit tags reach PyYAML's constructors unchecked: `!!int abc`, `!!timestamp x`
                self.diags.error(_pos(self.file, node.start_mark), f"invalid scalar: {_problem(e, node)}")
                return None
        if isinstance(node, yaml.SequenceNode):
            return [self.build(child, path + (i,), depth + 1) for i, child in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode):
            out: dict = {}
            for knode, vnode in self._pairs(node):
                kpos = _pos(self.file, knode.start_mark)
                if not isinstance(knode, yaml.ScalarNode):
                    self.diags.error(kpos, "mapping keys must be plain strings")
                    continue
                try:
                    key = _constructor.construct_object(knode)
                except (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:
                    self.diags.error(kpos, f"invalid key: {_problem(e, knode)}")
                    continue
                if not isinstance(key, str):
                    key = str(key) if isinstance(key, (int, float, bool)) or key is None else repr(key)
                if key in out:
                    self.diags.error(kpos, f"duplicate key `{key}`", hint="each key may appear once in a mapping")
                    continue
                self.smap.keys[path + (key,)] = kpos
                out[key] = self.build(vnode, path + (key,), depth + 1)
            return out
        raise _Limit(_pos(self.file, node.start_mark), f"unsupported YAML node {type(node).__name__}")

    def _pairs(self, node: yaml.MappingNode):
        """Key/value pairs with YAML merge keys (``<<: *anchor``) expanded; explicit keys win."""
        merged: list = []
        own: list = []
        for k, v in node.value:
            if k.tag == "tag:yaml.org,2002:merge":
                sources = v.value if isinstance(v, yaml.SequenceNode) else [v]
                for s in sources:
                    if isinstance(s, yaml.MappingNode):
                        merged.extend(self._pairs(s))
                    else:
                        self.diags.error(_pos(self.file, s.start_mark), "`<<` merges only mappings")
            else:
                own.append((k, v))
        names = {k.value for k, _ in own if isinstance(k, yaml.ScalarNode)}
        seen: set = set()
        kept = []
        for k, v in merged:
            if isinstance(k, yaml.ScalarNode) and (k.value in names or k.value in seen):
                continue
            seen.add(getattr(k, "value", None))
            kept.append((k, v))
        return own + kept


def load_yaml(path: Path, display: str, diags: Diagnostics) -> tuple[Any, SourceMap] | None:
    """Parse one YAML file; problems go to ``diags`` and the result is None when nothing usable."""
    note_input(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        diags.error(Pos(display), f"cannot read file: {e.strerror or e}")
        return None
    if size > MAX_FILE_BYTES:
        diags.error(Pos(display), f"file is {size} bytes, over the limit of {MAX_FILE_BYTES}")
        return None
    try:
        raw = path.read_bytes()
    except OSError as e:
        diags.error(Pos(display), f"cannot read file: {e.strerror or e}")
        return None
    text = _text(raw, display, diags)
    if text is None:
        return None
    try:
        try:
            docs = list(yaml.compose_all(text, Loader=_LOADER))
        except yaml.YAMLError:
            # PyYAML's own parser words errors better ("found character '\t'"); errors are rare
            docs = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        pos = _pos(display, mark) if mark else Pos(display)
        msg = e.problem or str(e)
        if e.context:
            msg = f"{e.context}: {msg}" if msg else e.context
        plain = next(((w, h) for k, w, h in _YAML_WORDS if k in msg), None)
        if plain is None:
            diags.error(pos, f"invalid YAML: {msg}")
        else:
            diags.error(pos, f"invalid YAML: {plain[0]} (PyYAML: {msg})", hint=plain[1])
        return None
    except yaml.YAMLError as e:  # pragma: no cover - unmarked errors are rare
        diags.error(Pos(display), f"invalid YAML: {e}")
        return None
    except RecursionError:  # composing is recursive; find where with the (iterative) event parser
        diags.error(_too_deep(text, display), f"nesting deeper than {MAX_DEPTH} levels")
        return None
    docs = [d for d in docs if d is not None]
    if not docs:
        diags.error(Pos(display), "file is empty", hint="a scene needs at least `scenec: 1` and `canvas`")
        return None
    if len(docs) > 1:
        diags.error(_pos(display, docs[1].start_mark), "a scene file holds one YAML document, found more")
        return None
    root = docs[0]
    if not isinstance(root, yaml.MappingNode):
        diags.error(_pos(display, root.start_mark), f"the document must be a mapping of keys, found {_kind(root)}")
        return None
    builder = _Builder(display, diags)
    try:
        data = builder.build(root, ())
    except _Limit as e:
        diags.error(e.pos, e.message)
        return None
    except RecursionError:
        diags.error(_too_deep(text, display), f"nesting deeper than {MAX_DEPTH} levels")
        return None
    return data, builder.smap


def _text(raw: bytes, display: str, diags: Diagnostics) -> str | None:
    """The file's text, or None with every line that holds bytes that are not UTF-8, or characters YAML
    forbids (NUL, other control characters), reported at its line and column."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):  # Windows' "Unicode" (Notepad), with its byte order mark
            diags.error(Pos(display, 1, 1), "the file is UTF-16 text (it starts with a UTF-16 byte order mark), not "
                        "UTF-8", hint="save the file as UTF-8")
            return None
        bad = []
        for n, line in enumerate(raw.split(b"\n"), 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                col = len(line[:e.start].decode("utf-8")) + 1
                bad.append((Pos(display, n, col), f"not UTF-8 text: byte 0x{line[e.start]:02x}"))
        _report(bad, diags, "lines with bytes that are not UTF-8", hint="save the file as UTF-8")
        return None
    bad = []
    for m in _NON_PRINTABLE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        col = m.start() - (text.rfind("\n", 0, m.start()) + 1) + 1
        bad.append((Pos(display, line, col), f"character U+{ord(m.group()):04X} is not allowed in YAML"))
        if len(bad) > MAX_REPORTED:
            break
    _report(bad, diags, "control characters", hint="remove it, or write it as an escape in a double-quoted "
            "string (\"\\0\", \"\\x07\")")
    return None if bad else text


def _report(bad: list[tuple[Pos, str]], diags: Diagnostics, what: str, hint: str) -> None:
    for pos, msg in bad[:MAX_REPORTED]:
        diags.error(pos, msg, hint=hint)
    if len(bad) > MAX_REPORTED:
        diags.error(bad[MAX_REPORTED][0], f"more {what} follow; only the first {MAX_REPORTED} are shown")


def _too_deep(text: str, display: str) -> Pos:
    """Where the nesting first goes deeper than MAX_DEPTH (the parser's events are not recursive)."""
    depth = 0
    try:
        for ev in yaml.parse(text, Loader=yaml.SafeLoader):  # libyaml stops scanning 1000 levels deep
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH + 1:  # as _Builder counts: the root collection is depth 0
                    return _pos(display, ev.start_mark)
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError:
        pass
    return Pos(display)


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.ScalarNode):
        return "a scalar value"
    return type(node).__name__
