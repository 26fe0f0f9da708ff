"""runtime.plan: loading plan directories (plan.json + tensors.safetensors) and accessors."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from scenec.runtime.errors import PlanError
from scenec.runtime.plan import Plan, load_plan
from scenec.runtime.testing import box, make_plan


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
    assert q.prompt(job["entities"][0]["prompt"]) == "a red fox"
    tok = q.mask(job["entities"][0]["masks"], "token")
    assert tok.dtype == np.float32 and tok.shape == q.grid("token") == (16, 16)
    assert q.mask(job["entities"][0]["masks"], "latent").shape == q.grid("latent") == (32, 32)
    assert q.canvas == (256, 256) and q.sampler["steps"] == 4
    assert q.job(job["id"]) is job


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
    assert Plan.of(write(p, tmp_path / "x")).json == p.json  # a directory path works too
