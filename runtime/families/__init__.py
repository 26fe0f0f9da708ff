"""Model families: the registry the runtime loads backends from.

Each family is one module under this package with a ``load(model, device, dtype, **kw)`` returning a
backend that implements runtime/backend.Backend. The compiler knows the same families by name, with
their geometry and capabilities, in compiler/caps.py. Adding a family: a module here, its entry in
:data:`FAMILIES`, and its declaration in compiler/caps.py.
"""

from __future__ import annotations

import importlib

from scenec.spec.errors import ModelUnavailable, Unsupported
from scenec.spec.plan import Model

FAMILIES = {"flux": "scenec.runtime.families.flux", "sd": "scenec.runtime.families.sd",
            "sdxl": "scenec.runtime.families.sdxl"}


def _import_diffusers_quietly() -> None:
    """Import diffusers with transformers' import-time notices muted (e.g. "requires torchvision,
    falling back to the PIL image processor"): they concern image processors scenec never uses."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        import diffusers  # noqa: F401
        from diffusers import FluxPipeline, StableDiffusionPipeline  # noqa: F401
    finally:
        transformers.logging.set_verbosity(level)


_TRUNCATION_NOTICES = ("Token indices sequence length is longer than", "The following part of your input was truncated")


def _drop_truncation_notice(record) -> bool:
    return not str(record.getMessage()).startswith(_TRUNCATION_NOTICES)


def mute_truncation_notices() -> None:
    """Drop transformers' and diffusers' notices that a prompt was cut (the second one prints the whole cut
    text: 50 KB for a long prompt): ``scenec validate`` and the build already warned, at the prompt, with
    the count and the cut (compiler/advice.py)."""
    import logging

    import diffusers.utils.logging as dl
    import transformers

    transformers.logging.get_logger("transformers")  # the libraries' root handlers exist once a logger is asked for
    dl.get_logger("diffusers")
    for name in ("transformers", "diffusers"):
        for h in logging.getLogger(name).handlers:
            if _drop_truncation_notice not in h.filters:
                h.addFilter(_drop_truncation_notice)


def as_model(model: Model | dict | str) -> Model:
    """A plan's model from its typed form, its dict, or a spec string (an alias, an id or a directory)."""
    if isinstance(model, Model):
        return model
    if isinstance(model, dict):
        return Model.model_validate(model)
    from scenec.compiler.caps import UnknownModel, model_info

    try:
        info = model_info(model)
    except UnknownModel as e:
        raise ModelUnavailable(str(e)) from None
    return Model(spec=model, family=info.family.name, repo=info.repo, max_sequence_length=info.max_sequence_length,
                 config=info.config, sha256=info.sha256)


def load_backend(model: Model | dict | str, device=None, dtype=None, compile: bool = False, **kw):
    """Load the backend of a plan's model with its family's module (``tiny``, ``tiny-sd``, aliases, ids).
    ``offload`` and ``quantize`` in ``kw``: the memory modes (runtime/memory.py); the backend records them
    as ``memory`` (each image's sidecar shows them). ``compile``: the denoiser's repeated blocks
    torch.compiled (runtime/compiling.py), whatever the family."""
    m = as_model(model)
    if m.family not in FAMILIES:
        raise Unsupported(f"model family {m.family!r} ({m.spec}) is not supported by this runtime")
    _import_diffusers_quietly()
    mute_truncation_notices()
    be = importlib.import_module(FAMILIES[m.family]).load(m, device=device, dtype=dtype, **kw)
    be.memory = {"offload": kw.get("offload", "none"), "quantize": kw.get("quantize", "none")}
    if compile:
        from ..compiling import compile_blocks, denoiser_of

        compile_blocks(denoiser_of(be.pipe))
    return be
