"""Inpainting fusion (EliGen): outside the entity regions the final latent is the encoded init image."""

import numpy as np
import pytest
import torch

from scenec.runtime.sampler import run_job
from scenec.runtime.testing import box, encode_init, make_plan, tiny_backend


@pytest.fixture(scope="module")
def backend():
    return tiny_backend()


def init_image():
    y, x = np.mgrid[0:256, 0:256]
    return np.stack([x, y, (x + y) // 2], -1).astype(np.uint8)


def test_outside_equals_init_latent(backend):
    fox = box((16, 16), 3, 3, 10, 11)
    fox[3, 3:11] = 0.5  # a feathered edge: partly drawn by the model
    plan = make_plan(entities=[{"id": "fox", "prompt": "a red fox", "token": fox}], init_image=init_image())
    job = plan.jobs[0]
    z0, m = encode_init(backend, plan, job)
    x = run_job(backend, plan, job, decode=False).latents
    out = m == 0
    assert out.any() and (~out).any()
    assert torch.equal(x[out], z0[out])  # exactly the init image outside
    assert (x[~out] - z0[~out]).abs().max() > 1e-2  # the model drew inside
    # the packed mask maps each latent pixel to its own channels (token t: 16 channels × 2×2 patch)
    mt = m.view(16, 16, 16, 2, 2)
    lat = plan.tensor(job.inpaint_mask["latent"]).reshape(16, 2, 16, 2).transpose(0, 2, 1, 3)
    assert np.array_equal(mt[:, :, 0].numpy(), lat) and torch.equal(mt, mt[:, :, :1].expand_as(mt))


def test_init_encoding_matches_img2img(backend):
    """z0 = pack((E(x) − shift)·scale), E = the VAE's mode (deterministic)."""
    plan = make_plan(entities=[{"id": "fox", "prompt": "a red fox", "token": box((16, 16), 0, 0, 8, 8)}],
                     init_image=init_image())
    z0, _ = encode_init(backend, plan, plan.jobs[0])
    p = backend.pipe
    img = p.image_processor.preprocess(init_image().astype(np.float32)[None] / 255.0)
    with torch.no_grad():
        z = p.vae.encode(img).latent_dist.mode()
    z = (z - p.vae.config.shift_factor) * p.vae.config.scaling_factor
    torch.testing.assert_close(z0, p._pack_latents(z, 1, 16, 32, 32), atol=1e-5, rtol=1e-5)
