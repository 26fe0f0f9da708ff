"""scenec tune: PAV, the optimisers on synthetic objectives with known optima (no model), the group
objective through execute() with a fake backend, resuming, and one end-to-end run on the tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from scenec.compiler import compile_scene
from scenec.isotonic import Evaluator, family_theta, optimise, pav, project_monotone
from scenec.tune import GroupObjective, schedule_line, state_path_for, tune

ROOT = Path(__file__).resolve().parents[1]


# --- PAV ---------------------------------------------------------------------------------------------

def _brute_isotonic(y):
    """Isotonic regression by the min-max formula x_i = max_{j≤i} min_{k≥i} mean(y[j..k])."""
    n = len(y)
    return np.array([max(min(np.mean(y[j:k + 1]) for k in range(i, n)) for j in range(i + 1)) for i in range(n)])


def test_pav_known_and_random():
    assert np.allclose(pav([1, 3, 2, 4, 3, 5]), [1, 2.5, 2.5, 3.5, 3.5, 5])
    assert np.allclose(pav([3, 2, 1]), [2, 2, 2])
    assert np.allclose(pav([0.1, 0.2, 0.9]), [0.1, 0.2, 0.9])  # already monotone: unchanged
    assert pav([]).size == 0
    assert np.allclose(pav([1, 0], w=[3, 1]), [0.75, 0.75])
    rng = np.random.default_rng(0)
    for _ in range(50):
        y = rng.normal(size=rng.integers(1, 12))
        x = pav(y)
        assert np.all(np.diff(x) >= -1e-12)
        assert np.allclose(x, _brute_isotonic(y))


def test_projection_is_clipped_pav():
    x = project_monotone([-0.5, 1.2, 0.3, 0.9])
    assert np.allclose(x, [0.0, 0.75, 0.75, 0.9])
    rng = np.random.default_rng(1)
    for _ in range(20):  # the projection is the closest feasible point: no feasible random point is closer
        y = rng.normal(0.5, 0.6, 6)
        p = project_monotone(y)
        for _ in range(50):
            q = np.sort(rng.random(6))
            assert np.sum((p - y) ** 2) <= np.sum((q - y) ** 2) + 1e-12


# --- optimisers on synthetic objectives -------------------------------------------------------------------

def _quadratic(target):
    t = np.asarray(target, dtype=np.float64)
    return lambda th: -float(np.sum((th - t) ** 2))


def test_vector_search_finds_the_pav_projection_of_a_non_monotone_target():
    target = np.array([0.1, 0.6, 0.3, 0.5, 1.1, 0.8])  # not monotone, partly outside [0, 1]
    best_possible = project_monotone(target)  # [0.1, 0.45, 0.45, 0.5, 0.95, 0.95]
    f = Evaluator(_quadratic(target), 6, budget=300)
    best = optimise(f, 6, method="vector")
    assert f.used <= 300
    assert np.abs(np.array(best.values) - best_possible).max() < 0.02
    v = np.array(best.values)
    assert np.all(np.diff(v) >= 0) and v.min() >= 0 and v.max() <= 1


def test_param_search_recovers_a_family_member():
    steps = 20
    target = family_theta("sin", {"center": 0.57, "width": 0.42}, steps)
    f = Evaluator(_quadratic(target), steps, budget=150)
    best = optimise(f, steps, method="param")
    assert best.params["shape"] == "sin"
    assert best.params["center"] == pytest.approx(0.57, abs=0.01)
    assert best.params["width"] == pytest.approx(0.42, abs=0.02)
    assert np.abs(np.array(best.values) - target).max() < 0.01
    assert best.method.startswith("param:sin(")


def test_both_is_never_worse_than_the_start_and_respects_the_budget():
    target = np.array([0.0, 0.0, 0.3, 0.2, 0.9, 1.0, 0.7, 1.0])
    start = np.linspace(0, 1, 8)
    f = Evaluator(_quadratic(target), 8, budget=40)
    best = optimise(f, 8, method="both", start=start)
    assert f.used == 40 and len(f.cache) == 40
    assert best.objective >= _quadratic(target)(start)
    optimum = _quadratic(target)(project_monotone(target))  # ≈ −0.052: the monotone optimum
    assert best.objective > optimum - 0.06


@pytest.mark.parametrize("method", ["both", "param", "vector"])
@pytest.mark.parametrize("budget", [1, 2, 3])
def test_the_budget_is_never_exceeded_small_budgets(method, budget):
    # --budget 1 with the default `both` used to evaluate 2 candidates: the start, then one by the
    # families, whose share was at least one more than what was used, even past the budget
    target = np.array([0.0, 0.3, 0.6, 1.0])
    f = Evaluator(_quadratic(target), 4, budget=budget)
    optimise(f, 4, method=method, start=np.linspace(0, 1, 4))
    assert f.used == budget and len(f.cache) == budget


def test_resume_replays_without_evaluating(tmp_path):
    target = np.array([0.2, 0.1, 0.6, 0.9])
    calls = []

    def obj(th):
        calls.append(th)
        return _quadratic(target)(th)

    state = tmp_path / "s.state.json"
    f = Evaluator(obj, 4, budget=12, state_path=state, fingerprint={"k": 1})
    b1 = optimise(f, 4, method="both")
    assert len(calls) == 12 and len(json.loads(state.read_text())["evaluations"]) == 12
    f2 = Evaluator(obj, 4, budget=12, state_path=state, fingerprint={"k": 1})
    b2 = optimise(f2, 4, method="both")
    assert len(calls) == 12 and f2.new == 0 and b2.values == b1.values  # same search, from the cache
    f3 = Evaluator(obj, 4, budget=20, state_path=state, fingerprint={"k": 1})
    optimise(f3, 4, method="both")
    assert f3.used == 20 and f3.new < 20 and len(calls) == 12 + f3.new
    f4 = Evaluator(obj, 4, budget=3, state_path=state, fingerprint={"k": 2}, log=lambda s: None)
    assert not f4.cache  # another problem: starts afresh


# --- the group objective, with a fake backend (no model) ------------------------------------------------

SCENE = """\
scenec: 1
model: tiny
canvas: {width: 64, height: 64}
sampler: {steps: 4, seed: 3}
background: {prompt: "a misty forest"}
entities:
  - {id: stag, prompt: "a stag", shape: {box: [0.0, 0.0, 0.5, 0.5]}}
  - {id: fox, prompt: "a red fox", shape: {box: [0.5, 0.5, 1.0, 1.0]}}
groups:
  - id: pair
    schedule: {shape: linear, center: 0.5, width: 1.0}
    variants:
      - {id: stag, entities: [stag]}
      - {id: fox, entities: [fox]}
  - id: other
    variants:
      - {id: stag, entities: [stag]}
      - {id: fox, entities: [fox]}
output: {dir: out}
"""

TARGET = np.array([0.0, 0.2, 0.8, 1.0])


class FakeBackend:
    """Images whose background differs between the variants by ‖θ − TARGET‖₁ (read from the job's step
    program): J = a·BgSim is maximal at θ = TARGET. Jobs run through :func:`fake_run_job`."""

    model_id, device, dtype = "fake", "cpu", "float32"

    def __init__(self):
        self.jobs = []

    def run_job(self, plan, job, progress=None, stop_at_fork=False, **_):
        if stop_at_fork:  # a group's shared prefix: nothing to draw yet
            return SimpleNamespace(latents=None)
        self.jobs.append(job.id)
        theta = np.array([op.theta for op in job.program if op.op == "denoise"])
        img = np.full((64, 64, 3), 100, np.uint8)
        if job.variant == "fox":
            img[:] += np.uint8(round(40 * np.abs(theta - TARGET).sum()))
        return SimpleNamespace(image=Image.fromarray(img), latents=None, timings={"total_s": 0.0})

    def clear_cache(self):
        pass


@pytest.fixture(autouse=True)
def fake_run_job(monkeypatch):
    """The sampler's run_job, for the fake backend: its images, no model."""
    import scenec.runtime.hires as hires
    import scenec.runtime.sampler as sampler

    def run_job(backend, plan, job, progress=None, **kw):
        return backend.run_job(plan, job if hasattr(job, "program") else plan.job(job["id"]), progress, **kw)

    monkeypatch.setattr(sampler, "run_job", run_job)
    monkeypatch.setattr(hires, "run_job", run_job)  # what writes an image runs jobs through runtime/hires.py


@pytest.fixture
def project(tmp_path):
    (tmp_path / "scenec.toml").write_text("[project]\n")
    (tmp_path / "pair.yaml").write_text(SCENE)
    return tmp_path


def test_group_objective_builds_only_the_group_with_theta(project):
    be = FakeBackend()
    obj = GroupObjective(project / "pair.yaml", "pair", weights=(1.0, 0.0), backend=be)
    assert obj.steps == 4 and np.allclose(obj.current, [0, 1 / 3, 2 / 3, 1])
    assert obj(TARGET) == pytest.approx(0.0, abs=1e-12)
    # not group `other`; the default name drops the repeated `pair`
    assert sorted(be.jobs) == ["pair-fox-3", "pair-stag-3"]
    worse = obj(np.array([0.0, 0.0, 0.0, 1.0]))
    assert worse < 0 and obj.last.validity == pytest.approx(0.5)
    fp = obj.fingerprint()
    assert fp["group"] == "pair" and fp["plan_hash_theta0"] == obj.fingerprint()["plan_hash_theta0"]


def test_group_objective_errors(project):
    from scenec.metrics import EvalError

    with pytest.raises(EvalError, match="2 groups"):
        GroupObjective(project / "pair.yaml", None)
    with pytest.raises(EvalError, match="no group `nope`"):
        GroupObjective(project / "pair.yaml", "nope")


def test_tune_writes_a_schedule_the_scene_accepts_and_resumes(project):
    be = FakeBackend()
    obj = GroupObjective(project / "pair.yaml", "pair", weights=(1.0, 0.0), backend=be)
    out = project / "schedules" / "pair.json"
    res = tune(project / "pair.yaml", budget=30, method="both", output=out, objective=obj, log=lambda s: None)
    doc = json.loads(out.read_text())
    assert doc["steps"] == 4 and len(doc["values"]) == 4 and doc["method"] and doc["objective"] <= 0
    assert doc["objective"] > doc["start"]["objective"]  # better than the scene's linear ramp
    assert np.abs(np.array(doc["values"]) - TARGET).max() < 0.1
    assert res["line"] == "schedule: {file: schedules/pair.json}" == schedule_line(project / "pair.yaml", out)
    assert state_path_for(out).name == "pair.state.json" and state_path_for(out).is_file()
    # a rerun with the same budget builds nothing: the same search, answered from the state file
    n = len(be.jobs)
    obj2 = GroupObjective(project / "pair.yaml", "pair", weights=(1.0, 0.0), backend=be)
    res2 = tune(project / "pair.yaml", budget=30, method="both", output=out, objective=obj2, log=lambda s: None)
    assert res2["built"] == 0 and len(be.jobs) == n and json.loads(out.read_text()) == doc
    # the scene names the file, and it compiles to exactly those values
    (project / "pair.yaml").write_text(SCENE.replace("schedule: {shape: linear, center: 0.5, width: 1.0}",
                                                     res["line"]))
    plan = compile_scene(project / "pair.yaml")
    theta = plan.tensors[next(g["theta"] for g in plan.json["groups"] if g["id"] == "pair")]
    assert np.allclose(theta, doc["values"], atol=1e-6)


# --- end to end on the tiny model -------------------------------------------------------------------------

def test_cli_tune_end_to_end_tiny(project):
    r = subprocess.run([sys.executable, "-m", "scenec", "tune", str(project / "pair.yaml"), "--group", "pair",
                        "--budget", "2", "--method", "param", "--clip", "tiny", "--device", "cpu",
                        "-o", str(project / "schedules" / "t.json")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    if r.returncode == 1 and "not supported" in r.stderr:
        pytest.skip("the runtime does not execute coupled groups yet: " + r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "schedule: {file: schedules/t.json}"
    doc = json.loads((project / "schedules" / "t.json").read_text())
    assert doc["evaluations"] == 2 and len(doc["values"]) == 4 and doc["clip"] == "tiny"
    assert "Traceback" not in r.stderr


def test_cli_tune_clip_none_is_bgsim_only(project):
    # docs: `--clip none` is BgSim only; with the default weights 1,1 it built a candidate, then failed:
    # "the metric is undefined (no values)"
    r = subprocess.run([sys.executable, "-m", "scenec", "tune", str(project / "pair.yaml"), "--group", "pair",
                        "--budget", "1", "--clip", "none", "--device", "cpu",
                        "-o", str(project / "schedules" / "n.json")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads((project / "schedules" / "n.json").read_text())
    assert doc["weights"] == [1.0, 0.0] and doc["clip"] is None and doc["objective"] is not None
    r = subprocess.run([sys.executable, "-m", "scenec", "tune", str(project / "pair.yaml"), "--group", "pair",
                        "--clip", "none", "--weights", "0,1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "nothing to optimise" in r.stderr


def test_cli_tune_bad_input(project):
    r = subprocess.run([sys.executable, "-m", "scenec", "tune", str(project / "pair.yaml"), "--group", "nope",
                        "--clip", "none"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ})
    assert r.returncode == 2 and "no group `nope`" in r.stderr and "Traceback" not in r.stderr


def test_cli_tune_bad_text_is_refused_before_the_state_is_read(project):
    # --text bogus used to be noticed at the first evaluation: after the state file was read (and
    # called "another problem; starting afresh", the text being part of its fingerprint) and the model loaded
    out = project / "schedules" / "t.json"
    state = state_path_for(out)
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text('{"format": "scenec-tune-state/1", "fingerprint": {}, "steps": 4, "evaluations": []}')
    r = subprocess.run([sys.executable, "-m", "scenec", "tune", str(project / "pair.yaml"), "--text", "bogus",
                        "--clip", "none", "-o", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ})
    assert r.returncode == 2 and "--text must be full or entity, not `bogus`" in r.stderr
    assert "starting afresh" not in r.stderr and "Traceback" not in r.stderr


def test_cli_tune_refuses_a_schedule_file_outside_the_project(project, tmp_path_factory):
    # -o outside the project root wrote a schedule and printed `schedule: {file: ../../x.json}` to add, which
    # `scenec validate` then refuses ("resolves outside the project root"); now refused before any build
    out = tmp_path_factory.mktemp("elsewhere") / "t.json"
    r = subprocess.run([sys.executable, "-m", "scenec", "tune", str(project / "pair.yaml"), "--clip", "none",
                        "-o", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ})
    assert r.returncode == 2 and "outside the project root" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists() and r.stdout == ""


def test_group_objective_compiles_with_the_command_lines_lora(project):
    """`tune --lora` builds every candidate with the LoRA (it is in each plan, and in the resume fingerprint)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": rng.standard_normal((2, 32), np.float32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": rng.standard_normal((32, 2), np.float32)},
              str(project / "style.safetensors"))
    plain = GroupObjective(project / "pair.yaml", "pair", weights=(1.0, 0.0), backend=FakeBackend())
    styled = GroupObjective(project / "pair.yaml", "pair", weights=(1.0, 0.0), backend=FakeBackend(),
                            lora=[f"{project / 'style.safetensors'}:0.7"])
    assert [lo["scale"] for lo in styled.plan_for(TARGET).json["model"]["lora"]] == [0.7]
    assert plain.plan_for(TARGET).json["model"]["lora"] == []
    assert styled.fingerprint()["plan_hash_theta0"] != plain.fingerprint()["plan_hash_theta0"]


def test_a_group_with_a_visual_refine_tunes(project):
    """visual.refine in the tuned group (a level on a step where θ must be above 0): the θ = 0 fingerprint and
    a candidate that is 0 at that step compile, without the refinement there (the tokens act on nothing at
    θ = 0: it would change nothing); a candidate above 0 there keeps it; the refinement is in the fingerprint."""
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(project / "stag.png")
    refine = "visual: {image: stag.png, refine: {steps: 1, lr: 0.5, at: [0.6]}}, "
    (project / "pair.yaml").write_text(SCENE.replace('{id: stag, prompt: "a stag", ',
                                                     '{id: stag, prompt: "a stag", ' + refine))
    obj = GroupObjective(project / "pair.yaml", "pair", weights=(1.0, 0.0), backend=FakeBackend())
    fp = obj.fingerprint()

    def refined(theta):
        return [vp.get("refine") for j in obj.plan_for(theta).json["jobs"] for vp in j.get("visuals") or ()]

    assert refined(np.array([0.0, 0.0, 0.0, 1.0])) == [None]  # step 2 (level 0.6) has θ = 0
    assert refined(np.array([0.0, 0.5, 0.5, 1.0]))[0]["at"] == [2]
    assert obj(np.array([0.0, 0.0, 0.0, 1.0])) < 0
    (project / "pair.yaml").write_text((project / "pair.yaml").read_text().replace("lr: 0.5", "lr: 0.25"))
    other = GroupObjective(project / "pair.yaml", "pair", weights=(1.0, 0.0), backend=FakeBackend())
    assert other.fingerprint() != fp
