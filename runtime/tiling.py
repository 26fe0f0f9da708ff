"""Seamless tiling (``canvas.tiling``; A1111's "Tiling"): convolutions that pad circularly, so the image wraps.

A UNet without positional embeddings (SD, SDXL: its attention is permutation-equivariant, its group norms are
global) whose every convolution pads circularly is equivariant under circular shifts of the latent by whole
cells of its coarsest grid; so is the VAE decoder. The image then has no edge: shifting it by any multiple of
64 px is the image made from the shifted noise (tests/test_tiling.py), and its left side continues its right.

:func:`circular` patches the ``nn.Conv2d`` modules of a module for the ``x`` and/or ``y`` axis (the other keeps
its zero padding) and puts them back on exit; LoRA layers wrap the same convolutions and follow.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def _forward(conv: nn.Conv2d, wrap_x: bool, wrap_y: bool):
    py, px = conv.padding

    def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if px:
            x = F.pad(x, (px, px, 0, 0), mode="circular" if wrap_x else "constant")
        if py:
            x = F.pad(x, (0, 0, py, py), mode="circular" if wrap_y else "constant")
        return F.conv2d(x, weight, bias, conv.stride, 0, conv.dilation, conv.groups)

    return conv_forward


@contextmanager
def circular(module: nn.Module | None, tiling: str):
    """``module``'s padded convolutions wrap around along ``tiling`` (``x``, ``y``, ``both``; ``none``: as is)."""
    convs = [] if module is None or tiling == "none" else [
        m for m in module.modules() if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros"
        and isinstance(m.padding, tuple) and any(m.padding)]
    for m in convs:
        m._conv_forward = _forward(m, tiling in ("x", "both"), tiling in ("y", "both"))
    try:
        yield
    finally:
        for m in convs:
            del m._conv_forward  # the class's own again


class Circular:
    """:func:`circular` held open across calls (a run's setup … close)."""

    def __init__(self, module: nn.Module, tiling: str):
        self._cm = circular(module, tiling)
        self._cm.__enter__()

    def close(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None
