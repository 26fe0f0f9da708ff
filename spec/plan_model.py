"""The plan's model and canvas sections (docs/plan-format.md): what the runtime loads and draws on.

Keys that later versions added are left out of a plan that does not use them (``text_encoder``, the text
options, ``tiling``), so plans without them keep the hashes they had before.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_serializer

from .diagnostics import printable
from .plan_text import Embedding, without_absent_text_options

# A file name as plan text: plan.json is UTF-8, a file name need not be (shown with \xNN escapes).
FileText = Annotated[str, BeforeValidator(lambda v: printable(v) if isinstance(v, str) else v)]


class _T(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


class Lora(_T):
    """A LoRA as the runtime loads it: the file, its content digest, its scale and its key format.

    ``path`` and ``name`` say where it is (not part of any ``job_hash``: moving the file changes no
    image); ``sha256``, ``scale`` and ``format`` what it does."""

    name: str  # as the user wrote it (messages)
    path: FileText  # the absolute path of the .safetensors file
    sha256: str
    scale: float = 1.0
    format: Literal["diffusers", "kohya", "xlabs", "diffsynth"] = "diffusers"
    # its text-encoder layers act too (a whole-image LoRA that has some); absent from the plan when False, so
    # plans of LoRAs without them keep their hashes
    text_encoder: bool = False

    @model_serializer(mode="wrap")
    def _without_absent_text_encoder(self, handler):
        d = handler(self)
        if not self.text_encoder:
            d.pop("text_encoder", None)
        return d


class Model(_T):
    spec: str | None = None
    family: str = "flux"
    repo: str | None = None
    max_sequence_length: int | None = None
    lora: list[Lora] = []  # acting on the whole image, in order
    embeddings: list[Embedding] = []  # textual inversions in the text encoders (spec/plan_text.py)
    clip_skip: int | None = Field(None, ge=1)  # diffusers' clip_skip
    prompt_syntax: Literal["plain", "a1111", "comfy"] = "plain"  # how prompts are read (spec/prompt_syntax.py)
    # a single-file checkpoint's (``repo`` is the file) configs' directory or hub id, and its sha256
    config: str | None = None
    sha256: str | None = None
    vae: str | None = None  # a VAE replacing the model's: its directory or .safetensors file (compiler/vae.py)
    vae_sha256: str | None = None  # the file's

    @model_serializer(mode="wrap")
    def _without_absent(self, handler):
        return without_absent_text_options(handler(self))


class Canvas(_T):
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    tiling: Literal["none", "x", "y", "both"] = "none"  # seamless: circular padding (runtime/tiling.py)

    @model_serializer(mode="wrap")
    def _without_none(self, handler):  # plans without tiling keep their hashes
        d = handler(self)
        if d.get("tiling") == "none":
            d.pop("tiling")
        return d
