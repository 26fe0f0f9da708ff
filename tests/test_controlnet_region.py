"""`control[].region`: a ControlNet acting inside one entity's region only (sd-webui-controlnet's "effective region
mask"): its residuals reach the denoiser masked by the region at every resolution (SD's UNet levels, Flux's image
tokens), the whole canvas as a region is the control without one, and an image without the entity has no control."""

import numpy as np
import pytest
import torch
from PIL import Image

from scenec.compiler import compile_scene
from scenec.compiler.check import validate_file
from scenec.runtime.families import load_backend
from scenec.runtime.sampler import run_job

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' own

SCENE = """scenec: 1
model: {model}
canvas: {{width: 64, height: 64}}
sampler: {{steps: 2, seed: 7}}
background: {{prompt: "a lighthouse on a cliff"}}
entities:
  - id: fox
    prompt: "a red fox"
{shape}control:
  - {{image: edges.png{region}}}
{extra}"""
BOX = "    shape: {box: [0.0, 0.5, 0.5, 1.0]}\n"


def write(tmp_path, name, model="tiny-sd", region=", region: fox", shape=BOX, extra=""):
    a = np.zeros((64, 64, 3), np.uint8)
    a[::9] = 255
    a[:, 20:23] = 255
    Image.fromarray(a).save(tmp_path / "edges.png")
    p = tmp_path / f"{name}.yaml"
    p.write_text(SCENE.format(model=model, shape=shape, region=region, extra=extra))
    return p


def captured(be, plan):
    """The residual inputs of every denoiser call of the plan's first job."""
    seen = []

    def hook(module, args, kwargs):
        seen.append({k: v for k, v in kwargs.items() if "residual" in k or k.startswith("controlnet_")})

    h = (be.transformer if be.family == "flux" else be.unet).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run_job(be, plan, plan.jobs[0], decode=False)
    finally:
        h.remove()
    return [s for s in seen if s]


@pytest.mark.parametrize("model", ["tiny-sd", "tiny"])
def test_the_residuals_act_inside_the_region_only(tmp_path, model):
    be = load_backend(model, device="cpu", dtype="fp32")
    plan = compile_scene(write(tmp_path, "r", model))
    c = plan.jobs[0].controls[0]
    assert c.region == "fox" and c.masks == plan.jobs[0].entities[0].masks
    calls = captured(be, plan)
    assert calls
    if model == "tiny-sd":  # at the UNet's finer levels the region both holds and leaves out cells
        assert all((plan.mask(c.masks, g) == 0).any() and (plan.mask(c.masks, g) == 1).any() for g in ("latent", "a16"))
    for kw in calls:
        if model == "tiny":
            m = plan.mask(c.masks, "token").reshape(-1)
            blocks = [r for k in ("controlnet_block_samples", "controlnet_single_block_samples") for r in kw[k] or []]
            for r in blocks:
                assert r[:, m == 0].abs().max() == 0 and r[:, m == 1].abs().max() > 0
        else:
            grids = {plan.grid(g): plan.mask(c.masks, g) for g in c.masks}
            for r in kw["down_block_additional_residuals"] + [kw["mid_block_additional_residual"]]:
                m = torch.from_numpy(grids[tuple(r.shape[-2:])])
                if (m == 0).any():
                    assert r[..., m == 0].abs().max() == 0
                if (m == 1).any():
                    assert r[..., m == 1].abs().max() > 0


def test_the_whole_canvas_as_region_is_the_control_without_one(tmp_path):
    be = load_backend("tiny-sd", device="cpu", dtype="fp32")
    a = compile_scene(write(tmp_path, "a", shape=""))  # an entity without a shape covers the canvas
    b = compile_scene(write(tmp_path, "b", shape="", region=""))
    assert torch.equal(run_job(be, a, a.jobs[0], decode=False).latents, run_job(be, b, b.jobs[0], decode=False).latents)
    assert a.jobs[0].job_hash == b.jobs[0].job_hash  # the same image: the same hash (the region is its masks)
    assert "region" not in b.json["jobs"][0]["controls"][0] or b.json["jobs"][0]["controls"][0]["region"] is None


def test_an_image_without_the_entity_has_no_control(tmp_path):
    group = ("groups:\n  - id: g\n    variants:\n      - {id: with, entities: [fox]}\n"
             "      - {id: without, prompt: sky}\n")
    plan = compile_scene(write(tmp_path, "g", extra=group))
    by = {j.variant: j for j in plan.jobs}
    assert len(by["with"].controls) == 1 and by["without"].controls == []


def test_a_region_naming_no_entity_is_located(tmp_path):
    p = write(tmp_path, "bad", region=", region: foxx")
    _, d = validate_file(p)
    errs = [x for x in d.sorted() if x.severity == "error"]
    assert [(e.pos.line, e.pos.col) for e in errs] == [(11, 32)], [e.format() for e in errs]
    assert "`region: foxx` names no entity" in errs[0].message and errs[0].hint == "did you mean `fox`?"
