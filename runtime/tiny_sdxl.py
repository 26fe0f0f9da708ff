"""The offline ``tiny-sdxl``: every Stable Diffusion XL component at a toy size, built in code.

SDXL's structure (diffusers' own test configuration, shrunk): two CLIP text encoders whose
penultimate hidden states are concatenated (the second with a projection giving the pooled vector),
a UNet with ``text_time`` added conditioning (pooled vector + size micro-conditioning) and attention
from 1/16 of the canvas down. Weights are random but deterministic (``torch.manual_seed`` before each
component); the tokenizer is tiny.py's offline CLIP-style BPE, used for both encoders.
"""

from __future__ import annotations

import torch

from .tiny import CLIP_MAX_LENGTH, build_tokenizers, tiny_clip_text
from .tiny_sd import SD_SCHEDULER_CONFIG

SEED = 20251202
TEXT_DIM = 32  # each encoder; the UNet's keys are both: 64
TIME_DIM = 8  # per micro-conditioning number (6 of them)


def build_tiny_sdxl(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> dict:
    """The components ``StableDiffusionXLPipeline`` takes, fixed seeds."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer, _ = build_tokenizers()

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1),
        cross_attention_dim=2 * TEXT_DIM, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=6 * TIME_DIM + TEXT_DIM, norm_num_groups=8)

    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=256,
        scaling_factor=5.0, force_upcast=False)  # random weights encode to std ≈ 0.2: scaled to ≈ unit std

    torch.manual_seed(SEED + 2)
    text_encoder = tiny_clip_text(tokenizer, TEXT_DIM)
    torch.manual_seed(SEED + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=TEXT_DIM,
        hidden_act="gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))

    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    for m in (unet, vae, text_encoder, text_encoder_2):
        if dtype != torch.float32 or torch.device(device).type != "cpu":
            m.to(device=device, dtype=dtype)
        m.eval().requires_grad_(False)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer, scheduler=scheduler, image_encoder=None, feature_extractor=None,
                force_zeros_for_empty_prompt=True)
