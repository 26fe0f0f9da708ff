"""Visual prompts in coupling groups (arXiv 2501.01424 inside arXiv 2506.06826's coupled generation), tiny
models, CPU: an entity's visual tokens are its stream's — none while θ = 0 (the group's images stay identical,
and equal the group without the visual prompt), weight θ where coupling scales the entity keys, their own scale
in the entity branch of Flux's single-stream blocks; a variant without the entity is untouched."""

import numpy as np
import pytest
import torch
from PIL import Image

from scenec.compiler import compile_scene
from scenec.runtime.sampler import run_group
from scenec.runtime.testing import tiny_backend, tiny_sd_backend

SCENE = """\
scenec: 1
model: {model}
canvas: {{width: 128, height: 128}}
sampler: {{steps: 4, seed: 1}}
background: {{prompt: "a misty forest"}}
entities:
  - id: stag
    prompt: "a stag"
    shape: {{box: [0.1, 0.3, 0.6, 0.9]}}
{visual}groups:
  - id: g
    schedule: {schedule}
    variants:
      - {{id: fox, prompt: "a red fox running"}}
      - {{id: stag, entities: [stag]}}
"""

BACKENDS = {"tiny": tiny_backend, "tiny-sd": tiny_sd_backend}


def group_results(tmp_path, model: str, schedule: str, visual: bool, name: str, refine: str = "") -> dict:
    d = tmp_path / name
    d.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / "stag.png")
    vis = f"    visual: {{image: stag.png, scale: 2.0{refine}}}\n" if visual else ""
    (d / "s.yaml").write_text(SCENE.format(model=model, visual=vis, schedule=schedule), encoding="utf-8")
    plan = compile_scene(d / "s.yaml")
    assert bool(plan.jobs[1].visuals) == visual
    out = {}
    for job, r in run_group(BACKENDS[model](), plan, plan.groups[0], plan.jobs, decode=False):
        assert not isinstance(r, Exception), r
        out[job.variant] = r
    return out


def group_latents(tmp_path, model: str, schedule: str, visual: bool, name: str) -> dict:
    return {k: r.latents for k, r in group_results(tmp_path, model, schedule, visual, name).items()}


@pytest.mark.parametrize("model", ["tiny", "tiny-sd"])
def test_theta_zero_keeps_the_groups_images_identical(tmp_path, model):
    with_vis = group_latents(tmp_path, model, "{values: [0, 0, 0, 0]}", True, "v")
    without = group_latents(tmp_path, model, "{values: [0, 0, 0, 0]}", False, "n")
    assert torch.equal(with_vis["fox"], with_vis["stag"]) and torch.equal(with_vis["stag"], without["stag"])


@pytest.mark.parametrize("model", ["tiny", "tiny-sd"])
def test_rising_theta_the_visual_prompt_acts_in_its_variant_only(tmp_path, model):
    with_vis = group_latents(tmp_path, model, "{values: [0, 0.5, 0.8, 1]}", True, "v")
    without = group_latents(tmp_path, model, "{values: [0, 0.5, 0.8, 1]}", False, "n")
    assert torch.equal(with_vis["fox"], without["fox"])  # the variant without the entity
    assert (with_vis["stag"] - without["stag"]).abs().max() > 1e-4


def test_flux_single_stream_entity_branch_sees_the_tokens_at_their_scale(tmp_path, monkeypatch):
    """At 0 < θ < 1 Flux's single-stream blocks mix two branches: the visual tokens join the entity branch
    at their own scale; dual-stream blocks get them at scale·θ (where the entity keys are scaled by θ)."""
    from scenec.runtime import attention

    seen = []
    orig = attention._with_extra

    def spy(ctl, site, q, k, v, mask, extra, n_text, n_img, bias=None):
        seen.append((site.name, q.shape[2], tuple(round(e.scale, 6) for e in extra)))
        return orig(ctl, site, q, k, v, mask, extra, n_text, n_img, bias)

    monkeypatch.setattr(attention, "_with_extra", spy)
    group_latents(tmp_path, "tiny", "{values: [0.5, 0.5, 0.5, 0.5]}", True, "v")
    assert ("double", None, (1.0,)) in {(s, None, sc) for s, _, sc in seen}  # 2.0 · θ = 1.0
    assert ("single", None, (2.0,)) in {(s, None, sc) for s, _, sc in seen}
    n_single = {n for s, n, _ in seen if s == "single"}
    n_double = {n for s, n, _ in seen if s == "double"}
    assert max(n_single) < max(n_double)  # the entity branch: without the background's text rows


@pytest.mark.parametrize("model,lr", [("tiny", 0.5), ("tiny-sd", 0.2)])
def test_refine_in_a_group_acts_in_its_variant_where_theta_has_risen(tmp_path, model, lr):
    """visual.refine in a coupling group (§3.4 of arXiv 2501.01424 on the entity stream): the loss falls at a
    step where θ > 0, the refined tokens change the entity's image, the other variant is untouched."""
    schedule = "{values: [0, 0.6, 1, 1]}"
    plain = group_results(tmp_path, model, schedule, True, "plain")
    ref = group_results(tmp_path, model, schedule, True, "ref", f", refine: {{steps: 2, lr: {lr}, at: [0.5]}}")
    notes = ref["stag"].diagnostics["visual_refine"]
    assert len(notes) == 1 and notes[0]["step"] >= 1  # a step with θ > 0
    assert notes[0]["loss_after"] < notes[0]["loss_before"], notes
    assert "visual_refine" not in ref["fox"].diagnostics
    assert torch.equal(ref["fox"].latents, plain["fox"].latents)
    assert float((ref["stag"].latents - plain["stag"].latents).abs().max()) > 1e-5


def test_refine_where_theta_is_0_is_refused_at_run_time_too(tmp_path):
    """A plan edited by hand past the compiler's check: a clear error, not a failed backward."""
    from scenec.runtime.sampler import run_job
    from scenec.spec.errors import PlanError

    d = tmp_path / "h"
    d.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(d / "stag.png")
    (d / "s.yaml").write_text(SCENE.format(model="tiny", schedule="{values: [0, 1, 1, 1]}",
                                           visual="    visual: {image: stag.png, refine: {at: [0.1]}}\n"))
    plan = compile_scene(d / "s.yaml")
    job = plan.jobs[1]
    vp = job.visuals[0]
    job.visuals[0] = vp.model_copy(update={"refine": vp.refine.model_copy(update={"at": (0,)})})
    with pytest.raises(PlanError, match="θ is 0"):
        run_job(tiny_backend(), plan, job, decode=False)
