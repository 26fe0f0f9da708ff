"""A VAE replacing the model's for a plan (``model.vae``; compiler/vae.py): A1111's "SD VAE", diffusers'
``AutoencoderKL`` passed as a pipeline's ``vae``.

For the run — its encodes (init images, control images, references) and its decode — the pipeline's ``vae`` is
the plan's; on close it is the model's own again, so the next plan runs on the model as loaded. A directory loads
with ``AutoencoderKL.from_pretrained``, a single ``.safetensors`` file with ``AutoencoderKL.from_single_file``
and the model's own VAE config (A1111's VAE files carry no config); safetensors only. Loaded VAEs are kept on the
backend (a few), read again when their files change. The VAE keeps the backend's dtype, and the SDXL family's
fp16 upcast follows its config (``force_upcast``: false for madebyollin/sdxl-vae-fp16-fix, so it decodes in fp16).
"""

from __future__ import annotations

import json
import tempfile
from collections import OrderedDict
from pathlib import Path

from scenec.spec.errors import ModelUnavailable

from ..cache import dir_stamp, file_stamp
from .base import Method

KEPT = 2  # VAEs kept loaded per backend


def load_vae(backend, where: str):
    """The backend's VAE from ``where`` (a diffusers directory or a .safetensors file), loaded once."""
    loaded = backend.__dict__.setdefault("vaes", OrderedDict())
    key = (where, file_stamp(where) if Path(where).is_file() else dir_stamp(where))
    if key not in loaded:
        for old in [k for k in loaded if k[0] == where]:
            del loaded[old]
        loaded[key] = _load(backend, where)
        while len(loaded) > KEPT:
            loaded.popitem(last=False)
    loaded.move_to_end(key)
    return loaded[key]


def _load(backend, where: str):
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    own = backend.pipe.vae
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # from_single_file's notes on dtypes: the VAE keeps the backend's
    try:
        if Path(where).is_file():
            with tempfile.TemporaryDirectory(prefix="scenec-vae-") as cfg:  # the model's own VAE config
                (Path(cfg) / "config.json").write_text(json.dumps({**dict(own.config), "_class_name": "AutoencoderKL"}))
                vae = AutoencoderKL.from_single_file(where, config=cfg, torch_dtype=backend.dtype,
                                                     local_files_only=True)
        else:
            vae = AutoencoderKL.from_pretrained(where, torch_dtype=backend.dtype, use_safetensors=True,
                                                local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelUnavailable(f"VAE {where}: cannot load it ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    finally:
        diffusers_logging.set_verbosity(level)
    if vae.config.latent_channels != own.config.latent_channels:
        raise ModelUnavailable(f"VAE {where} has {vae.config.latent_channels} latent channels; this model's has "
                               f"{own.config.latent_channels}")
    vae = vae.requires_grad_(False).eval()
    offload = (getattr(backend, "memory", None) or {}).get("offload", "none")
    if offload == "model":
        # as the model's own VAE under enable_model_cpu_offload: its hook puts the denoiser back on the CPU when the
        # VAE runs (unhooked, the UNet/transformer stayed on the device through the decode and the next plan's
        # text encoding, beside the text encoders), and the VAE goes back to the CPU when the run ends
        from accelerate import cpu_offload_with_hook

        prev = getattr(getattr(own, "_hf_hook", None), "prev_module_hook", None)
        vae._scenec_offload = cpu_offload_with_hook(vae, backend.device, prev_module_hook=prev)[1]
        return vae
    if offload == "sequential":  # streamed from the CPU, as the model's own
        from accelerate import cpu_offload

        cpu_offload(vae, execution_device=backend.device)
        return vae
    return vae.to(backend.device)


class Vae(Method):
    name = "vae"

    @classmethod
    def wants(cls, plan, job) -> bool:
        return plan.model.vae is not None

    def capabilities(self) -> tuple[str, ...]:
        return ()  # every family runs an AutoencoderKL

    def setup(self) -> None:
        be = self.run.backend
        self.own = be.pipe.vae
        be.pipe.vae = load_vae(be, self.run.rows[0].plan.model.vae)  # batch rows share the model section

    def close(self) -> None:
        own = getattr(self, "own", None)
        if own is not None:
            mine = self.run.backend.pipe.vae
            self.run.backend.pipe.vae = own
            if getattr(mine, "_scenec_offload", None) is not None:
                mine._scenec_offload.offload()
