"""Euler and ancestral Euler on SD/SDXL (``sampler.solver``: ``euler``, ``euler-karras``, ``euler-a``).

Euler's method on the probability-flow ODE in σ-space (Karras et al. 2022, arXiv 2206.00364, Eq. 4 and
Alg. 1 without churn), x_σ = x₀ + σ ε: dx/dσ = (x − x̂₀)/σ, one step x_j = x_i + (σ_j − σ_i)·dx/dσ — as
diffusers' ``EulerDiscreteScheduler.step`` (its default ``s_churn = 0``), on the model's timestep spacing or
Karras' σ (Eq. 5, ρ = 7, ``use_karras_sigmas``). The ancestral variant (``EulerAncestralDiscreteScheduler``,
η = 1; k-diffusion's ``sample_euler_ancestral``) steps down to σ_down = √(σ_j² − σ_up²) and adds fresh noise
of std σ_up = σ_j·√(σ_i² − σ_j²)/σ_i.

The sampler and every method keep variance-preserving latents x = √ᾱ x₀ + √(1−ᾱ) ε (what DDIM steps, what
inpainting's ``noised`` and img2img write, what the UNet reads: diffusers' ``scale_model_input`` divides x_σ
by √(σ² + 1)). With ᾱ = 1/(1 + σ²), x_σ = x·√(1 + σ²): the step converts in and out of σ-space, so no method
changes. The ancestral noise comes from the job's own noise stream (``noise()``), so a job gives the same
image on every device.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from scenec.spec.errors import PlanError

from .solvers import DDIM

# what makes the scheduler the plain Euler step on the compiler's levels (compiler/solvers.py euler_timesteps),
# set over whatever a model's own scheduler config holds (SDXL ships an EulerDiscreteScheduler config, whose
# keys survive DDIMScheduler.from_config): diffusers' defaults
EULER_PINNED = {"interpolation_type": "linear", "use_exponential_sigmas": False, "use_beta_sigmas": False,
                "sigma_min": None, "sigma_max": None, "timestep_type": "discrete", "final_sigmas_type": "zero"}


def ancestral_sigmas(s_i: torch.Tensor, s_j: torch.Tensor) -> tuple[float, float]:
    """σ_up = √(σ_j²(σ_i² − σ_j²)/σ_i²) and σ_down = √(σ_j² − σ_up²) of a step σ_i → σ_j, in float32 as
    EulerAncestralDiscreteScheduler.step computes them from its σ table."""
    up = (s_j ** 2 * (s_i ** 2 - s_j ** 2) / s_i ** 2) ** 0.5
    return float(up), float((s_j ** 2 - up ** 2) ** 0.5)


class Euler(DDIM):
    """(Ancestral) Euler over the scheduler's σ table σ_0 > … > σ_N = 0; level i < N is the scheduler's
    (possibly fractional) timestep ``timesteps[i]``, the UNet's input. A level's ᾱ is 1/(1 + σ²).

    Single-step: a run may start at any level (img2img, a group's resumed prefix). ``start_scale``: diffusers
    starts ``linspace``/``trailing`` spacing at x_σ = σ_0·ε (``init_noise_sigma``), not √(σ_0² + 1)·ε, i.e.
    the VP latent σ_0/√(1 + σ_0²)·ε; the sampler scales its initial noise by it (runtime/sampler.py Run)."""

    def __init__(self, scheduler, name: str, ancestral: bool):
        super().__init__(scheduler, scheduler.timesteps)
        self.name, self.ancestral = name, ancestral
        self._sigma = [float(s) for s in scheduler.sigmas]
        self._t = [float(t) for t in scheduler.timesteps]
        scale = float(scheduler.init_noise_sigma) / math.sqrt(1.0 + self._sigma[0] ** 2)
        self.start_scale = 1.0 if abs(scale - 1.0) < 1e-6 else scale  # leading spacing: √(σ_0² + 1), float32

    def identity(self) -> dict:
        return {"solver": self.name, "timesteps": self._t, "scheduler": dict(self.scheduler.config)}

    def alpha(self, level: int) -> float:
        return 1.0 / (1.0 + self._sigma[level] ** 2)

    def _x0(self, x_ve: torch.Tensor, out: torch.Tensor, sigma: float) -> torch.Tensor:
        """x̂₀ from the model's output at σ (EulerDiscreteScheduler.step's ``pred_original_sample``)."""
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return x_ve - sigma * out
        if kind == "v_prediction":
            return out * (-sigma / (sigma ** 2 + 1) ** 0.5) + x_ve / (sigma ** 2 + 1)
        return out  # sample prediction

    def step(self, x: torch.Tensor, out: torch.Tensor, i: int, j: int, eta: float, noise: Callable[[], torch.Tensor],
             dtype) -> torch.Tensor:
        """One step σ_i → σ_j in float32: x_σ = x·√(1 + σ_i²); Euler (or ancestral Euler) as diffusers' step;
        back to VP by ÷√(1 + σ_j²). No fresh noise into σ_j = 0 (σ_up = 0 there)."""
        if eta > 0:
            raise PlanError(f"{self.name} takes no DDIM η (step {i} → {j}, η {eta:g}; COW's cycles need ddim)")
        s_i, s_j = self._sigma[i], self._sigma[j]
        xs = x.to(torch.float32) * math.sqrt(1.0 + s_i * s_i)
        x0 = self._x0(xs, out, s_i)
        d = (xs - x0) / s_i
        if not self.ancestral:
            xs = xs + d * (s_j - s_i)
        else:
            up, down = ancestral_sigmas(self.scheduler.sigmas[i], self.scheduler.sigmas[j])
            xs = xs + d * (down - s_i)
            if up > 0:
                xs = xs + noise().to(xs.device, torch.float32) * up
        return (xs / math.sqrt(1.0 + s_j * s_j)).to(dtype)

    def _refuse(self, *_a, **_k):
        raise PlanError(f"{self.name} cannot re-noise or invert its step (COW's cycles need `solver: ddim`)")

    renoise = inversion_guess = inversion_step = _refuse


def euler_solver(kind: str, config, steps: int, device) -> Euler:
    """``euler`` / ``euler-karras`` on ``EulerDiscreteScheduler.from_config(config, use_karras_sigmas=…)``,
    ``euler-a`` on ``EulerAncestralDiscreteScheduler.from_config(config)`` — diffusers' own idiom (e.g.
    ``pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)``), with :data:`EULER_PINNED`."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    if kind == "euler-a":
        s = EulerAncestralDiscreteScheduler.from_config(config)
    else:
        s = EulerDiscreteScheduler.from_config(config, **EULER_PINNED, use_karras_sigmas=kind == "euler-karras")
    s.set_timesteps(steps, device=device)
    if len(s.timesteps) != steps:
        raise PlanError(f"scheduler gave {len(s.timesteps)} steps, the plan has {steps}")
    return Euler(s, kind, ancestral=kind == "euler-a")
