"""The SDXL family on the tiny random SDXL (two text encoders, pooled vector, size micro-conditioning).

Every method runs on it through the same seams as on SD: no entities reproduces diffusers'
StableDiffusionXLPipeline (DDIM); regional masks act on the UNet's cross-attention; coupled groups
keep their exact endpoints; COW, SOW and inpainting run; batch rows equal their jobs alone.
"""

import numpy as np
import pytest
import torch

from scenec.compiler import compile_scene
from scenec.runtime.families import load_backend
from scenec.runtime.sampler import run_batch, run_group, run_job
from scenec.runtime.testing import box, encode_init, sd_plan

G = (16, 16)
ENTS = [{"id": "fox", "prompt": "a red fox", "negative": "blurry", "token": box(G, 2, 2, 9, 9)},
        {"id": "tree", "prompt": "a green tree", "token": box(G, 8, 8, 16, 14)}]


@pytest.fixture(scope="module")
def backend():
    return load_backend("tiny-sdxl", device="cpu", dtype="fp32")


def xl_plan(**kw):
    def edit(doc, tensors):
        doc["model"] = {"spec": "tiny-sdxl", "family": "sdxl", "repo": None, "max_sequence_length": 77}

    return sd_plan(edit=edit, **kw)


def run(backend, plan):
    return run_job(backend, plan, plan.jobs[0], decode=False).latents


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_no_entities_reproduces_the_sdxl_pipeline(backend, negative):
    from diffusers import StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline(**{k: getattr(backend.pipe, k) for k in (
        "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")},
        image_encoder=None, feature_extractor=None)
    p.set_progress_bar_config(disable=True)
    ours = run(backend, xl_plan(prompt="a meadow at sunset", negative=negative, seed=11))
    ref = p("a meadow at sunset", negative_prompt=negative or None, height=256, width=256, num_inference_steps=4,
            guidance_scale=7.5, generator=torch.Generator().manual_seed(11), output_type="latent").images
    assert float((ours - ref).abs().max()) <= 1e-5


def test_regional_masks_act_on_the_cross_attention(backend):
    plan = xl_plan(entities=ENTS, seed=3, program=[{"op": "denoise", "from": 0, "to": 1, "regional": True,
                                                    "theta": None, "eta": 0.0}])
    backend.attn.probe = []
    try:
        run(backend, plan)
        recs = backend.attn.probe
    finally:
        backend.attn.probe = None
    assert recs and {r["kind"] for r in recs} == {"cross"} and {r["n_q"] for r in recs} == {16 * 16}  # a16
    fox = torch.from_numpy(plan.tensors["region/fox/a16"].reshape(-1) > 0)
    for r in recs:
        a = r["allow"]
        assert a[:, :77].all()  # the global prompt: every query
        n_fox = backend.encode_entity("a red fox" if a.shape[1] > 77 + 8 else "blurry").shape[1]
        assert torch.equal(a[:, 77:77 + n_fox], fox[:, None].expand(-1, n_fox))
        torch.testing.assert_close(r["out"], r["expected"], atol=1e-5, rtol=1e-4)
    assert float((run(backend, xl_plan(entities=ENTS, seed=3)) - run(backend, xl_plan(seed=3))).abs().max()) > 1e-3


SCENE = """\
scenec: 1
model: tiny-sdxl
canvas: {{width: 128, height: 128}}
sampler: {{steps: 4, seed: 1}}
background: {{prompt: "a misty forest"}}
entities:
  - {{id: stag, prompt: "a stag", shape: {{box: [0.1, 0.3, 0.6, 0.9]}}}}
{extra}"""


def compile_text(tmp_path, text, name):
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.yaml").write_text(text, encoding="utf-8")
    return compile_scene(d / f"{name}.yaml")


def test_coupled_groups_keep_their_exact_endpoints(backend, tmp_path):
    group = ("groups:\n  - id: g\n    schedule: {{values: [{t}, {t}, {t}, {t}]}}\n    variants:\n"
             "      - {{id: fox, prompt: \"a red fox running\"}}\n      - {{id: stag, entities: [stag]}}\n")
    res = {}
    for t in (0, 1):
        plan = compile_text(tmp_path, SCENE.format(extra=group.format(t=t)), f"t{t}")
        res[t] = {j.variant: r.latents for j, r in run_group(backend, plan, plan.groups[0], plan.jobs, decode=False)}
    assert torch.equal(res[0]["fox"], res[0]["stag"])  # θ ≡ 0: the group's images are identical
    plain = compile_text(tmp_path, SCENE.format(extra="").replace("entities:\n", "").split("  - {id: stag")[0], "bg")
    assert torch.equal(res[0]["fox"], run(backend, plain))  # … the background alone
    fox = compile_text(tmp_path, SCENE.format(extra="").replace("a misty forest", "a red fox running")
                       .split("entities:")[0], "fox")
    assert float((res[1]["fox"] - run(backend, fox)).abs().max()) <= 1e-5  # θ ≡ 1: the variant's prompt alone
    eligen = compile_text(tmp_path, SCENE.format(extra=""), "eligen")
    assert float((res[1]["stag"] - run(backend, eligen)).abs().max()) <= 1e-5  # with regions: EliGen's job


def test_references_and_inpainting_run(backend, tmp_path):
    from test_runtime_cow import reference_rgba

    from scenec.spec.plan import Plan

    init = np.random.default_rng(0).uniform(0, 255, (256, 256, 3)).astype(np.uint8)
    plan = xl_plan(entities=ENTS[:1], seed=2, init_image=init)
    x = run(backend, plan)
    z0, m = encode_init(backend, plan, plan.jobs[0])
    out = (m == 0).expand_as(x)
    assert torch.equal(x[out], z0[out]) and float((x[~out] - z0[~out]).abs().max()) > 1e-2
    # a reference with SOW: pasted in its region, the cycles run, the image changes
    base = xl_plan(seed=4, steps=4)
    t = dict(base.tensors)
    t["cond/r/rgba"] = reference_rgba(ENTS[0]["token"])
    masks = {}
    for g, (h, w) in base.doc.grids.items():
        t[f"cond/r/{g}"] = box((h, w), 0, 0, h // 2, w // 2)
        masks[g] = f"cond/r/{g}"
    from scenec.compiler.schedule import Cow, ProgramInputs, build_program

    for job in base.json["jobs"]:
        job["conditions"] = [{"entity": "fox", "image": "cond/r/rgba", "window": [1, 3], "cycles": 2, "preserve": 3,
                              "eta": 1.0, "masks": masks, "related": None,
                              "modulation": {"suppress": 2.0, "enhance": 2.0, "decay": 0.8, "distance": 1.0,
                                             "threshold": 2.0}}]
        job["program"] = [op.model_dump(by_alias=True, mode="json") for op in
                          build_program(ProgramInputs(4, conditions=[Cow(0, 1, 3, 2, 3, 1.0)]))]
    ref = Plan(base.json, t)
    assert float((run(backend, ref) - run(backend, xl_plan(seed=4, steps=4))).abs().max()) > 1e-2


def test_batch_rows_equal_their_jobs_alone(backend):
    g8 = (8, 8)
    base = dict(width=128, height=128, steps=3)
    plans = [xl_plan(prompt="a meadow at dawn", entities=[{"id": "fox", "prompt": "a red fox",
                                                           "token": box(g8, 4, 1, 8, 5)}], seed=1, **base),
             xl_plan(prompt="a quiet forest with tall pine trees and fog", seed=5, **base)]
    rows = [(p, p.jobs[0]) for p in plans]
    got = run_batch(backend, rows)
    for (p, j), r in zip(rows, got):
        assert float((r.latents - run_job(backend, p, j, decode=False).latents).abs().max()) <= 1e-4
