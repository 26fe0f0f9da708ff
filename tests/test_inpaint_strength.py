"""`background: {image, strength, repaint: regions}` (A1111's inpainting with a denoising strength, masked content
"original"): the regions start from the image noised to `strength`, the rest is kept exactly."""

import numpy as np
import pytest
import torch
from PIL import Image

from scenec.compiler import compile_scene
from scenec.compiler.schedule import img2img_start
from scenec.runtime.families import load_backend
from scenec.runtime.sampler import run_job

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' own

SCENE = """scenec: 1
model: {model}
canvas: {{width: 64, height: 64}}
sampler: {{steps: 5, seed: 3}}
background: {{prompt: "a misty forest", image: i.png, strength: 0.6{repaint}}}
entities:
  - id: fox
    prompt: "a red fox"
{shape}"""
BOX = "    shape: {box: [0.25, 0.5, 0.75, 1.0]}\n"


def compiled(tmp_path, model, repaint=", repaint: regions", shape=BOX, name="s"):
    if not (tmp_path / "i.png").exists():
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    p = tmp_path / f"{name}.yaml"
    p.write_text(SCENE.format(model=model, repaint=repaint, shape=shape))
    return compile_scene(p)


@pytest.mark.parametrize("model", ["tiny-sd", "tiny"])
def test_the_outside_is_kept_and_the_regions_start_from_the_noised_image(tmp_path, model):
    be = load_backend(model, device="cpu", dtype="fp32")
    plan = compiled(tmp_path, model)
    job = plan.jobs[0]
    assert job.init_level == img2img_start(5, 0.6) == job.program[0].from_ == 2
    x = run_job(be, plan, job, decode=False).latents
    z0 = be.encode_image(plan.tensor(job.init_image))
    m = be.latent_mask(plan.mask(job.inpaint_mask, "latent")).expand_as(x)
    out = m == 0
    assert out.any() and (~out).any()
    assert torch.equal(x[out], z0[out])  # exactly the image outside the region
    assert (x[~out] - z0[~out]).abs().max() > 1e-2  # repainted inside
    everything = compiled(tmp_path, model, repaint="", name="all")  # `all` (the default) repaints outside too
    assert (run_job(be, everything, everything.jobs[0], decode=False).latents[out] - z0[out]).abs().max() > 1e-2
    assert everything.jobs[0].job_hash != job.job_hash


def test_a_region_covering_the_canvas_is_img2img(tmp_path):
    """`repaint: regions` where the region is the whole canvas repaints what `all` does: the same latents."""
    be = load_backend("tiny-sd", device="cpu", dtype="fp32")
    a = compiled(tmp_path, "tiny-sd", shape="", name="whole")
    b = compiled(tmp_path, "tiny-sd", repaint=", repaint: all", shape="", name="img2img")
    assert torch.equal(run_job(be, a, a.jobs[0], decode=False).latents,
                       run_job(be, b, b.jobs[0], decode=False).latents)


@pytest.mark.parametrize("model", ["tiny-sd", "tiny"])
def test_overlay_pastes_the_images_own_pixels_back(tmp_path, model):
    """`background.overlay` (A1111's overlay): where the model did not paint, the image written is the input's own
    pixels, not the input through the VAE; where it painted, the decoded image; between, blended by the feather."""
    from scenec.runtime.hires import run_image

    be = load_backend(model, device="cpu", dtype="fp32")
    shape = "    shape: {box: [0.25, 0.5, 0.75, 1.0]}\n    feather: 0.1\n"
    compiled(tmp_path, model, shape=shape, name="plain")  # writes i.png and the scene; then inpainting from noise:
    text = (tmp_path / "plain.yaml").read_text().replace(", strength: 0.6, repaint: regions", "")
    (tmp_path / "plain.yaml").write_text(text)
    (tmp_path / "over.yaml").write_text(text.replace("image: i.png", "image: i.png, overlay: true"))
    plain, over = compile_scene(tmp_path / "plain.yaml"), compile_scene(tmp_path / "over.yaml")
    assert plain.jobs[0].overlay is None and plain.jobs[0].init_level is None
    job = over.jobs[0]
    m = over.tensor(job.overlay)
    assert m.shape == (64, 64) and m.min() == 0 and m.max() == 1 and ((m > 0) & (m < 1)).any()
    a = np.asarray(run_image(be, plain, plain.jobs[0]).image, np.int16)
    b = np.asarray(run_image(be, over, job).image, np.int16)
    init = over.tensor(job.init_image).astype(np.int16)
    assert np.array_equal(b[m == 0], init[m == 0]) and not np.array_equal(a[m == 0], init[m == 0])
    assert np.array_equal(b[m == 1], a[m == 1])
    assert over.jobs[0].job_hash != plain.jobs[0].job_hash and "overlay" not in plain.json["jobs"][0]
