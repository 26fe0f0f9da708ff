"""The checked-in JSON Schema is current, accepts every valid scene and rejects structural mistakes."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from scenec.spec.schema import scene_schema, scene_schema_text

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_FILE = ROOT / "schemas" / "scene.schema.json"

VALID = {
    "scenec": 1,
    "name": "ok",
    "canvas": {"width": 256, "height": 256},
    "sampler": {"steps": 4, "seed": [1, 2], "guidance": 3.5, "true_cfg": 1.0},
    "background": {"prompt": "a meadow", "negative": "blurry"},
    "entities": [
        {"id": "fox", "prompt": "a fox", "shape": {"box": [0, 0, 0.5, 0.5]}, "feather": 0.02, "z": 1},
        {"id": "eagle", "prompt": "an eagle", "shape": {"polygon": [[0.5, 0.1], [0.9, 0.1], [0.7, 0.4]]}},
        {"id": "face", "prompt": "a face", "shape": {"ellipse": {"center": [0.5, 0.5], "radii": [0.1, 0.1]}},
         "reference": {"image": "refs/face.png", "window": [0.7, 0.5], "cycles": 10, "preserve": 0.4,
                       "related": {"box": [0, 0, 1, 1]}, "modulation": False}},
        {"id": "sky", "prompt": "sky", "shape": {"difference": [{"box": [0, 0, 256, 100], "units": "px"},
                                                               {"mask": "refs/m.png"}]}},
    ],
    "groups": [{"id": "g", "schedule": {"values": [0, 0.5, 1, 1]},
                "variants": [{"id": "a", "entities": ["fox"]}, {"id": "b", "prompt": "a dancer"}]}],
    "defs": {"entities": {"bird": {"prompt": "a bird"}}},
    "include": ["lib/common.yaml"],
    "output": {"dir": "out", "name": "{scene}-{group}-{variant}-{seed}"},
    "attention": {"image_self": "restricted", "blocks": "double", "until": 0.5},
}


def _set(doc, path, value):
    d = copy.deepcopy(doc)
    cur = d
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return d


def test_checked_in_schema_is_current():
    assert SCHEMA_FILE.read_text() == scene_schema_text(), "run `scenec schema > schemas/scene.schema.json`"


def test_schema_is_valid_draft_2020_12():
    jsonschema.Draft202012Validator.check_schema(scene_schema())


def test_schema_accepts_valid_scene():
    jsonschema.validate(VALID, scene_schema())


def test_schema_accepts_every_example_scene():
    schema = scene_schema()
    files = sorted((ROOT / "scenes").glob("*.yaml"))
    for f in files:
        jsonschema.validate(yaml.safe_load(f.read_text()), schema)


def test_schema_accepts_the_example_library_files():
    # scenes/lib/*.yaml carry the schema modeline, and an editor underlined them: "'canvas' is a required property"
    schema = scene_schema()
    files = sorted((ROOT / "scenes" / "lib").glob("*.yaml"))
    assert files
    for f in files:
        jsonschema.validate(yaml.safe_load(f.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError, match="canvas"):  # neither a scene nor a library
        jsonschema.validate({"scenec": 1, "background": {"prompt": "x"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"scenec": 1, "defs": {"entities": {"fox": {"promt": "x"}}}}, schema)


@pytest.mark.parametrize("path,value", [
    (("colour",), "red"),                                   # unknown top-level key
    (("entities", 0, "promt"), "x"),                        # unknown nested key
    (("canvas", "width"), "256"),                           # wrong type
    (("entities", 0, "id"), "Fox"),                         # bad id
    (("entities", 0, "id"), "a b"),
    (("sampler", "steps"), 0),                              # steps < 1
    (("entities", 0, "feather"), -0.1),                     # negative feather
    (("entities", 2, "reference", "cycles"), -1),           # negative cycles
    (("groups", 0, "schedule"), {"values": [0, 1.5, 1, 1]}),  # θ outside [0, 1]
    (("groups", 0, "schedule"), {"values": [-0.1, 0, 1, 1]}),
    (("entities", 1, "shape"), {"polygon": [[0, 0], [1, 1]]}),  # polygon < 3 points
    (("entities", 0, "shape"), {"box": [0, 0, 1]}),
    (("entities", 0, "shape"), {"circle": 3}),
    (("scenec",), 2),
    (("groups", 0, "schedule"), {"shape": "cubic", "center": 0.5}),
    (("entities", 2, "reference", "fit"), "fill"),
])
def test_schema_rejects_structural_mistakes(path, value):
    bad = _set(VALID, path, value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, scene_schema())


def test_pydantic_and_schema_agree_on_the_valid_scene():
    from scenec.spec.models import Scene

    Scene.model_validate(json.loads(json.dumps(VALID)))


def _properties(node, where="#"):
    """Every (path, property schema) of a JSON Schema, at any depth: properties, $defs, anyOf/oneOf/allOf,
    items, prefixItems, additionalProperties."""
    if isinstance(node, dict):
        for key, sub in node.get("properties", {}).items():
            yield f"{where}/properties/{key}", sub
        for k, v in node.items():
            if k in ("properties", "$defs"):
                for name, sub in v.items():
                    yield from _properties(sub, f"{where}/{k}/{name}")
            elif isinstance(v, (dict, list)):
                yield from _properties(v, f"{where}/{k}")
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            yield from _properties(sub, f"{where}/{i}")


def test_every_schema_key_has_a_description_and_an_example():
    """Editors show `description` on hover and offer `examples`: every key at any depth has both."""
    schema = scene_schema()
    props = list(_properties(schema))
    assert len(props) > 80  # the walk reaches the nested models ($defs), not only the top level
    assert any(p.endswith("/$defs/EllipseSpec/properties/radii") for p, _ in props)
    missing = [p for p, s in props if not (isinstance(s.get("description"), str) and s["description"].strip())]
    assert not missing, f"keys without a description: {missing}"
    missing = [p for p, s in props if not (isinstance(s.get("examples"), list) and s["examples"])]
    assert not missing, f"keys without examples: {missing}"


def test_every_example_is_valid_for_its_key():
    """An example an editor offers must be a value the schema accepts there."""
    schema = scene_schema()
    for path, prop in _properties(schema):
        sub = {**{k: v for k, v in prop.items() if k != "examples"}, "$defs": schema["$defs"]}
        for ex in prop["examples"]:
            assert not list(jsonschema.Draft202012Validator(sub).iter_errors(ex)), (path, ex)


def test_the_walk_sees_a_key_without_description():
    """The walk itself: a nested key that lost its description is found."""
    schema = scene_schema()
    del schema["$defs"]["Modulation"]["properties"]["decay"]["description"]
    assert [p for p, s in _properties(schema) if "description" not in s] == [
        "#/$defs/Modulation/properties/decay"]
