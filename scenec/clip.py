"""CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
Captioning") on the coupled-generation paper's scale (arXiv 2506.06826 reports 16.6–22.6): max(100 ·
cos(E_image, E_text), 0) — Hessel's w·max(cos, 0) with w = 100, as torchmetrics' CLIPScore computes it —
with a transformers ``CLIPModel``. torch and transformers are imported only inside these functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .metrics import EvalError, to_float_image

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
CLIP_W = 100.0  # the rescaling of the cosine (Hessel et al.'s w; 100 as the paper and torchmetrics report it)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    """CLIPScore with a transformers ``CLIPModel`` and tokenizer; images preprocessed by hand (resize the
    short side, centre crop, normalise), as CLIPImageProcessor does, so torchvision is not needed."""

    def __init__(self, model, tokenizer, name: str = "clip", image_size: int | None = None,
                 mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                 device: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.image_size = int(image_size or model.config.vision_config.image_size)
        self.mean = np.asarray(mean, np.float32).reshape(1, 1, 3)
        self.std = np.asarray(std, np.float32).reshape(1, 1, 3)
        self.device = device or "cpu"
        self.max_length = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    @classmethod
    def load(cls, spec: str, device: str | None = None) -> "ClipScorer":
        """``tiny`` (random, offline: noise scores), a local directory, or a hub id."""
        if spec == "tiny":
            return tiny_clip()
        import torch  # noqa: F401 - fail early with the import error, not inside transformers
        from transformers import AutoTokenizer, CLIPModel

        try:
            try:  # the local cache first: no network round trips when the model is here
                model = CLIPModel.from_pretrained(spec, local_files_only=True)
                tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
            except (OSError, ValueError):
                if Path(spec).exists():
                    raise
                model = CLIPModel.from_pretrained(spec)
                tok = AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError) as e:
            raise EvalError(f"CLIP model `{spec}` is not available here ({type(e).__name__}); pass --clip with a "
                            "local directory or a downloaded hub id, or --clip none to skip CLIPScore", exit_code=1) from e
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        pp = Path(spec) / "preprocessor_config.json"
        if pp.is_file():
            try:
                cfg = json.loads(pp.read_text())
                mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
            except ValueError:
                pass
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        return cls(model, tok, name=spec, mean=mean, std=std, device=device)

    def preprocess(self, image: Any) -> np.ndarray:
        """Resize the short side to ``image_size`` (bicubic), centre crop, normalise → float32 [3, S, S]."""
        from PIL import Image

        a = to_float_image(image)
        im = Image.fromarray(np.round(a * 255).astype(np.uint8))
        s = self.image_size
        w, h = im.size
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - s) // 2, (nh - s) // 2
        im = im.crop((left, top, left + s, top + s))
        x = (np.asarray(im, np.float32) / 255.0 - self.mean) / self.std
        return x.transpose(2, 0, 1)

    def cosine(self, images: Sequence[Any], texts: Sequence[str]) -> np.ndarray:
        """cos(E_image_i, E_text_i) for each pair."""
        import torch

        if len(images) != len(texts):
            raise ValueError("one text per image")
        if not images:
            return np.zeros(0)
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        pix = torch.from_numpy(np.stack([self.preprocess(x) for x in images]))
        dtype = next(self.model.parameters()).dtype
        with torch.no_grad():
            out = self.model(input_ids=tok["input_ids"].to(self.device),
                             attention_mask=tok["attention_mask"].to(self.device),
                             pixel_values=pix.to(self.device, dtype))
        ie = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        te = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return (ie * te).sum(-1).cpu().numpy().astype(np.float64)

    def score(self, images: Sequence[Any], texts: Sequence[str]) -> np.ndarray:
        """CLIPScore per pair: 100 · max(cos, 0)."""
        return CLIP_W * np.maximum(self.cosine(images, texts), 0.0)


def tiny_clip(seed: int = 0) -> ClipScorer:
    """A small random CLIP (CLIPConfig at toy size, the offline tokenizer of ``runtime/tiny.py``): scores
    are noise, but the whole metric path runs with no download."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from scenec.runtime.tiny import build_tokenizers

    tok, _ = build_tokenizers()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    return ClipScorer(CLIPModel(cfg).eval().requires_grad_(False), tok, name="tiny")


def load_clip(spec: str | None, device: str | None = None) -> ClipScorer | None:
    """``None``/``"none"`` → no CLIPScore; else :meth:`ClipScorer.load`."""
    if spec is None or str(spec).lower() == "none":
        return None
    return ClipScorer.load(spec, device=device)
