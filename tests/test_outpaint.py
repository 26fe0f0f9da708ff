"""`background: {image, fit, box}`: the image placed in part of the canvas, the rest painted by the model
(outpainting: A1111's "Outpainting mk2" / "Poor man's outpainting", ComfyUI's Pad Image for Outpainting)."""

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
sampler: {{steps: 3, seed: 5}}
background: {{prompt: "a meadow", image: wide.png{place}}}
{extra}"""


def write(tmp_path, name, model="tiny-sd", place=", fit: contain, feather: 0", extra=""):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    p = tmp_path / f"{name}.yaml"
    p.write_text(SCENE.format(model=model, place=place, extra=extra))
    return p


@pytest.mark.parametrize("model", ["tiny-sd", "tiny"])
def test_the_image_is_kept_and_the_rest_painted(tmp_path, model):
    """`fit: contain`: a 2:1 image on a square canvas keeps its middle half; the bars above and below are painted
    (the inpaint mask), the image's part of the latent is exactly its encoding."""
    be = load_backend(model, device="cpu", dtype="fp32")
    plan = compile_scene(write(tmp_path, "c", model))
    job = plan.jobs[0]
    init = plan.tensor(job.init_image)
    assert (init[:16] == 128).all() and (init[48:] == 128).all() and not (init[16:48] == 128).all()
    m = plan.mask(job.inpaint_mask, "latent")
    assert (m[:2] == 1).all() and (m[6:] == 1).all() and (m[2:6] == 0).all()
    x = run_job(be, plan, job, decode=False).latents
    z0 = be.encode_image(init)
    keep = be.latent_mask(m).expand_as(x) == 0
    assert torch.equal(x[keep], z0[keep]) and (x[~keep] - z0[~keep]).abs().max() > 1e-2


def test_a_box_places_the_image(tmp_path):
    """`box: [0, 0, 0.5, 1]` with `fit: cover`: the image fills the left half (cropped), the right half is painted."""
    plan = compile_scene(write(tmp_path, "b", place=", fit: cover, box: [0, 0, 0.5, 1], feather: 0"))
    m = plan.mask(plan.jobs[0].inpaint_mask, "latent")
    assert (m[:, :4] == 0).all() and (m[:, 4:] == 1).all()
    assert not (plan.tensor(plan.jobs[0].init_image)[:, :32] == 128).all()


def test_the_painted_part_blends_into_the_image_not_at_the_canvas_edge(tmp_path):
    """`feather` (ComfyUI's Pad Image for Outpainting `feathering`): the mask ramps from 1 at the image's edge to 0
    `feather` into it, on the padded sides only (the image's left and right lie on the canvas's edges: no ramp)."""
    plan = compile_scene(write(tmp_path, "f", place=", fit: contain, feather: 0.125"))  # 8 px: one latent cell
    m = plan.mask(plan.jobs[0].inpaint_mask, "latent")
    assert np.array_equal(m[:, 0], [1, 1, 0.5, 0, 0, 0.5, 1, 1]) and (m == m[:, :1]).all()


def test_stretch_over_the_canvas_is_the_plan_as_before(tmp_path):
    a = compile_scene(write(tmp_path, "s", place="", extra="entities: [{id: a, prompt: a fox}]\n"))
    b = compile_scene(write(tmp_path, "t", place=", fit: stretch, box: [0, 0, 1, 1]",
                            extra="entities: [{id: a, prompt: a fox}]\n"))
    assert a.jobs[0].job_hash == b.jobs[0].job_hash


def test_hires_paints_the_scaled_bars(tmp_path):
    plan = compile_scene(write(tmp_path, "h", extra="hires: {scale: 2, strength: 0.5}\n"))
    stage = plan.hires_stage(plan.jobs[0].id)
    m = stage.mask(stage.jobs[0].inpaint_mask, "latent")
    assert m.shape == (16, 16) and (m[:4] == 1).all() and (m[4:12] == 0).all() and (m[12:] == 1).all()


def test_errors(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text('scenec: 1\nmodel: tiny-sd\ncanvas: {width: 64, height: 64}\n'
                 'background: {prompt: x, fit: contain, box: [0.5, 0, 0.5, 1]}\n')
    _, d = validate_file(p)
    got = sorted((x.pos.line, x.pos.col, x.message) for x in d.sorted() if x.severity == "error")
    assert [g[:2] for g in got] == [(4, 25), (4, 39), (4, 44)], got
    assert "places `background.image`, which is not given" in got[0][2] and "is empty" in got[2][2]


def test_strength_with_a_placed_image_is_warned(tmp_path):
    p = write(tmp_path, "w", place=", fit: contain, strength: 0.6, repaint: regions")
    _, d = validate_file(p)
    warns = [(x.pos.line, x.message) for x in d.sorted() if x.severity == "warning"]
    assert len(warns) == 1 and warns[0][0] == 5 and "greyish" in warns[0][1], warns  # not "nothing is repainted"

