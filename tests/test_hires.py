"""`hires` (A1111's "Hires. fix"): the second pass is exactly img2img of the enlarged first image at the larger
canvas — a hires build equals, pixel for pixel, a first-pass build enlarged with the same filter and fed to an
img2img build at the second canvas (SD and Flux); A1111's step count; the plan's nested pass; job hashes."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from scenec.compiler import compile_scene
from scenec.compiler.hires import canvas_of, levels_of
from scenec.runtime.families import load_backend
from scenec.runtime.hires import enlarge
from scenec.runtime.outputs import execute
from scenec.runtime.sampler import run_job

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' own

SCENE = """scenec: 1
model: {model}
canvas: {{width: {w}, height: {w}}}
sampler: {{steps: {steps}, seed: 7}}
background: {{prompt: "a misty forest"{bg}}}
entities:
  - id: fox
    prompt: "a red fox"
    shape: {{box: [0.25, 0.5, 0.75, 1.0]}}
{extra}"""


def write(tmp_path, name, model="tiny-sd", w=64, steps=4, bg="", extra=""):
    p = tmp_path / f"{name}.yaml"
    p.write_text(SCENE.format(model=model, w=w, steps=steps, bg=bg, extra=extra))
    return p


def test_a1111_step_count():
    """A1111's ``setup_img2img_steps`` with the hires steps given: exactly those steps, of int(steps / strength)."""
    assert levels_of(20, 0.7) == (28, 8)
    assert levels_of(20, 0.5) == (40, 20)
    assert levels_of(20, 1.0) == (20, 0)  # min(strength, 0.999): int(20.02) levels, from the top
    assert levels_of(4, 0.3) == (13, 9)
    assert canvas_of((512, 768), 1.5, 8) == (768, 1152)
    assert canvas_of((64, 80), 1.3, 16) == (80, 96)  # each side rounded down to the family's multiple


def test_the_plan_nests_the_second_pass(tmp_path):
    plan = compile_scene(write(tmp_path, "a", extra="hires: {scale: 2, strength: 0.5, steps: 3}\n"))
    hr = plan.doc.hires
    assert hr.upscaler == "lanczos"
    stage = plan.hires_stage(plan.jobs[0].id)
    assert stage.canvas == (128, 128) and stage.steps == 6 and stage.doc.grids["latent"] == (16, 16)
    job = stage.jobs[0]
    assert [(op.from_, op.to) for op in job.program] == [(3, 4), (4, 5), (5, 6)]
    assert job.init_level == 3 and job.id == plan.jobs[0].id and job.seed == 7
    # the regions are the scene's fractions of the larger canvas: the same masks as a scene drawn at 128 × 128
    big = compile_scene(write(tmp_path, "big", w=128, steps=6))
    for grid in ("latent",):
        mine = stage.mask(job.entities[0].masks, grid)
        theirs = big.mask(big.jobs[0].entities[0].masks, grid)
        assert mine.shape == (16, 16) and np.array_equal(mine, theirs)
    assert all(n.startswith("hires/") for n in job.entities[0].masks.values())
    assert "hires" not in compile_scene(write(tmp_path, "plain")).json  # a scene without it: the plan as before
    from scenec.compiler import explain

    assert "\nhires canvas=128x128 upscaler=lanczos strength=0.5 steps=3 of 6\n" in explain(tmp_path / "a.yaml")


def test_job_hash_follows_the_second_pass(tmp_path):
    def h(extra):
        return compile_scene(write(tmp_path, "h", extra=extra)).jobs[0].job_hash

    base = h("hires: {scale: 2, strength: 0.5}\n")
    assert base != h("")
    for other in ("{scale: 2, strength: 0.6}", "{scale: 1.5, strength: 0.5}",
                  "{scale: 2, strength: 0.5, upscaler: nearest}", "{scale: 2, strength: 0.5, steps: 2}"):
        assert h(f"hires: {other}\n") != base, other
    assert h("hires: {scale: 2, strength: 0.5, steps: 4}\n") == base  # the default is the sampler's steps


CONTROL = "control:\n  - {image: edges.png, scale: 1.0}\n"


@pytest.mark.parametrize("model,w,more", [("tiny-sd", 64, ""), ("tiny", 64, ""), ("tiny-sdxl", 64, CONTROL)])
def test_the_second_pass_is_img2img_of_the_enlarged_first_image(tmp_path, model, w, more):
    """hires = the first pass, enlarged (nearest here), then img2img at 2× with the same seed, prompts, regions
    and ControlNet image: a scene built with `background: {image: enlarged.png, strength: 4/8}` at 2× and 8 steps
    gives the same pixels (SD: DDIM; Flux: flow matching; SDXL with a ControlNet)."""
    be = load_backend(model, device="cpu", dtype="fp32")
    edges = np.zeros((80, 80, 3), np.uint8)
    edges[::9] = 255
    Image.fromarray(edges).save(tmp_path / "edges.png")
    extra = more + "hires: {scale: 2, strength: 0.5, upscaler: nearest}\n"
    hires = compile_scene(write(tmp_path, "hr", model, w, extra=extra))
    if more:
        stage = hires.hires_stage(hires.jobs[0].id)
        assert stage.tensor(stage.jobs[0].controls[0].image).shape == (2 * w, 2 * w, 3)
    out = tmp_path / "out"
    res = execute(hires, be, out)
    assert res[0]["status"] == "built", res
    got = Image.open(res[0]["image"])
    assert got.size == (2 * w, 2 * w)
    side = json.loads(open(res[0]["sidecar"]).read())
    assert side["timings"]["first_total_s"] > 0 and side["timings"]["total_s"] > side["timings"]["first_total_s"]

    first = compile_scene(write(tmp_path, "first", model, w, extra=more))
    small = run_job(be, first, first.jobs[0]).image
    Image.fromarray(enlarge(small, (2 * w, 2 * w), "nearest")).save(tmp_path / "enlarged.png")
    again = compile_scene(write(tmp_path, "again", model, 2 * w, steps=8, bg=", image: enlarged.png, strength: 0.5",
                                extra=more))
    want = run_job(be, again, again.jobs[0]).image
    assert np.array_equal(np.asarray(got), np.asarray(want))
    # and the second pass did something: the image is not just the first one enlarged
    assert np.abs(np.asarray(got, np.int16) - np.asarray(Image.open(tmp_path / "enlarged.png"), np.int16)).max() > 8


@pytest.mark.parametrize("model,mode", [("tiny-sd", "bilinear"), ("tiny", "nearest-exact")])
def test_a_latent_upscaler_starts_the_second_pass_from_the_resized_latent(tmp_path, model, mode):
    """`latent` upscalers (A1111's "Latent", ComfyUI's Upscale Latent): the first pass's final latent, not decoded,
    resized with F.interpolate (A1111's call) is the second pass's init latent: the hires job's final latent equals
    an img2img job at 2× started from that latent."""
    import torch
    import torch.nn.functional as F

    be = load_backend(model, device="cpu", dtype="fp32")
    up = {"bilinear": "latent", "nearest-exact": "latent-nearest-exact"}[mode]
    hires = compile_scene(write(tmp_path, "hr", model, extra=f"hires: {{scale: 2, strength: 0.5, upscaler: {up}}}\n"))
    from scenec.runtime.hires import run_image

    got = run_image(be, hires, hires.jobs[0])
    first = compile_scene(write(tmp_path, "first", model))
    x = run_job(be, first, first.jobs[0], decode=False).latents
    if model == "tiny":  # Flux packs 2×2 latent patches into tokens
        z = F.interpolate(be.pipe._unpack_latents(x, 64, 64, be.pipe.vae_scale_factor), size=(16, 16), mode=mode)
        z = be.pipe._pack_latents(z, 1, z.shape[1], 16, 16)
    else:
        z = F.interpolate(x, size=(16, 16), mode=mode)
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(tmp_path / "unused.png")
    again = compile_scene(write(tmp_path, "again", model, 128, steps=8, bg=", image: unused.png, strength: 0.5"))
    want = run_job(be, again, again.jobs[0], init_latent=z)
    assert torch.equal(got.latents, want.latents)
    lanczos = compile_scene(write(tmp_path, "lz", model, extra="hires: {scale: 2, strength: 0.5}\n"))
    assert not torch.equal(run_image(be, lanczos, lanczos.jobs[0]).latents, got.latents)  # not the image route


GROUP = """groups:
  - id: g
    schedule: {schedule}
    variants:
      - {{id: a, prompt: "a stag"}}
      - {{id: b, prompt: "a squirrel"}}
hires: {{scale: 2, strength: 0.5, upscaler: {up}}}
"""


@pytest.mark.parametrize("model,up", [("tiny-sd", "lanczos"), ("tiny", "latent")])
def test_theta_zero_keeps_a_groups_hires_images_identical(tmp_path, model, up):
    """Coupled generation's invariant through both passes: θ ≡ 0 makes a group's images identical (the second
    pass runs the group's θ(t) on its own schedule); θ rising from 0 to 1 makes them differ."""
    from scenec.runtime.outputs import execute

    be = load_backend(model, device="cpu", dtype="fp32")
    pixels = {}
    for name, schedule in (("zero", "{values: [0, 0, 0, 0]}"), ("ramp", "{shape: linear, center: 0.5, width: 1.0}")):
        plan = compile_scene(write(tmp_path, name, model, extra=GROUP.format(schedule=schedule, up=up)))
        stage = plan.hires_stage()
        assert stage.steps == 8 and [g.shared_prefix for g in stage.groups] == [0]
        theta = stage.tensor(stage.groups[0].theta)
        assert theta.shape == (8,) and (theta.max() == 0 if name == "zero" else theta[0] == 0 and theta[-1] == 1)
        assert all(abs(op.theta - float(theta[op.from_])) < 1e-6 for op in stage.jobs[0].program)
        res = execute(plan, be, tmp_path / name)
        assert [r["status"] for r in res] == ["built", "built"], res
        pixels[name] = [np.asarray(Image.open(r["image"])) for r in res]
        assert pixels[name][0].shape == (128, 128, 3)
    assert np.array_equal(*pixels["zero"])
    assert not np.array_equal(*pixels["ramp"])


def test_a_hires_plan_validates_its_second_pass(tmp_path):
    from scenec.spec.errors import PlanError
    from scenec.spec.plan import Plan

    plan = compile_scene(write(tmp_path, "v", extra="hires: {scale: 2}\n"))
    doc = json.loads(json.dumps(plan.json))
    doc["hires"]["plan"]["jobs"][0]["program"][0]["from"] = 99  # a bad second pass fails its job, not the plan
    bad = Plan(doc, plan.tensors)
    assert not bad.jobs and "hires: job" in str(bad.invalid[plan.jobs[0].id])
    doc = json.loads(json.dumps(plan.json))
    doc["hires"]["plan"]["format"] = "nope"
    with pytest.raises(PlanError, match="hires: unknown plan format"):
        Plan(doc, plan.tensors)


def test_a_unit_ships_its_second_pass(tmp_path):
    from scenec.build.units import subplan

    p = write(tmp_path, "u", extra="hires: {scale: 2}\n")
    p.write_text(p.read_text().replace("seed: 7", "seed: [1, 2]"))
    plan = compile_scene(p)
    one = subplan(plan, [plan.json["jobs"][1]])
    assert [j["id"] for j in one.json["hires"]["plan"]["jobs"]] == [plan.jobs[1].id]
    assert any(n.startswith("hires/") for n in one.tensors) and one.hires_stage(plan.jobs[1].id).jobs


def test_build_writes_the_larger_image_and_is_incremental(tmp_path):
    from scenec.runtime.batching import batch_key

    p = write(tmp_path, "cli", extra="hires: {scale: 1.5, strength: 0.5, steps: 2}\n")
    assert batch_key(compile_scene(p).json, compile_scene(p).json["jobs"][0]) is None  # runs alone, not as a row

    def scenec(*args):
        return subprocess.run([sys.executable, "-m", "scenec", *args], capture_output=True, text=True, cwd=tmp_path)

    def build(*more):
        return scenec("build", str(p), "-o", str(tmp_path / "o"), *more)

    r = build("--masks")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "o" / "cli-7.png").size == (96, 96)
    mask = np.asarray(Image.open(tmp_path / "o" / "cli-7.mask-fox.png"))  # at the image's size, the box's fractions
    assert mask.shape == (96, 96) and mask[48:, 24:72].min() == 255 and mask[:48].max() == 0
    r = scenec("preview", str(p), "-o", str(tmp_path / "pv.png"), "--on", str(tmp_path / "o" / "cli-7.png"))
    assert r.returncode == 0 and Image.open(tmp_path / "pv.png").size == (96, 96), r.stderr  # regions at its size
    r = scenec("show", str(tmp_path / "o" / "cli-7.png"))
    assert "\n  hires     96×96, lanczos, 2 of 4 steps\n" in r.stdout, r.stdout
    # the embedded scene rebuilds it, second pass and all
    r = scenec("build", "--from", str(tmp_path / "o" / "cli-7.png"), "-o", str(tmp_path / "o2"))
    assert (tmp_path / "o" / "cli-7.png").read_bytes() == (tmp_path / "o2" / "cli-7.png").read_bytes(), r.stderr
    r = build()
    assert "0 built, 1 cached" in r.stdout + r.stderr, r.stdout + r.stderr
    p.write_text(p.read_text().replace("strength: 0.5", "strength: 0.6"))
    r = build()
    assert "1 built, 0 cached" in r.stdout + r.stderr, r.stdout + r.stderr


def test_prompt_editing_goes_on_from_the_first_pass(tmp_path):
    """A1111's hires timeline (``get_learned_conditioning_prompt_schedules`` with ``hires_steps``): in the second
    pass a fraction f switches at (f − 1)·its steps, a step n at n − the first pass's steps; before its first step
    the switch has happened already."""
    from scenec.runtime.prompt_editing import at_level
    from scenec.spec.prompt_editing import text_at

    t = "a [cat:dog:0.5] [x:y:1.5] [p:q:25]"
    assert [text_at(t, 20, k) for k in (0, 10, 11)] == ["a cat x p", "a cat x p", "a dog x p"]
    assert [text_at(t, 10, k, base=20) for k in (0, 5, 6)] == ["a dog x p", "a dog x p", "a dog y q"]
    p = write(tmp_path, "edit", extra="prompt_syntax: a1111\nhires: {scale: 2, strength: 0.5}\n")
    p.write_text(p.read_text().replace('"a misty forest"', '"a [cat:dog:1.5] forest"'))
    plan = compile_scene(p)
    stage = plan.hires_stage(plan.jobs[0].id)
    job = stage.jobs[0]
    read = [at_level(stage, job, op.from_).prompt(job.global_.prompt) for op in job.program]
    assert read == ["a cat forest"] * 3 + ["a dog forest"]  # (1.5 − 1)·4 = step 2 of the 4 it runs
    first = [at_level(plan, plan.jobs[0], op.from_).prompt(plan.jobs[0].global_.prompt) for op in plan.jobs[0].program]
    assert first == ["a cat forest"] * 4  # 1.5 of the first pass: past its end


def test_inpainting_keeps_the_outside_through_the_second_pass(tmp_path):
    """`background.image` without strength (inpainting): the second pass repaints the (scaled) regions only and keeps
    the rest of the enlarged first image exactly (its latent)."""
    import torch

    from scenec.runtime.hires import run_image

    be = load_backend("tiny-sd", device="cpu", dtype="fp32")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "bg.png")
    plan = compile_scene(write(tmp_path, "inp", bg=", image: bg.png", extra="hires: {scale: 2, strength: 0.5}\n"))
    stage = plan.hires_stage(plan.jobs[0].id)
    job = stage.jobs[0]
    m = stage.mask(job.inpaint_mask, "latent")
    assert m.shape == (16, 16) and m.min() == 0 and m.max() == 1  # the fox's box, not everything
    x = run_image(be, plan, plan.jobs[0]).latents
    first = run_job(be, plan, plan.jobs[0]).image
    z0 = be.encode_image(enlarge(first, (128, 128), "lanczos"))
    out = be.latent_mask(m).expand_as(x) == 0
    assert torch.equal(x[out], z0[out]) and (x[~out] - z0[~out]).abs().max() > 1e-2


def test_what_validate_says(tmp_path):
    from scenec.compiler.check import validate_file

    def said(text, name):
        p = tmp_path / f"{name}.yaml"
        p.write_text(text)
        _, d = validate_file(p)
        return [(x.severity, x.pos.line, x.pos.col, x.message, x.hint) for x in d.sorted()]

    base = "scenec: 1\nmodel: {m}\ncanvas: {{width: {w}, height: 256}}\n"
    got = said(base.format(m="tiny", w=64) + "hires: {scale: 1.2}\n", "stretch")
    assert [g[0] for g in got] == ["warning"] and "64×304" in got[0][3] and "stretched" in got[0][3]
    got = said(base.format(m="tiny-sd", w=64) + "background: {image: bg.png}\nentities: [{id: a, prompt: a}]\n"
               "hires: {upscaler: latent}\n", "latent-inpaint")
    assert any("with inpainting" in g[3] and g[1] == 6 for g in got), got
    got = said(base.format(m="tiny-sd", w=64) + "sampler: {cfg_scale: 7}\n"
               "hires: {upscale_by: 2, denoise: 0.4, upscaler: R-ESRGAN 4x+}\n", "names")
    hints = {g[3].split("`")[1]: g[4] for g in got}
    assert hints["cfg_scale"] == "did you mean `guidance`?" and hints["upscale_by"] == "did you mean `scale`?"
    assert hints["denoise"] == "did you mean `strength`?"
    assert "not offered yet" in hints["hires.upscaler"], hints
    got = said(base.format(m="tiny-sd", w=64) + "hires: {upscaler: Latent (nearest-exact)}\n", "a1111")
    assert got[0][4] == "did you mean `latent-nearest-exact`?"
    got = said(base.format(m="tiny-sd", w=64) + "hires: {upscaler: latent, strength: 0.3}\n", "light")
    assert [(g[0], g[1], g[2]) for g in got] == [("warning", 4, 37)] and "blurred" in got[0][3], got
