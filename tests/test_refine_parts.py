"""The pieces of `visual.refine` (arXiv 2501.01424, §3.4) against their references: the solvers' x̂₀ against
the diffusers schedulers' own, the differentiable decode against the family's decode, the region's box and
gray-masked crop on a known mask, and the torch CLIP preprocessing against CLIPImageProcessor."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_visual_runtime import BACKENDS, compile_

from scenec.runtime import sampler
from scenec.runtime.methods.visual_refine import GRAY, clip_pixels, region_box, region_crop, vae_image
from scenec.runtime.solvers import DDIM, FlowEuler


@pytest.mark.parametrize("sigma", [1.0, 0.73, 0.2])
def test_flow_clean_is_the_schedulers_euler_step_to_sigma_zero(sigma):
    from diffusers import FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(1, 16, 64, generator=g), torch.randn(1, 16, 64, generator=g)
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(sigmas=[sigma])  # one step σ → 0
    assert sched.sigmas.tolist() == pytest.approx([sigma, 0.0])
    ref = sched.step(v, sched.timesteps[0], x, return_dict=False)[0]
    solver = FlowEuler(torch.tensor([1.0, sigma, 0.0]))  # level 1 is σ
    torch.testing.assert_close(solver.clean(x, v, 1), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_ddim_clean_is_the_schedulers_pred_original_sample(prediction):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(10)
    solver = DDIM(sched, sched.timesteps)
    g = torch.Generator().manual_seed(1)
    for level in (0, 4, 9):
        x, out = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
        ref = sched.step(out, sched.timesteps[level], x).pred_original_sample
        torch.testing.assert_close(solver.clean(x, out, level), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", ["tiny", "tiny-sd"])
def test_vae_image_is_the_familys_decode(tmp_path, model):
    be = BACKENDS[model]()
    plan = compile_(tmp_path, "p", model)
    z = sampler.run_job(be, plan, plan.jobs[0], decode=False).latents
    with torch.no_grad():
        img = vae_image(be, z, plan)
    ref = torch.from_numpy(np.asarray(be.decode(z, plan), np.float32)).permute(2, 0, 1)[None]
    w, h = plan.canvas
    assert img.shape == (1, 3, h, w) and float(ref.std()) > 5  # not a flat image
    mine = ((img / 2 + 0.5).clamp(0, 1) * 255).round()  # the pipeline's postprocess
    assert float((mine - ref).abs().max()) <= 1.0


def fake(mask: np.ndarray, grid="g"):
    plan = SimpleNamespace(grid=lambda name: mask.shape, mask=lambda masks, g: mask.astype(np.float32))
    return plan, SimpleNamespace(masks={grid: "m"})


def test_region_box_and_gray_crop_on_a_known_mask():
    m = np.zeros((8, 8), np.float32)
    m[2:5, 1:6] = 1.0
    m[4, 5] = 0.0  # a notch inside the box
    m[2, 1] = 0.25  # partial coverage counts
    plan, vp = fake(m)
    assert region_box(plan, vp, 64, 64) == (16, 40, 8, 48)
    assert region_box(plan, vp, 64, 128) == (16, 40, 16, 96)
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    crop = region_crop(plan, vp, img)
    assert crop.shape == (1, 3, 24, 40)
    torch.testing.assert_close(crop[..., :8, :8], img[..., 16:24, 8:16], atol=0, rtol=0)  # cell (2, 1): inside
    assert torch.all(crop[..., 16:24, 32:40] == GRAY)  # cell (4, 5): the notch is gray
    assert GRAY == pytest.approx(128 / 255 * 2 - 1)
    whole, vp0 = fake(np.zeros((8, 8), np.float32))  # an empty region: the whole image
    assert region_box(whole, vp0, 64, 64) == (0, 64, 0, 64) and region_crop(whole, vp0, img).shape == img.shape
    assert region_box(plan, SimpleNamespace(masks=None), 32, 48) == (0, 32, 0, 48)


# (max, mean) differences in normalised units on uniform noise (the worst case): downscaling is PIL's
# antialiased bicubic in torch; upscaling differs in the bicubic coefficient (torch −0.75, PIL −0.5)
TOL = {(40, 30): (0.35, 0.007), (100, 60): (0.35, 0.007), (224, 224): (1e-6, 1e-6), (1024, 768): (0.02, 0.005),
       (768, 1024): (0.02, 0.005), (300, 500): (0.2, 0.006)}


@pytest.mark.parametrize("hw", list(TOL))
def test_clip_pixels_is_clip_image_processor(hw):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor()  # CLIP ViT-L/14's: shortest edge 224, centre crop 224, bicubic
    rgb = np.random.default_rng(sum(hw)).integers(0, 256, (*hw, 3), dtype=np.uint8)
    ref = proc(images=rgb, return_tensors="pt").pixel_values
    img = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
    mine = clip_pixels(img, proc)
    assert mine.shape == ref.shape
    d = (mine - ref).abs()
    assert float(d.max()) < TOL[hw][0] and float(d.mean()) < TOL[hw][1], (float(d.max()), float(d.mean()))
    # a wrong preprocessing is far off: without the centre crop (squashed), or unnormalised; (1024, 768)
    # with the long edge rounded (299) instead of truncated (298) as transformers does: mean 0.16
    squashed = torch.nn.functional.interpolate((img + 1) / 2, size=(224, 224), mode="bicubic", antialias=True)
    mean, std = (torch.tensor(t)[:, None, None] for t in (proc.image_mean, proc.image_std))
    if hw[0] != hw[1]:
        assert float(((squashed - mean) / std - ref).abs().mean()) > 0.05
    assert float(((mine * std + mean) - ref).abs().mean()) > 0.2
