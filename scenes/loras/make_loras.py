"""Write the LoRA the example scenes use: ``fox-style.safetensors``, a random rank-2 LoRA for the offline
``tiny`` Flux model (every Linear layer of its transformer), in diffusers' naming.

Random, so it styles nothing: it shows where a LoRA acts (scenes/fox-lora.yaml puts it on one entity)
and exercises the whole path offline. For a real model, point ``file:`` at a LoRA trained for it.
Deterministic (a fixed seed): running it again rewrites the same bytes. Run from anywhere:

    python scenes/loras/make_loras.py
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    import torch

    from scenec.runtime.testing import lora_file, lora_layers, tiny_backend

    denoiser = tiny_backend().denoiser
    names = [n for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear)]
    lora_file(lora_layers(denoiser, names, rank=2, seed=7, std=0.5), HERE / "fox-style.safetensors")


if __name__ == "__main__":
    main()
