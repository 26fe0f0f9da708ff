"""Cost of scenec's regional attention (EliGen, arXiv 2501.01097) in a Flux-sized DiT, beside the anchor.

One transformer forward (= one denoising step), batch 1, 1024x1024 → 4096 image tokens, 4 entities,
random weights (same arithmetic as real ones). Cases, in the geometry of the project's anchor
attention benchmark (passed with --anchor PATH: same boxes, same token counts, same inputs):

  base512      plain Flux, 512 text tokens, diffusers' stock processor (the floor)
  ours_plain512  the same through scenec's processors with no modifier (the plain path: goal ≤ 1.03×)
  tok2560      5 prompts x 512 tokens, no mask (token cost alone)
  ours2560     scenec's path: the Flux family's processors (runtime/families/flux.py) under the
               regional Mask modifier (runtime/attention.py), 4 entities x 512 tokens, the mask built
               once from a RegionalLayout (runtime/layout.py)
  ours1024     scenec's path, entity prompts at 128 tokens (real lengths in practice)
  anchor_*     the anchor's own dense / flex processors, when --anchor PATH is given

Each case runs eager, then (unless --no-compile) with every block torch.compiled (regional
compile, as the anchor's --compile). Ours is checked against the anchor's dense mask: the image
outputs must agree (relative error printed).

Usage: python bench/bench_attention.py [--tiny] [--reps N] [--cases a,b] [--anchor PATH] [--no-compile]
--tiny: a small CPU smoke run (eager only unless --compile). --anchor PATH: the anchor attention
benchmark's script (also looked for in bench/anchor/ of this checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from common import load_anchor, use_checkout

ROOT = Path(__file__).resolve().parent.parent






def main() -> None:
    use_checkout()
    from diffusers import FluxTransformer2DModel

    from scenec.runtime.attention import DOUBLE, SINGLE, Attention, Mask
    from scenec.runtime.families.flux import FluxProcessor
    from scenec.runtime.layout import RegionalLayout, build_mask, region_membership

    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--cases", default="")
    ap.add_argument("--anchor", default=None, help="the anchor attention benchmark's script (default: bench/anchor/)")
    ap.add_argument("--compile", action="store_true", help="also run per-block compiled (default on CUDA)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compiled-cases", default="base512,ours_plain512,ours1024,anchor_flex1024",
                    help="the cases of the compiled pass (each compiles for its own length; '' = all)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    do_compile = (dev == "cuda" or args.compile) and not args.no_compile
    torch._dynamo.config.recompile_limit = 64  # every case compiles for its own length: never fall back to eager
    anchor = load_anchor(args.anchor, "anchor_attention")

    if args.tiny:  # the anchor's tiny config
        cfg = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                   axes_dims_rope=(4, 4, 8))
        grid, txt, trimmed = (8, 8), 16, 4
        reps = min(args.reps, 3)
    else:
        cfg = dict(guidance_embeds=True)
        grid, txt, trimmed = (64, 64), 512, 128
        reps = args.reps
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(dev):
        model = FluxTransformer2DModel(**cfg).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    inner_in, jd, pd = cfg.get("in_channels", 64), cfg.get("joint_attention_dim", 4096), cfg.get("pooled_projection_dim", 768)
    h, w = grid
    # the anchor's boxes: the four quadrants shrunk by one token
    boxes = [(0, 0, h // 2, w // 2), (0, w // 2, h // 2, w), (h // 2, 0, h, w // 2), (h // 2, w // 2, h, w)]
    boxes = [(y0 + 1, x0 + 1, y1 - 1, x1 - 1) for (y0, x0, y1, x1) in boxes]
    masks = []
    for (y0, x0, y1, x1) in boxes:
        m = torch.zeros(h, w)
        m[y0:y1, x0:x1] = 1.0
        masks.append(m.numpy())
    regions = region_membership(masks, grid)

    def inputs(n_txt, n_pad=0):
        g = torch.Generator(dev).manual_seed(1)  # same draws as the anchor's inputs()
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(),
                                             indexing="ij"), -1).reshape(-1, 3)
        hs = torch.randn(1, h * w, inner_in, generator=g, device=dev, dtype=dtype)
        ehs = torch.randn(1, n_txt, jd, generator=g, device=dev, dtype=dtype)
        pooled = torch.randn(1, pd, generator=g, device=dev, dtype=dtype)
        if n_pad:
            ehs = torch.cat([ehs, ehs.new_zeros(1, n_pad, jd)], 1)
        return dict(hidden_states=hs, encoder_hidden_states=ehs, pooled_projections=pooled,
                    timestep=torch.tensor([0.5], device=dev, dtype=dtype),
                    guidance=torch.tensor([3.5], device=dev, dtype=dtype),
                    img_ids=img_ids.to(dev, dtype), txt_ids=torch.zeros(n_txt + n_pad, 3, device=dev, dtype=dtype),
                    return_dict=False)

    stock = model.transformer_blocks[0].attn.processor.__class__
    # the Flux family's attention state and processors, as FluxBackend installs them: flex on CUDA
    ctl = Attention("flex" if dev == "cuda" else "sdpa")
    pad_multiple = 128 if ctl.impl == "flex" else 1  # FluxBackend's text padding

    def set_proc(p):
        for b in list(model.transformer_blocks) + list(model.single_transformer_blocks):
            b.attn.processor = p

    def install_ours():
        for b in model.transformer_blocks:
            b.attn.processor = FluxProcessor(ctl, DOUBLE)
        for b in model.single_transformer_blocks:
            b.attn.processor = FluxProcessor(ctl, SINGLE)

    def timed(inp):
        with torch.inference_mode():
            out = model(**inp)[0]
            times = []
            if dev == "cuda":
                for _ in range(2):
                    model(**inp)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                for _ in range(reps):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record(); model(**inp); e.record(); torch.cuda.synchronize()
                    times.append(s.elapsed_time(e))
                mem = torch.cuda.max_memory_allocated() / 2**30
            else:
                for _ in range(reps):
                    t0 = time.perf_counter(); model(**inp); times.append((time.perf_counter() - t0) * 1e3)
                mem = 0.0
        return out.float(), statistics.median(times), mem

    def run(name, each, mode):
        n_txt = sum(each)
        t0 = time.perf_counter()
        if mode == "plain":
            set_proc(stock())
            out, ms, mem = timed(inputs(n_txt))
            setup = 0.0
        elif mode == "ours_plain":  # scenec's processors with no modifier: the path of a scene without entities
            install_ours()
            ctl.clear()
            out, ms, mem = timed(inputs(n_txt))
            setup = 0.0
        elif mode == "ours":
            install_ours()
            lay = RegionalLayout(list(each), regions, "open", pad_multiple)
            s0 = time.perf_counter()
            built = build_mask(lay, ctl.impl, dev, "regional")  # once per job and layout in the runtime
            setup = time.perf_counter() - s0
            # attention.blocks: all — the regional method's sites on Flux (runtime/methods/regional.py)
            ctl.set([Mask({h * w: built}, frozenset({DOUBLE.name, SINGLE.name}))], n_img=h * w)
            try:
                out, ms, mem = timed(inputs(n_txt, lay.n_pad))
            finally:
                ctl.clear()
        else:  # the anchor's processors
            allow = anchor.region_allow(list(each), len(each), grid, boxes, dev)
            s0 = time.perf_counter()
            if mode == "anchor_dense":
                set_proc(anchor.DenseMaskProcessor(allow))
            else:
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention

                flex = torch.compile(flex_attention, dynamic=False) if dev == "cuda" else flex_attention
                bm = create_block_mask(lambda b, hh, q, k: allow[q, k], None, None, allow.shape[0], allow.shape[0],
                                       device=dev)
                set_proc(anchor.FlexProcessor(bm, flex))
            setup = time.perf_counter() - s0
            out, ms, mem = timed(inputs(n_txt))
        return out, dict(ms=ms, peak_gib=mem, tokens=n_txt + h * w, mask_setup_ms=setup * 1e3,
                         wall_s=time.perf_counter() - t0)

    k = 4
    cases = [("base512", [txt], "plain"), ("ours_plain512", [txt], "ours_plain"), ("tok2560", [txt] * (k + 1), "plain"),
             ("ours2560", [txt] * (k + 1), "ours"), ("ours1024", [txt] + [trimmed] * k, "ours")]
    if anchor is not None:
        cases += [("anchor_dense2560", [txt] * (k + 1), "anchor_dense"),
                  ("anchor_flex2560", [txt] * (k + 1), "anchor_flex"),
                  ("anchor_dense1024", [txt] + [trimmed] * k, "anchor_dense"),
                  ("anchor_flex1024", [txt] + [trimmed] * k, "anchor_flex")]
    else:
        print("no anchor attention benchmark (--anchor PATH): running scenec's cases only", file=sys.stderr)
    if args.cases:
        keep = set(args.cases.split(","))
        cases = [c for c in cases if c[0] in keep]

    results, outs = {}, {}
    meta = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", dtype=str(dtype),
                impl=ctl.impl, torch=torch.__version__, tiny=args.tiny)

    def save(res):
        """$OUT/bench_attention[_tiny].json, rewritten after every case: a run cut short keeps what it measured."""
        out_dir = os.environ.get("OUT")
        if out_dir:
            from torch._dynamo.utils import counters

            doc = {"meta": {**meta, "dynamo": dict(counters["stats"])}, "results": res}
            with open(os.path.join(out_dir, "bench_attention%s.json" % ("_tiny" if args.tiny else "")), "w") as f:
                json.dump(doc, f, indent=1)
    passes = [("eager", False)] + ([("compiled", True)] if do_compile else [])
    for label, comp in passes:
        if comp:
            for b in list(model.transformer_blocks) + list(model.single_transformer_blocks):
                b.compile()
        keep_c = set(filter(None, args.compiled_cases.split(",")))
        for name, each, mode in cases:
            if comp and keep_c and name not in keep_c:
                continue
            if mode == "anchor_flex" and dev == "cpu":
                import warnings

                warnings.filterwarnings("ignore", message=".*flex_attention.*")
            out, r = run(name, each, mode)
            key = f"{name}@{label}"
            outs[key], results[key] = out, r
            save(results)
            print(f"{key:26s} tokens={r['tokens']:5d} median_ms={r['ms']:9.2f} peak_GiB={r['peak_gib']:6.2f} "
                  f"mask_setup_ms={r['mask_setup_ms']:8.2f}", flush=True)
        base = results.get(f"base512@{label}", {}).get("ms")
        for key, r in results.items():
            if key.endswith("@" + label) and base:
                r["x_base"] = r["ms"] / base
        for ours, ref in (("ours2560", "anchor_dense2560"), ("ours1024", "anchor_dense1024"),
                          ("ours1024", "anchor_flex1024"), ("ours_plain512", "base512")):
            a, b = outs.get(f"{ours}@{label}"), outs.get(f"{ref}@{label}")
            if a is not None and b is not None:
                rel = ((a - b).norm() / b.norm()).item()
                results[f"relerr_{ours}_vs_{ref}@{label}"] = rel
                print(f"rel_err {ours} vs {ref} ({label}): {rel:.2e}")
    save(results)
    print(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
