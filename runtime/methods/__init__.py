"""The methods: each one module, written once against the Backend protocol, registered here.

A method is a class with the :class:`Method` hooks; the sampler (runtime/sampler.py) makes one
instance per run for every registered method whose :meth:`Method.wants` says the run's jobs need it,
and calls the hooks in registration order:

- :meth:`setup` once, after the initial latents are drawn (and :meth:`close` once when the run ends: after
  the decode, which still sees what the methods set up — the plan's VAE, tiling);
- :meth:`run_op` for the step ops the method owns (``ops``);
- around each ``denoise`` op: :meth:`before_denoise`, then for every model call :meth:`shape` (which
  streams the call's text holds) and, once the family has assembled that text, :meth:`modifiers`
  (attention modifiers) and :meth:`denoiser_inputs` (extra denoiser inputs, computed by the family right
  before its forward); then :meth:`output` (the model output before the solver step) and
  :meth:`after_step` (the new latent);
- :meth:`sampled` once when sampling has ended, before the decode (free what only sampling needed: an
  offloaded ControlNet).

Adding a method: a module here with a :class:`Method` subclass, and its class in :func:`registered` (or
:func:`register` from outside the package).
"""

from __future__ import annotations

from .base import Method


def registered() -> list[type[Method]]:
    """The methods in hook order (imported on first use: they import torch)."""
    from .control import ControlNet
    from .coupling import Coupling
    from .inpaint import Inpaint
    from .lora import Lora
    from .oneway import OneWay
    from .regional import Regional
    from .tiling import Tiling
    from .vae import Vae
    from .visual import VisualPrompts

    # LoRA first: its hooks are on the model before another method's setup runs it (COW's inversion)
    # the plan's VAE before any method encodes an image or tiling wraps its decoder; tiling before COW's setup too:
    # its inversion runs the denoiser
    return [Lora, Vae, Tiling, Coupling, Regional, OneWay, Inpaint, VisualPrompts, ControlNet, *EXTRA]


EXTRA: list[type[Method]] = []  # methods registered at run time (plugins, tests): appended after the built-ins


def register(cls: type[Method]) -> type[Method]:
    """Register a method class (usable as a decorator)."""
    if cls not in EXTRA:
        EXTRA.append(cls)
    return cls


__all__ = ["EXTRA", "Method", "register", "registered"]
