"""ControlNet conditions (``control``; Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models", arXiv 2302.05543, §3.2 and Eq. 2): for every UNet call inside a control's window, its ControlNet reads
the call's latent input, timestep, the global prompt's text and the control image, and its residuals, scaled
by ``scale``, are added to the UNet's skip connections and middle block (diffusers' ``ControlNetModel`` and
``down_block_additional_residuals`` / ``mid_block_additional_residual``, as ``StableDiffusionControlNetPipeline``
and the SDXL one call them). Several controls add their residuals (diffusers' MultiControlNet). On Flux the
ControlNet is a ``FluxControlNetModel`` and its residuals go to the transformer's blocks (control_flux.py).

The ControlNet's own cross-attention is diffusers' stock one and reads the global prompt only: entity prompts
act through the UNet's regional attention, not through the ControlNet. Without entities its text is the whole
prompt, so a job reproduces the ControlNet pipeline (tests/test_controlnet.py).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from scenec.spec.errors import ModelUnavailable, PlanError

from ..cache import dir_stamp
from ..memory import place_module
from . import control_flux
from .base import Method

KEPT = 4  # ControlNets kept loaded per backend (least recently used first out)


def tiny_controlnet(unet) -> torch.nn.Module:
    """The tiny models' ControlNet: diffusers' ``ControlNetModel.from_unet`` (the UNet's encoder copied), its zero
    convolutions and its control image encoder (``controlnet_cond_embedding``, whose last convolution is zero too,
    the rest drawn from the global random state) given small seeded random weights instead, so that a tiny control
    visibly acts, through its image."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet)
    g = torch.Generator().manual_seed(0)
    for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
        for p in conv.parameters():
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    for p in net.controlnet_cond_embedding.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def load_controlnet(backend, model: str | None) -> torch.nn.Module:
    """The backend's ControlNet for a plan control's ``model`` (a directory; None: the tiny built-in), loaded
    once (safetensors only), frozen, on the backend's device and dtype; read again when its files changed (a
    backend kept across builds: ``scenec tune``, the Python API), as visual prompts' encoders are."""
    loaded = backend.__dict__.setdefault("controlnets", OrderedDict())
    key = (model, dir_stamp(model))
    if key not in loaded:
        for old in [k for k in loaded if k[0] == model]:
            del loaded[old]  # the same directory before its files changed
        flux = getattr(backend, "family", "") == "flux"
        if model is None:
            if getattr(backend, "model_id", "") not in ("tiny-sd", "tiny-sdxl", "tiny"):
                raise PlanError("a control without `model`: only the tiny models build a ControlNet in code")
            # from a fresh tiny model (the same deterministic weights): the backend's may be offloaded or quantised
            if flux:
                net = control_flux.build_tiny()
            elif backend.model_id == "tiny-sd":
                from ..tiny_sd import build_tiny_sd

                net = tiny_controlnet(build_tiny_sd()["unet"])
            else:
                from ..tiny_sdxl import build_tiny_sdxl

                net = tiny_controlnet(build_tiny_sdxl()["unet"])
        else:
            from diffusers import ControlNetModel

            why = wrong_class(model, flux)
            if why:
                raise ModelUnavailable(f"ControlNet {model} is not for {getattr(backend, 'model_id', 'this model')}: "
                                       f"{why}")
            try:
                if flux:
                    net = control_flux.load(model, backend.dtype)
                else:
                    net = ControlNetModel.from_pretrained(model, use_safetensors=True, torch_dtype=backend.dtype)
            except (OSError, ValueError) as e:
                raise ModelUnavailable(f"ControlNet {model}: cannot load it ({type(e).__name__}: "
                                       f"{str(e).splitlines()[0][:200]})") from None
            why = control_flux.misfit(net, backend.transformer) if flux else misfit(net, backend.unet)
            if why:
                raise ModelUnavailable(f"ControlNet {model} is not for {getattr(backend, 'model_id', 'this model')}: "
                                       f"{why}")
        net.requires_grad_(False)  # visual.refine takes gradients through the UNet call, not into the ControlNet
        if net.dtype != backend.dtype:
            net.to(dtype=backend.dtype)
        # --offload: not on the device for good (a Flux ControlNet is ~6.6 GB in bf16), as diffusers offloads it
        net._scenec_offload = place_module(net, backend.device, (getattr(backend, "memory", None) or {})
                                           .get("offload", "none"))
        loaded[key] = net.eval()
        while len(loaded) > KEPT:
            loaded.popitem(last=False)
    loaded.move_to_end(key)
    return loaded[key]


def wrong_class(model: str, flux: bool) -> str | None:
    """Why the ControlNet directory ``model`` is for the other kind of model (its ``config.json`` names a Flux
    ControlNet for an SD/SDXL model, or the other way round; the compiler's check), or None (an unreadable
    config: loading it says what is wrong)."""
    from scenec.compiler.control import controlnet_config, other_kind

    kind = other_kind(controlnet_config(model), flux)
    return None if kind is None else f"it is a {kind[0]}, the model needs a {kind[1]}"


def misfit(net, unet) -> str | None:
    """Why a ControlNet cannot condition ``unet`` (made for another base model: SD 1.x, SD 2.x, SDXL), or None."""
    for key, what in (("cross_attention_dim", "text width"), ("addition_embed_type", "added conditioning")):
        a, b = net.config.get(key), unet.config.get(key)
        if a != b:
            return f"its {what} (`{key}`) is {a}, the model's {b}"
    return None


class ControlNet(Method):
    name = "control"
    batchable = False  # each job its own images (runtime/batching.py runs them alone)

    @classmethod
    def wants(cls, plan, job) -> bool:
        return bool(job.controls)

    def setup(self) -> None:
        run = self.run
        be = run.backend
        self.controls = []
        self.flux = getattr(be, "family", "") == "flux"
        self._last = None  # Flux: (model input, level, residuals) of the last positive call
        self.masks = {}  # a regional control's region masks: Flux [1, N, 1] on the tokens; SD {(h, w): [1, 1, h, w]}
        for k, c in enumerate(run.job.controls):
            net = load_controlnet(be, c.model)
            if c.masks is not None:
                self.masks[k] = self._region(c)
            if self.flux:
                cond = control_flux.control_input(be, net, np.asarray(run.plan.tensor(c.image), np.uint8))
                mode = control_flux.control_mode(net, c.mode, c.model_spec or "(built-in)", be.device)
                self.controls.append((c, net, cond, mode, self.masks.get(k)))
                continue
            if c.mode is not None:
                raise PlanError("`mode` (a Union ControlNet's control type) applies to Flux ControlNets only")
            rgb = np.asarray(run.plan.tensor(c.image), np.float32) / 255.0  # diffusers: [0, 1], not normalised
            image = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
            self.controls.append((c, net, image.to(be.device, net.dtype), self.masks.get(k)))
        if self.flux and len(self.controls) > 1:
            control_flux.check_together([a[1] for a in self.controls],
                                        [c.model_spec or "(built-in)" for c, *_ in self.controls])

    def _region(self, c):
        """A regional control's masks (sd-webui-controlnet's "effective region mask"): on Flux the token grid's, a
        ``[1, N, 1]`` weight per image token; on SD each grid's, by its size (the UNet's resolutions)."""
        plan, be = self.run.plan, self.run.backend  # in the residuals' dtype once, not at every call
        if self.flux:
            m = np.array(plan.mask(c.masks, "token"), np.float32).reshape(1, -1, 1)
            return torch.from_numpy(m).to(be.device, be.dtype)
        out = {}
        for grid in c.masks:
            m = np.array(plan.mask(c.masks, grid), np.float32)
            out[m.shape] = torch.from_numpy(m).to(be.device, be.dtype)[None, None]
        return out

    def sampled(self) -> None:
        """Under ``--offload model`` each ControlNet goes back to the CPU when sampling ends, before the decode (the
        decode runs inside the run: a Flux ControlNet of several GB stayed on the device beside the VAE)."""
        self.close()
        self.controls, self._last = [], None  # nor its inputs and last residuals

    def close(self) -> None:
        """... and when the run ends without reaching the decode (a failure)."""
        for _, net, *_ in getattr(self, "controls", ()):
            if getattr(net, "_scenec_offload", None) is not None:
                net._scenec_offload.offload()

    def denoiser_inputs(self, call, x: torch.Tensor, t, kwargs: dict) -> dict:
        """The denoiser's residual inputs for this call: each acting control's ControlNet on the call's model input
        ``x`` (``[B, C, h, w]``; Flux: packed ``[B, N, C]``), timestep ``t`` and global text (the first
        ``lengths[0]`` tokens of each row)."""
        acting = [a for a in self.controls if a[0].acts(call.level)]
        if not acting:
            return {}
        if self.flux:
            return self._flux_inputs(acting, call, x, kwargs)
        text = call.cond.seq[:, :call.cond.lengths[0]]
        extra = {"added_cond_kwargs": kwargs["added_cond_kwargs"]} if "added_cond_kwargs" in kwargs else {}
        down = mid = None
        for c, net, img, region in acting:
            rows = None
            if net.config.get("global_pool_conditions", False) and any(call.negatives):
                # diffusers runs a pooled-condition ControlNet (e.g. shuffle) in guess mode: on the conditional
                # rows only, zeros on the unconditional ones
                rows = [i for i, neg in enumerate(call.negatives) if not neg]
                if not rows:
                    continue
            d, m = _residuals(net, x, t, text, extra, img, float(c.scale), rows)
            if region is not None:  # its residuals inside its region only, at each of the UNet's resolutions
                d, m = [_masked(r, region) for r in d], _masked(m, region)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if down is None:
            return {}
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def _flux_inputs(self, acting, call, x, kwargs) -> dict:
        """Flux (runtime/methods/control_flux.py): a negative (true CFG) call reuses the positive call's residuals
        on the same input, as FluxControlNetPipeline computes them once per step."""
        if all(call.negatives) and self._last is not None and self._last[0] is x and self._last[1] == call.level:
            return self._last[2]
        out = control_flux.residuals(acting, call, x, kwargs, float(self.run.plan.sampler.guidance))
        guided = self.run.backend.guided(self.run.plan)
        self._last = (x, call.level, out) if guided and not any(call.negatives) else None
        return out


def _masked(r: torch.Tensor, region: dict) -> torch.Tensor:
    """A residual ``[B, C, h, w]`` times its region's mask at that resolution (the plan's grid of that size, else
    the finest grid's averaged down to it)."""
    import torch.nn.functional as F

    size = tuple(r.shape[-2:])
    m = region.get(size)
    if m is None:
        m = F.adaptive_avg_pool2d(max(region.values(), key=lambda t: t.numel()), size)
    return r * m.to(r.dtype)


def _residuals(net, x, t, text, extra: dict, img, scale: float, rows: list[int] | None):
    """``net``'s residuals on every row of ``x``, or on ``rows`` only (zeros on the others)."""
    if rows is None:
        return net(x, t, encoder_hidden_states=text, controlnet_cond=img.expand(x.shape[0], -1, -1, -1),
                   conditioning_scale=scale, guess_mode=False, return_dict=False, **extra)
    idx = torch.tensor(rows, device=x.device)
    if torch.is_tensor(t) and t.ndim and t.shape[0] == x.shape[0]:
        t = t[idx]
    if extra:
        extra = {"added_cond_kwargs": {k: v[idx] for k, v in extra["added_cond_kwargs"].items()}}
    d, m = net(x[idx], t, encoder_hidden_states=text[idx], controlnet_cond=img.expand(len(rows), -1, -1, -1),
               conditioning_scale=scale, guess_mode=True, return_dict=False, **extra)

    def full(r):
        out = r.new_zeros((x.shape[0], *r.shape[1:]))
        out[idx] = r
        return out

    return [full(r) for r in d], full(m)
