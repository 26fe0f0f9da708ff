"""Cost of a coupling group (coupled generation, arXiv 2506.06826) in a Flux-sized DiT, beside the anchor.

One group of B variants (shared background, B entity prompts), 1024x1024 → 4096 image tokens, 512
text tokens per prompt, random weights (same arithmetic as real ones). Per-step costs, measured as
the project's anchor coupled benchmark (passed with --anchor PATH) measures them (one transformer
forward = one denoising step):

  plain_B        B plain forwards batched (the "four plain images" baseline)
  bg_only_1      the background alone, batch 1: a shared-prefix step (θ = 0 for every variant)
  ours_B         scenec's coupled forward at θ = 0.5, batch B: the stock transformer forward over
                 [bg | ent | img] under the modifiers runtime/methods/coupling.py contributes
                 (KeyScale on the double-stream blocks, fused two-branch Branches on the
                 single-stream blocks; runtime/attention.py), pooled vector (1 − θ)·bg + θ·ent
  anchor_B       the anchor's coupled_forward (the published method), batch B, with --anchor PATH

Composed over each schedule's θ table (T = --steps):
  scenec group   = Σ_steps cost(θ_i) / (T · plain_B), cost = bg_only_1 for the shared θ = 0 prefix,
                   plain_B at θ = 1 (exact endpoint: entity stream alone), ours_B for 0 < θ < 1
  no sharing     = the same with plain_B for the prefix steps
  anchor steps   = the scenec composition with anchor_B for the mixed steps (endpoints + sharing, unfused)
  published      = T · anchor_B / (T · plain_B) (the coupled forward at every step, as published)
and the anchor's own composed numbers (group_cost_c{c}_w{w}_over_plain) from the same measurements.
Exactness: ours vs the anchor at θ = 0.5 (relative error), and the published θ = 1 vs entity only.

--tiny: a small CPU run (wall-clock timings, meaningless for the GPU goal but the same code path).
--e2e (with --tiny): the runtime end to end on the tiny model (runtime/sampler.py ``run_job`` and
``run_group``): a compiled B-variant group, shared prefix on / off, against B plain jobs.

Usage: python bench/bench_coupled.py [--tiny] [--group 4] [--steps 50] [--reps N] [--anchor PATH] [--e2e]
--anchor PATH: the anchor coupled benchmark's script (also looked for in bench/anchor/ of this checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import load_anchor, use_checkout

ROOT = Path(__file__).resolve().parent.parent
SCHEDULES = {"sin(c=0.4,w=0.2)": ("sin", 0.4, 0.2), "step(c=0.5)": ("step", 0.5, None)}






def theta_table(kind: str, center: float, width: float | None, steps: int) -> np.ndarray:
    """The compiler's θ table (compiler/schedule.py, numpy only)."""
    from scenec.compiler import schedule as sch

    t = sch.progress(steps)
    return sch.theta_step(t, center) if kind == "step" else sch.theta_sin(t, center, width)


def compose(theta: np.ndarray, cost_mixed: float, plain_b: float, bg1: float, share: bool = True) -> dict:
    """Group cost over the θ table relative to T plain batch-B steps."""
    T = len(theta)
    prefix = 0
    while prefix < T and theta[prefix] == 0.0:
        prefix += 1
    mixed = int(((theta > 0) & (theta < 1)).sum())
    ones = int((theta == 1).sum())
    zeros_late = T - prefix - mixed - ones  # θ = 0 after the prefix (not with a non-decreasing θ)
    cost = prefix * (bg1 if share else plain_b) + mixed * cost_mixed + (ones + zeros_late) * plain_b
    return {"prefix": prefix, "mixed": mixed, "ones": ones, "ratio": cost / (T * plain_b)}


def main() -> None:
    use_checkout()
    from diffusers import FluxTransformer2DModel

    from scenec.runtime.attention import DOUBLE, SINGLE, Attention, Branches, KeyScale
    from scenec.runtime.families.flux import FluxProcessor

    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--anchor", default=None, help="the anchor coupled benchmark's script (default: bench/anchor/)")
    ap.add_argument("--e2e", action="store_true", help="with --tiny: the runtime end to end on the tiny model")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default with --tiny: 1, steadier timings)")
    ap.add_argument("--out", default=None, help="write the results as JSON here (default: $OUT/bench_coupled.json)")
    args = ap.parse_args()
    anchor = load_anchor(args.anchor, "anchor_coupled")

    dev = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    reps = args.reps or (8 if dev == "cuda" else 5)
    if args.threads or dev == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.tiny:
        cfg = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                   axes_dims_rope=(4, 4, 8))
        hw, txt = 8, 16
    else:
        cfg = dict(guidance_embeds=True)
        hw, txt = 64, 512
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(dev):
        model = FluxTransformer2DModel(**cfg).eval()
    torch.set_default_dtype(torch.float32)
    B = args.group
    cin, jd, pd = cfg.get("in_channels", 64), cfg.get("joint_attention_dim", 4096), cfg.get("pooled_projection_dim", 768)
    gen = torch.Generator(dev).manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=dev, dtype=dtype)  # noqa: E731
    x, bg1, ent, pooled = rnd(B, hw * hw, cin), rnd(1, txt, jd), rnd(B, txt, jd), rnd(B, pd)
    bg = bg1.expand(B, -1, -1)
    t = torch.full((B,), 0.5, device=dev, dtype=dtype)
    g = torch.full((B,), 3.5, device=dev, dtype=dtype)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(hw).float(), torch.arange(hw).float(),
                                         indexing="ij"), -1).reshape(-1, 3).to(dev, dtype)
    txt_ids = torch.zeros(txt, 3, device=dev, dtype=dtype)
    # the Flux family's processors (as FluxBackend installs them): without a modifier at their site
    # they run diffusers' stock processor, so plain_B and bg_only_1 are diffusers' own forwards
    ctl = Attention("flex" if dev == "cuda" else "sdpa")
    for b in model.transformer_blocks:
        b.attn.processor = FluxProcessor(ctl, DOUBLE)
    for b in model.single_transformer_blocks:
        b.attn.processor = FluxProcessor(ctl, SINGLE)
    stock = [b.attn.processor for b in model.transformer_blocks]
    enc_joint = torch.cat([bg, ent], 1)  # the joint text [bg | ent] of a coupled call (no padding)
    txt_ids_joint = torch.zeros(2 * txt, 3, device=dev, dtype=dtype)

    def restore():
        for b, p in zip(model.transformer_blocks, stock):
            b.attn.processor = p

    def plain(enc, xx=x, pp=pooled, tt=t, gg=g):
        return model(hidden_states=xx, encoder_hidden_states=enc, pooled_projections=pp, timestep=tt, guidance=gg,
                     img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]

    def ours(theta):
        """Coupling's modifiers (runtime/methods/coupling.py ``Coupling.modifiers``) on the stock forward."""
        scale = torch.ones(2 * txt, device=dev, dtype=torch.float32)
        scale[:txt], scale[txt:] = 1 - theta, theta
        ctl.set([KeyScale(scale, frozenset({DOUBLE.name})), Branches(txt, theta, None, frozenset({SINGLE.name}))],
                n_img=x.shape[1])
        try:  # background and entity pooled vectors are the same tensor here: the mix is `pooled`
            return model(hidden_states=x, encoder_hidden_states=enc_joint,
                         pooled_projections=(1 - theta) * pooled + theta * pooled, timestep=t, guidance=g,
                         img_ids=img_ids, txt_ids=txt_ids_joint, return_dict=False)[0]
        finally:
            ctl.clear()

    def anchor_coupled(theta):
        try:
            return anchor.coupled_forward(model, x, bg, ent, pooled, t, g, img_ids, txt_ids, theta)
        finally:
            restore()  # the anchor leaves its processor on the double-stream blocks: ours back

    cases = {"plain_B": lambda: plain(ent), "bg_only_1": lambda: plain(bg1, x[:1], pooled[:1], t[:1], g[:1]),
             "ours_B": lambda: ours(0.5)}
    if anchor is not None:
        cases["anchor_B"] = lambda: anchor_coupled(0.5)

    res: dict = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "dtype": str(dtype),
                 "group": B, "steps": args.steps, "tiny": args.tiny}
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    with torch.inference_mode():
        if anchor is not None:
            res["relerr_ours_vs_anchor_theta0.5"] = rel(ours(0.5), anchor_coupled(0.5))
            res["relerr_anchor_theta1_vs_entity_only"] = rel(anchor_coupled(1.0), plain(ent))
        res["relerr_ours_theta1_vs_entity_only"] = 0.0  # θ = 1 exactly runs the entity stream alone (plain_B)
        for name, fn in cases.items():
            for _ in range(2 if dev == "cuda" else 1):
                fn()
            if dev == "cuda":
                torch.cuda.synchronize()
            ts = []
            for _ in range(reps):
                if dev == "cuda":
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))  # noqa: E702
                else:
                    t0 = time.perf_counter(); fn(); ts.append((time.perf_counter() - t0) * 1e3)  # noqa: E702
            res[f"{name}_ms"] = statistics.median(ts)
            print(f"{name:12s} median_ms={res[f'{name}_ms']:10.3f}", flush=True)

    p, b1, o = res["plain_B_ms"], res["bg_only_1_ms"], res["ours_B_ms"]
    res["ours_coupled_over_plain"] = o / p
    if anchor is not None:
        res["anchor_coupled_over_plain"] = res["anchor_B_ms"] / p
        for c, w in ((10, 10), (20, 10), (25, 0)):  # the anchor's own composition
            T = 50
            res[f"anchor_group_cost_c{c}_w{w}_over_plain"] = (
                c * b1 + w * res["anchor_B_ms"] + (T - c - w) * p) / (T * p)
    res["schedules"] = {}
    for label, (kind, center, width) in SCHEDULES.items():
        th = theta_table(kind, center, width, args.steps)
        row = {"theta": [round(float(v), 4) for v in th]}
        row["scenec_group"] = compose(th, o, p, b1)
        row["scenec_no_sharing"] = compose(th, o, p, b1, share=False)
        if anchor is not None:
            row["anchor_steps_with_endpoints_and_sharing"] = compose(th, res["anchor_B_ms"], p, b1)
            row["published"] = {"ratio": res["anchor_B_ms"] / p}
        res["schedules"][label] = row
        s = row["scenec_group"]
        line = (f"{label:18s} prefix={s['prefix']:2d} mixed={s['mixed']:2d} ones={s['ones']:2d}  "
                f"scenec group / {B} plain = {s['ratio']:.3f}  (no sharing {row['scenec_no_sharing']['ratio']:.3f}")
        if anchor is not None:
            line += (f", anchor steps {row['anchor_steps_with_endpoints_and_sharing']['ratio']:.3f}"
                     f", published {row['published']['ratio']:.3f}")
        print(line + ")", flush=True)

    if args.e2e:
        if not args.tiny:
            raise SystemExit("--e2e runs on the tiny model: use it with --tiny")
        res["e2e"] = e2e(args.group, args.steps)

    print(json.dumps({k: v for k, v in res.items() if k != "schedules"}, indent=1))
    out = args.out or (os.path.join(os.environ["OUT"], "bench_coupled.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)


def e2e(B: int, steps: int) -> dict:
    """The runtime end to end on the tiny model (CPU): a compiled group of B prompt variants."""
    from scenec.compiler import compile_scene
    from scenec.runtime.sampler import run_group, run_job
    from scenec.runtime.testing import tiny_backend

    be = tiny_backend()
    variants = "\n".join(f'      - {{id: v{i}, prompt: "a red fox number {i}"}}' for i in range(B))
    head = f"scenec: 1\nmodel: tiny\ncanvas: {{width: 128, height: 128}}\nsampler: {{steps: {steps}, seed: 1}}\n" \
           "background: {prompt: \"a misty forest\"}\n"
    out = {}
    with tempfile.TemporaryDirectory() as d:
        plain_path = Path(d) / "plain.yaml"
        plain_path.write_text(head.replace("seed: 1", f"seed: [{', '.join(str(i) for i in range(1, B + 1))}]"))
        plain = compile_scene(plain_path)
        run_job(be, plain, plain.jobs[0], decode=False)  # warm-up (encoders, allocator)

        def best(fn, n=2):  # min over n runs: CPU timings are noisy
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
            return min(out)

        out["plain_x%d_s" % B] = best(lambda: [run_job(be, plain, job, decode=False) for job in plain.jobs])
        for label, (kind, center, width) in SCHEDULES.items():
            sch = f"{{shape: {kind}, center: {center}" + (f", width: {width}}}" if width else "}")
            path = Path(d) / f"group-{kind}.yaml"
            path.write_text(head + f"groups:\n  - id: g\n    schedule: {sch}\n    variants:\n{variants}\n")
            plan = compile_scene(path)
            grp = plan.groups[0]
            row = {"shared_prefix": grp.shared_prefix}
            for share in (True, False):
                def go(share=share):
                    for _job, r in run_group(be, plan, grp, plan.jobs, share=share, decode=False):
                        assert not isinstance(r, Exception), r
                row["share_on_s" if share else "share_off_s"] = best(go)
            row["on_over_plain"] = row["share_on_s"] / out["plain_x%d_s" % B]
            row["off_over_plain"] = row["share_off_s"] / out["plain_x%d_s" % B]
            out[label] = row
            print(f"e2e {label:18s} group (sharing on) / {B} plain = {row['on_over_plain']:.3f}, "
                  f"sharing off {row['off_over_plain']:.3f}", flush=True)
    return out


if __name__ == "__main__":
    main()
