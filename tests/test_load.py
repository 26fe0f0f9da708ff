"""Loading: positions, includes, defs/`use`, limits — every problem at FILE:LINE:COL, all at once."""

import textwrap

import pytest

from scenec.spec import SceneError, load_scene


def write(tmp_path, name, text):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


def errors(path):
    with pytest.raises(SceneError) as e:
        load_scene(path)
    return [(d.pos.line, d.pos.col, d.message) for d in e.value.diagnostics.sorted()]


BASE = """
        scenec: 1
        canvas: {width: 256, height: 256}
"""


def test_minimal_scene_loads_with_defaults(tmp_path):
    ls = load_scene(write(tmp_path, "a.yaml", BASE))
    assert ls.name == "a"
    assert ls.scene.sampler.seed == 0
    assert ls.scene.output.name == "{scene}-{group}-{variant}-{seed}"
    assert ls.pos(("canvas", "width")).line == 2


def test_all_structural_errors_reported_at_once(tmp_path):
    p = write(tmp_path, "a.yaml", """
        scenec: 1
        canvas: {width: 256, height: "256"}
        sampler: {steps: 0}
        entities:
          - id: Fox
            prompt: fox
            colour: red
        """)
    errs = errors(p)
    assert (2, 30, "`canvas.height` must be an integer, found string `256`") in errs
    assert any(e[:2] == (3, 18) and "greater than or equal to 1" in e[2] for e in errs)
    assert any(e[:2] == (5, 9) and "not a valid id" in e[2] for e in errs)
    assert any(e[:2] == (7, 5) and "unknown key `colour`" in e[2] for e in errs)
    assert len(errs) == 4


def test_unknown_key_hint(tmp_path):
    p = write(tmp_path, "a.yaml", BASE + "        entitys: []\n")
    with pytest.raises(SceneError) as e:
        load_scene(p)
    d = e.value.diagnostics.items[0]
    assert d.hint == "did you mean `entities`?"
    assert d.format().startswith(f"{d.pos.file}:3:1: error: unknown key `entitys`")


@pytest.mark.parametrize("written, meant", [
    ("DPM++ 2M SDE Karras", "dpm++2m-sde-karras"), ("DPM++ 2M Karras", "dpm++2m-karras"), ("Euler a", "euler-a"),
    ("dpmpp_2m_sde", "dpm++2m-sde"), ("euler_ancestral", "euler-a"), ("UniPC", "unipc"), ("DDIM", "ddim")])
def test_a1111_and_comfyui_sampler_names_hint_at_the_solver(tmp_path, written, meant):
    """A sampler named as A1111's menu or ComfyUI's KSampler names it: the hint is the solver that is the same."""
    p = write(tmp_path, "a.yaml", BASE + f"        sampler: {{solver: '{written}'}}\n")
    with pytest.raises(SceneError) as e:
        load_scene(p)
    (d,) = e.value.diagnostics.items
    assert d.hint == f"did you mean `{meant}`?", (d.message, d.hint)


def test_an_option_in_other_capitals_hints_at_it(tmp_path):
    p = write(tmp_path, "a.yaml", BASE.replace("256}", "256, tiling: Both}") + "        prompt_syntax: A1111\n")
    with pytest.raises(SceneError) as e:
        load_scene(p)
    assert [d.hint for d in e.value.diagnostics.sorted()] == ["did you mean `both`?", "did you mean `a1111`?"]


def test_use_merges_def_and_overrides(tmp_path):
    p = write(tmp_path, "a.yaml", BASE + """
        entities:
          - {id: eagle, use: bird, negative: "blur"}
        defs:
          entities:
            bird: {prompt: "an eagle", negative: "cage", feather: 0.1}
        """)
    e = load_scene(p).scene.entities[0]
    assert (e.prompt, e.negative, e.feather) == ("an eagle", "blur", 0.1)


def test_include_defs_errors_point_into_included_file(tmp_path):
    write(tmp_path, "scenec.toml", "")
    write(tmp_path, "lib/common.yaml", """
        scenec: 1
        defs:
          entities:
            bird: {prompt: "an eagle", feather: -1}
        """)
    p = write(tmp_path, "scenes/a.yaml", BASE + """
        include: [../lib/common.yaml]
        entities:
          - {id: eagle, use: bird}
        """)
    with pytest.raises(SceneError) as e:
        load_scene(p)
    d = e.value.diagnostics.sorted()
    assert any(x.pos.file.endswith("common.yaml") and (x.pos.line, x.pos.col) == (4, 41) for x in d), d


def test_include_cycle(tmp_path):
    write(tmp_path, "b.yaml", "scenec: 1\ninclude: [a.yaml]\n")
    p = write(tmp_path, "a.yaml", BASE + "        include: [b.yaml]\n")
    errs = errors(p)
    assert any("include cycle" in m for _, _, m in errs)


def test_include_outside_root_and_absolute(tmp_path):
    write(tmp_path, "lib.yaml", "scenec: 1\n")
    p = write(tmp_path, "proj/a.yaml", BASE + "        include: [../lib.yaml, /etc/passwd]\n")
    errs = errors(p)
    assert any(line == 3 and "outside the project root" in m for line, _, m in errs)
    assert any(line == 3 and "absolute path" in m for line, _, m in errs)


def test_two_includes_defining_same_name(tmp_path):
    write(tmp_path, "x.yaml", "scenec: 1\ndefs: {entities: {bird: {prompt: a}}}\n")
    write(tmp_path, "y.yaml", "scenec: 1\ndefs: {entities: {bird: {prompt: b}}}\n")
    p = write(tmp_path, "a.yaml", BASE + "        include: [x.yaml, y.yaml]\n")
    errs = errors(p)
    assert any("defined by two includes" in m for _, _, m in errs)


def test_own_defs_win_over_included(tmp_path):
    write(tmp_path, "x.yaml", "scenec: 1\ndefs: {entities: {bird: {prompt: included}}}\n")
    p = write(tmp_path, "a.yaml", BASE + """
        include: [x.yaml]
        defs: {entities: {bird: {prompt: own}}}
        entities: [{id: b, use: bird}]
        """)
    assert load_scene(p).scene.entities[0].prompt == "own"


def test_alias_bomb_is_refused(tmp_path):
    lines = ["scenec: 1", "canvas: {width: 256, height: 256}", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i-1}"] * 10) + "]")
    p = write(tmp_path, "bomb.yaml", "\n".join(lines) + "\n")
    errs = errors(p)
    assert any("alias bomb" in m for _, _, m in errs)


def test_a_large_document_without_aliases_is_not_called_an_alias_bomb(tmp_path):
    items = "".join(f"  - {{id: e{k}, prompt: p, shape: {{box: [0, 0, 1, 1]}}}}\n" for k in range(8000))
    p = tmp_path / "big.yaml"
    p.write_text("scenec: 1\ncanvas: {width: 256, height: 256}\nentities:\n" + items)
    [(line, _, msg)] = errors(p)
    assert msg == "document has more than 50000 values, more than a scene may hold"
    assert 4 < line < 8004  # where the limit was reached, not 1:1


def test_bytes_that_are_not_utf8_are_reported_on_their_lines(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("scenec: 1\ncanvas: {width: 256, height: 256}\n"
                  "background: {prompt: \"caf\xe9 cr\xe8me\"}\nentities: []\nname: na\xefve\n".encode("latin-1"))
    assert errors(p) == [(3, 26, "not UTF-8 text: byte 0xe9"), (5, 9, "not UTF-8 text: byte 0xef")]
    p.write_bytes(b"scenec: 1\n" + b"# \xff\n" * 30)
    errs = errors(p)
    assert len(errs) == 11 and errs[0][:2] == (2, 3) and "only the first 10" in errs[-1][2]


def test_a_file_name_that_is_not_utf8_loads_and_prints(tmp_path, monkeypatch):
    import os

    from scenec.spec.diagnostics import display_path

    monkeypatch.chdir(tmp_path)
    name = os.fsdecode(b"caf\xe9.yaml")  # a latin-1 name on a UTF-8 system: lone surrogates in Python
    (tmp_path / name).write_text("scenec: 1\ncanvas: {width: 256, height: 256}\nentities: [1]\n")
    assert display_path(tmp_path / name) == "caf\\xe9.yaml"
    with pytest.raises(SceneError) as e:
        load_scene(tmp_path / name)
    text = str(e.value)
    text.encode("utf-8")  # printable: no lone surrogates
    assert text.startswith("caf\\xe9.yaml:3:")
    (tmp_path / name).write_text("scenec: 1\ncanvas: {width: 256, height: 256}\n")
    assert load_scene(tmp_path / name).name == "caf\ufffd"  # a name for outputs, valid UTF-8


def test_broken_yaml_position(tmp_path):
    p = write(tmp_path, "a.yaml", "scenec: 1\ncanvas: {width: 256, height: 256\n")
    errs = errors(p)
    assert len(errs) == 1 and errs[0][2].startswith("invalid YAML")


def test_duplicate_keys(tmp_path):
    p = write(tmp_path, "a.yaml", BASE + "        scenec: 1\n")
    assert (3, 1, "duplicate key `scenec`") in errors(p)


def test_non_mapping_document(tmp_path):
    p = write(tmp_path, "a.yaml", "- 1\n- 2\n")
    assert errors(p) == [(1, 1, "the document must be a mapping of keys, found a list")]


def test_nan_and_inf_are_refused(tmp_path):
    # `.nan`/`.inf` are YAML floats: a NaN z has no order, and inf guidance made `Infinity` in plan.json
    p = write(tmp_path, "a.yaml", BASE + """
        sampler: {guidance: .inf}
        entities: [{id: a, prompt: a, z: .nan}]
    """)
    assert errors(p) == [(4, 21, "`sampler.guidance` must be a finite number; found number `inf`"),
                         (5, 34, "`entities.0.z` must be a finite number; found number `nan`")]


def test_use_of_a_def_that_is_not_a_mapping_is_not_unknown(tmp_path):
    p = write(tmp_path, "a.yaml", BASE + """
        defs: {entities: {b: null}}
        entities: [{id: a, use: b}]
    """)
    msgs = [m for _, _, m in errors(p)]
    assert "`defs.entities.b` must be a mapping, found null" in msgs
    assert not any("unknown def" in m for m in msgs)


def test_a_bad_value_inside_a_union_mapping_is_one_error(tmp_path):
    """`model` is a string or a mapping: a bad value inside the mapping is reported there, and the string
    branch's "must be a string" (pydantic's other union branch) is not reported as an unknown key."""
    p = write(tmp_path, "m.yaml", """
        scenec: 1
        model: {id: tiny, lora: [{file: x.safetensors, scale: abc}]}
        canvas: {width: 64, height: 64}
        """)
    assert errors(p) == [(2, 55, "`model.lora.0.scale` must be a number, found string `abc`")]


def test_a_shape_with_two_kinds_says_so(tmp_path):
    # it read as a box with an unknown key: "unknown key `ellipse`, allowed here: units, box"
    p = write(tmp_path, "s.yaml", BASE + """
        entities:
          - {id: a, prompt: a, shape: {ellipse: {center: [0.5, 0.5], radii: [0.1, 0.1]}, box: [0, 0, 1, 1]}}
        """)
    assert errors(p) == [(5, 31, "a shape needs exactly one of: box, polygon, ellipse, mask, union, intersection, "
                                 "difference; found `box` and `ellipse`")]


def test_a_schedule_with_two_forms_says_so(tmp_path):
    # it read as a `values` schedule with unknown keys `shape` and `center` ("allowed here: values")
    p = write(tmp_path, "s.yaml", BASE + """
        sampler: {steps: 4}
        entities:
          - {id: a, prompt: a, shape: {box: [0, 0, 0.5, 1]}}
        groups:
          - id: g
            schedule: {values: [0, 0.5, 1, 1], shape: step, center: 0.5}
            variants: [{id: v, entities: [a]}, {id: w, prompt: b}]
        """)
    assert errors(p) == [(9, 15, "a schedule is {shape: step|linear|sin|arctan, ...}, {values: [...]} or {file: ...}; "
                                 "found `shape` and `values`")]


def test_a_library_file_loaded_as_a_scene_says_what_it_is(tmp_path):
    # `scenec build lib/animals.yaml` said only "missing required key `canvas`"
    p = write(tmp_path, "lib.yaml", """
        scenec: 1
        defs:
          entities:
            fox: {prompt: a fox}
        """)
    with pytest.raises(SceneError) as e:
        load_scene(p)
    [d] = e.value.diagnostics.errors
    assert d.message == "missing required key `canvas`" and "library file" in d.hint
    p = write(tmp_path, "s.yaml", "scenec: 1\nbackground: {prompt: x}\n")
    with pytest.raises(SceneError) as e:
        load_scene(p)
    assert [d.hint for d in e.value.diagnostics.errors] == [None]  # a scene without canvas is just that


def test_no_far_fetched_did_you_mean(tmp_path):
    # `colour` was "did you mean `lora`?"; with nothing close, the hint lists the keys allowed
    p = write(tmp_path, "s.yaml", BASE + """
        entities:
          - {id: a, prompt: a, colour: red, shape: {box: [0, 0, 1, 1]}}
        """)
    with pytest.raises(SceneError) as e:
        load_scene(p)
    [d] = e.value.diagnostics.errors
    assert d.message == "unknown key `colour`" and d.hint.startswith("allowed here: ") and "did you mean" not in d.hint


def test_other_uis_key_names_hint_scenecs(tmp_path):
    """A1111's, ComfyUI's and diffusers' names for a setting, or scenec's own key in the wrong mapping, hint where
    it is in a scene: `cfg_scale` was "did you mean `cfg_rescale`?" (a 0–1 share, not the CFG scale) and a
    top-level `prompt` "did you mean `prompt_syntax`?"."""
    p = write(tmp_path, "s.yaml", BASE + """
        steps: 4
        prompt: a cat
        sampler: {cfg_scale: 7, cfg: 7, scheduler: karras, sampler: euler, denoise: 0.5, clip_skip: 1}
        background: {prompt: x, negative_prompt: y, denoising_strength: 0.4}
        model: {id: tiny-sd, lora: [{file: a.safetensors, strength_model: 0.8}]}
        entities:
          - {id: a, prompt: a, negative_prompt: b, box: [0, 0, 1, 1]}
        """)
    with pytest.raises(SceneError) as e:
        load_scene(p)
    hints = {(d.pos.line, d.pos.col): (d.message, d.hint) for d in e.value.diagnostics.errors}
    assert hints[(4, 1)] == ("unknown key `steps`", "`steps` is `sampler.steps` in a scene")
    assert hints[(5, 1)][1] == "`prompt` is `background.prompt` in a scene"
    assert hints[(6, 11)][1] == "did you mean `guidance`?"  # in `sampler`: its own name for it
    assert hints[(6, 25)][1] == "did you mean `guidance`?"
    assert hints[(6, 33)][1].startswith("the schedule is part of `sampler.solver`'s name: `dpm++2m-karras`")
    assert hints[(6, 52)][1] == "did you mean `solver`?"
    assert hints[(6, 68)][1] == "A1111's, ComfyUI's or diffusers' `denoise` is `background.strength` in a scene"
    assert hints[(6, 82)][1] == "`clip_skip` is `model.clip_skip` in a scene"
    assert hints[(7, 25)][1] == "did you mean `negative`?"
    assert hints[(7, 45)][1] == "did you mean `strength`?"
    assert hints[(8, 51)][1] == "did you mean `scale`?"
    assert hints[(10, 24)][1] == "did you mean `negative`?"
    assert hints[(10, 44)][1] == "`box` is `shape.box` in an entity: `shape: {box: [x0, y0, x1, y1]}`"
    p.write_text("scenec: 1\ncanvas: {width: 64, height: 64}\n"
                 "control: [{image: e.png, strength: 0.5, end_percent: 0.6}]\n")
    with pytest.raises(SceneError) as e:
        load_scene(p)
    assert [d.hint.split(":")[0] for d in e.value.diagnostics.sorted()] == [
        "did you mean `scale`?", "the steps it acts in are `window"]
    p.write_text("scenec: 1\ncanvas: {width: 64, height: 64}\ncfg_scale: 7\ndenoising_strength: 0.5\n")
    with pytest.raises(SceneError) as e:
        load_scene(p)
    assert [d.hint for d in e.value.diagnostics.sorted()] == [
        "A1111's, ComfyUI's or diffusers' `cfg_scale` is `sampler.guidance` in a scene",
        "A1111's, ComfyUI's or diffusers' `denoising_strength` is `background.strength` in a scene"]


def test_a1111_escaped_parens_in_double_quotes_hint_single_quotes(tmp_path):
    """A1111's and ComfyUI's literal parenthesis `\\(` is an unknown escape inside YAML's double quotes."""
    p = tmp_path / "s.yaml"
    p.write_text('scenec: 1\ncanvas: {width: 64, height: 64}\nbackground: {prompt: "a \\(literal\\) word"}\n')
    with pytest.raises(SceneError) as e:
        load_scene(p)
    [d] = e.value.diagnostics.errors
    assert (d.pos.line, d.pos.col) == (3, 26) and "unknown escape character '('" in d.message
    assert d.hint == ("in double quotes `\\` starts an escape: write the prompt in single quotes ('a \\(b\\)') "
                      "or without quotes, or double the backslash (`\\\\(`)")


def test_a1111s_random_seed_minus_one_is_told_what_to_do(tmp_path):
    """A1111's and ComfyUI's seed −1 (a new random seed each run) gets a hint, in a list too."""
    p = tmp_path / "s.yaml"
    for seed, col in (("-1", 17), ("[1, -1]", 21)):
        p.write_text(f"scenec: 1\ncanvas: {{width: 64, height: 64}}\nsampler: {{seed: {seed}}}\n")
        with pytest.raises(SceneError) as e:
            load_scene(p)
        [d] = e.value.diagnostics.errors
        assert (d.pos.line, d.pos.col) == (3, col), d.format()
        assert d.hint and d.hint.startswith("A1111's and ComfyUI's seed -1 (a new random seed each run) has no "
                                            "equivalent: a scene makes the same images at every build"), d.format()


def test_a_value_of_the_wrong_shape_is_shown_the_right_one(tmp_path):
    """A string where a list or a mapping goes (`lora: loras/x.safetensors`, `canvas: 512x512`, `entities` as one
    mapping) gets the field's example as a hint (the schema's, that editors show)."""
    p = write(tmp_path, "s.yaml", """
        scenec: 1
        model: {id: tiny-sd, lora: loras/x.safetensors, embeddings: [embeddings/bad.safetensors]}
        canvas: 512x512
        entities:
          id: fox
        """)
    with pytest.raises(SceneError) as e:
        load_scene(p)
    hints = {(d.pos.line, d.pos.col): d.hint for d in e.value.diagnostics.errors}
    assert hints[(2, 28)] == "e.g. `lora: [{file: loras/watercolor.safetensors, scale: 0.8}]`", hints
    assert hints[(2, 62)] == "e.g. `{file: embeddings/badhands.safetensors, token: badhands}` (an item of the list)"
    assert hints[(3, 9)] == "e.g. `canvas: {width: 1024, height: 768}`"
    assert hints[(5, 3)].startswith("e.g. `entities: [{id: fox, prompt: a red fox running, shape: ")


def test_a_library_without_scenec_is_told_that_alone(tmp_path):
    """A library (`defs`, no `canvas`) without `scenec: 1`: validated alone it was "missing required keys `scenec`
    and `canvas`" (as if it were a scene), included "missing required key `scenec`" without a word why."""
    lib = write(tmp_path, "lib/animals.yaml", """
        defs:
          entities:
            fox: {prompt: a fox}
        """)
    scene = write(tmp_path, "s.yaml", BASE + """
        include: [lib/animals.yaml]
        entities: [{id: f, use: fox}]
        """)
    for path, file in ((lib, lib), (scene, lib)):
        with pytest.raises(SceneError) as e:
            load_scene(path)
        [d] = [x for x in e.value.diagnostics.errors if x.pos.file.endswith("animals.yaml")]
        assert d.message == "missing required key `scenec`", d.format()
        assert d.hint == "a library file (`defs`, no `canvas`) starts with `scenec: 1` too", d.format()


def test_missing_keys_are_reported_beside_an_unknown_first_key(tmp_path):
    """An A1111-style file (`prompt:`, `steps:`) lacks `scenec` and `canvas`: that error is at the document's
    position, 1:1, where the unknown first key's is too, and one error per position dropped it."""
    p = tmp_path / "s.yaml"
    p.write_text("prompt: a cat\nsteps: 20\n")
    with pytest.raises(SceneError) as e:
        load_scene(p)
    got = [(d.pos.line, d.pos.col, d.message) for d in e.value.diagnostics.sorted()]
    assert got == [(1, 1, "missing required keys `scenec` and `canvas`"), (1, 1, "unknown key `prompt`"),
                   (2, 1, "unknown key `steps`")], got


def test_a_utf16_file_is_named_as_such(tmp_path):
    """Windows' Notepad "Unicode" saves UTF-16: one error saying so, not a byte at every line."""
    p = tmp_path / "s.yaml"
    p.write_bytes("scenec: 1\ncanvas: {width: 64, height: 64}\n".encode("utf-16"))
    with pytest.raises(SceneError) as e:
        load_scene(p)
    [d] = e.value.diagnostics.errors
    assert (d.pos.line, d.pos.col, d.message) == (1, 1, "the file is UTF-16 text (it starts with a UTF-16 byte "
                                                        "order mark), not UTF-8"), d.format()
    assert d.hint == "save the file as UTF-8"
