"""The offline ``tiny-sd``: every Stable Diffusion component at a toy size, built in code, no downloads.

Geometry is SD's (8x VAE, 4 latent channels, UNet with cross-attention at 1/8, 1/16, 1/32 and the
mid block at 1/64 of the canvas), so plans compiled for ``tiny-sd`` exercise every grid the SD family
lowers to (``latent``, ``a16``, ``a32``, ``a64``). Weights are random but deterministic
(``torch.manual_seed`` before each component). The tokenizer is tiny.py's offline CLIP-style BPE;
the scheduler is SD 1.5's DDIM configuration.
"""

from __future__ import annotations

import torch

from .tiny import build_tokenizers, tiny_clip_text

SEED = 20250321

# stable-diffusion-v1-5's scheduler config, as DDIM
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    prediction_type="epsilon",
)


def build_tiny_sd(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> dict:
    """The components ``StableDiffusionPipeline`` takes (no safety checker), fixed seeds."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    tokenizer, _ = build_tokenizers()
    text_dim = 32

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim, attention_head_dim=8, norm_num_groups=8)

    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=256,
        scaling_factor=5.0)  # random weights encode to std ≈ 0.2: scaled to ≈ unit std, as SD's 0.18215 does

    torch.manual_seed(SEED + 2)
    text_encoder = tiny_clip_text(tokenizer, text_dim)

    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    for m in (unet, vae, text_encoder):
        if dtype != torch.float32 or torch.device(device).type != "cpu":
            m.to(device=device, dtype=dtype)
        m.eval().requires_grad_(False)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
