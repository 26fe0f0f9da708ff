"""Golden IR text after each pass (the way xDSL tests passes with filecheck files).

Regenerate after an intended change with ``SCENEC_UPDATE_GOLDEN=1 pytest tests/test_passes.py``
and review the diff.
"""

import os
from pathlib import Path

import pytest

from scenec.compiler.passes import PIPELINE, run_passes
from scenec.compiler.printer import print_ir
from scenec.spec import load_scene

HERE = Path(__file__).parent
SCENES = HERE / "scenes"
GOLDEN = HERE / "golden"
CASES = [(s, p) for s in ("regional", "coupled", "reference") for p, _ in PIPELINE[1:]]


@pytest.mark.parametrize("scene,after", CASES, ids=[f"{s}-{p}" for s, p in CASES])
def test_golden_ir(scene, after, monkeypatch):
    monkeypatch.chdir(HERE)  # diagnostics and `; file:line` comments print paths relative to the cwd
    text = print_ir(run_passes(load_scene(SCENES / f"{scene}.yaml"), until=after))
    golden = GOLDEN / f"{scene}.{after}.ir"
    if os.environ.get("SCENEC_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()


def test_passes_are_pure():
    ls = load_scene(SCENES / "regional.yaml")
    a = run_passes(ls, until="expand")
    before = print_ir(a)
    from scenec.compiler.passes import p_geometry

    b = p_geometry(a)
    assert print_ir(a) == before  # the input IR is untouched
    assert b.passes == a.passes + ("geometry",)
    assert len(b.graph) > len(a.graph)


def test_prompts_are_deduplicated():
    ir = run_passes(load_scene(SCENES / "regional.yaml"), until="expand")
    from scenec.compiler.ir import PromptNode

    texts = [p.text for p in ir.nodes(PromptNode)]
    assert len(texts) == len(set(texts))
    # two seeds share every prompt: 2 jobs, 1 set of texts
    assert len(ir.jobs()) == 2
    assert sorted(texts) == sorted({"a meadow", "blurry", "a red fox", "an eagle", "cage", "a rock"})


def test_cow_program_unrolls_cycles():
    ir = run_passes(load_scene(SCENES / "reference.yaml"))
    ops = [o.model_dump(by_alias=True) for o in ir.programs[ir.jobs()[0].id]]
    # 10 steps, window 0.7 -> 0.5 = steps 3..5, 2 cycles, preserve 0.3 = step 7
    kinds = [(o["op"], o.get("from", o.get("at"))) for o in ops]
    assert kinds[:3] == [("denoise", 0), ("denoise", 1), ("denoise", 2)]
    assert kinds.count(("renoise", 5)) == 1
    assert [k for k in kinds if k[0] == "paste"] == [("paste", 3), ("paste", 4), ("paste", 3), ("paste", 4), ("paste", 7)]
    assert sum(1 for o in ops if o["op"] == "denoise") == 10 + 2
    assert ops[-1] == {"op": "denoise", "from": 9, "to": 10, "regional": True, "theta": None, "eta": 0.0}


def test_coupled_shared_prefix_and_fork():
    ir = run_passes(load_scene(SCENES / "coupled.yaml"))
    theta = ir.theta["pair"]
    k = ir.shared_prefix["pair"]
    assert k > 0 and all(theta[:k] == 0) and theta[k] > 0
    for job in ir.jobs():
        ops = [o.model_dump(by_alias=True) for o in ir.programs[job.id]]
        assert [o["op"] for o in ops].index("fork") == k


def test_prompt_equal_to_its_negative(tmp_path):
    # no background: its prompt and negative are both "" (one prompt node, one edge with both relations)
    p = tmp_path / "a.yaml"
    p.write_text("scenec: 1\nmodel: tiny\ncanvas: {width: 256, height: 256}\n"
                 "entities: [{id: a, prompt: x, negative: x}]\n")
    ir = run_passes(load_scene(p))
    g, a = ir.streams(ir.jobs()[0].id)
    assert ir.prompt_of(g.id).text == "" and ir.prompt_of(g.id, "negative").text == ""
    assert ir.prompt_of(a.id).text == "x" and ir.prompt_of(a.id, "negative").text == "x"
    assert "stream global prompt=%p0 negative=%p0" in print_ir(ir)


def test_references_sharing_a_preserve_step_are_all_pasted():
    from scenec.compiler.schedule import Cow, ProgramInputs, build_program

    for cycles in (0, 2):
        ops = [o.model_dump(by_alias=True) for o in build_program(
            ProgramInputs(steps=10, conditions=[Cow(0, 3, 5, cycles, 7, 1.0), Cow(1, 3, 5, cycles, 7, 1.0)]))]
        assert [o["condition"] for o in ops if o["op"] == "paste" and o["at"] == 7] == [0, 1]
