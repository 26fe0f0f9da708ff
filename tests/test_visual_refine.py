"""`visual.refine` (arXiv 2501.01424, §3.4) on the tiny models: the refinement lowers its own loss, changes
the image, touches only the positive value tokens (never a weight), records its losses in the sidecar;
without `refine` a build is what it was (plan and latents); bad plans and bad scenes are refused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_visual_runtime import BACKENDS, compile_

from scenec.runtime import sampler
from scenec.runtime.methods import visual_refine
from scenec.runtime.outputs import execute
from scenec.spec.errors import PlanError
from scenec.spec.plan_visual import Refine, check_visual

# Flux's tiny model barely reacts to its visual tokens: a larger rate shows the descent clearly
LR = {"tiny": 0.5, "tiny-sd": 0.2, "tiny-sdxl": 0.2}


def refined(model: str, at: str = "[1.0]", steps: int = 2) -> str:
    return f"    visual: {{image: fox.png, refine: {{steps: {steps}, lr: {LR[model]}, at: {at}}}}}\n"


def weights(be) -> dict[str, torch.Tensor]:
    """Every parameter a refinement could reach: the denoiser, the VAE, the adapters and image encoders."""
    mods = {"denoiser": be.transformer if getattr(be, "transformer", None) is not None else be.unet,
            "vae": be.pipe.vae}
    for i, (adapter, encoder, _, _) in enumerate(be.__dict__.get("visual_models", {}).values()):
        mods[f"adapter{i}"], mods[f"encoder{i}"] = adapter, encoder
    return {f"{m}.{n}": (p.detach().clone(), p.requires_grad) for m, mod in mods.items()
            for n, p in mod.named_parameters()}


@pytest.mark.parametrize("model", ["tiny", "tiny-sd", "tiny-sdxl"])
def test_refine_lowers_its_loss_changes_the_image_and_freezes_everything_else(tmp_path, model, monkeypatch):
    be = BACKENDS[model]()
    plain = sampler.run_job(be, p := compile_(tmp_path, "plain", model, fox="    visual: {image: fox.png}\n"),
                            p.jobs[0], decode=False)
    before = weights(be)  # the adapter and encoder are loaded (and cached) by the plain run
    seen = []
    orig = visual_refine.refine

    def spy(run, prompt, op):
        toks = [t.clone() for t in (prompt.pos[0], prompt.pos[1], *prompt.neg)]
        note = orig(run, prompt, op)
        seen.append((toks, [prompt.pos[0], prompt.pos[1], *prompt.neg], prompt.pos[1].requires_grad))
        return note

    monkeypatch.setattr(visual_refine, "refine", spy)
    plan = compile_(tmp_path, "refine", model, fox=refined(model))
    r = sampler.run_job(be, plan, plan.jobs[0], decode=False)
    notes = r.diagnostics["visual_refine"]
    assert [(n["entity"], n["step"]) for n in notes] == [("fox", 0)] and len(seen) == 1
    assert notes[0]["loss_after"] < notes[0]["loss_before"], notes
    (k0, v0, nk0, nv0), (k1, v1, nk1, nv1), grad = seen[0]
    assert torch.equal(k0, k1) and torch.equal(nk0, nk1) and torch.equal(nv0, nv1)  # keys, negative branch
    assert not torch.equal(v0, v1) and not grad  # the positive value tokens moved, and serve as plain tensors
    assert not torch.equal(plain.latents, r.latents)  # the refined tokens change the image
    after = weights(be)
    assert after.keys() == before.keys()
    for name, (w, flag) in before.items():
        assert torch.equal(after[name][0], w) and after[name][1] == flag, name


@pytest.mark.parametrize("model", ["tiny", "tiny-sd"])
def test_without_refine_the_build_is_unchanged(tmp_path, model):
    """No `refine` key in the plan, and the sampler's no_grad entry point gives the latents that
    inference_mode gave (the sampler's mode before refinement), bit for bit."""
    be = BACKENDS[model]()
    plan = compile_(tmp_path, "plain", model, fox="    visual: {image: fox.png, window: [1.0, 0.3]}\n")
    raw = plan.doc.jobs[0]["visuals"][0]  # the job as the plan file holds it
    assert "refine" not in raw and plan.jobs[0].visuals[0].refine is None
    now = sampler.run_job(be, plan, plan.jobs[0], decode=False)
    with torch.inference_mode():
        then = sampler.run_job.__wrapped__(be, plan, plan.jobs[0], decode=False)
    assert torch.equal(now.latents, then.latents) and now.diagnostics == {}


def test_refine_losses_are_in_the_sidecar(tmp_path):
    be = BACKENDS["tiny"]()
    plan = compile_(tmp_path, "r", "tiny", fox=refined("tiny", at="[1.0, 0.6]", steps=1))
    assert plan.jobs[0].visuals[0].refine.at == (0, 2)
    [res] = execute(plan, be, tmp_path / "out")
    side = json.loads(Path(res["sidecar"]).read_text())
    notes = side["diagnostics"]["visual_refine"]
    assert [n["step"] for n in notes] == [0, 2]
    assert all(n["loss_after"] < n["loss_before"] for n in notes), notes
    plain = compile_(tmp_path, "p", "tiny", fox="    visual: {image: fox.png}\n")
    [res] = execute(plain, be, tmp_path / "out-plain")
    assert "diagnostics" not in json.loads(Path(res["sidecar"]).read_text())


def test_the_plan_check_refuses_bad_refinements(tmp_path):
    plan = compile_(tmp_path, "r", "tiny", fox="    visual: {image: fox.png, window: [1.0, 0.5], "
                    "refine: {at: [1.0]}}\n")
    vp = plan.jobs[0].visuals[0]
    check_visual(plan, vp, "job")  # the compiled one passes
    lo, hi = vp.window
    for bad in ({"refine": Refine(steps=1, lr=0.1, at=(hi,))}, {"refine": Refine(steps=1, lr=0.1, at=(lo, lo))},
                {"scale": 0.0}, {"mode": "ip-adapter"}):
        with pytest.raises(PlanError, match="refine"):
            check_visual(plan, vp.model_copy(update=bad), "job")
    with pytest.raises(ValueError):
        Refine(steps=0, lr=0.1, at=(0,))


def test_a_bad_refine_is_a_located_error_with_status_2():
    bad = Path(__file__).resolve().parent / "bad"
    p = subprocess.run([sys.executable, "-m", "scenec", "validate", "visual-refine.yaml"], cwd=bad,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr + p.stdout
    out = p.stderr + p.stdout
    assert "visual-refine.yaml:20:19: error: refine at 0.1 is sampler step 3" in out
    assert "visual-refine.yaml:27:15: error: `refine` on a visual prompt of scale 0" in out


def test_refine_under_inference_mode_is_a_clear_error(tmp_path):
    """Gradients cannot be taken in inference mode: a caller that wraps the sampler in it is told so."""
    from scenec.spec.errors import Unsupported

    plan = compile_(tmp_path, "r", "tiny-sd", fox=refined("tiny-sd"))
    with torch.inference_mode(), pytest.raises(Unsupported, match="inference_mode"):
        sampler.run_job.__wrapped__(BACKENDS["tiny-sd"](), plan, plan.jobs[0], decode=False)


def test_refine_levels_name_the_step_that_starts_nearest(tmp_path):
    """`at` near 0 is the last step (the table's end, level 0, starts no step): it was refused as "step N"."""
    plan = compile_(tmp_path, "late", fox=refined("tiny", at="[0.05, 1.0]"))
    (vp,) = plan.jobs[0].visuals
    assert vp.refine.at == (0, plan.steps - 1)


def test_a_window_covering_no_step_is_one_error_at_refine_at(tmp_path):
    """At 2 steps on tiny-sd [1, 0.3] covers no step: the refinement says so once, not that a level is
    `outside the visual window (no step)` (which read as a contradiction of the window it named)."""
    import numpy as np
    from PIL import Image

    from scenec.compiler.check import validate_file

    p = tmp_path / "s.yaml"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "fox.png")
    p.write_text('scenec: 1\nmodel: tiny-sd\ncanvas: {width: 128, height: 128}\nsampler: {steps: 2}\n'
                 'entities:\n  - id: fox\n    prompt: "a fox"\n'
                 '    visual: {image: fox.png, window: [1.0, 0.3], refine: {at: [0.9, 0.8]}}\n')
    _, diags = validate_file(p)
    errs = [d for d in diags if d.severity == "error"]
    assert len(errs) == 1 and "covers no sampler step at 2 steps" in errs[0].message
    assert (errs[0].pos.line, errs[0].pos.col) == (8, 63)  # the `at` list
    assert any(d.severity == "warning" and "covers no sampler step" in d.message for d in diags)
