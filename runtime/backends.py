"""Choose the backend by the plan's model family: ``flux`` → runtime/flux.py, ``sd`` → runtime/sd.py."""

from __future__ import annotations

from .errors import Unsupported


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


def load_backend(model: dict | str, device=None, dtype=None, **kw):
    """Load the backend of a plan's ``model`` dict (or a spec string: ``tiny-sd``/``sd15``/``sd21`` are SD)."""
    if isinstance(model, str):
        from scenec.compiler.caps import ALIASES

        info = ALIASES.get(model)
        fam = info.family.name if info is not None else ("flux" if "flux" in model.lower() or model == "tiny" else "sd")
        model = {"spec": model, "family": fam, "repo": info.repo if info is not None else model}
    family = model.get("family", "flux")
    _import_diffusers_quietly()
    if family == "sd":
        from .sd import load_sd_backend

        return load_sd_backend(model, device=device, dtype=dtype)
    if family == "flux":
        from .flux import load_backend as load_flux

        return load_flux(model, device=device, dtype=dtype, **kw)
    raise Unsupported(f"model family {family!r} ({model.get('spec')}) is not supported by this runtime")
