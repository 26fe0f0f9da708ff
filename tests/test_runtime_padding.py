"""Padding never leaks: a forward with padded text computes what the unpadded job computes.

Text is padded to a multiple of 128 on the FlexAttention path and to the longest row in a batch. Every
forward over padded text masks the padding (runtime/backend.pad_masks): regional or not, in every
block kind, at coupling's endpoints after ``attention.until``, in every batch row. fp32 on the tiny
Flux; the SDPA path (padding forced by ``pad_multiple``) and the FlexAttention path (which pads by
itself) alike.
"""

import warnings

import numpy as np
import pytest

from scenec.runtime.families import load_backend
from scenec.runtime.sampler import run_batch, run_job
from scenec.runtime.testing import box, make_plan, tiny_backend

TOL = 1e-6
G = (16, 16)
ENTS = [{"id": "fox", "prompt": "a red fox running", "token": box(G, 2, 2, 8, 8)},
        {"id": "bird", "prompt": "a small blue bird", "token": box(G, 6, 6, 12, 12, 0.25)}]


def program(regional, theta=None):
    theta = theta or [None] * len(regional)
    return [{"op": "denoise", "from": i, "to": i + 1, "regional": r, "theta": t, "eta": 0.0}
            for i, (r, t) in enumerate(zip(regional, theta))]


def coupled(theta, regional):
    """A coupled job with regions (a group of one), θ and regional per step as the compiler writes them."""
    def edit(doc, tensors):
        tensors["group/g/theta"] = np.asarray(theta, np.float32)
        doc["groups"] = [{"id": "g", "jobs": [j["id"] for j in doc["jobs"]], "theta": "group/g/theta"}]
        for j in doc["jobs"]:
            j["group"], j["global"]["gain"] = "g", "1-theta"
            for e in j["entities"]:
                e["gain"] = "theta"
            j["program"] = program(regional, [float(t) for t in theta])

    return make_plan(entities=ENTS, seed=3, edit=edit)


CASES = {
    "until < 1": lambda: make_plan(entities=ENTS, seed=3, program=program([True, False, False, False])),
    "blocks: double": lambda: make_plan(entities=ENTS, seed=3, blocks="double"),
    "blocks: single": lambda: make_plan(entities=ENTS, seed=3, blocks="single"),
    "θ = 1 after until": lambda: coupled([0.5, 1.0, 1.0, 1.0], [True, False, False, False]),
    "0 < θ < 1 after until": lambda: coupled([0.3, 0.6, 0.8, 1.0], [True, True, False, False]),
}


@pytest.fixture(scope="module", params=["sdpa", "flex"])
def backend(request):
    if request.param == "sdpa":
        return tiny_backend()
    return load_backend("tiny", device="cpu", dtype="fp32", attn_impl="flex")


def latents(backend, plan, pad_multiple):
    old = backend.pad_multiple
    backend.pad_multiple = pad_multiple
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager FlexAttention on CPU warns that it is slow
            return run_job(backend, plan, plan.jobs[0], decode=False).latents
    finally:
        backend.pad_multiple = old


@pytest.mark.parametrize("case", list(CASES))
def test_padded_equals_unpadded(backend, case):
    plan = CASES[case]()
    padded, unpadded = latents(backend, plan, 128), latents(backend, plan, 1)
    assert float((padded - unpadded).abs().max()) <= TOL, case


def test_batch_rows_of_different_text_lengths_equal_their_jobs_alone(backend):
    """Rows are padded to the longest row; on non-regional steps (after until) the padding is masked too."""
    g8 = (8, 8)
    base = dict(width=128, height=128, steps=3, program=program([True, False, False]))
    plans = [make_plan("a meadow at dawn", entities=[{"id": "fox", "prompt": "a red fox", "token": box(g8, 4, 1, 8, 5)}],
                       seed=1, **base),
             make_plan("a quiet forest with tall pine trees and fog", seed=5, **base),
             make_plan("a city", entities=[
                 {"id": "car", "prompt": "a yellow taxi cab with a long description of many many words",
                  "token": box(g8, 0, 0, 4, 4)}, {"id": "dog", "prompt": "dog", "token": box(g8, 5, 5, 8, 8)}],
                 seed=7, **base)]
    rows = [(p, p.jobs[0]) for p in plans]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = run_batch(backend, rows)
        for (p, j), r in zip(rows, got):
            alone = run_job(backend, p, j, decode=False).latents
            assert float((r.latents - alone).abs().max()) <= TOL
