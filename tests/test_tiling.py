"""Seamless tiling (``canvas.tiling``): with circular padding the UNet and the VAE decoder are equivariant under
circular shifts by whole cells of the coarsest grid, so the image has no edge; without it they are not (the test
can fail); a plan without tiling after one with it runs on the model as loaded; Flux refuses it at the key."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from scenec.runtime.families import load_backend
from scenec.runtime.sampler import run_job
from scenec.runtime.testing import sd_plan

SHIFT = 8  # latent cells: the UNet's coarsest grid is 1/8 of the latent (64 px)


def plan(tiling, family="sd", **kw):
    def edit(d, t):
        if tiling != "none":
            d["canvas"]["tiling"] = tiling
        if family == "sdxl":
            d["model"] = {**d["model"], "spec": "tiny-sdxl", "family": "sdxl"}
    return sd_plan(steps=2, edit=edit, seed=3, width=128, height=128, prompt="moss on stone", negative="blurry", **kw)


@pytest.fixture(scope="module")
def sd():
    return load_backend("tiny-sd", device="cpu", dtype="fp32")


def run(be, p, x0):
    return run_job(be, p, p.jobs[0], resume=(0, x0.clone()))


def shifted(be, p, axis):
    """(the image of the noise, the image of the noise shifted by SHIFT cells along ``axis``) as arrays, and the
    final latents of both."""
    x0, _ = be.prepare_latents(p, 3)
    a, b = run(be, p, x0), run(be, p, torch.roll(x0, SHIFT, dims=axis))
    return np.asarray(a.image, np.float32), np.asarray(b.image, np.float32), a.latents, b.latents


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_both_axes_wrap_the_image_is_shift_equivariant(family, sd):
    be = sd if family == "sd" else load_backend("tiny-sdxl", device="cpu", dtype="fp32")
    p = plan("both", family)
    for axis in (-1, -2):
        ia, ib, la, lb = shifted(be, p, axis)
        dl = float((torch.roll(la, SHIFT, dims=axis) - lb).abs().max())
        di = float(np.abs(np.roll(ia, SHIFT * 8, axis=1 if axis == -1 else 0) - ib).max())
        print(f"{family} axis {axis}: latent max |Δ| {dl:.3g}, image max |Δ| {di:.3g} (of 255)")
        assert dl <= 1e-4 and di <= 1.0  # uint8 rounding
    plain = plan("none", family)
    ia, ib, la, lb = shifted(be, plain, -1)
    assert float((torch.roll(la, SHIFT, dims=-1) - lb).abs().max()) > 1e-3  # zero padding: edges


def test_x_wraps_and_y_keeps_its_edges(sd):
    p = plan("x")
    _, _, la, lb = shifted(sd, p, -1)
    assert float((torch.roll(la, SHIFT, dims=-1) - lb).abs().max()) <= 1e-4
    _, _, la, lb = shifted(sd, p, -2)
    assert float((torch.roll(la, SHIFT, dims=-2) - lb).abs().max()) > 1e-3


def test_the_model_is_as_loaded_after_a_tiled_plan(sd):
    p = plan("none")
    before = run_job(sd, p, p.jobs[0]).latents
    run_job(sd, plan("both"), plan("both").jobs[0])
    assert torch.equal(run_job(sd, p, p.jobs[0]).latents, before)
    assert not any("_conv_forward" in vars(m) for m in sd.pipe.unet.modules())
    assert not any("_conv_forward" in vars(m) for m in sd.pipe.vae.modules())


def test_the_plan_carries_it_and_flux_refuses_it_at_the_key(tmp_path):
    from scenec.compiler import compile_scene

    f = tmp_path / "t.yaml"
    f.write_text("scenec: 1\nmodel: tiny-sd\ncanvas: {width: 64, height: 64, tiling: both}\n"
                 "background: {prompt: moss}\n")
    p = compile_scene(f)
    assert p.json["canvas"]["tiling"] == "both"
    f2 = tmp_path / "u.yaml"
    f2.write_text(f.read_text().replace(", tiling: both", ""))
    q = compile_scene(f2)
    assert "tiling" not in q.json["canvas"] and q.jobs[0].job_hash != p.jobs[0].job_hash
    from scenec.compiler import explain

    ir_text = explain(f, after="check")
    assert "canvas=64x64 grids=latent:8x8,a16:4x4,a32:2x2,a64:1x1 tiling=both\n" in ir_text, ir_text
    assert "tiling=" not in explain(f2, after="check")  # IR text without it is what it was
    f.write_text(f.read_text().replace("tiny-sd", "tiny"))
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", str(f)], capture_output=True, text=True)
    assert r.returncode == 2 and "t.yaml:3:33: error: `canvas.tiling` needs seamless tiling, which flux models" \
        in r.stderr, r.stderr
