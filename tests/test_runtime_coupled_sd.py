"""Coupled generation on the tiny SD (UNet cross-attention: background keys × (1 − θ), entity keys × θ).

The same exact endpoints as on Flux: θ ≡ 0 makes a group's images identical (the background alone, the
pipeline's own path); θ ≡ 1 makes a whole-canvas variant the plain image of its prompt and a variant
with regions the EliGen job of its entities with the background as global prompt. The shared θ = 0
prefix gives the same images on and off.
"""

import numpy as np
import pytest
import torch

from scenec.compiler import compile_scene
from scenec.runtime.sampler import run_group, run_job
from scenec.runtime.testing import tiny_sd_backend

SCENE = """\
scenec: 1
model: tiny-sd
canvas: {{width: 128, height: 128}}
sampler: {{steps: 4, seed: {seeds}}}
background: {{prompt: "a misty forest", negative: "blurry"}}
entities:
  - {{id: stag, prompt: "a stag", shape: {{box: [0.1, 0.3, 0.6, 0.9]}}}}
  - {{id: owl, prompt: "an owl", shape: {{box: [0.5, 0.1, 0.9, 0.5]}}}}
groups:
  - id: g
    schedule: {schedule}
    variants:
      - {{id: fox, prompt: "a red fox running"}}
      - {{id: stag, entities: [stag]}}
      - {{id: both, entities: [stag, owl]}}
"""

PLAIN = """\
scenec: 1
model: tiny-sd
canvas: {{width: 128, height: 128}}
sampler: {{steps: 4, seed: {seed}}}
background: {{prompt: "{prompt}", negative: "blurry"}}
{entities}
"""


@pytest.fixture(scope="module")
def backend():
    return tiny_sd_backend()


def compile_text(tmp_path, text, name):
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.yaml").write_text(text, encoding="utf-8")
    return compile_scene(d / f"{name}.yaml")


def run(backend, plan, share=None):
    """{variant: latents} for seed 1 of the plan's group."""
    out = {}
    for job, r in run_group(backend, plan, plan.groups[0], plan.jobs, share=share, decode=False):
        assert not isinstance(r, Exception), r
        if job.seed == 1:
            out[job.variant] = r.latents
    return out


def alone(backend, tmp_path, name, prompt, entities=""):
    plan = compile_text(tmp_path, PLAIN.format(seed=1, prompt=prompt, entities=entities), name)
    return run_job(backend, plan, plan.jobs[0], decode=False).latents


def test_theta_zero_makes_the_group_identical_and_equal_to_the_background_alone(backend, tmp_path):
    plan = compile_text(tmp_path, SCENE.format(seeds="[1, 2]", schedule="{values: [0, 0, 0, 0]}"), "zero")
    assert plan.json["groups"][0]["shared_prefix"] == 4
    on, off = run(backend, plan, share=True), run(backend, plan, share=False)
    for v in ("stag", "both"):
        assert torch.equal(on[v], on["fox"]) and torch.equal(off[v], on["fox"])
    assert torch.equal(on["fox"], alone(backend, tmp_path, "plain", "a misty forest"))


def test_theta_one_is_the_variant_alone(backend, tmp_path):
    plan = compile_text(tmp_path, SCENE.format(seeds="1", schedule="{values: [1, 1, 1, 1]}"), "one")
    res = run(backend, plan)
    assert all(torch.isfinite(x).all() for x in res.values())
    # a whole-canvas variant: the plain image of its prompt
    assert float((res["fox"] - alone(backend, tmp_path, "fox", "a red fox running")).abs().max()) <= 1e-5
    # a variant with regions: EliGen's job of its entities, the background as global prompt
    ents = "entities:\n  - {id: stag, prompt: \"a stag\", shape: {box: [0.1, 0.3, 0.6, 0.9]}}"
    eligen = alone(backend, tmp_path, "eligen", "a misty forest", ents)
    assert float((res["stag"] - eligen).abs().max()) <= 1e-5


def test_mixed_theta_differs_from_both_endpoints_and_sharing_changes_nothing(backend, tmp_path):
    lat = {}
    for th in (0, 0.5, 1):
        plan = compile_text(tmp_path, SCENE.format(seeds="1", schedule=f"{{values: [{th}, {th}, {th}, {th}]}}"),
                            f"t{th}")
        lat[th] = run(backend, plan)
    for v in ("fox", "stag", "both"):
        assert torch.isfinite(lat[0.5][v]).all()
        assert float((lat[0.5][v] - lat[0][v]).abs().max()) > 1e-3, v
        assert float((lat[0.5][v] - lat[1][v]).abs().max()) > 1e-3, v
    plan = compile_text(tmp_path, SCENE.format(seeds="1", schedule="{shape: step, center: 0.5}"), "step")
    assert plan.json["groups"][0]["shared_prefix"] == 2
    on, off = run(backend, plan, share=True), run(backend, plan, share=False)
    for v in on:
        assert torch.equal(on[v], off[v]), v
    assert len({np.asarray(x).tobytes() for x in on.values()}) == 3  # the variants differ after the fork


def test_cross_attention_keys_are_scaled_background_by_one_minus_theta_entities_by_theta(backend, tmp_path):
    """θ = 0.3 (1 − θ ≠ θ), a variant with two regions (entity texts of their own lengths): the call's text is
    [background (77) | stag | owl] and its keys are scaled 0.7 for the background, 0.3 for each entity."""
    from scenec.runtime.attention import KeyScale
    from scenec.runtime.sampler import Run

    plan = compile_text(tmp_path, SCENE.format(seeds="1", schedule="{values: [0.3, 0.3, 0.3, 0.3]}"), "k")
    job = next(j for j in plan.jobs if j.variant == "both")
    r = Run(backend, [(plan, job)])
    r.setup()
    call = r.call([(0, False)], job.program[0], 0)
    n_stag, n_owl = (backend.encode_entity(t).shape[1] for t in ("a stag", "an owl"))
    assert call.cond.lengths == [77, n_stag, n_owl] and n_stag != n_owl
    scale = next(m for m in call.mods if isinstance(m, KeyScale)).scale
    expect = torch.tensor([0.7] * 77 + [0.3] * (n_stag + n_owl))
    torch.testing.assert_close(scale[:77 + n_stag + n_owl], expect)
    assert (scale[77 + n_stag + n_owl:] == 1).all()  # padding (masked anyway)
