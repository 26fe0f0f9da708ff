"""The runtime's seams are real: a new method is one class plus its registration, and runs on every family.

The toy method below (a constant additive bias on the image–image attention between the tokens of one
region) is written once against the Method hooks and the attention modifiers; registered, it runs on
the tiny Flux (joint attention of every block) and the tiny SD (the UNet's self-attention at every
resolution) with no change to the sampler or the families. Also: the dispatcher's extra key/value
tokens (the modifier visual prompts use) against the explicit formula.
"""

import numpy as np
import pytest
import torch

from scenec.runtime import methods
from scenec.runtime.attention import CROSS, SELF, Attention, ExtraKV, attend
from scenec.runtime.methods.base import Method
from scenec.runtime.sampler import run_job
from scenec.runtime.testing import box, make_plan, sd_plan, tiny_backend, tiny_sd_backend

ONE_STEP = [{"op": "denoise", "from": 0, "to": 1, "regional": True, "theta": None, "eta": 0.0}]
ENTS = [{"id": "fox", "prompt": "a red fox", "token": box((16, 16), 2, 2, 9, 9)}]


class RegionBias(Method):
    """Toy method: + ``C`` on the logits between image tokens that both lie in the first entity's region."""

    name = "toy-region-bias"
    kind = "toy"
    C = 1.5

    def capabilities(self):
        return ()  # needs nothing of a family beyond the Backend protocol

    @classmethod
    def wants(cls, plan, job):
        return bool(job.entities)

    def setup(self):
        be, plan, job = self.run.backend, self.run.plan, self.run.job
        self.sites = frozenset(s.name for s in be.sites if s.image_keys)
        self.region = {}
        for g in be.image_grids:
            if g in plan.doc.grids:
                h, w = plan.grid(g)
                self.region[h * w] = torch.from_numpy(plan.mask(job.entities[0].masks, g).reshape(-1) > 0)

    def modifiers(self, call):
        return [self]

    # the bias modifier (runtime/attention.Bias)
    def observe(self, q, k, n_text, allow, rows):
        pass

    def image_bias(self, n, device):
        r = self.region[n].to(device)
        return (r[:, None] & r[None, :]).float() * self.C

    def score_mod(self, n_text, n_img):
        raise NotImplementedError("the toy runs on the dense path only")


@pytest.fixture
def toy():
    methods.register(RegionBias)
    yield RegionBias
    methods.EXTRA.remove(RegionBias)


def probed(backend, plan):
    backend.attn.probe = []
    try:
        x = run_job(backend, plan, plan.jobs[0], decode=False).latents
        return x, backend.attn.probe
    finally:
        backend.attn.probe = None


FAMILIES = {"flux": (tiny_backend, make_plan), "sd": (tiny_sd_backend, sd_plan)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_registered_toy_method_runs_on_every_family(family, toy, monkeypatch):
    load, plan_of = FAMILIES[family]
    be = load()
    plan = plan_of(entities=ENTS, program=ONE_STEP, seed=2)
    sites = {s.name for s in be.sites if s.image_keys}
    x_toy, recs = probed(be, plan)
    toys = [r for r in recs if r["kind"] == "toy"]
    assert toys and {r["site"] for r in toys} == sites  # every image–image site of the family
    grids = {r["n_q"] - r["n_txt"] for r in toys}
    assert grids == {h * w for g, (h, w) in plan.doc.grids.items() if g in be.image_grids}
    by_n = {h * w: g for g, (h, w) in plan.doc.grids.items() if g in be.image_grids}
    for r in toys:
        n, b = r["n_txt"], r["bias"]
        region = torch.from_numpy(plan.mask(plan.jobs[0].entities[0].masks, by_n[r["n_q"] - n]).reshape(-1) > 0)
        text = torch.cat([b[:n].flatten(), b[:, :n].flatten()])
        assert (text[torch.isfinite(text)] == 0).all()  # text never biased (−∞: the regional mask)
        torch.testing.assert_close(b[n:, n:], (region[:, None] & region[None, :]).float() * RegionBias.C)
        torch.testing.assert_close(r["out"], r["expected"], atol=1e-5, rtol=1e-4)
    methods.EXTRA.remove(RegionBias)
    x_plain = run_job(be, plan, plan.jobs[0], decode=False).latents
    methods.EXTRA.append(RegionBias)
    assert float((x_toy - x_plain).abs().max()) > 1e-4  # it changed the image
    monkeypatch.setattr(RegionBias, "C", 0.0)
    x_zero = run_job(be, plan, plan.jobs[0], decode=False).latents
    torch.testing.assert_close(x_zero, x_plain, atol=1e-5, rtol=0)  # a zero bias is the model without it


@pytest.mark.parametrize("site", [SELF, CROSS])
def test_extra_key_value_tokens_reach_only_their_queries(site):
    g = torch.Generator().manual_seed(0)
    n_img, n_txt, m, d = 16, 5, 3, 8
    q = torch.randn(1, 2, n_img, d, generator=g)
    k, v = (torch.randn(1, 2, n_img if site is SELF else n_txt, d, generator=g) for _ in range(2))
    ek, ev = (torch.randn(1, 2, m, d, generator=g) for _ in range(2))
    visible = torch.zeros(n_img, dtype=torch.bool)
    visible[:6] = True
    ctl = Attention("sdpa")
    out = attend(ctl, site, q, k, v, [ExtraKV(ek, ev, visible, 2.0, frozenset({site.name}))])
    # explicit: the extra tokens join the softmax of visible queries with + log(scale) on their logits
    logits = torch.cat([q @ k.transpose(-1, -2), q @ ek.transpose(-1, -2)], -1) / d ** 0.5
    logits[..., k.shape[2]:] += np.log(2.0)
    logits[..., ~visible, k.shape[2]:] = float("-inf")
    expected = torch.softmax(logits, -1) @ torch.cat([v, ev], 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    plain = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, -1) @ v
    torch.testing.assert_close(out[:, :, ~visible], plain[:, :, ~visible], atol=1e-5, rtol=1e-5)
