"""What a build is asked to do: :class:`BuildOptions` (the options of ``scenec build``, as data), and
:class:`BatchError`, a problem with those options themselves (exit 2)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


class BatchError(Exception):
    """A problem with the command line itself (bad --select, unknown executor); exit 2."""


@dataclass(frozen=True)
class BuildOptions:
    """The options of a batch build (``scenec build``; docs/batch.md). ``scenec status`` reads the
    planning ones."""

    # what is planned: which outputs, where, and what the cache compares
    out: str | Path | None = None  # -o: overrides each scene's output.dir (which is relative to the scene)
    model: str | None = None  # --model: overrides each scene's model
    lora: Iterable[str] = ()  # --lora PATH[:SCALE]: LoRAs on the whole image, after each scene's own
    select: Iterable[str] = ()  # --select terms (selection.parse_selectors)
    exclude: Iterable[str] = ()  # --exclude terms
    force: bool = False  # rebuild selected outputs even when up to date
    masks: bool = False  # also write canvas-size region masks beside the images (scenec.build.canvas_masks)
    weights_hash: str = "stat"  # identity of local model directories: stat | content
    overrides: tuple = ()  # --seed/--steps/--guidance/--set (scenec.spec.overrides.Override), every scene
    last_out: bool = False  # without `out`: each scene's outputs where its last `build -o` wrote (status)
    # how it runs
    dry_run: bool = False  # plan and report; build nothing
    device: str | None = None  # cuda | cpu (default: cuda when available)
    dtype: str | None = None  # bf16 | fp16 | fp32
    compile: bool = False  # torch.compile the denoiser's repeated blocks (runtime/compiling.py)
    batch_size: int = 1  # batch-compatible jobs of any scenes run together, up to this many
    executor: str = "local"  # local | ray
    address: str | None = None  # Ray cluster address (default: a local Ray)
    workers: int | None = None  # Ray actors (default: one per GPU, else one per CPU)
    offload: str = "none"  # none | model | sequential: diffusers' CPU offload (runtime/memory.py)
    quantize: str = "none"  # none | nf4 | int8 | fp8 (runtime/memory.py)
    # what it says
    quiet: bool = False  # no progress lines on stderr

    def __post_init__(self) -> None:
        object.__setattr__(self, "select", tuple(self.select or ()))
        object.__setattr__(self, "exclude", tuple(self.exclude or ()))
        object.__setattr__(self, "lora", tuple(self.lora or ()))
        object.__setattr__(self, "overrides", tuple(self.overrides or ()))

    @property
    def memory(self) -> dict:
        """How models are loaded: ``{"offload", "quantize", "compile"}`` (keyword arguments of ``load_backend``)."""
        return {"offload": self.offload, "quantize": self.quantize, "compile": self.compile}


def check_out_dir(out: str | Path | None) -> None:
    """-o must be a directory or a path that can become one: BatchError when it, or the nearest part of it that
    exists, is a file (`-o notes.txt/renders` failed every job as "cannot write", exit 1)."""
    if out is None:
        return
    p = Path(out)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise BatchError(f"-o {out}: not a directory" if q == p else f"-o {out}: {q} is not a directory")
            return
