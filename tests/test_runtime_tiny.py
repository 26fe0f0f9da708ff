"""runtime.tiny: the offline tiny Flux builds deterministically and runs in diffusers' FluxPipeline."""

import hashlib

import torch

from scenec.runtime.tiny import build_tiny_flux, build_tokenizers


def _digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_tokenizers_any_text():
    clip, t5 = build_tokenizers()
    assert clip.model_max_length == 77
    ids = clip("a red fox").input_ids
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id and len(ids) == 5  # words are merged
    for text in ("", "ünïcode 🦊 — ok", "x" * 500):
        assert t5(text, truncation=True, max_length=32).input_ids[-1] == t5.eos_token_id
        assert len(clip(text, padding="max_length", max_length=77, truncation=True).input_ids) == 77
    assert t5("a fox", padding="max_length", max_length=8).input_ids[-1] == t5.pad_token_id
    assert build_tokenizers()[1].get_vocab() == t5.get_vocab()


def test_weights_identical_every_build():
    a, b = build_tiny_flux(), build_tiny_flux()
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert _digest(getattr(a, name)) == _digest(getattr(b, name)), name
    assert a.vae.config.block_out_channels and 2 ** (len(a.vae.config.block_out_channels) - 1) == 8
    assert a.transformer.config.in_channels == 64 and a.vae.config.latent_channels == 16


def test_flux_pipeline_runs():
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**build_tiny_flux().components())
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red fox in a meadow", height=256, width=256, num_inference_steps=4, guidance_scale=3.5,
               generator=torch.Generator().manual_seed(0), max_sequence_length=32).images[0]
    assert img.size == (256, 256)
