"""Write a random-weight Flux diffusers directory (safetensors) for end-to-end `scenec build` runs on a GPU.

The transformer has FLUX.1's full width (24 heads × 128 = 3072, 4096 image tokens at 1024²: the same
arithmetic per block as the real model) but only ``--layers`` double and ``--single`` single blocks, so
the directory is written and loaded in seconds; the text encoders, tokenizers and VAE are the ``tiny``
model's (built offline, runtime/tiny.py). ``--small`` makes the transformer tiny too (CPU smoke runs).
A local directory is what users pass as ``--model DIR``: the family is read from its model_index.json.

Usage: python bench/make_random_model.py OUT_DIR [--layers 2] [--single 4] [--small] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import use_checkout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--small", action="store_true", help="a tiny-width transformer (CPU smoke)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    use_checkout()
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from scenec.runtime.tiny import build_tiny_flux

    t0 = time.perf_counter()
    tiny = build_tiny_flux()
    parts = tiny.components()
    text_dim = parts["text_encoder_2"].config.d_model
    width = dict(attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6)) if args.small else {}
    torch.manual_seed(0)
    with torch.device(args.device):
        parts["transformer"] = FluxTransformer2DModel(
            in_channels=64, num_layers=args.layers, num_single_layers=args.single, joint_attention_dim=text_dim,
            pooled_projection_dim=text_dim, guidance_embeds=True, **width).to(torch.bfloat16)
    pipe = FluxPipeline(**parts)
    pipe.save_pretrained(args.out, safe_serialization=True)
    n = sum(p.numel() for p in parts["transformer"].parameters())
    print(f"wrote {args.out}: transformer {n / 1e9:.2f} B parameters ({args.layers} double + {args.single} single "
          f"blocks, width {parts['transformer'].inner_dim}) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
