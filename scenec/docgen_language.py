"""docs/language.md's key tables, generated from the scene models (spec/models*.py).

The pydantic fields' ``description`` and ``examples`` are the one source of both the JSON Schema's hover
help (schemas/scene.schema.json) and these tables; the rest of docs/language.md is hand-written. A table
lives between ``<!-- generated:keys NAME ... -->`` and ``<!-- /generated:keys NAME -->``.

Regenerate with ``python -m scenec.docgen language`` (rewrites docs/language.md in place; ``--check`` only
says whether it is current; a test fails when it is stale).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOC = Path("docs") / "language.md"
BEGIN = "<!-- generated:keys {name}: `python -m scenec.docgen language` writes this table from spec/models*.py -->"
END = "<!-- /generated:keys {name} -->"
_BLOCK = re.compile(r"(<!-- generated:keys (?P<name>[a-z_-]+):[^\n]*-->\n)(?P<body>.*?)(<!-- /generated:keys "
                    r"(?P=name) -->)", re.S)

# $defs model → the section of docs/language.md that documents it
ANCHORS = {"Canvas": ("canvas", "#canvas"), "Sampler": ("sampler", "#sampler"), "FreeU": ("freeu", "#sampler"),
           "Background": ("background", "#background"), "Entity": ("entity", "#entities"),
           "Hires": ("hires", "#hires-a-second-larger-pass"),
           "EntityDef": ("entity def", "#defs-use-and-include"), "Lora": ("LoRA", "#lora"),
           "Embedding": ("embedding", "#embeddings-and-clip-skip"),
           "ModelSpec": ("model", "#model"), "Reference": ("reference", "#reference-one-way-diffusion"),
           "Modulation": ("modulation", "#reference-one-way-diffusion"),
           "Visual": ("visual", "#visual-object-level-visual-prompts"),
           "VisualRefine": ("refine", "#visual-object-level-visual-prompts"),
           "Control": ("control", "#control-controlnet"),
           "Group": ("group", "#groups-and-variants"),
           "Variant": ("variant", "#groups-and-variants"), "Defs": ("defs", "#defs-use-and-include"),
           "Output": ("output", "#output"), "Attention": ("attention", "#attention"),
           "EllipseSpec": ("ellipse", "#shapes")}


def blocks() -> dict[str, list[tuple[type, str]]]:
    """Each generated table: the models whose keys it lists, with the prefix its key column shows."""
    from scenec.spec import models as m

    return {
        "top-level": [(m.Scene, "")], "canvas": [(m.Canvas, "")], "model": [(m.ModelSpec, "")],
        "sampler": [(m.Sampler, ""), (m.FreeU, "freeu.")], "background": [(m.Background, "")],
        "hires": [(m.Hires, "")],
        "entities": [(m.Entity, "")],
        "lora": [(m.Lora, "")], "embeddings": [(m.Embedding, "")],
        "shapes": [(s, "") for s in m.SHAPE_MODELS] + [(m.EllipseSpec, "ellipse.")],
        "reference": [(m.Reference, "")], "modulation": [(m.Modulation, "")],
        "visual": [(m.Visual, ""), (m.VisualRefine, "refine.")], "control": [(m.Control, "")],
        "groups": [(m.Group, "groups[]."), (m.Variant, "variants[].")],
        "schedules": [(s, "") for s in m.SCHEDULE_MODELS], "defs": [(m.Defs, "defs.")],
        "output": [(m.Output, "")], "attention": [(m.Attention, "")],
    }


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _flow(value) -> str:
    """A value as YAML flow text, as a scene would write it."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True, sort_keys=False).strip()
    return text[:-3].strip() if text.endswith("...") else text


def _num(x) -> str:
    if x == 2**63 - 1:
        return "2⁶³−1"
    return str(int(x)) if isinstance(x, float) and x.is_integer() and abs(x) < 1e15 else str(x)


def _range(s: dict) -> str:
    """Bounds as an interval, ``[0, 1]``, ``(0, 2]``, or one side, ``≥ 0``."""
    lo = ("[", s["minimum"]) if "minimum" in s else ("(", s["exclusiveMinimum"]) if "exclusiveMinimum" in s else None
    hi = ("]", s["maximum"]) if "maximum" in s else (")", s["exclusiveMaximum"]) if "exclusiveMaximum" in s else None
    if lo and hi:
        return f" {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f" {'≥' if lo[0] == '[' else '>'} {_num(lo[1])}"
    return f" {'≤' if hi[0] == ']' else '<'} {_num(hi[1])}" if hi else ""


def type_text(s: dict, defs: dict) -> str:
    """A property's JSON Schema in words (markdown), links to the sections documenting its models."""
    if "$ref" in s:
        name = s["$ref"].rsplit("/", 1)[-1]
        word, anchor = ANCHORS.get(name, (name, ""))
        return f"[{word}]({anchor})" if anchor else word
    alts = s.get("oneOf") or s.get("anyOf")
    if alts is not None and "type" not in s:
        refs = {a.get("$ref", "").rsplit("/", 1)[-1] for a in alts}
        if refs and all(r.endswith("Shape") for r in refs):
            return "[shape](#shapes)"
        if refs and all(r.endswith("Schedule") for r in refs):
            return "[schedule](#schedules)"
        parts = [type_text(a, defs) for a in alts if a.get("type") != "null"]
        return " or ".join(dict.fromkeys(parts))
    if "const" in s:
        return f"`{_flow(s['const'])}`"
    if "enum" in s:
        return " \\| ".join(f"`{_flow(v)}`" for v in s["enum"])
    t = s.get("type")
    if t == "array":
        n, item = (s.get("minItems"), s.get("maxItems")), type_text(s.get("items", {}), defs)
        item = f"({item})" if item.startswith(("list", "non-empty")) else item
        if n[0] is not None and n[0] == n[1]:
            return f"list of {n[0]} × {item}"
        return ("non-empty list" if n[0] == 1 else f"list of ≥ {n[0]} ×" if n[0] else "list of") + \
            (" of " if n[0] == 1 else " ") + item
    if t == "object":
        pattern, val = next(iter(s.get("patternProperties", {}).items()), (None, s.get("additionalProperties")))
        val = type_text(val, defs) if isinstance(val, dict) else "value"
        return f"mapping {('`' + pattern.strip('^$') + '`') if pattern else 'NAME'} → {val}"
    if t == "string":
        return "string" + (f" `{s['pattern'].strip('^$')}`" if "pattern" in s else "")
    if t in ("integer", "number", "boolean"):
        return t + _range(s)
    return "any"


def _default(field) -> str:
    from pydantic import BaseModel

    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "none"
    if isinstance(value, BaseModel):
        dumped = value.model_dump(mode="json", exclude_defaults=True)
        return f"`{_flow(dumped)}`" if dumped else "all defaults"
    return f"`{_flow(value)}`"


def table(models: list[tuple[type, str]], schema: dict) -> str:
    defs = schema.get("$defs", {})
    rows, seen = {}, set()
    for model, prefix in models:
        props = (schema if model.__name__ == "Scene" else defs[model.__name__])["properties"]
        own = [k for k in vars(model).get("__annotations__", {}) if k in model.model_fields]
        for key in own + [k for k in model.model_fields if k not in own]:  # the model's own keys first
            field = model.model_fields[key]
            name = prefix + key
            ty = type_text(props[key], defs)
            if name in seen:  # the same key in several members of a union: one row, every type
                if ty not in rows[name][1]:
                    rows[name][1] += " \\| " + ty
                continue
            seen.add(name)
            example = f"`{_cell(_flow(field.examples[0]))}`" if field.examples else ""
            rows[name] = [f"`{name}`", ty, _default(field), _cell(field.description or ""), example]
    out = ["| key | type | default | meaning | example |", "|---|---|---|---|---|"]
    out += ["| " + " | ".join(r) + " |" for r in rows.values()]
    return "\n".join(out) + "\n"


def update_language(text: str) -> str:
    """``text`` (docs/language.md) with every generated table rewritten; an unknown or missing block is an error."""
    from scenec.spec.schema import scene_schema

    schema, spec, found = scene_schema(), blocks(), []

    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in spec:
            raise ValueError(f"docs/language.md: unknown generated table `{name}` (known: {', '.join(spec)})")
        found.append(name)
        return BEGIN.format(name=name) + "\n" + table(spec[name], schema) + m.group(4)

    new = _BLOCK.sub(sub, text)
    missing = [n for n in spec if n not in found]
    if missing:
        raise ValueError(f"docs/language.md has no generated table for: {', '.join(missing)}")
    return new


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [a for a in argv if a != "--check"]
    path = Path(paths[0]) if paths else DOC
    text = path.read_text(encoding="utf-8")
    new = update_language(text)
    if check:
        if new != text:
            print(f"{path} is stale: run `python -m scenec.docgen language`", file=sys.stderr)
            return 1
        return 0
    if new != text:
        path.write_text(new, encoding="utf-8")
    print(f"{path}: {'updated' if new != text else 'current'}", file=sys.stderr)
    return 0
