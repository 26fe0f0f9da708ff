"""COW's schedule as the compiler emits it: noise levels on the model's own schedule, the step program
(seed initialisation, pastes at every window level, preserve with several references), the letterbox
excluded from a reference's masks, and the checks that refuse schedules that cannot hold."""

import numpy as np
import pytest
from PIL import Image

from scenec.compiler import compile_scene
from scenec.compiler.caps import ALIASES
from scenec.compiler.levels import FLOW_DEV, flow_sigmas, level_index, noise_levels
from scenec.compiler.schedule import Cow, ProgramInputs, build_program
from scenec.spec.plan import Paste, Renoise, Seed


def ops_text(ops):
    return [(o.op, getattr(o, "from_", None) if o.op in ("denoise", "renoise") else getattr(o, "at", None),
             getattr(o, "condition", None)) for o in ops]


# --- levels → steps -----------------------------------------------------------------------------------

@pytest.mark.parametrize("model,steps,size", [("tiny", 4, 256), ("tiny", 10, 192), ("tiny-sd", 10, 256),
                                              ("tiny-sd", 4, 128)])
def test_the_compilers_levels_are_the_runtime_solvers(model, steps, size):
    from scenec.runtime.testing import make_plan, sd_plan, tiny_backend, tiny_sd_backend

    flux = model == "tiny"
    plan = (make_plan if flux else sd_plan)(steps=steps, width=size, height=size)
    solver = (tiny_backend() if flux else tiny_sd_backend()).solver(plan)
    runtime = np.asarray(solver.sig) if flux else np.append(np.asarray(solver.timesteps, np.float64) / 1000, 0.0)
    np.testing.assert_allclose(noise_levels(ALIASES[model], (size, size), steps), runtime, atol=1e-6, rtol=0)


def test_flux_dev_default_window_lands_on_the_nearest_sigma():
    """FLUX.1-dev at 1024², 28 steps: the window 0.7 → 0.5 as step fractions ran at σ 0.888 → 0.760 (indices 8 →
    14); as noise levels it is the steps whose σ is nearest 0.7 and 0.5."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **FLOW_DEV)
    retrieve_timesteps(sched, 28, "cpu", sigmas=np.linspace(1.0, 1 / 28, 28), mu=calculate_shift(4096))
    table = noise_levels(ALIASES["flux-dev"], (1024, 1024), 28)
    np.testing.assert_allclose(table, sched.sigmas.numpy(), atol=1e-6)
    assert table[8] == pytest.approx(0.888, abs=1e-3) and table[14] == pytest.approx(0.760, abs=1e-3)
    a, b = level_index(0.7, table), level_index(0.5, table)
    assert (a, b) == (16, 21)  # σ 0.703 → 0.513
    for level, i in ((0.7, a), (0.5, b)):
        assert abs(table[i] - level) <= min(abs(table[i - 1] - level), abs(table[i + 1] - level))
        assert abs(table[i] - level) < 0.03


def test_ddpm_levels_are_timesteps_over_1000():
    table = noise_levels(ALIASES["sd21"], (512, 512), 10)
    np.testing.assert_allclose(table, [0.901, 0.801, 0.701, 0.601, 0.501, 0.401, 0.301, 0.201, 0.101, 0.001, 0.0])
    # COW's window 0.7 → 0.5 and preserve 0.4 on SD-2.1's 10 DDIM steps: t 701 → 501, then 401
    assert [level_index(x, table) for x in (0.7, 0.5, 0.4)] == [2, 4, 5]
    assert level_index(1.0, table) == 0 and level_index(0.0, table) == 10


def test_schnell_does_not_shift():
    np.testing.assert_allclose(noise_levels(ALIASES["flux-schnell"], (1024, 1024), 4), [1, 0.75, 0.5, 0.25, 0])
    assert flow_sigmas(4, (1024, 1024), FLOW_DEV)[1] > 0.9  # dev at 1024²: strongly shifted


def test_a_local_models_scheduler_config_is_read(tmp_path):
    from scenec.compiler.caps import model_info

    d = tmp_path / "m"
    (d / "scheduler").mkdir(parents=True)
    (d / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (d / "scheduler" / "scheduler_config.json").write_text('{"timestep_spacing": "trailing", "steps_offset": 0}')
    table = noise_levels(model_info(str(d)), (512, 512), 4)
    np.testing.assert_allclose(table, [0.999, 0.749, 0.499, 0.249, 0.0])


# --- the step program ---------------------------------------------------------------------------------

def test_seed_program_as_the_official_pipeline_runs_it():
    """COW's official pipeline on 10 steps (window t 701 → 501 = indices 2 → 4, 10 cycles, preserve 0.4 at
    index 5): invert the seed canvas to the window's end, re-noise up every cycle (the first included),
    paste at every window level, its end included, η 1 inside, 0.1 after, one more paste at preserve."""
    ops = build_program(ProgramInputs(10, conditions=[Cow(0, 2, 4, 10, 5, 1.0, 0.1)]))
    assert ops[0] == Seed(at=4, conditions=[0])
    cycle = [("renoise", 4, None), ("paste", 2, 0), ("denoise", 2, None), ("paste", 3, 0), ("denoise", 3, None),
             ("paste", 4, 0)]
    assert ops_text(ops[1:]) == cycle * 10 + [("denoise", 4, None), ("paste", 5, 0)] + \
        [("denoise", i, None) for i in range(5, 10)]
    assert {o.eta for o in ops if o.op == "denoise" and o.from_ < 4} == {1.0}
    assert {o.eta for o in ops if o.op == "denoise" and o.from_ >= 4} == {0.1}
    assert sum(isinstance(o, Renoise) for o in ops) == 10


def test_every_preserve_is_emitted_with_several_references():
    """A preserve that falls inside another reference's window lands in the last cycle, once; one after the
    union window after the cycles; both references paste at their own window levels in their own cycles."""
    a = Cow(0, 3, 5, 2, 6, 1.0, 0.1)  # its preserve (6) is inside b's window (2 → 8)
    b = Cow(1, 2, 8, 3, 9, 1.0, 0.1)
    ops = build_program(ProgramInputs(10, conditions=[a, b]))
    pastes = [(o.condition, o.at) for o in ops if isinstance(o, Paste)]
    assert pastes.count((0, 6)) == 1 and pastes.count((1, 9)) == 1
    renoise = [i for i, o in enumerate(ops) if isinstance(o, Renoise)]
    last = ops[renoise[-1]:]
    assert Paste(condition=0, at=6) in last  # in the last cycle: the last time the sampler passes level 6
    assert [(c, at) for c, at in pastes if c == 0 and at != 6] == [(0, lv) for _ in range(2) for lv in (3, 4, 5)]
    assert [at for c, at in pastes if c == 1 and at != 9] == list(range(2, 9)) * 3
    assert ops[0] == Seed(at=8, conditions=[0, 1])
    # with noise initialisation a preserve before the window is pasted while sampling down to it
    pre = build_program(ProgramInputs(10, conditions=[Cow(0, 3, 5, 1, 1, 1.0, 0.0, "noise")]))
    assert ops_text(pre[:3]) == [("denoise", 0, None), ("paste", 1, 0), ("denoise", 1, None)]


# --- letterbox ----------------------------------------------------------------------------------------

SCENE = """\
scenec: 1
model: tiny
canvas: {{width: 256, height: 256}}
sampler: {{steps: 10}}
entities:
  - id: banner
    prompt: a banner
    shape: {{box: [0.25, 0.25, 0.75, 0.75]}}
    reference: {{image: wide.png, fit: {fit}{extra}}}
"""


def compile_text(tmp_path, text):
    (tmp_path / "s.yaml").write_text(text)
    return compile_scene(tmp_path / "s.yaml")


def test_contain_excludes_the_letterbox_bars_from_paste_and_sow(tmp_path):
    """A 4:1 reference in a 128² box: its footprint is 128 × 32 px; the bars above and below it are grey, not
    the reference — out of the alpha, the paste mask and SOW's condition region on every grid."""
    Image.new("RGB", (400, 100), (200, 30, 30)).save(tmp_path / "wide.png")
    plan = compile_text(tmp_path, SCENE.format(fit="contain", extra=""))
    c = plan.jobs[0].conditions[0]
    rgba = plan.tensors[c.image]
    alpha = rgba[..., 3] > 0
    assert alpha.sum() == 128 * 32 and alpha[112:144, 64:192].all()
    latent = plan.mask(c.masks, "latent")
    assert (latent > 0).sum() == 16 * 4  # of the region's 16 × 16 = 256 latent cells (the bars were 192)
    assert latent[14:18, 8:24].min() == 1.0 and latent[8:14].max() == 0.0 and latent[18:24].max() == 0.0
    token = plan.mask(c.masks, "token")
    assert (token > 0).sum() == 8 * 2
    region = plan.mask(plan.jobs[0].entities[0].masks, "latent")
    assert (region > 0).sum() == 256  # the entity's prompt still acts on its whole region
    cover = compile_text(tmp_path, SCENE.format(fit="cover", extra=""))
    cc = cover.jobs[0].conditions[0]
    assert cc.masks == cover.jobs[0].entities[0].masks  # no bars: the region's own masks


# --- checks -------------------------------------------------------------------------------------------

def test_references_in_one_image_must_agree_on_init(tmp_path):
    from scenec.spec.diagnostics import SceneError

    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "wide.png")
    text = SCENE.format(fit="stretch", extra=", init: noise") + \
        "  - {id: b, prompt: b, shape: {box: [0, 0, 0.2, 0.2]}, reference: {image: wide.png}}\n"
    with pytest.raises(SceneError) as e:
        compile_text(tmp_path, text)
    d = e.value.diagnostics.errors[0]
    assert (d.pos.line, d.pos.col) == (10, 67) and "init" in d.message  # at b's reference (its init defaults)
    # in separate images (variants) they need not agree
    ok = text + "groups:\n  - id: g\n    variants: [{id: x, entities: [banner]}, {id: y, entities: [b]}]\n"
    plan = compile_text(tmp_path, ok)
    assert [j.program[0].op for j in plan.jobs] == ["denoise", "seed"]


def test_a_preserve_before_the_window_cannot_hold_with_the_seed(tmp_path):
    from scenec.spec.diagnostics import SceneError

    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "wide.png")
    with pytest.raises(SceneError) as e:
        compile_text(tmp_path, SCENE.format(fit="stretch", extra=", window: [0.6, 0.3], preserve: 0.9"))
    assert any("never samples" in d.message for d in e.value.diagnostics.errors)
    plan = compile_text(tmp_path, SCENE.format(fit="stretch", extra=", window: [0.6, 0.3], preserve: 0.9, init: noise"))
    assert Paste(condition=0, at=2) in plan.jobs[0].program  # σ 0.868, the nearest to 0.9
