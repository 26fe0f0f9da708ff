"""Coupled generation (coupling groups, arXiv 2506.06826) on the tiny Flux, CPU, fp32.

Exact endpoints (θ = 0: the background alone; θ = 1: the entity stream alone), the shared θ = 0
prefix (on/off give identical images), mixed θ, and the block-level mixing (the attention modifiers
coupling contributes: KeyScale, Branches) against a direct reimplementation of the published formula
(the anchor's KeyScaleProcessor / coupled_forward).
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scenec.compiler import compile_scene
from scenec.runtime.attention import Branches, KeyScale
from scenec.runtime.outputs import execute
from scenec.runtime.backend import Call, Cond, mix_pooled
from scenec.runtime.sampler import Run, run_group, run_job
from scenec.runtime.testing import tiny_backend
from scenec.spec.plan import Denoise, Plan

SCENE = """\
scenec: 1
model: tiny
canvas: {{width: 128, height: 128}}
sampler: {{steps: {steps}, seed: {seeds}}}
background: {{prompt: "a misty forest"}}
entities:
  - {{id: stag, prompt: "a stag", shape: {{box: [0.1, 0.3, 0.6, 0.9]}}}}
  - {{id: owl, prompt: "an owl", shape: {{box: [0.5, 0.1, 0.9, 0.5]}}}}
groups:
  - id: g
    schedule: {schedule}
    variants:
      - {{id: fox, prompt: "a red fox running"}}
      - {{id: stag, entities: [stag]}}
      - {{id: both, entities: [stag, owl]}}
      - {{id: mixed, prompt: "a sunny day", entities: [owl]}}
"""

PLAIN = """\
scenec: 1
model: tiny
canvas: {{width: 128, height: 128}}
sampler: {{steps: {steps}, seed: {seeds}}}
background: {{prompt: "{prompt}"}}
"""


@pytest.fixture(scope="module")
def backend():
    return tiny_backend()


def compile_text(tmp_path, text: str, name: str = "scene") -> Plan:
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.yaml").write_text(text, encoding="utf-8")
    return compile_scene(d / f"{name}.yaml")


def group_plan(tmp_path, schedule: str, steps: int = 4, seeds="[1, 2]", name: str = "coupled") -> Plan:
    return compile_text(tmp_path, SCENE.format(steps=steps, seeds=seeds, schedule=schedule), name)


def run(backend, plan, share=None, decode=False):
    """{job id: JobResult} of the plan's single group."""
    out = {}
    for job, r in run_group(backend, plan, plan.groups[0], plan.jobs, share=share, decode=decode):
        assert not isinstance(r, Exception), r
        out[job.id] = r
    return out


def by_variant(plan, results, seed):
    return {j.variant: results[j.id] for j in plan.jobs if j.seed == seed}


# -- endpoints -------------------------------------------------------------------------------

def test_theta_zero_all_variants_identical_and_equal_the_background_alone(backend, tmp_path):
    plan = group_plan(tmp_path, "{values: [0, 0, 0, 0]}")
    assert plan.json["groups"][0]["shared_prefix"] == 4
    for share in (True, False):
        res = run(backend, plan, share=share, decode=True)
        for seed in (1, 2):
            imgs = [np.asarray(r.image).tobytes() for r in by_variant(plan, res, seed).values()]
            assert len(imgs) == 4 and all(i == imgs[0] for i in imgs)
    # … and equal the plain scene with only the background prompt (diffusers' path)
    plain = compile_text(tmp_path, PLAIN.format(steps=4, seeds=1, prompt="a misty forest"), "plain")
    ref = run_job(backend, plain, plain.jobs[0], decode=False).latents
    fox = by_variant(plan, res, 1)["fox"].latents
    assert torch.equal(fox, ref)


def test_theta_one_prompt_variant_equals_the_plain_scene_with_that_prompt(backend, tmp_path):
    plan = group_plan(tmp_path, "{values: [1, 1, 1, 1]}", seeds="3")
    assert plan.json["groups"][0]["shared_prefix"] == 0
    res = by_variant(plan, run(backend, plan), 3)
    plain = compile_text(tmp_path, PLAIN.format(steps=4, seeds=3, prompt="a red fox running"), "plain")
    ref = run_job(backend, plain, plain.jobs[0], decode=False).latents
    assert (res["fox"].latents - ref).abs().max().item() <= 1e-5
    # the region variants at θ = 1 run their entity streams alone (regional): different images
    assert (res["stag"].latents - res["both"].latents).abs().max() > 1e-3


def test_theta_one_region_variant_is_eligen_with_the_background_as_global_prompt(backend, tmp_path):
    plan = group_plan(tmp_path, "{values: [1, 1, 1, 1]}", seeds="3")
    res = by_variant(plan, run(backend, plan), 3)
    text = PLAIN.format(steps=4, seeds=3, prompt="a misty forest") + \
        "entities:\n  - {id: stag, prompt: \"a stag\", shape: {box: [0.1, 0.3, 0.6, 0.9]}}\n"
    eligen = compile_text(tmp_path, text, "eligen")
    ref = run_job(backend, eligen, eligen.jobs[0], decode=False).latents
    assert (res["stag"].latents - ref).abs().max().item() <= 1e-5


def test_mixed_theta_differs_from_both_endpoints(backend, tmp_path):
    lat = {}
    for th in (0, 0.5, 1):
        plan = group_plan(tmp_path, f"{{values: [{th}, {th}, {th}, {th}]}}", seeds="5", name=f"t{th}")
        lat[th] = {v: r.latents for v, r in by_variant(plan, run(backend, plan), 5).items()}
    for v in ("fox", "stag", "both", "mixed"):
        mid = lat[0.5][v]
        assert torch.isfinite(mid).all()
        assert (mid - lat[0][v]).abs().max() > 1e-3, v
        assert (mid - lat[1][v]).abs().max() > 1e-3, v


# -- shared prefix ---------------------------------------------------------------------------

def test_shared_prefix_on_and_off_give_identical_outputs(backend, tmp_path):
    plan = group_plan(tmp_path, "{shape: sin, center: 0.5, width: 0.5}", steps=8)
    prefix = plan.json["groups"][0]["shared_prefix"]
    assert prefix == 2 and all({"op": "fork"} in j["program"] for j in plan.json["jobs"])

    calls = []
    hook = backend.transformer.x_embedder.register_forward_hook(lambda *a: calls.append(1))
    try:
        on = run(backend, plan, share=True)
        n_on = len(calls)
        calls.clear()
        off = run(backend, plan, share=False)
        n_off = len(calls)
    finally:
        hook.remove()
    assert set(on) == set(off) == {j.id for j in plan.jobs}
    for jid in on:
        assert torch.equal(on[jid].latents, off[jid].latents), jid
        assert on[jid].timings["shared_prefix_steps"] == prefix and on[jid].timings["shared_with"] == 4
        assert "shared_prefix_s" not in off[jid].timings
    # 2 seeds × 4 variants × 8 steps alone; shared: per seed, 2 prefix steps once + 4 × 6
    assert n_off == 2 * 4 * 8 and n_on == 2 * (prefix + 4 * (8 - prefix))


def test_execute_runs_groups_together_and_the_switch_turns_sharing_off(backend, tmp_path, monkeypatch):
    plan = group_plan(tmp_path, "{shape: step, center: 0.5}", steps=4, seeds="1")
    seen = []
    a = execute(plan, backend, tmp_path / "on", progress=lambda d, t, n: seen.append((d, t)))
    assert [r["job"] for r in a] == [j.id for j in plan.jobs] and all(r["status"] == "built" for r in a)
    assert seen[-1][0] == seen[-1][1] == sum(len(j.program) for j in plan.jobs)
    side = json.loads(open(a[0]["sidecar"]).read())
    assert side["timings"]["shared_with"] == 4
    monkeypatch.setenv("SCENEC_SHARED_PREFIX", "0")
    b = execute(plan, backend, tmp_path / "off")
    assert "shared_prefix_s" not in json.loads(open(b[0]["sidecar"]).read())["timings"]
    from PIL import Image

    for ra, rb in zip(a, b):
        assert np.asarray(Image.open(ra["image"])).tobytes() == np.asarray(Image.open(rb["image"])).tobytes()


def test_a_failing_job_fails_alone_in_its_group(backend, tmp_path):
    plan = group_plan(tmp_path, "{shape: step, center: 0.5}", steps=4, seeds="1")
    doc = json.loads(json.dumps(plan.json))
    next(op for op in doc["jobs"][1]["program"] if op.get("theta") == 1.0)["theta"] = 2.0  # after the fork
    res = execute(Plan(doc, plan.tensors), backend, tmp_path / "out")
    assert [r["status"] for r in res] == ["built", "failed", "built", "built"]
    assert "theta" in res[1]["error"]


def test_true_cfg_coupled_step_is_the_guided_mix_of_two_coupled_passes(backend, tmp_path):
    """With true_cfg > 1 a coupled step is v_neg + s·(v_pos − v_neg), where the negative pass has the same
    coupled structure over the negatives: built here from two true_cfg = 1 groups, one whose prompts are the
    negatives, at θ = 0.3."""
    def plan_of(bg, fox, cfg):
        text = SCENE.format(steps=2, seeds=1, schedule="{values: [0.3, 0.3]}").replace(
            "sampler: {steps: 2, seed: 1}", f"sampler: {{steps: 2, seed: 1, true_cfg: {cfg}}}").replace(
            'background: {prompt: "a misty forest"}',
            f'background: {{prompt: "{bg[0]}", negative: "{bg[1]}"}}').replace(
            '{id: fox, prompt: "a red fox running"}', f'{{id: fox, prompt: "{fox[0]}", negative: "{fox[1]}"}}')
        return compile_text(tmp_path, text, f"cfg{cfg}-{bg[0][:3]}")

    one_op = [{"op": "denoise", "from": 0, "to": 1, "regional": True, "theta": 0.3, "eta": 0.0}]

    def v_of(plan):
        job = next(j for j in plan.jobs if j.variant == "fox")
        r = Run(backend, [(plan, job)])
        r.setup()
        return r.predict(r.x, 0, Denoise.model_validate(one_op[0])), r.x

    v_cfg, x = v_of(plan_of(("a misty forest", "fog"), ("a red fox running", "a cat"), 2.5))
    v_pos, x1 = v_of(plan_of(("a misty forest", ""), ("a red fox running", ""), 1.0))
    v_neg, x2 = v_of(plan_of(("fog", ""), ("a cat", ""), 1.0))
    assert torch.equal(x, x1) and torch.equal(x, x2)
    torch.testing.assert_close(v_cfg, v_neg + 2.5 * (v_pos - v_neg), atol=1e-5, rtol=1e-5)
    assert (v_pos - v_neg).abs().max() > 10 * 1e-5  # the two passes differ: the mix is not trivially equal


# -- the published formula, block by block ---------------------------------------------------

class PublishedKeyScale:
    """The anchor's KeyScaleProcessor (bench/anchor_coupled.py), verbatim in substance."""

    def __init__(self, n_bg, theta):
        self.n_bg, self.theta = n_bg, theta

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.transformers.transformer_flux import (
            _get_qkv_projections,
            apply_rotary_emb,
        )

        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        scale = torch.ones(ek.shape[1], device=ek.device, dtype=ek.dtype)
        scale[: self.n_bg] = 1 - self.theta
        scale[self.n_bg:] = self.theta
        ek = ek * scale[None, :, None, None]
        q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        out = out.flatten(2, 3).to(q.dtype)
        e, h = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], 1)
        return attn.to_out[1](attn.to_out[0](h.contiguous())), attn.to_add_out(e.contiguous())


def published_forward(model, x, bg, ent, pooled_bg, pooled_ent, t, g, img_ids, theta):
    """The anchor's coupled_forward: double blocks with key scaling, single blocks as two branches, mixed;
    the pooled vector (1 − θ)·pooled_bg + θ·pooled_ent (Flux's text ids are zeros)."""
    hidden = model.x_embedder(x)
    temb = model.time_text_embed(t * 1000, g * 1000, (1 - theta) * pooled_bg + theta * pooled_ent)
    enc = model.context_embedder(torch.cat([bg, ent], 1))
    n_bg, n_ent = bg.shape[1], ent.shape[1]

    def rope(n):
        return model.pos_embed(torch.cat([torch.zeros(n, 3), img_ids], 0))

    with processors(model, PublishedKeyScale(n_bg, theta)):
        for blk in model.transformer_blocks:
            enc, hidden = blk(hidden, enc, temb, rope(n_bg + n_ent))
    enc_bg, enc_ent = enc[:, :n_bg], enc[:, n_bg:]
    for blk in model.single_transformer_blocks:
        enc_bg, h_bg = blk(hidden, enc_bg, temb, rope(n_bg))
        enc_ent, h_ent = blk(hidden, enc_ent, temb, rope(n_ent))
        hidden = (1 - theta) * h_bg + theta * h_ent
    return model.proj_out(model.norm_out(hidden, temb))


class modifiers:
    """The shared tiny backend's processors run under ``mods`` inside the block (restored after)."""

    def __init__(self, backend, mods, n_img):
        self.backend, self.mods, self.n_img = backend, mods, n_img

    def __enter__(self):
        self.backend.attn.set(self.mods, n_img=self.n_img)

    def __exit__(self, *exc):
        self.backend.attn.clear()


class processors:
    """Temporarily set every double-stream block's processor (the shared tiny backend is restored)."""

    def __init__(self, model, proc):
        self.model, self.proc = model, proc

    def __enter__(self):
        self.saved = [b.attn.processor for b in self.model.transformer_blocks]
        for b in self.model.transformer_blocks:
            b.attn.processor = self.proc

    def __exit__(self, *exc):
        for b, p in zip(self.model.transformer_blocks, self.saved):
            b.attn.processor = p


def _inputs(tr, nb=7, ne=5, hw=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dim = tr.inner_dim
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(hw).float(), torch.arange(hw).float(),
                                         indexing="ij"), -1).reshape(-1, 3)
    return rnd(1, hw * hw, dim), rnd(1, nb, dim), rnd(1, ne, dim), rnd(1, dim), img_ids


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# θ = 0.3 (1 − θ ≠ θ) with different text lengths and pooled vectors: swapping background and entity fails
THETA = 0.3


@torch.inference_mode()
def test_double_block_key_scaling_matches_the_published_processor(backend):
    tr, theta = backend.transformer, THETA
    hidden, bg, ent, temb, img_ids = _inputs(tr)
    nb = bg.shape[1]
    enc = torch.cat([bg, ent], 1)
    rope = tr.pos_embed(torch.cat([torch.zeros(enc.shape[1], 3), img_ids], 0))
    blk = tr.transformer_blocks[0]
    with processors(tr, PublishedKeyScale(nb, theta)):
        ref_e, ref_h = blk(hidden, enc, temb, rope)
    scale = torch.ones(enc.shape[1])
    scale[:nb], scale[nb:] = 1 - theta, theta
    with modifiers(backend, [KeyScale(scale, frozenset({"double"}))], hidden.shape[1]):
        e, h = blk(hidden, enc, temb, rope)
    assert _rel(e, ref_e) <= 1e-6 and _rel(h, ref_h) <= 1e-6


@torch.inference_mode()
def test_single_block_fused_mixing_matches_two_branches(backend):
    tr, theta = backend.transformer, THETA
    hidden, bg, ent, temb, img_ids = _inputs(tr)
    blk = tr.single_transformer_blocks[0]
    rope_bg = tr.pos_embed(torch.cat([torch.zeros(bg.shape[1], 3), img_ids], 0))
    rope_ent = tr.pos_embed(torch.cat([torch.zeros(ent.shape[1], 3), img_ids], 0))
    ref_bg, h_bg = blk(hidden, bg, temb, rope_bg)
    ref_ent, h_ent = blk(hidden, ent, temb, rope_ent)
    ref_h = (1 - theta) * h_bg + theta * h_ent
    rope = tr.pos_embed(torch.cat([torch.zeros(bg.shape[1] + ent.shape[1], 3), img_ids], 0))
    nb = bg.shape[1]
    with modifiers(backend, [Branches(nb, theta, None, frozenset({"single"}))], hidden.shape[1]):
        e, h = blk(hidden, torch.cat([bg, ent], 1), temb, rope)  # fused: one block, two attentions
    e_bg, e_ent = e[:, :nb], e[:, nb:]
    assert _rel(e_bg, ref_bg) <= 1e-5 and _rel(e_ent, ref_ent) <= 1e-5 and _rel(h, ref_h) <= 1e-5


@torch.inference_mode()
def test_coupled_forward_matches_the_published_forward(backend):
    tr, theta = backend.transformer, THETA
    gen = torch.Generator().manual_seed(3)
    cin, jd, pd = tr.config.in_channels, tr.config.joint_attention_dim, tr.config.pooled_projection_dim
    hw, Lb, Le = 4, 6, 4
    x, bg, ent, p_bg, p_ent = (torch.randn(*s, generator=gen) for s in ((1, hw * hw, cin), (1, Lb, jd), (1, Le, jd),
                                                                        (1, pd), (1, pd)))
    t, g = torch.full((1,), 0.5), torch.full((1,), 3.5)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(hw).float(), torch.arange(hw).float(),
                                         indexing="ij"), -1).reshape(-1, 3)
    ref = published_forward(tr, x, bg, ent, p_bg, p_ent, t, g, img_ids, theta)
    scale = torch.ones(Lb + Le)
    scale[:Lb], scale[Lb:] = 1 - theta, theta
    mods = [KeyScale(scale, frozenset({"double"})), Branches(Lb, theta, None, frozenset({"single"}))]
    call = Call([0], [False], [], 0, pooled_weights=(1 - theta, theta), cond=Cond(torch.cat([bg, ent], 1),
                                                                                  [p_bg, p_ent], [Lb, Le], {}))
    with modifiers(backend, mods, hw * hw):
        ours = tr(hidden_states=x, encoder_hidden_states=torch.cat([bg, ent], 1),
                  pooled_projections=mix_pooled(call, 1), timestep=t, guidance=g, img_ids=img_ids, txt_ids=torch.zeros(Lb + Le, 3), return_dict=False)[0]
    assert _rel(ours, ref) <= 1e-5
    swapped = published_forward(tr, x, ent, bg, p_ent, p_bg, t, g, img_ids, theta)
    assert _rel(swapped, ref) > 1e-3  # the test tells background from entity
    # the published formula at θ = 1 is not "entity only" (key scaling by 0 leaves logits at 0)
    one = published_forward(tr, x, bg, ent, p_bg, p_ent, t, g, img_ids, 1.0)
    ent_only = tr(hidden_states=x, encoder_hidden_states=ent, pooled_projections=p_ent, timestep=t, guidance=g,
                  img_ids=img_ids, txt_ids=torch.zeros(Le, 3), return_dict=False)[0]
    assert _rel(one, ent_only) > 1e-4


@torch.inference_mode()
def test_a_coupled_step_of_the_runtime_is_the_published_forward(backend, tmp_path):
    """The coupling method's own call (its text order, key scaling, branches and pooled mix) at θ = 0.3 against
    the published forward over the background and the variant prompt encoded on their own."""
    plan = group_plan(tmp_path, "{values: [0.3, 0.3, 0.3, 0.3]}", seeds="1")
    job = next(j for j in plan.jobs if j.variant == "fox")
    r = Run(backend, [(plan, job)])
    r.setup()
    op = job.program[0]
    assert op.theta == pytest.approx(0.3)
    call = r.call([(0, False)], op, 0)
    t = r.solver.model_time(0, 1, r.x.dtype, backend.device)
    ours = backend._forward(r, r.x, call, t)
    msl = plan.model.max_sequence_length
    bg, fox = (backend.encode_global(text, msl) for text in ("a misty forest", "a red fox running"))
    img_ids = backend._img_ids[(128, 128)]
    theta = float(op.theta)
    ref = published_forward(backend.transformer, r.x, bg.seq, fox.seq, bg.pooled, fox.pooled, t / 1000,
                            torch.full((1,), plan.sampler.guidance), img_ids, theta)
    assert _rel(ours, ref) <= 1e-5
    swapped = published_forward(backend.transformer, r.x, fox.seq, bg.seq, fox.pooled, bg.pooled, t / 1000,
                                torch.full((1,), plan.sampler.guidance), img_ids, theta)
    assert _rel(ours, swapped) > 1e-3
