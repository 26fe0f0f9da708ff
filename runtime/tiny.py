"""The offline ``tiny`` Flux: every FLUX.1 component at a toy size, built in code, no downloads.

Geometry is Flux's (8x VAE, 16 latent channels, 2x2 patch packing → one token per 16x16 px,
64 packed channels), so plans compiled for ``tiny`` exercise the same shapes as FLUX.1-dev.
Weights are random but deterministic: ``torch.manual_seed`` before each component, so every run
builds the same bytes. Tokenizers are byte-level BPE with a fixed vocabulary built in code (all 256
byte symbols plus merges for a fixed list of words): any text tokenizes, nothing is trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SEED = 20250117
CLIP_MAX_LENGTH = 77

# FLUX.1-dev's scheduler config (scheduler/scheduler_config.json).
FLUX_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

# Words that become single tokens (after a leading space, byte-level style). Order is the merge order.
_WORDS = (
    "a an the of and with in on at to by from red green blue yellow white black grey gray brown orange "
    "purple pink golden silver fox cat dog bird horse cow sheep person man woman child face tree trees "
    "flower flowers grass meadow field forest mountain mountains river lake sea ocean sky cloud clouds sun "
    "moon star house castle city street road car boat bridge window door table chair cup book lamp light "
    "dark night day morning evening sunset running sitting standing flying small large big tiny old young "
    "photo painting portrait style detailed background blurry low quality"
).split()


@dataclass
class TinyFlux:
    """The components FluxPipeline takes, as keyword arguments (``FluxPipeline(**tiny.components())``)."""

    scheduler: object
    vae: object
    text_encoder: object
    tokenizer: object
    text_encoder_2: object
    tokenizer_2: object
    transformer: object

    def components(self) -> dict:
        return dict(scheduler=self.scheduler, vae=self.vae, text_encoder=self.text_encoder,
                    tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
                    tokenizer_2=self.tokenizer_2, transformer=self.transformer)


def _bpe_tokenizer(specials: list[str], template: str, pair: str, special_ids: list[tuple[str, int]] | None = None):
    """Byte-level BPE over a fixed vocabulary: specials, the 256 byte symbols, then merged words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for tok in specials + alphabet:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    byte_of = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for word in _WORDS:
        # the word as the pre-tokenizer sees it (leading space → "Ġ"), merged left to right
        sym = byte_of.pre_tokenize_str(" " + word)[0][0]
        cur = sym[0]
        for ch in sym[1:]:
            nxt = cur + ch
            if nxt not in vocab:
                merges.append((cur, ch))
                vocab[nxt] = len(vocab)
            cur = nxt
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=template, pair=pair, special_tokens=[(s, vocab[s]) for s in (special_ids or [])])
    return tok, vocab


def build_tokenizers():
    """(CLIP-style tokenizer, T5-style tokenizer) as ``PreTrainedTokenizerFast``, built offline."""
    from transformers import PreTrainedTokenizerFast

    # CLIP: <|startoftext|> text <|endoftext|>, padded with <|endoftext|> (as openai/clip-vit-large-patch14)
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    clip_tok, _ = _bpe_tokenizer([bos, eos], f"{bos} $A {eos}", f"{bos} $A {eos} $B {eos}", [bos, eos])
    clip = PreTrainedTokenizerFast(tokenizer_object=clip_tok, bos_token=bos, eos_token=eos, pad_token=eos,
                                   unk_token=eos, model_max_length=CLIP_MAX_LENGTH)
    # T5: text </s>, padded with <pad> (id 0, T5's decoder start id)
    pad, t5_eos, unk = "<pad>", "</s>", "<unk>"
    t5_tok, _ = _bpe_tokenizer([pad, t5_eos, unk], f"$A {t5_eos}", f"$A {t5_eos} $B {t5_eos}", [t5_eos])
    t5 = PreTrainedTokenizerFast(tokenizer_object=t5_tok, eos_token=t5_eos, pad_token=pad, unk_token=unk,
                                 model_max_length=512)
    return clip, t5


def tiny_clip_text(tokenizer, width: int):
    """A two-layer CLIP text encoder of the given width over the tiny tokenizer (random weights: seed first)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=width,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def tiny_flux_transformer(text_dim: int = 32):
    """The tiny Flux transformer alone (seeded first, as in :func:`build_tiny_flux`: the same bytes)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(SEED)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=text_dim, pooled_projection_dim=text_dim,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def build_tiny_flux(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> TinyFlux:
    """Build every component of the ``tiny`` model with fixed seeds (identical bytes on every run)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = build_tokenizers()
    text_dim = 32

    transformer = tiny_flux_transformer(text_dim)

    torch.manual_seed(SEED + 1)
    # 4 blocks = 3 downsamples = 8x, like FLUX.1's VAE (scaling/shift factors are FLUX.1's too)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
        sample_size=256, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False)

    torch.manual_seed(SEED + 2)
    text_encoder = tiny_clip_text(tokenizer, text_dim)

    torch.manual_seed(SEED + 3)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=text_dim, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0))

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)
    mods = [transformer, vae, text_encoder, text_encoder_2]
    for m in mods:
        if dtype != torch.float32 or torch.device(device).type != "cpu":  # already fp32 on CPU: skip (and its warning)
            m.to(device=device, dtype=dtype)
        m.eval().requires_grad_(False)
    return TinyFlux(scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer)


VISION_SEED = SEED + 7
VISION_SIZE = 32  # the tiny image encoder's input side


def tiny_clip_vision(width: int = 32, projection: bool = False):
    """A two-layer CLIP vision encoder (``CLIPVisionModel``, or ``CLIPVisionModelWithProjection`` as
    IP-Adapter uses) on 32 px images in 8 px patches, and its ``CLIPImageProcessor`` (random weights,
    seeded: the same bytes every run; the caller's RNG untouched)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(VISION_SEED)
        model = (CLIPVisionModelWithProjection if projection else CLIPVisionModel)(CLIPVisionConfig(
            hidden_size=width, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            image_size=VISION_SIZE, patch_size=8, projection_dim=width, hidden_act="quick_gelu"))
    processor = CLIPImageProcessor(size={"shortest_edge": VISION_SIZE},
                                   crop_size={"height": VISION_SIZE, "width": VISION_SIZE})
    return model.eval().requires_grad_(False), processor
