"""`scenec build --compile` and the compiled FlexAttention kernel: how often they compile.

Counted with dynamo's own counters on CPU (backend "eager": dynamo traces and guards, no code is
generated). Compiled FlexAttention specialises on the sequence length (``dynamic=False``), so a build of
varied prompts must meet a bounded number of lengths: the text is padded to a bucket
(runtime/layout.text_bucket), not merely to the next multiple of 128.
"""

import warnings

import pytest
import torch

from scenec.runtime import kernels
from scenec.runtime.compiling import compile_blocks, denoiser_of
from scenec.runtime.sampler import run_job
from scenec.runtime.testing import box, make_plan

GRID = (16, 16)
ONE_STEP = [{"op": "denoise", "from": 0, "to": 1, "regional": True, "theta": None, "eta": 0.0}]
WORDS = [3, 40, 90, 140]  # entity prompt lengths (words): texts of 1024 + 6 … 1024 + 280 tokens


def _plan(i: int, msl: int = 1024):
    ents = [{"id": "a", "prompt": "fox " * WORDS[i], "token": box(GRID, 0, 0, 8, 8)},
            {"id": "b", "prompt": "a small bird", "token": box(GRID, 8, 8, 16, 16)}]
    return make_plan(entities=ents, program=ONE_STEP, max_sequence_length=msl)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.fixture
def flex_backend():
    from scenec.runtime.families import load_backend

    return load_backend("tiny", device="cpu", dtype="fp32", attn_impl="flex")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_flex_meets_one_length_per_bucket(flex_backend, monkeypatch):
    from torch.nn.attention.flex_attention import flex_attention

    from scenec.runtime import layout

    torch._dynamo.reset()
    before = _graphs()  # the counters are the process's (other tests in this worker compiled too)
    monkeypatch.setattr(kernels, "_flex_compiled", torch.compile(flex_attention, dynamic=False, backend="eager"))
    seen = []
    orig = layout.RegionalLayout.__post_init__

    def record(self):
        orig(self)
        seen.append((sum(self.text_lengths), self.n_text))

    monkeypatch.setattr(layout.RegionalLayout, "__post_init__", record)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(len(WORDS)):
            run_job(flex_backend, _plan(i), _plan(i).jobs[0], decode=False)
    texts = {t for t, _ in seen}
    assert len({-(-t // 128) for t in texts}) >= 2  # rounding to 128 alone would compile ≥ 2 lengths
    assert len({n for _, n in seen}) == 1  # one bucket
    assert _graphs() - before == 1


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_blocks_compute_what_eager_blocks_do_and_do_not_recompile_per_scene(flex_backend):
    torch._dynamo.reset()
    eager = [run_job(flex_backend, _plan(i, 32), _plan(i, 32).jobs[0], decode=False).latents for i in range(3)]
    n = compile_blocks(denoiser_of(flex_backend.pipe), backend="eager", log=False)
    tr = flex_backend.pipe.transformer
    assert n == len(tr.transformer_blocks) + len(tr.single_transformer_blocks)
    before = _graphs()
    got = [run_job(flex_backend, _plan(0, 32), _plan(0, 32).jobs[0], decode=False).latents]
    first = _graphs()
    assert first > before  # the blocks really are compiled
    got += [run_job(flex_backend, _plan(i, 32), _plan(i, 32).jobs[0], decode=False).latents for i in (1, 2)]
    assert _graphs() == first  # other prompts, same bucket: no recompile
    for a, b in zip(eager, got):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
