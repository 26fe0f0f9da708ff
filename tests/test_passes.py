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
    # tiny, 10 steps at 256²: window 0.7 -> 0.5 = σ 0.712 -> 0.524 = steps 4..6, 2 cycles, preserve 0.3 = σ 0.292
    # = step 8; the seed canvas inverted to the window's end, re-noised up at the start of every cycle
    kinds = [(o["op"], o.get("from", o.get("at"))) for o in ops]
    assert kinds[:3] == [("seed", 6), ("renoise", 6), ("paste", 4)]
    assert kinds.count(("renoise", 6)) == 2
    assert [k for k in kinds if k[0] == "paste"] == [("paste", 4), ("paste", 5), ("paste", 6)] * 2 + [("paste", 8)]
    assert sum(1 for o in ops if o["op"] == "denoise") == 2 * 2 + 4
    assert ops[-1] == {"op": "denoise", "from": 9, "to": 10, "regional": True, "theta": None, "eta": 0.1}


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
        for init in ("seed", "noise"):
            ops = [o.model_dump(by_alias=True) for o in build_program(ProgramInputs(steps=10, conditions=[
                Cow(0, 3, 5, cycles, 7, 1.0, 0.1, init), Cow(1, 3, 5, cycles, 7, 1.0, 0.1, init)]))]
            assert [o["condition"] for o in ops if o["op"] == "paste" and o["at"] == 7] == [0, 1]


def test_arctan_is_half_at_its_centre_with_exact_endpoints(tmp_path):
    """arXiv 2506.06826's arctan family: θ(t) = ½ + atan((t − c)/s)/π, so θ(c) = ½; where it reaches 0 or 1
    (within 1e-6) it is exactly 0 or 1, so a steep schedule takes the exact endpoints and shares its prefix."""
    import numpy as np

    from scenec.compiler.schedule import progress, theta_arctan

    t = progress(5)  # 0, 0.25, 0.5, 0.75, 1
    th = theta_arctan(t, 0.5, 0.1)
    assert th[2] == 0.5 and (np.diff(th) > 0).all()
    np.testing.assert_allclose(th, 0.5 + np.arctan((t - 0.5) / 0.1) / np.pi, rtol=0, atol=1e-15)
    assert 0.0 < th[0] < 0.07 and 0.93 < th[-1] < 1.0  # not reached at this scale
    assert theta_arctan(t, 0.4, 1e-8).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    p = tmp_path / "g.yaml"
    p.write_text("scenec: 1\nmodel: tiny\ncanvas: {width: 128, height: 128}\nsampler: {steps: 5}\n"
                 "groups: [{id: g, schedule: {shape: arctan, center: 0.4, scale: 1.0e-8}, "
                 "variants: [{id: a, prompt: a}, {id: b, prompt: b}]}]\n")
    ir = run_passes(load_scene(p))
    assert ir.shared_prefix["g"] == 2 and ir.theta["g"].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
