"""Semantic checks (compiler/check.py): exact positions, messages, hints, and all problems at once."""

from __future__ import annotations

import json
import textwrap
import warnings

import pytest
from PIL import Image

from scenec.compiler.caps import model_info
from scenec.compiler.check import check_scene, schedule_file_values, validate_file
from scenec.spec.diagnostics import Diagnostics
from scenec.spec.load import load_scene


def write(root, name, text):
    p = root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


@pytest.fixture
def proj(tmp_path, monkeypatch):
    (tmp_path / "scenec.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def diags_of(path, model=None):
    ls, d = validate_file(path, model)
    return d


def errs(d):
    return [(x.pos.line, x.pos.col, x.message) for x in d.sorted() if x.severity == "error"]


def warns(d):
    return [(x.pos.line, x.pos.col, x.message) for x in d.sorted() if x.severity == "warning"]


def one(d, line, col, text, severity="error"):
    hits = [x for x in d if x.severity == severity and (x.pos.line, x.pos.col) == (line, col) and text in x.message]
    assert len(hits) == 1, f"{line}:{col}: {text}\n" + "\n".join(x.format() for x in d.sorted())
    return hits[0]


def test_valid_scene_has_no_diagnostics(proj):
    Image.new("L", (16, 16), 255).save(proj / "ref.png")
    (proj / "theta.json").write_text(json.dumps({"values": [0, 0.5, 1, 1]}))
    p = write(proj, "ok.yaml", """
        scenec: 1
        model: tiny
        canvas: {width: 256, height: 256}
        sampler: {steps: 4, seed: [1, 2]}
        background: {prompt: "a meadow", image: ref.png}
        entities:
          - {id: fox, prompt: "a fox", shape: {box: [0, 0.5, 0.5, 1]}}
          - id: face
            prompt: "a face"
            shape: {box: [0.5, 0, 1, 0.5]}
            reference: {image: ref.png, window: [0.75, 0.25], preserve: 0.25}
        groups:
          - id: g
            schedule: {file: theta.json}
            variants:
              - {id: fox, entities: [fox]}
              - {id: face, entities: [face]}
          - id: h
            schedule: {values: [0, 0, 1, 1]}
            variants: [{id: both, entities: [fox, face]}, {id: cat, prompt: "a cat"}]
        """)
    d = diags_of(p)
    assert list(d) == [], [x.format() for x in d]


def test_three_independent_errors_reported_at_once(proj):
    p = write(proj, "s.yaml", """
        scenec: 1
        model: flux-dev
        canvas: {width: 1000, height: 768}
        entities:
          - {id: fox, prompt: "a fox", shape: {box: [0, 0, 0.5, 1]}}
          - {id: fox, prompt: "a fox", shape: {box: [0.5, 0, 1, 1]}}
        output: {name: "{scene}-{sede}"}
        """)
    d = diags_of(p)
    assert errs(d) == [
        (3, 17, "canvas width 1000 is not a multiple of 16 (required by flux models such as `flux-dev`)"),
        (6, 10, "duplicate entity id `fox` (first at line 5)"),
        (7, 25, "unknown placeholder `{sede}` in `output.name`"),
    ]


def test_duplicate_ids(proj):
    p = write(proj, "s.yaml", """
        scenec: 1
        canvas: {width: 256, height: 256}
        entities:
          - {id: a, prompt: a, shape: {box: [0, 0, 0.5, 1]}}
          - {id: b, prompt: b, shape: {box: [0.5, 0, 1, 1]}}
        groups:
          - id: g
            variants:
              - {id: v, entities: [a]}
              - {id: v, entities: [b]}
          - id: g
            variants: [{id: w, entities: [a, b]}]
        output: {name: "{scene}-{group}-{variant}-{index}"}
        """)
    d = diags_of(p)
    one(d, 10, 14, "duplicate variant id `v` in group `g` (first at line 9)")
    one(d, 11, 9, "duplicate group id `g` (first at line 7)")
    assert len(d.errors) == 2


def test_variant_entities(proj):
    p = write(proj, "s.yaml", """
        scenec: 1
        canvas: {width: 256, height: 256}
        entities:
          - {id: fox, prompt: fox, shape: {box: [0, 0, 0.5, 1]}}
          - {id: owl, prompt: owl, shape: {box: [0.5, 0, 1, 1]}}
          - {id: cat, prompt: cat, shape: {box: [0.5, 0, 1, 0.2]}, z: 5}
        groups:
          - id: g
            variants:
              - {id: a, entities: [fxo, owl, owl]}
              - {id: b}
              - {id: c, negative: "blurry", entities: [fox]}
        """)
    d = diags_of(p)
    assert one(d, 10, 28, "unknown entity `fxo` in variant `a`").hint == "did you mean `fox`?"
    one(d, 10, 38, "entity `owl` is listed twice in variant `a` (first at line 10, column 33)")
    one(d, 11, 9, "variant `b` has neither `entities` nor `prompt`")
    assert len(d.errors) == 3
    one(d, 12, 17, "variant `c` has a `negative` but no `prompt`", "warning")
    one(d, 6, 10, "entity `cat` is in no variant, so no image shows it", "warning")


def test_unknown_entity_hint_lists_entities(proj):
    p = write(proj, "s.yaml", """
        scenec: 1
        canvas: {width: 256, height: 256}
        entities: [{id: fox, prompt: fox}]
        groups: [{id: g, variants: [{id: a, entities: [zebra]}]}]
        """)
    d = diags_of(p)
    assert one(d, 4, 48, "unknown entity `zebra`").hint == "entities: fox"


def test_canvas_multiple_hints(proj):
    p = write(proj, "s.yaml", """
        scenec: 1
        model: sd15
        canvas: {width: 500, height: 512}
        """)
    d = diags_of(p)
    assert one(d, 3, 17, "canvas width 500 is not a multiple of 8").hint == "nearest valid: 496 or 504"
    assert len(d) == 1
    # the same canvas is valid for flux at 512 wide; --model overrides the scene's model
    d = diags_of(p, model="flux-dev")
    assert one(d, 3, 17, "not a multiple of 16").hint == "nearest valid: 496 or 512"


def test_schedule_values_against_steps(proj):
    p = write(proj, "s.yaml", """
        scenec: 1
        canvas: {width: 256, height: 256}
        sampler: {steps: 4}
        entities: [{id: fox, prompt: fox}]
        groups:
          - id: short
            schedule: {values: [0, 1]}
            variants: [{id: a, entities: [fox]}]
          - id: down
            schedule: {values: [0, 0.7, 0.3, 1]}
            variants: [{id: a, entities: [fox]}]
        """)
    d = diags_of(p)
    e = one(d, 7, 24, "schedule has 2 values, the sampler has 4 steps")
    assert e.hint == "give one value per step (4), or set `sampler.steps: 2`"
    one(d, 10, 33, "θ must be non-decreasing, but value 3 is 0.3 after 0.7")
    assert len(d.errors) == 2


def test_schedule_uses_model_default_steps(proj):
    p = write(proj, "s.yaml", """
        scenec: 1
        model: flux-schnell
        canvas: {width: 256, height: 256}
        entities: [{id: fox, prompt: fox}]
        groups: [{id: g, schedule: {values: [0, 0.5, 1]}, variants: [{id: a, entities: [fox]}]}]
        """)
    d = diags_of(p)
    e = one(d, 5, 37, "schedule has 3 values, the sampler has 4 steps")
    assert "model's default is 4 steps" in e.hint


@pytest.mark.parametrize("content, text", [
    ([0, 0.5, 1], "schedule has 3 values, the sampler has 4 steps"),
    ({"values": [0, 0.6, 0.5, 1]}, "value 3 is 0.5 after 0.6"),
    ([0, 0.5, 1, 2], "θ values must lie in [0, 1]"),
    ({"theta": [0, 0, 1, 1]}, 'holds an object without a "values" key'),
    ([0, True, 1, 1], "value 2 is not a number"),
    ([], "holds no values"),
    ("x", "must hold a list of numbers"),
    (None, "is not valid JSON"),
])
def test_schedule_files(proj, content, text):
    f = proj / "sched" / "t.json"
    f.parent.mkdir()
    f.write_text("[0, 1" if content is None else json.dumps(content))
    p = write(proj, "s.yaml", """
        scenec: 1
        canvas: {width: 256, height: 256}
        sampler: {steps: 4}
        entities: [{id: fox, prompt: fox}]
        groups:
          - id: g
            schedule:
              file: sched/t.json
            variants: [{id: a, entities: [fox]}]
        """)
    d = diags_of(p)
    one(d, 8, 13, text)
    assert len(d.errors) == 1


def test_schedule_file_nan_and_huge(proj):
    (proj / "t.json").write_text("[0, NaN, 1, 1e999]")
    (proj / "u.json").write_text("[0, " + "9" * 400 + ", 1, 1]")
    p = write(proj, "s.yaml", """
        scenec: 1
        canvas: {width: 256, height: 256}
        sampler: {steps: 4}
        entities: [{id: fox, prompt: fox}]
        groups:
          - {id: g, schedule: {file: t.json}, variants: [{id: a, entities: [fox]}]}
          - {id: h, schedule: {file: u.json}, variants: [{id: a, entities: [fox]}]}
        """)
    d = diags_of(p)
    one(d, 6, 30, "θ values must lie in [0, 1]")
    one(d, 7, 30, "value 2 is out of range")


def test_schedule_file_values_helper():
    assert schedule_file_values([0, 1]) == [0.0, 1.0]
    assert schedule_file_values({"values": [0.5]}) == [0.5]
    assert isinstance(schedule_file_values({"values": "x"}), str)


def test_reference_window_and_preserve(proj):
    Image.new("RGB", (8, 8)).save(proj / "r.png")
    p = write(proj, "s.yaml", """
        scenec: 1
        canvas: {width: 256, height: 256}
        sampler: {steps: 10}
        entities:
          - id: a
            prompt: a
            shape: {box: [0, 0, 0.3, 1]}
            reference: {image: r.png, window: [0.5, 0.7]}
          - id: b
            prompt: b
            shape: {box: [0.3, 0, 0.6, 1]}
            reference: {image: r.png, window: [0.7, 0.5], preserve: 0.6}
          - id: c
            prompt: c
            shape: {box: [0.6, 0, 1, 1]}
            reference: {image: r.png, window: [0.52, 0.5]}
          - id: e
            prompt: e
            shape: {box: [0.6, 0, 1, 0.4]}
            reference: {image: r.png, window: [0.7, 0.5], preserve: 0.04}
        """)
    d = diags_of(p)
    e = one(d, 8, 39, "reference window [0.5, 0.7] must go from a higher noise level to a lower one")
    assert "[0.7, 0.5]" in e.hint
    assert len(d.errors) == 1
    one(d, 12, 61, "`preserve` 0.6 is above the window's end 0.5", "warning")
    one(d, 16, 39, "covers no sampler step at 10 steps", "warning")
    # levels are noise levels on the model's schedule (flux-dev at 256², 10 steps: the last step is at σ 0.155)
    w = one(d, 20, 61, "`preserve` 0.04 is nearest step 10 of 10, after the last one: no replacement happens",
            "warning")
    assert "at least 0.0774" in w.hint


def test_image_files(proj):
    Image.new("1", (10000, 10000), 0).save(proj / "huge.png")
    (proj / "fake.png").write_text("not an image")
    p = write(proj, "s.yaml", """
        scenec: 1
        canvas: {width: 256, height: 256}
        background: {image: huge.png}
        entities:
          - {id: a, prompt: a, shape: {box: [0, 0, 0.5, 1]}, reference: {image: fake.png}}
          - {id: b, prompt: b, shape: {box: [0.5, 0, 1, 1]}, reference: {image: ../x.png}}
          - {id: c, prompt: c, shape: {mask: none.png}, z: 3}
        """)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # our limit acts first, quietly
        d = diags_of(p)
    one(d, 3, 21, "background image `huge.png` is 10000x10000 pixels, over the limit")
    one(d, 5, 73, "reference image `fake.png` is not a readable image")
    one(d, 6, 73, "`../x.png` resolves outside the project root")
    one(d, 7, 38, "mask `none.png` not found")


def test_output_names(proj):
    p = write(proj, "s.yaml", """
        scenec: 1
        canvas: {width: 256, height: 256}
        sampler: {seed: [1, 2]}
        output: {name: "img-{scene}"}
        """)
    d = diags_of(p)
    e = one(d, 4, 16, "output names collide: two images would be named `img-s`")
    assert e.hint == "add {seed} or {index} to `output.name`"
    # {index} alone keeps them apart; so does {seed}
    for name in ("{index}", "{seed}", "x/{scene}/{seed}"):
        p.write_text(p.read_text().replace(p.read_text().splitlines()[3], f'output: {{name: "{name}"}}'))
        assert not diags_of(p).has_errors(), name


def test_output_name_placeholders_and_braces(proj):
    p = write(proj, "s.yaml", """
        scenec: 1
        canvas: {width: 256, height: 256}
        output:
          name: {scene}-{variantt}
        """)
    # unquoted, `{scene}` starts a flow mapping: YAML itself fails after it
    assert [e[:2] for e in errs(diags_of(p))] == [(4, 16)]
    p = write(proj, "s.yaml", """
        scenec: 1
        canvas: {width: 256, height: 256}
        output:
          name: x-{scene}-{variantt}
        """)
    d = diags_of(p)
    assert one(d, 4, 19, "unknown placeholder `{variantt}`").hint == "did you mean `variant`?"
    p = write(proj, "s.yaml", """
        scenec: 1
        canvas: {width: 256, height: 256}
        output: {name: '{scene}}-{seed}'}
        """)
    one(diags_of(p), 3, 24, "unbalanced `{` or `}`")


def test_output_with_groups_needs_variant(proj):
    p = write(proj, "s.yaml", """
        scenec: 1
        canvas: {width: 256, height: 256}
        entities:
          - {id: a, prompt: a, shape: {box: [0, 0, 0.5, 1]}}
          - {id: b, prompt: b, shape: {box: [0.5, 0, 1, 1]}}
        groups:
          - {id: g, variants: [{id: a, entities: [a]}]}
          - {id: h, variants: [{id: a, entities: [b]}]}
        output: {name: "{scene}-{variant}-{seed}"}
        """)
    e = one(diags_of(p), 9, 16, "output names collide: two images would be named `s-a-0`")
    assert e.hint == "add {group} or {index} to `output.name`"


def test_output_dir_and_unsafe_names(proj):
    p = write(proj, "s.yaml", """
        scenec: 1
        name: ".."
        canvas: {width: 256, height: 256}
        output: {dir: /tmp/out, name: "{scene}"}
        """)
    d = diags_of(p)
    one(d, 4, 15, "`output.dir`: absolute path `/tmp/out` is not allowed")
    one(d, 4, 31, "`output.name` makes `..`, which is not a safe relative file name")


def test_duplicate_seeds_and_includes(proj):
    write(proj, "lib/a.yaml", "scenec: 1\ndefs: {entities: {x: {prompt: x}}}\n")
    p = write(proj, "s.yaml", """
        scenec: 1
        canvas: {width: 256, height: 256}
        sampler: {seed: [3, 4, 3]}
        include: [lib/a.yaml, lib/../lib/a.yaml]
        """)
    d = diags_of(p)
    one(d, 3, 24, "seed 3 is listed twice (first at line 3, column 18)")
    one(d, 4, 23, "`lib/../lib/a.yaml` is included twice", "warning")


def test_errors_in_defs_point_into_the_library(proj):
    write(proj, "lib/faces.yaml", """
        scenec: 1
        defs:
          entities:
            face:
              prompt: "a face"
              reference: {image: missing.png, window: [0.2, 0.6]}
        """)
    p = write(proj, "s.yaml", """
        scenec: 1
        canvas: {width: 256, height: 256}
        include: [lib/faces.yaml]
        entities:
          - {id: a, use: face, shape: {box: [0, 0, 0.5, 1]}}
          - {id: b, use: face, shape: {box: [0.5, 0, 1, 1]}}
        """)
    d = diags_of(p)
    # reported once, in the library, though two entities use the def
    found = [(x.pos.file, x.pos.line, x.pos.col, x.message) for x in d.sorted() if x.severity == "error"]
    assert [f[:3] for f in found] == [("lib/faces.yaml", 6, 26), ("lib/faces.yaml", 6, 47)]
    assert "missing.png" in found[0][3] and "window [0.2, 0.6]" in found[1][3]


def test_check_scene_directly_and_geometry_stub(proj, monkeypatch):
    from scenec.compiler import geometry

    p = write(proj, "s.yaml", "scenec: 1\ncanvas: {width: 100, height: 256}\n")
    ls = load_scene(p)

    def stub(*a, **k):
        raise NotImplementedError

    monkeypatch.setattr(geometry, "check_geometry", stub)
    d = Diagnostics()
    check_scene(ls, model_info("flux-dev"), d)
    assert errs(d) == [(2, 17, "canvas width 100 is not a multiple of 16 (required by flux models such as `flux-dev`)")]


def test_validate_file_never_raises(proj):
    (proj / "bad.yaml").write_text("scenec: [\n")
    ls, d = validate_file("bad.yaml")
    assert ls is None and d.has_errors()
    ls, d = validate_file("missing.yaml")
    assert ls is None and errs(d) == [(1, 1, "no such scene file")]


# --- what the model's family can run (compiler/caps.py) -----------------------------------------

def _many_entities(n: int) -> str:
    return "".join(f"  - {{id: e{k}, prompt: p{k}, shape: {{box: [{k % 8 / 8:g}, {k // 8 / 8:g}, "
                   f"{(k % 8 + 1) / 8:g}, {(k // 8 + 1) / 8:g}]}}}}\n" for k in range(n))


def test_entity_limit_counts_each_image_of_a_group_alone(proj):
    """63 entities over two variants of 40 and 23 fit the 62 per image; one image of all 63 does not."""
    head = "scenec: 1\nmodel: tiny\ncanvas: {width: 256, height: 256}\nentities:\n" + _many_entities(63)
    split = head + ("groups:\n  - id: g\n    variants:\n"
                    f"      - {{id: a, entities: [{', '.join(f'e{k}' for k in range(40))}]}}\n"
                    f"      - {{id: b, entities: [{', '.join(f'e{k}' for k in range(40, 63))}]}}\n")
    assert errs(diags_of(write(proj, "split.yaml", split))) == []
    d = diags_of(write(proj, "one.yaml", head))
    one(d, 67, 5, "the scene has 63 entities, more than the 62 flux models such as `tiny` allow in one image")
    # SD's regional attention uses the same token layouts: the same limit
    one(diags_of(proj / "one.yaml", "tiny-sd"), 67, 5,
        "the scene has 63 entities, more than the 62 sd models such as `tiny-sd` allow in one image")


def test_family_without_a_method_refuses_the_key_that_asks_for_it(proj, monkeypatch):
    import dataclasses

    from scenec.compiler import caps

    Image.new("RGB", (16, 16), "red").save(proj / "ref.png")
    bare = dataclasses.replace(caps.SD, name="bare", methods=frozenset({"regional"}))
    monkeypatch.setitem(caps.ALIASES, "bare", caps.ModelInfo("bare", bare, "alias", None, steps=4, guidance=7.5))
    p = write(proj, "s.yaml", """
        scenec: 1
        canvas: {width: 256, height: 256}
        entities:
          - id: face
            prompt: "a face"
            reference: {image: ref.png}
        """)
    d = diags_of(p, "bare")
    # the reference is refused; its modulation (which needs the reference) is not reported on top
    assert errs(d) == [(6, 5, "`reference` needs reference images, which bare models such as `bare` do not run")]
    assert d.errors[0].hint == "bare models run: regional attention"
    assert errs(diags_of(p, "tiny-sd")) == []


def test_a_mistyped_alias_suggests_the_alias_not_a_download():
    from scenec.compiler.caps import UnknownModel

    with pytest.raises(UnknownModel, match=r"`flux-devv` is no alias, .*: did you mean `flux-dev`\?"):
        model_info("flux-devv")
    with pytest.raises(UnknownModel, match="hf download someone/model"):  # a hub id: where to get it
        model_info("someone/model")


def test_an_output_dir_that_is_a_file_is_a_located_warning(tmp_path):
    # validate said "ok"; a build then warned "unreadable manifest (Not a directory)" and failed every job
    (tmp_path / "scenec.toml").write_text('[project]\ndefault_model = "tiny"\n')
    (tmp_path / "notes.txt").write_text("x")
    p = tmp_path / "s.yaml"
    p.write_text("scenec: 1\ncanvas: {width: 64, height: 64}\nbackground: {prompt: x}\noutput: {dir: notes.txt/sub}\n")
    _, diags = validate_file(p)
    assert not diags.has_errors()
    [w] = diags.warnings
    assert (w.pos.line, w.pos.col) == (4, 15) and "is a file, not a directory" in w.message
    p.write_text("scenec: 1\ncanvas: {width: 64, height: 64}\nbackground: {prompt: x}\noutput: {dir: renders}\n")
    assert not validate_file(p)[1].warnings  # a directory still to be made is fine


def test_an_unknown_model_is_one_error_not_its_stand_in_familys_too(tmp_path):
    """`model: nope` said so, and then what flux-dev (the stand-in) would refuse: a canvas not a multiple of
    16, `solver: ddim` not a Flux solver, negatives that cannot act on Flux. Only the model's error now."""
    p = tmp_path / "s.yaml"
    p.write_text("scenec: 1\nmodel: nope\ncanvas: {width: 200, height: 200}\nsampler: {solver: ddim}\n"
                 "background: {prompt: x, negative: y}\n"
                 "entities:\n  - {id: a, prompt: a, shape: {box: [0.1, 0.1, 0.5, 0.5]}}\n")
    _, d = validate_file(p)
    assert [(x.pos.line, x.severity) for x in d] == [(2, "error")] and "`nope` is no alias" in d.errors[0].message
    p.write_text(p.read_text().replace("model: nope", "model: flux-dev"))
    _, d = validate_file(p)
    assert len(d.errors) >= 2  # the same scene on a known model: its family's errors are real


def test_a_path_written_from_the_project_root_in_a_subdirectory_scene_says_so(proj):
    """A scene in scenes/ naming `loras/x.safetensors` (a path from the project root, as ComfyUI's model folders
    are) is not found; the hint says where the file is and the path to write (`../loras/x.safetensors`)."""
    import numpy as np
    from safetensors.numpy import save_file

    (proj / "refs").mkdir()
    Image.new("RGB", (64, 64)).save(proj / "refs" / "init image.png")
    (proj / "loras").mkdir()
    save_file({"lora_unet_x.lora_down.weight": np.zeros((1, 4), np.float32)}, str(proj / "loras" / "a.safetensors"))
    (proj / "embeddings").mkdir()
    save_file({"emb_params": np.zeros((1, 32), np.float32)}, str(proj / "embeddings" / "bad.safetensors"))
    p = write(proj, "scenes/s.yaml", """
        scenec: 1
        model: {id: tiny-sd, lora: [{file: loras/a.safetensors}], embeddings: [{file: embeddings/bad.safetensors}]}
        canvas: {width: 64, height: 64}
        background: {prompt: x, image: "refs/init image.png"}
        """)
    _, diags = validate_file(p)
    hints = {d.pos.col: d.hint for d in diags.errors}
    assert hints[36].endswith("; did you mean `../loras/a.safetensors`? (a path is relative to the file that "
                              "names it, not to the project root)"), hints
    assert "did you mean `../embeddings/bad.safetensors`?" in hints[79], hints
    assert "did you mean `../refs/init image.png`?" in hints[32], hints
    (proj / "scenes" / "refs").mkdir()  # a file nowhere else: the hint as before
    p.write_text(p.read_text().replace("refs/init image.png", "refs/none.png"))
    _, diags = validate_file(p)
    assert [d.hint for d in diags.errors if "none.png" in d.message] == [f"looked for {proj / 'scenes/refs/none.png'}"]


def test_a_checkpoint_path_from_the_project_root_says_so(proj):
    """`model: models/x.safetensors` in scenes/s.yaml: the checkpoint is in the project's models/, so the hint
    gives `../models/x.safetensors` (as for LoRAs and images)."""
    (proj / "models").mkdir()
    (proj / "models" / "my model.safetensors").write_bytes(b"\0" * 16)
    p = write(proj, "scenes/s.yaml", """
        scenec: 1
        model: "models/my model.safetensors"
        canvas: {width: 64, height: 64}
        """)
    _, diags = validate_file(p)
    [err] = diags.errors
    assert (err.pos.line, err.pos.col) == (2, 8) and "does not exist" in err.message, err.format()
    assert err.hint and "did you mean `../models/my model.safetensors`?" in err.hint, err.format()


def test_a_vae_path_from_the_project_root_says_so(proj):
    """`vae: vae/my-vae` (a directory, or a file) written from the project root in scenes/s.yaml: the hint gives
    `../vae/…`; the message still says no hub id `vae/my-vae` is cached (it has the form of one)."""
    (proj / "vae" / "my-vae").mkdir(parents=True)
    (proj / "vae" / "ft.safetensors").write_bytes(b"\0" * 16)
    p = write(proj, "scenes/s.yaml", """
        scenec: 1
        model: {id: tiny-sd, vae: vae/my-vae}
        canvas: {width: 64, height: 64}
        """)
    for spec, want in (("vae/my-vae", "../vae/my-vae"), ("vae/ft.safetensors", "../vae/ft.safetensors")):
        p.write_text(p.read_text().replace("vae/my-vae", spec))
        _, diags = validate_file(p)
        [err] = diags.errors
        assert err.hint and f"did you mean `{want}`?" in err.hint, err.format()
