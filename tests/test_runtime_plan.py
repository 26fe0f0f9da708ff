"""spec.plan: loading plan directories (plan.json + tensors.safetensors), accessors, the validator."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from scenec.runtime.testing import box, make_plan
from scenec.spec.errors import PlanError
from scenec.spec.plan import Plan, load_plan


def write(plan: Plan, d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "plan.json").write_text(json.dumps(plan.json))
    save_file(plan.tensors, str(d / "tensors.safetensors"))
    return d


def test_load_roundtrip(tmp_path):
    p = make_plan(entities=[{"id": "fox", "prompt": "a red fox", "token": box((16, 16), 2, 2, 8, 8)}])
    q = load_plan(write(p, tmp_path / "plan"))
    assert q.json == p.json
    assert set(q.tensors) == set(p.tensors)
    job = q.jobs[0]
    assert q.prompt(job.entities[0].prompt) == "a red fox"
    tok = q.mask(job.entities[0].masks, "token")
    assert tok.dtype == np.float32 and tok.shape == q.grid("token") == (16, 16)
    assert q.mask(job.entities[0].masks, "latent").shape == q.grid("latent") == (32, 32)
    assert q.canvas == (256, 256) and q.sampler.steps == 4
    assert q.job(job.id) is job


def test_plan_errors(tmp_path):
    with pytest.raises(PlanError, match="no plan.json"):
        load_plan(tmp_path)
    with pytest.raises(PlanError, match="unknown plan format"):
        Plan({"format": "scenec-plan/99"})
    p = make_plan()
    with pytest.raises(PlanError, match="lacks it"):
        p.tensor("nope")
    with pytest.raises(PlanError, match="out of range"):
        p.prompt(99)
    assert load_plan(write(p, tmp_path / "x")).json == p.json


def _bad(edit, tensors=None):
    """make_plan's plan with its document (and tensors) edited before validation."""
    return make_plan(entities=[{"id": "fox", "prompt": "a red fox", "token": box((16, 16), 2, 2, 8, 8)}],
                     seeds=[1, 2], edit=edit)


@pytest.mark.parametrize("edit, message", [
    (lambda d, t: d["jobs"][0]["program"].append({"op": "denoise", "from": 3, "to": 5}), "need to = from + 1"),
    (lambda d, t: d["jobs"][0]["program"].append({"op": "renoise", "from": 1, "to": 2}), "renoise needs"),
    (lambda d, t: d["jobs"][0]["program"].append({"op": "paste", "condition": 0, "at": 1}), "paste of condition 0"),
    (lambda d, t: d["jobs"][0]["program"][0].update(theta=1.5), "theta 1.5 outside"),
    (lambda d, t: d["jobs"][0]["program"][0].update(eta=-1), "eta must lie in"),
    (lambda d, t: d["jobs"][0]["global"].update(prompt=40), "prompt index 40 out of range"),
    (lambda d, t: t.update({"bad/token": np.zeros((4, 4), np.float32)}) or
     d["jobs"][0]["entities"][0]["masks"].update(token="bad/token"), "does not match the token grid"),
    (lambda d, t: d["jobs"][0]["entities"][0]["masks"].pop("latent"), "no mask on the 'latent' grid"),
    (lambda d, t: d["jobs"][0].update(init_image="image/x", inpaint_mask=dict(d["jobs"][0]["entities"][0]["masks"])),
     "lacks it"),
    (lambda d, t: d["jobs"][0].update(init_image="region/fox/token"), "needs an inpaint_mask"),
    (lambda d, t: d["jobs"][0].update(seed="one"), "seed"),
])
def test_a_bad_job_is_invalid_alone_with_one_sentence(edit, message):
    p = _bad(edit)
    bad, good = p.all_jobs()
    assert isinstance(bad[1], PlanError) and message in str(bad[1]) and "test-1" in str(bad[1])
    assert good[0] == "test-2" and [j.id for j in p.jobs] == ["test-2"]
    with pytest.raises(PlanError, match=message.split()[0]):
        p.job("test-1")


def test_unknown_op_is_unsupported_and_plan_wide_errors_fail_the_plan():
    from scenec.spec.errors import Unsupported

    p = _bad(lambda d, t: d["jobs"][0]["program"].append({"op": "warp"}))
    assert isinstance(p.invalid["test-1"], Unsupported) and "step op 'warp'" in str(p.invalid["test-1"])
    with pytest.raises(PlanError, match="canvas"):
        _bad(lambda d, t: d["canvas"].update(width=-3))
    with pytest.raises(PlanError, match="group 'g'"):
        _bad(lambda d, t: d.update(groups=[{"id": "g", "jobs": [], "theta": "group/g/theta"}]) or
             t.update({"group/g/theta": np.zeros(3, np.float32)}))
