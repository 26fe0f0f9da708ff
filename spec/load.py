"""Loading a scene: YAML with positions → includes → defs/`use` → pydantic models.

``load_scene`` returns a ``LoadedScene`` (the model plus where every value was written) or raises
``SceneError`` carrying every problem found, each at FILE:LINE:COL.
"""

from __future__ import annotations

import copy
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ValidationError

from . import models as m
from .diagnostics import Diagnostics, Pos, SceneError, did_you_mean, display_path
from .key_hints import unknown_key_hint
from .overrides import Override, apply_overrides
from .paths import PathProblem, find_project_root, resolve_inside
from .yamlload import SourceMap, load_yaml

MAX_INCLUDE_DEPTH = 16


@dataclass
class LoadedScene:
    scene: m.Scene
    smap: SourceMap
    file: Path  # absolute path of the scene file
    display: str  # how diagnostics name it
    root: Path  # project root
    files: dict[str, Path] = field(default_factory=dict)  # display name -> absolute path, includes too
    warnings: list = field(default_factory=list)
    overrides: tuple[str, ...] = ()  # the command-line overrides applied, as written (spec/overrides.py)

    @property
    def name(self) -> str:
        """The scene's `name`, else its file's stem; bytes of a stem that are not UTF-8 become U+FFFD (the
        name makes output file names and plan text, which are UTF-8)."""
        return self.scene.name or self.file.stem.encode("utf-8", "surrogateescape").decode("utf-8", "replace")

    def pos(self, path: tuple) -> Pos:
        return self.smap.value(path)

    def key_pos(self, path: tuple) -> Pos:
        return self.smap.key(path)

    def base_dir(self, path: tuple) -> Path:
        """Directory of the file in which the value at ``path`` was written (paths are relative to it)."""
        pos = self.smap.value(path)
        f = self.files.get(pos.file, self.file)
        return f.parent

    def resolve(self, path: tuple, value: str) -> Path:
        """Resolve a path-valued field; raises PathProblem."""
        from .fsio import note_input

        p = resolve_inside(value, self.base_dir(path), self.root)
        note_input(p)
        return p


@dataclass
class _Def:
    data: dict
    smap: SourceMap
    path: tuple  # where the def lives in its own file
    file: str


def load_scene(path: str | Path, diags: Diagnostics | None = None, overrides: Iterable[Override] = ()) -> LoadedScene:
    """Load and structurally validate a scene file, with the command line's ``overrides`` applied; raise
    SceneError with all problems found."""
    diags = diags if diags is not None else Diagnostics()
    path = Path(path)
    display = display_path(path)
    if not path.is_file():
        diags.error(Pos(display), "no such scene file" if not path.exists() else
                    "is a directory, not a scene file" if path.is_dir() else "not a regular file")
        raise SceneError(diags)
    root = find_project_root(path)
    loaded = load_yaml(path, display, diags)
    if loaded is None:
        raise SceneError(diags)
    data, smap = loaded
    files = {display: path.resolve()}

    included: dict[str, _Def] = {}
    before = len(diags.errors)
    _load_includes(data, smap, path.resolve(), display, root, diags, included, files, stack=[path.resolve()])

    own_defs = _entity_defs(data)
    _apply_use(data, smap, own_defs, included, diags, includes_failed=len(diags.errors) > before)
    overrides = tuple(overrides)
    apply_overrides(data, smap, overrides, diags, display)

    scene = _validate(m.Scene, data, smap, diags)
    if scene is None or diags.has_errors():
        err = SceneError(diags)
        partial = scene if scene is not None else _without_bad_values(data)
        if partial is not None:
            err.partial = LoadedScene(scene=partial, smap=smap, file=path.resolve(), display=display, root=root,
                                      files=files, overrides=tuple(o.flag for o in overrides))
        raise err
    result = LoadedScene(scene=scene, smap=smap, file=path.resolve(), display=display, root=root, files=files,
                         overrides=tuple(o.flag for o in overrides))
    result.warnings = diags.warnings
    return result


def load_library(path: str | Path, diags: Diagnostics) -> bool:
    """Check a library file (only ``scenec``, ``defs`` and ``include``) and the libraries it includes;
    problems go to ``diags``. True when it is valid."""
    path = Path(path)
    display = display_path(path)
    loaded = load_yaml(path, display, diags)
    if loaded is None:
        return False
    data, smap = loaded
    _validate(m.Library, data, smap, diags)
    _load_includes(data, smap, path.resolve(), display, find_project_root(path), diags, {}, {display: path.resolve()},
                   stack=[path.resolve()])
    return not diags.has_errors()


def _load_includes(data, smap, file: Path, display: str, root: Path, diags: Diagnostics,
                   out: dict[str, _Def], files: dict[str, Path], stack: list[Path]) -> None:
    incs = data.get("include")
    if not isinstance(incs, list):
        return  # wrong types are reported by validation
    for i, inc in enumerate(incs):
        if not isinstance(inc, str):
            continue
        pos = smap.value(("include", i))
        try:
            target = resolve_inside(inc, file.parent, root)
        except PathProblem as e:
            diags.error(pos, e.message, e.hint)
            continue
        if target in stack:
            chain = " -> ".join(display_path(p) for p in [*stack[stack.index(target):], target])
            diags.error(pos, f"include cycle: {chain}")
            continue
        if len(stack) > MAX_INCLUDE_DEPTH:
            diags.error(pos, f"includes nested deeper than {MAX_INCLUDE_DEPTH}")
            continue
        if not target.is_file():
            diags.error(pos, f"included file `{inc}` not found")
            continue
        inc_display = display_path(target)
        loaded = load_yaml(target, inc_display, diags)
        if loaded is None:
            continue
        idata, ismap = loaded
        files[inc_display] = target
        _validate(m.Library, idata, ismap, diags)
        _load_includes(idata, ismap, target, inc_display, root, diags, out, files, stack + [target])
        for name, d in _entity_defs(idata).items():
            if not isinstance(d, dict):
                continue
            if name in out and out[name].file != inc_display:
                prev = out[name]
                diags.error(ismap.key(("defs", "entities", name)),
                            f"`{name}` is defined by two includes (also at {prev.smap.key(prev.path)})",
                            hint="rename one, or define it in the scene itself, whose defs win")
                continue
            out[name] = _Def(d, ismap, ("defs", "entities", name), inc_display)


def _entity_defs(data: dict) -> dict:
    defs = data.get("defs")
    ents = defs.get("entities") if isinstance(defs, dict) else None
    return ents if isinstance(ents, dict) else {}


def _apply_use(data, smap: SourceMap, own_defs: dict, included: dict[str, _Def], diags: Diagnostics,
               includes_failed: bool = False) -> None:
    ents = data.get("entities")
    if not isinstance(ents, list):
        return
    for i, ent in enumerate(ents):
        if not isinstance(ent, dict) or "use" not in ent:
            continue
        name = ent["use"]
        if not isinstance(name, str):
            continue
        if name in own_defs:
            if not isinstance(own_defs[name], dict):
                continue  # the def itself is reported (`must be a mapping`); it is not unknown
            d = _Def(own_defs[name], smap, ("defs", "entities", name), "")
        elif name in included:
            d = included[name]
        else:
            choices = list(own_defs) + list(included)
            hint = did_you_mean(name, choices) or ("defs available: " + ", ".join(sorted(choices)) if choices
                                                   else "define it under `defs.entities`")
            if includes_failed:
                hint = "an include did not load (see its error), and it may define it"
            diags.error(smap.value(("entities", i, "use")), f"unknown def `{name}` in `use`", hint=hint)
            ent.setdefault("prompt", "")  # the def would have given it: no second error for the same mistake
            continue
        if not isinstance(d.data, dict):
            continue
        merged = copy.deepcopy(d.data)
        merged.update(ent)
        ents[i] = merged
        smap.graft(d.smap, d.path, ("entities", i))


# --- pydantic errors → diagnostics -----------------------------------------------------------

def _validate(model: type[BaseModel], data: Any, smap: SourceMap, diags: Diagnostics):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errs = e.errors(include_url=False)
        paths = [_data_path(tuple(x["loc"]), data, x["type"]) for x in errs]
        # A union (`seed: int | list[int]`) reports every branch. Keep the branch that fits the input:
        # drop an error when another points deeper into the same value, and for a list or mapping
        # report "must be an integer" last (one error per position keeps the first).
        scalar = ("int_type", "float_type", "string_type", "bool_type", "literal_error")
        order = sorted(range(len(errs)), key=lambda i: errs[i]["type"] in scalar
                       and isinstance(errs[i].get("input"), (list, dict)))
        missing: dict[tuple, list[str]] = {}  # several keys missing from one mapping: one message
        for i in order:
            p = paths[i]
            if any(len(q) > len(p) and q[:len(p)] == p for q in paths):
                continue
            if errs[i]["type"] == "missing":
                key = errs[i]["loc"][-1]
                missing.setdefault(p[:-1] if p and p[-1] == key else p, []).append(f"`{key}`")
                continue
            _report(model, errs[i], data, smap, diags)
        for parent, keys in missing.items():
            hint = None
            if parent == () and isinstance(data, dict) and "defs" in data and "canvas" not in data:
                if keys == ["`canvas`"]:
                    hint = "this is a library file (`defs`, no `canvas`): build or compile the scenes that include it"
                elif "`scenec`" in keys:  # a library, not a scene missing its canvas
                    keys = ["`scenec`"]
                    hint = "a library file (`defs`, no `canvas`) starts with `scenec: 1` too"
            names = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]
            diags.add(smap.value(parent), f"missing required key{'s' if len(keys) > 1 else ''} {names}", hint=hint,
                      distinct=True)
        return None


def _without_bad_values(data: Any, rounds: int = 3):
    """The scene with every value that failed validation left out, when each can be (it has a default):
    a Scene for the semantic checks, or None (a required value is wrong, or a list item)."""
    data = copy.deepcopy(data)
    for _ in range(rounds):
        try:
            return m.Scene.model_validate(data)
        except ValidationError as e:
            for err in e.errors(include_url=False):
                if err["type"] == "missing":
                    return None
                path = _data_path(tuple(err["loc"]), data, err["type"])
                parent = data
                for part in path[:-1]:
                    parent = parent[part]
                if not path or not isinstance(parent, dict) or path[-1] not in parent:
                    return None
                del parent[path[-1]]
    return None


KEY_ERRORS = ("missing", "extra_forbidden")  # errors about a key, which the data may lack


def _data_path(loc: tuple, data: Any, typ: str = "missing") -> tuple:
    """Drop the parts of a pydantic location that are not in the data (union tags, type names); the last
    part, absent from the data, is kept for an error about a key (``typ``: missing or unknown)."""
    out = []
    cur = data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            out.append(part)
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            out.append(part)
            cur = cur[part]
        elif (typ in KEY_ERRORS and isinstance(cur, dict) and isinstance(part, str) and part not in cur
              and loc[-1] == part):
            out.append(part)  # a missing or unknown key: keep it, the report needs its name
            cur = None
    return tuple(out)


def _describe(v: Any) -> str:
    if isinstance(v, bool):
        return f"boolean `{str(v).lower()}`"
    if isinstance(v, str):
        s = v if len(v) <= 40 else v[:37] + "..."
        return f"string `{s}`"
    if isinstance(v, (int, float)):
        return f"number `{v}`"
    if v is None:
        return "null"
    if isinstance(v, list):
        return f"a list of {len(v)}"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


_TYPE_WORDS = {
    "int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
    "string_type": "a string", "bool_type": "true or false", "list_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
    "literal_error": None,
}


def _report(model, err: dict, data: Any, smap: SourceMap, diags: Diagnostics) -> None:
    loc = tuple(err["loc"])
    typ = err["type"]
    path = _data_path(loc, data, typ)
    value = err.get("input")
    if typ == "extra_forbidden":
        key = path[-1] if path else loc[-1]
        allowed = _allowed_keys(model, loc[:-1])
        hint = unknown_key_hint(key, allowed, _section(model, loc[:-1]))  # spec/key_hints.py
        if hint is None and allowed:
            hint = "allowed here: " + ", ".join(allowed)
        diags.error(smap.key(path), f"unknown key `{key}`", hint)
        return
    if typ == "missing":
        key = loc[-1]
        parent = path[:-1] if path and path[-1] == key else path
        diags.error(smap.value(parent), f"missing required key `{key}`")
        return
    pos = smap.value(path)
    where = ".".join(str(p) for p in path) or "document"
    if typ in _TYPE_WORDS and _TYPE_WORDS[typ]:
        msg = f"`{where}` must be {_TYPE_WORDS[typ]}, found {_describe(value)}"
        diags.error(pos, msg, _example_hint(model, loc) if typ in _SHAPE_TYPES else None)
        return
    if typ == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ",").split(",") if c.strip()]
        diags.error(pos, f"`{where}` must be one of {', '.join(choices)}; found {_describe(value)}",
                    did_you_mean(value, choices) if isinstance(value, str) else None)
        return
    if typ == "string_pattern_mismatch":
        pat = err.get("ctx", {}).get("pattern", "")
        if pat == r"^\S+$":  # a word: an embedding's token (spec/models_parts.py)
            diags.error(pos, f"`{where}` must be one word, without spaces; found {_describe(value)}",
                        hint="e.g. `<my-style>`: prompts write the token as it is")
            return
        allowed = "lowercase letters, digits, `_` and `-`" if pat == m.ID_PATTERN else \
            "lowercase letters, digits, `.`, `_` and `-`"
        diags.error(pos, f"`{value}` is not a valid {'id' if pat == m.ID_PATTERN else 'name'}: use {allowed}")
        return
    if typ in ("shape_kind", "schedule_kind"):
        forms = m.SHAPE_KINDS if typ == "shape_kind" else ("shape", "values", "file")
        kinds = [k for k in forms if k in value] if isinstance(value, dict) else []
        if len(kinds) > 1:
            diags.error(pos, f"{err['msg']}; found {' and '.join(f'`{k}`' for k in kinds)}",
                        hint="one region made of several shapes: `union: [...]` (or `difference`, `intersection`)"
                        if typ == "shape_kind" else "keep one of them")
        else:
            diags.error(pos, err["msg"])
        return
    if typ in ("too_short", "too_long"):
        ctx = err.get("ctx", {})
        n = ctx.get("min_length") if typ == "too_short" else ctx.get("max_length")
        word = "at least" if typ == "too_short" else "at most"
        items = "character" if isinstance(value, str) else "item"
        diags.error(pos, f"`{where}` must have {word} {n} {items}{'s' if n != 1 else ''}, found {ctx.get('actual_length', len(value) if hasattr(value, '__len__') else '?')}")
        return
    msg = err["msg"]
    if msg.startswith("Input should be "):
        msg = "must be " + msg[len("Input should be "):]
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    else:
        msg = msg[:1].lower() + msg[1:]
    hint = None
    if value == -1 and "seed" in path:
        hint = ("A1111's and ComfyUI's seed -1 (a new random seed each run) has no equivalent: a scene makes the same "
                "images at every build; give seeds (`seed: [1, 2, 3]`, or `--seed 1..8`)")
    diags.error(pos, f"`{where}` {msg}; found {_describe(value)}", hint)


_SHAPE_TYPES = ("list_type", "dict_type", "model_type", "model_attributes_type")


def _example_hint(model: type[BaseModel], loc: tuple) -> str | None:
    """``e.g. `key: EXAMPLE``` from the field's schema example, for a value of the wrong shape (a string where a
    list or a mapping goes); an item of a list is shown the example's first item."""
    import yaml

    item = bool(loc) and isinstance(loc[-1], int)
    fields = loc[:-1] if item else loc
    if not fields or not isinstance(fields[-1], str):
        return None
    parent = _model_at(model, fields[:-1])
    field = parent.model_fields.get(fields[-1]) if parent is not None else None
    examples = field.examples if field is not None else None
    if not examples or (item and not (isinstance(examples[0], list) and examples[0])):
        return None
    ex = examples[0][0] if item else examples[0]
    text = yaml.safe_dump(ex, default_flow_style=True, sort_keys=False, width=1 << 16).strip()
    text = text.removesuffix("\n...").strip()
    return f"e.g. `{text}` (an item of the list)" if item else f"e.g. `{fields[-1]}: {text}`"


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model reached by following a pydantic location (best effort)."""
    cur: Any = model
    for part in loc:
        cur = _unwrap(cur, part)
        if cur is None:
            return None
    cur = _unwrap(cur, None)
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the model reached by following a pydantic location (best effort)."""
    cur = _model_at(model, loc)
    return list(cur.model_fields) if cur is not None else []


def _section(model: type[BaseModel], loc: tuple) -> str | None:
    cur = _model_at(model, loc)
    return cur.__name__ if cur is not None else None


def _unwrap(tp: Any, part: Any) -> Any:
    """One step down a type: into a model's field, a list's item, a dict's value, or a union's tag."""
    for _ in range(8):
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            args = typing.get_args(tp)
            tag = next((a.tag for a in args[1:] if hasattr(a, "tag") and isinstance(getattr(a, "tag"), str)), None)
            tp = args[0]
            if tag is not None and part is not None and part == tag:
                return tp
            continue
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            for a in args:
                inner = a
                a_args = typing.get_args(a)
                if typing.get_origin(a) is typing.Annotated:
                    tag = next((x.tag for x in a_args[1:] if hasattr(x, "tag")), None)
                    if tag == part:
                        return a_args[0]
                    inner = a_args[0]
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    if part == inner.__name__:  # pydantic's tag of a union's model branch (`ModelSpec`)
                        return inner
                    if part is None or part in inner.model_fields:
                        return inner if part is None else inner.model_fields[part].annotation
            if len(args) == 1:
                tp = args[0]
                continue
            return None
        if origin in (list, tuple):
            if part is None or isinstance(part, int):
                return typing.get_args(tp)[0] if part is not None else tp
            return None
        if origin is dict:
            return typing.get_args(tp)[1] if part is not None else tp
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if part is None:
                return tp
            f = tp.model_fields.get(part)
            return f.annotation if f else None
        return tp if part is None else None
    return None
