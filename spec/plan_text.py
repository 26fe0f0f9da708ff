"""The plan's text options (``model.embeddings``, ``model.clip_skip``; docs/plan-format.md).

Textual inversion (Gal et al. 2022, "An Image is Worth One Word", arXiv 2208.01618): a word whose input
embedding was learned, added to a CLIP tokenizer and text encoder as diffusers' ``load_textual_inversion``
adds it. CLIP skip: the text read from an earlier layer of the encoder (diffusers' ``clip_skip``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from .diagnostics import printable


class Embedding(BaseModel):
    """One textual-inversion embedding as the runtime loads it: its file, digest, token and shape.

    ``path`` and ``name`` say where it is (not part of any ``job_hash``); ``sha256`` and ``token`` what it does."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str  # as the user wrote it (messages)
    path: Annotated[str, BeforeValidator(lambda v: printable(v) if isinstance(v, str) else v)]
    sha256: str
    token: str = Field(min_length=1, pattern=r"^\S+$")
    vectors: int = Field(1, ge=1)  # tokens it becomes: `token`, `token_1`, … `token_{vectors-1}`
    # the file's tensor per text encoder, in the pipeline's order: ["emb_params"] (SD), ["clip_l", "clip_g"] (SDXL)
    keys: list[str] = Field(min_length=1, max_length=2)


def without_absent_text_options(d: dict) -> dict:
    """A plan model as serialised: no ``embeddings``/``clip_skip`` keys when it has none, no ``prompt_syntax`` when
    prompts are read plainly, so plans without them keep the hashes they had before plans carried them."""
    if d.get("prompt_syntax") == "plain":
        d.pop("prompt_syntax")
    if not d.get("embeddings"):
        d.pop("embeddings", None)
    for k in ("clip_skip", "config", "sha256", "vae", "vae_sha256"):  # config, sha256: a single-file checkpoint's
        if d.get(k) is None:
            d.pop(k, None)
    return d
