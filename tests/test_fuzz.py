"""Fuzzing `validate_file`: whatever the bytes, it returns diagnostics and never raises.

Three sources of input: random YAML-ish documents (nested dicts, lists and scalars dumped with
``yaml.safe_dump``); valid scenes with one subtree replaced by random data (to get past the
structural checks into the semantic and geometric ones); and byte/text mutations of the example
scenes (scenes/*.yaml when present, plus two small scenes embedded here). Each input is validated
inside a temporary project that holds a copy of scenes/ (so includes, images and schedule files
resolve). Derandomized, so CI sees the same examples every run; ``SCENEC_FUZZ=20`` hunts longer.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from scenec.compiler.check import validate_file
from scenec.spec.diagnostics import Diagnostics

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "scenes"

SMALL_SCENES = {
    "embedded-coupled.yaml": """\
scenec: 1
model: tiny
canvas: {width: 256, height: 256}
sampler: {steps: 4, seed: [1, 2]}
background: {prompt: "a meadow", negative: "blurry"}
entities:
  - {id: fox, prompt: "a fox", shape: {box: [0.05, 0.5, 0.55, 0.95]}, feather: 0.03}
  - id: eagle
    prompt: "an eagle"
    shape: {polygon: [[0.45, 0.08], [0.95, 0.12], [0.85, 0.42], [0.5, 0.38]]}
groups:
  - id: animals
    schedule: {values: [0, 0.25, 0.75, 1]}
    variants:
      - {id: fox, entities: [fox]}
      - {id: eagle, entities: [eagle]}
      - {id: cat, prompt: "a cat"}
output: {dir: out, name: "{scene}-{group}-{variant}-{seed}"}
""",
    "embedded-reference.yaml": """\
scenec: 1
canvas: {width: 512, height: 384}
sampler: {steps: 10}
background: {prompt: "a studio", image: ref.png}
defs:
  entities:
    face: {prompt: "a face", negative: "cartoon"}
entities:
  - id: face
    use: face
    shape: {ellipse: {center: [0.5, 0.4], radii: [0.2, 0.25]}}
    reference: {image: ref.png, window: [0.7, 0.5], cycles: 3, preserve: 0.4,
                related: {difference: [{box: [0, 0, 1, 1]}, {mask: ref.png}]}}
  - id: hand
    prompt: "a hand"
    shape: {union: [{box: [0, 0.7, 0.3, 1]}, {box: [200, 300, 300, 384], units: px}]}
    z: 2
""",
}

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["", "{seed}", "../x", "/etc/passwd", "ref.png", "fox", "1e999", "~"]),
)
KEYS = st.one_of(st.text(max_size=8), st.sampled_from([
    "scenec", "canvas", "width", "height", "entities", "id", "prompt", "shape", "box", "polygon", "groups",
    "variants", "schedule", "values", "file", "reference", "image", "window", "include", "defs", "use", "output",
    "name", "sampler", "steps", "seed", "mask", "union", "difference", "z", "feather", "<<", "matrix",
    "related", "preserve", "cycles"]))
DATA = st.recursive(SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=5),
                                                    st.dictionaries(KEYS, kids, max_size=5)), max_leaves=25)

# SCENEC_FUZZ=N runs N times as many examples, randomized (a longer hunt, outside CI)
SCALE = int(os.environ.get("SCENEC_FUZZ", "0") or 0)
SETTINGS = dict(derandomize=not SCALE, deadline=2000, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "scenec.toml").write_text("")
    if EXAMPLES.is_dir():
        shutil.copytree(EXAMPLES, root / "scenes", ignore=shutil.ignore_patterns("out", "scenec.toml"))
    im = Image.new("L", (32, 24), 0)
    im.paste(255, (8, 6, 24, 18))
    im.save(root / "ref.png")
    for name, text in SMALL_SCENES.items():
        (root / name).write_text(text)
    return root


def _examples() -> dict[str, bytes]:
    out = {k: v.encode() for k, v in SMALL_SCENES.items()}
    if EXAMPLES.is_dir():
        for f in sorted(EXAMPLES.glob("*.yaml")):
            out[f"scenes/{f.name}"] = f.read_bytes()
    return out


EXAMPLE_TEXTS = _examples()


def _validate(project: Path, rel: str, data: bytes) -> Diagnostics:
    p = project / rel
    p.write_bytes(data)
    ls, diags = validate_file(p)  # must not raise; hypothesis's deadline bounds the time
    assert isinstance(diags, Diagnostics)
    for d in diags:
        assert d.pos.line >= 1 and d.pos.col >= 1 and d.message
        d.format()
    if ls is None:
        assert diags.has_errors()
    return diags


def test_embedded_scenes_are_valid(project):
    for name in SMALL_SCENES:
        ls, diags = validate_file(project / name)
        assert ls is not None and not diags.has_errors(), [d.format() for d in diags]


@settings(max_examples=120 * max(SCALE, 1), **SETTINGS)
@given(DATA)
def test_random_documents(project, data):
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        return
    _validate(project, "fuzz-doc.yaml", text.encode("utf-8", errors="surrogatepass"))


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _replace(doc, path, value):
    if not path:
        return value
    cur = doc
    for part in path[:-1]:
        cur = cur[part]
    cur[path[-1]] = value
    return doc


BASES = {name: yaml.safe_load(text) for name, text in SMALL_SCENES.items()}


@settings(max_examples=150 * max(SCALE, 1), **SETTINGS)
@given(st.sampled_from(sorted(BASES)), st.data())
def test_scene_subtree_replaced(project, name, data):
    doc = copy.deepcopy(BASES[name])
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        path = data.draw(st.sampled_from(paths))
        doc = _replace(doc, path, data.draw(DATA))
    try:
        text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    except (yaml.YAMLError, ValueError):
        return
    _validate(project, "fuzz-tree.yaml", text.encode("utf-8", errors="surrogatepass"))


MUTATION = st.tuples(st.sampled_from(["delete", "insert", "replace", "dup-line", "swap-lines"]),
                     st.integers(0, 10**6), st.integers(1, 12), st.binary(min_size=1, max_size=6) |
                     st.sampled_from([b"{", b"}", b"[", b"]", b":", b"- ", b"\t", b"&a ", b"*a", b"\n  ", b"'",
                                      b'"', b"#", b"!!python/object ", b"!!int ", b"!!float ",
                                      b"!!timestamp ", b"!!bool ", b"!!binary ", b"!!set ", b"\xff", b"---\n", b"<<: ", b"0.", b"-1"]))


def _mutate(text: bytes, ops) -> bytes:
    for op, at, n, blob in ops:
        if not text:
            text = blob
            continue
        i = at % len(text)
        if op == "delete":
            text = text[:i] + text[i + n:]
        elif op == "insert":
            text = text[:i] + blob + text[i:]
        elif op == "replace":
            text = text[:i] + blob + text[i + len(blob):]
        else:
            lines = text.split(b"\n")
            j = at % len(lines)
            if op == "dup-line":
                lines.insert(j, lines[j])
            else:
                k = (j + n) % len(lines)
                lines[j], lines[k] = lines[k], lines[j]
            text = b"\n".join(lines)
    return text


@settings(max_examples=200 * max(SCALE, 1), **SETTINGS)
@given(st.sampled_from(sorted(EXAMPLE_TEXTS)), st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_example_scenes(project, name, ops):
    # written beside the original, so its includes and images resolve the same way
    rel = str(Path(name).parent / "fuzz-mutant.yaml")
    _validate(project, rel, _mutate(EXAMPLE_TEXTS[name], ops))
