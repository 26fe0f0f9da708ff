"""The samplers' update rules over the plan's noise levels: flow-matching Euler (Flux) and DDIM (SD).

A plan's step program refers to noise levels by index: level 0 is pure noise, level N clean. A
solver knows its family's level table (σ for flow matching, the DDPM timesteps for DDIM) and gives
the sampler and the methods what they need, written once:

- :meth:`step`: one sampler step from level i to level j with the model's output, deterministic
  (η = 0) or with DDIM's share of fresh noise (η > 0, COW's cycles);
- :meth:`renoise`: the closed-form forward transition q(x_b | x_a) back up to a noisier level;
- :meth:`noised`: the marginal q(x_ℓ | x₀) with given noise (inpainting's kept region on DDPM);
- :meth:`inversion_guess` / :meth:`inversion_step`: the pieces of inverting the sampler's own
  deterministic step (COW's reference inversion, runtime/inversion.py).

All noise is passed in (``noise()`` draws from the job's own CPU generator), so a job gives the same
image on every device and run.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from scenec.spec.errors import PlanError

Model = Callable[[torch.Tensor, int], torch.Tensor]  # (x in the model's dtype, level) → model output


def renoise_flow(x_a: torch.Tensor, s_a: float, s_b: float, noise: torch.Tensor) -> torch.Tensor:
    """Rectified-flow forward transition σ_a → σ_b (σ_b > σ_a): the COW re-noise for flow matching.

    x_a = (1−σ_a)x₀ + σ_a ε_a. With c = (1−σ_b)/(1−σ_a), c·x_a = (1−σ_b)x₀ + c σ_a ε_a, so adding
    independent noise of std s = sqrt(σ_b² − (c σ_a)²) gives (1−σ_b)x₀ + σ_b ε: level b's marginal.
    """
    s_a, s_b = float(s_a), float(s_b)
    if not (0.0 <= s_a < s_b <= 1.0) or s_a >= 1.0:
        raise PlanError(f"renoise needs 0 ≤ σ_a < σ_b ≤ 1, got σ_a={s_a:g}, σ_b={s_b:g}")
    c = (1.0 - s_b) / (1.0 - s_a)
    s = math.sqrt(max(0.0, s_b * s_b - (c * s_a) ** 2))
    return c * x_a.to(torch.float32) + s * noise


def renoise_ddpm(x_r: torch.Tensor, a_r: float, a_b: float, noise: torch.Tensor) -> torch.Tensor:
    """DDPM forward transition ᾱ_r → ᾱ_b (ᾱ_b < ᾱ_r): x_b = √(ᾱ_b/ᾱ_r)·x_r + √(1−ᾱ_b/ᾱ_r)·ε (Ho et al. 2020)."""
    a_r, a_b = float(a_r), float(a_b)
    if not (0.0 < a_b < a_r <= 1.0):
        raise PlanError(f"renoise needs 0 < ᾱ_b < ᾱ_r ≤ 1, got ᾱ_r={a_r:g}, ᾱ_b={a_b:g}")
    r = a_b / a_r
    return math.sqrt(r) * x_r.to(torch.float32) + math.sqrt(1.0 - r) * noise


def fresh_noise_share(s_i: float, s_j: float, eta: float) -> float:
    """DDIM's share of fresh noise in a step σ_i → σ_j of a rectified flow (Song et al. 2021, Eq. 16).

    x_σ = (1−σ)x₀ + σε is the variance-preserving x = √ᾱ x₀ + √(1−ᾱ) ε scaled by √((1−σ)² + σ²), with
    SNR = ᾱ/(1−ᾱ) = ((1−σ)/σ)². DDIM's σ_t² = η²·(1−ᾱ_j)/(1−ᾱ_i)·(1 − ᾱ_i/ᾱ_j), as a share of the target's
    noise std √(1−ᾱ_j), is η·√(1 − SNR_i/SNR_j): η = 1 is the DDPM posterior (≈ 0.70 of the noise std
    on SD's 10-step window, DDIMScheduler's own value), not all of it; σ_i = 1 gives η."""
    if s_j <= 0.0 or s_i >= 1.0:  # into the clean sample (no noise left), or out of pure noise (SNR_i = 0)
        return float(eta)
    r = ((1.0 - s_i) / s_i) ** 2 / ((1.0 - s_j) / s_j) ** 2  # SNR_i / SNR_j ∈ [0, 1)
    return float(eta) * math.sqrt(max(0.0, 1.0 - r))


def flow_step_eta(x: torch.Tensor, v: torch.Tensor, s_i: float, s_j: float, eta: float,
                  noise: torch.Tensor | None) -> torch.Tensor:
    """Stochastic flow-matching step σ_i → σ_j, DDIM's η carried over to the flow: x̂₀ = x − σ_i v,
    ε̂ = x + (1−σ_i) v, x_j = (1−σ_j) x̂₀ + σ_j (√(1−s²) ε̂ + s ξ) with s = :func:`fresh_noise_share`.
    η = 0 is the Euler step; η = 1 the DDPM posterior (COW's cycles: η 1 inside, 0.1 after)."""
    x, v = x.to(torch.float32), v.to(torch.float32)
    s_i, s_j, eta = float(s_i), float(s_j), float(eta)
    if not 0.0 <= eta <= 1.0:
        raise PlanError(f"eta must lie in [0, 1], got {eta:g}")
    x0 = x - s_i * v
    eps = x + (1.0 - s_i) * v
    share = fresh_noise_share(s_i, s_j, eta)
    if share > 0.0 and noise is not None:
        eps = math.sqrt(1.0 - share * share) * eps + share * noise
    return (1.0 - s_j) * x0 + s_j * eps


class FlowEuler:
    """Flow-matching Euler over σ₀ = 1 > … > σ_N = 0 (FlowMatchEulerDiscreteScheduler's update in float32).

    ``sigmas``: the scheduler's table (a float32 tensor of N + 1 values); the model's timestep at level
    i is σ_i·1000 in float32, cast to the model's dtype (as FluxPipeline passes it)."""

    kind = "flow"

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = sigmas
        self.sig = [float(s) for s in sigmas]  # host copies: no device sync per step
        self.n = len(self.sig) - 1

    def identity(self) -> dict:
        return {"solver": "flow-euler", "sigmas": [repr(s) for s in self.sig]}

    def model_time(self, level: int, batch: int, dtype, device) -> torch.Tensor:
        return (torch.full([batch], self.sig[level], device=device, dtype=torch.float32) * 1000).to(dtype)

    def noised(self, z0: torch.Tensor, noise: torch.Tensor, level: int) -> torch.Tensor:
        """x_σ = (1 − σ)·z₀ + σ·ε at a level (the img2img start, as FlowMatchEulerDiscreteScheduler.scale_noise)."""
        s = self.sig[level]
        return ((1 - s) * z0.to(torch.float32) + s * noise.to(torch.float32)).to(noise.dtype)

    def step(self, x: torch.Tensor, out: torch.Tensor, i: int, j: int, eta: float, noise: Callable[[], torch.Tensor],
             dtype) -> torch.Tensor:
        """x + (σ_j − σ_i)·v in float32 (the scheduler's Euler step), or :func:`flow_step_eta` when η > 0."""
        x32 = x.to(torch.float32)
        if eta > 0:
            fresh = noise() if self.sig[j] > 0 else None
            return flow_step_eta(x32, out, self.sig[i], self.sig[j], eta, fresh).to(dtype)
        return (x32 + (self.sigmas[j] - self.sigmas[i]) * out).to(dtype)

    def clean(self, x: torch.Tensor, out: torch.Tensor, level: int) -> torch.Tensor:
        """The predicted clean latent x̂₀ = x − σ·v of the rectified flow (as :func:`flow_step_eta`), float32."""
        return x.to(torch.float32) - self.sig[level] * out.to(torch.float32)

    def renoise(self, x: torch.Tensor, a: int, b: int, noise: torch.Tensor) -> torch.Tensor:
        return renoise_flow(x, self.sig[a], self.sig[b], noise).to(x.dtype)

    def inversion_guess(self, x: torch.Tensor, i: int, model: Model, dtype) -> torch.Tensor:
        """Reverse Euler from level i + 1 to i: x_{i+1} + (σ_i − σ_{i+1})·v(x_{i+1}, σ_{i+1})."""
        return x + (self.sig[i] - self.sig[i + 1]) * model(x.to(dtype), i + 1).to(torch.float32)

    def inversion_step(self, y: torch.Tensor, i: int, model: Model, dtype) -> torch.Tensor:
        """The sampler's deterministic step i → i + 1 from y (float32), for the fixed-point refinement."""
        return y + (self.sig[i + 1] - self.sig[i]) * model(y.to(dtype), i).to(torch.float32)


class DDIM:
    """DDIM over the scheduler's timesteps (diffusers' ``DDIMScheduler.step``, η and its variance noise).

    Level i < N is timestep ``timesteps[i]``; level N is clean (the scheduler's final ᾱ)."""

    kind = "ddpm"

    def __init__(self, scheduler, timesteps: torch.Tensor):
        self.scheduler = scheduler
        self.timesteps = timesteps
        self.n = len(timesteps)
        self._t = [int(t) for t in timesteps]  # host copies: no device sync per step

    def identity(self) -> dict:
        return {"solver": "ddim", "timesteps": self._t, "scheduler": dict(self.scheduler.config)}

    def model_time(self, level: int, batch: int, dtype, device) -> torch.Tensor:
        return self.timesteps[level]

    def alpha(self, level: int) -> float:
        """ᾱ at a level: ᾱ(t_level) for level < N, the scheduler's final ᾱ at N."""
        s = self.scheduler
        if level >= self.n:
            return float(s.final_alpha_cumprod)
        return float(s.alphas_cumprod[self._t[level]])

    def step(self, x: torch.Tensor, out: torch.Tensor, i: int, j: int, eta: float, noise: Callable[[], torch.Tensor],
             dtype) -> torch.Tensor:
        kw = {"eta": eta, "variance_noise": noise().to(x.dtype)} if eta > 0 else {}
        return self.scheduler.step(out, self.timesteps[i], x, return_dict=False, **kw)[0]

    def clean(self, x: torch.Tensor, out: torch.Tensor, level: int) -> torch.Tensor:
        """The predicted clean latent (DDIM, Song et al. 2021, Eq. 12's x̂₀), float32: ε-prediction
        (x − √(1−ᾱ)·ε)/√ᾱ, v-prediction √ᾱ·x − √(1−ᾱ)·v, sample-prediction the output itself."""
        a = self.alpha(level)
        x, out = x.to(torch.float32), out.to(torch.float32)
        kind = self.scheduler.config.prediction_type
        if kind == "v_prediction":
            return a ** 0.5 * x - (1 - a) ** 0.5 * out
        if kind == "sample":
            return out
        return (x - (1 - a) ** 0.5 * out) / a ** 0.5

    def renoise(self, x: torch.Tensor, a: int, b: int, noise: torch.Tensor) -> torch.Tensor:
        return renoise_ddpm(x, self.alpha(a), self.alpha(b), noise).to(x.dtype)

    def noised(self, z0: torch.Tensor, noise: torch.Tensor, level: int) -> torch.Tensor:
        """q(x_ℓ | z₀) with the given noise: √ᾱ_ℓ·z₀ + √(1−ᾱ_ℓ)·ε; level N: z₀ itself."""
        if level >= self.n:
            return z0
        a = self.alpha(level)
        return (a ** 0.5) * z0 + ((1 - a) ** 0.5) * noise.to(z0.dtype)

    def inversion_guess(self, x: torch.Tensor, i: int, model: Model, dtype) -> torch.Tensor:
        """DDIM inversion (Song et al. 2021, Eq. 13 run backwards): x̂₀, ε̂ from the model at (x_{i+1}, t_i),
        then x_i = √ᾱ_i·x̂₀ + √(1−ᾱ_i)·ε̂."""
        a_i, a_next = self.alpha(i), self.alpha(i + 1)
        e = model(x.to(dtype), i).to(torch.float32)
        if self.scheduler.config.prediction_type == "v_prediction":  # ε from v at the current point
            e = (a_next ** 0.5) * e + ((1 - a_next) ** 0.5) * x
        x0 = (x - (1 - a_next) ** 0.5 * e) / a_next ** 0.5
        return a_i ** 0.5 * x0 + (1 - a_i) ** 0.5 * e

    def inversion_step(self, y: torch.Tensor, i: int, model: Model, dtype) -> torch.Tensor:
        yy = y.to(dtype)
        return self.scheduler.step(model(yy, i), self.timesteps[i], yy, return_dict=False)[0].to(torch.float32)


class DPMSolverPP(DDIM):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2: data prediction, second-order
    multistep) as diffusers' ``DPMSolverMultistepScheduler`` steps it, optionally on Karras' σ spacing
    (arXiv 2206.00364, Eq. 5). A level's ᾱ is 1/(1 + σ²) of the scheduler's σ table (Karras' σ fall between
    the training timesteps), 1 at level N (σ = 0).

    Multistep: each step reads the previous one's prediction, kept in the scheduler, so the steps must run
    in order (a run may start mid-table: img2img); it cannot re-noise or invert (COW's cycles need DDIM)."""

    multistep = True

    def __init__(self, scheduler, name: str):
        super().__init__(scheduler, scheduler.timesteps)
        self.name = name
        self._sigma = [float(s) for s in scheduler.sigmas]

    def identity(self) -> dict:
        return {"solver": self.name, "timesteps": self._t, "scheduler": dict(self.scheduler.config)}

    def alpha(self, level: int) -> float:
        return 1.0 / (1.0 + self._sigma[level] ** 2)

    def step(self, x: torch.Tensor, out: torch.Tensor, i: int, j: int, eta: float, noise: Callable[[], torch.Tensor],
             dtype) -> torch.Tensor:
        s = self.scheduler
        if eta > 0 or j != i + 1:
            raise PlanError(f"{self.name} steps one level at a time without fresh noise (step {i} → {j}, η {eta:g})")
        if s.step_index is None:
            s.set_begin_index(i)
        elif s.step_index != i:
            raise PlanError(f"{self.name} is multistep: step {i} after step {s.step_index - 1}")
        return s.step(out, self.timesteps[i], x, return_dict=False)[0]

    def _refuse(self, *_a, **_k):
        raise PlanError(f"{self.name} cannot re-noise or invert its step (COW's cycles need `solver: ddim`)")

    renoise = inversion_guess = inversion_step = _refuse


class UniPC(DPMSolverPP):
    """UniPC (Zhao et al. 2023, arXiv 2302.04867: the UniC corrector after each UniP-2 predictor step, B(h) =
    e^h − 1 ("bh2"), data prediction) as diffusers' ``UniPCMultistepScheduler`` steps it, on the model's spacing
    or Karras' σ. Multistep like DPM-Solver++ (the scheduler holds the history and the last sample the corrector
    refines), so the same one-level-at-a-time stepping; no re-noising or inversion."""


class DPMSolverSDE(DPMSolverPP):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, §5 and Appendix: the data-prediction solver of
    the reverse diffusion SDE, second-order multistep, midpoint) as diffusers' ``DPMSolverMultistepScheduler``
    with ``algorithm_type="sde-dpmsolver++"`` steps it (A1111's "DPM++ 2M SDE", its Karras variant on Karras'
    σ): x_t = (σ_t/σ_s)e^{−h}·x_s + α_t(1 − e^{−2h})·(D₀ + ½D₁) + σ_t√(1 − e^{−2h})·ξ. The fresh noise ξ of
    every step comes from the job's own noise stream (``noise()``, drawn on the CPU), as ancestral Euler's
    (runtime/euler.py), so an image depends on its seed alone, on every device; none is drawn into σ = 0
    (its coefficient σ_t is 0 there). Multistep like DPM-Solver++(2M): one level at a time, in order."""

    def step(self, x: torch.Tensor, out: torch.Tensor, i: int, j: int, eta: float, noise: Callable[[], torch.Tensor],
             dtype) -> torch.Tensor:
        s = self.scheduler
        if eta > 0 or j != i + 1:
            raise PlanError(f"{self.name} steps one level at a time with its own noise, no DDIM η "
                            f"(step {i} → {j}, η {eta:g})")
        if s.step_index is None:
            s.set_begin_index(i)
        elif s.step_index != i:
            raise PlanError(f"{self.name} is multistep: step {i} after step {s.step_index - 1}")
        xi = noise() if self._sigma[j] > 0 else torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return s.step(out, self.timesteps[i], x, variance_noise=xi, return_dict=False)[0]


# what makes UniPCMultistepScheduler UniPC-bh2 of order 2 with its corrector at every step, as diffusers' defaults
UNIPC_PINNED = {"solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True,
                "disable_corrector": [], "thresholding": False, "final_sigmas_type": "zero",
                "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_flow_sigmas": False}


# what makes DPMSolverMultistepScheduler DPM-Solver++(2M) on the model's spacing or Karras' σ, as the compiler's
# levels assume (compiler/solvers.py): its defaults, set over whatever a model's own scheduler config holds
# (a model that ships a DPMSolverMultistepScheduler config keeps these keys through DDIMScheduler.from_config)
DPM_PINNED = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint", "use_lu_lambdas": False,
              "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_flow_sigmas": False,
              "lambda_min_clipped": -float("inf"), "final_sigmas_type": "zero", "euler_at_final": False,
              "lower_order_final": True, "thresholding": False}
# the SDE variant: the same, but algorithm_type "sde-dpmsolver++" (diffusers' A1111 "DPM++ 2M SDE")
DPM_SDE_PINNED = {**DPM_PINNED, "algorithm_type": "sde-dpmsolver++"}


def ddpm_solver(kind: str, scheduler, steps: int, device) -> DDIM:
    """The plan's solver on an SD/SDXL model: ``ddim`` on the pipeline's DDIMScheduler, ``dpm++2m`` /
    ``dpm++2m-karras`` on a DPMSolverMultistepScheduler made from its config (diffusers' own idiom,
    ``DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``, with :data:`DPM_PINNED`; ``dpm++2m-sde``
    / ``dpm++2m-sde-karras`` with :data:`DPM_SDE_PINNED`), one per run (it holds the history)."""
    if kind == "ddim":
        s = scheduler
    elif kind in ("dpm++2m", "dpm++2m-karras"):
        from diffusers import DPMSolverMultistepScheduler

        s = DPMSolverMultistepScheduler.from_config(scheduler.config, **DPM_PINNED,
                                                    use_karras_sigmas=kind.endswith("karras"))
    elif kind in ("dpm++2m-sde", "dpm++2m-sde-karras"):
        from diffusers import DPMSolverMultistepScheduler

        s = DPMSolverMultistepScheduler.from_config(scheduler.config, **DPM_SDE_PINNED,
                                                    use_karras_sigmas=kind.endswith("karras"))
    elif kind in ("unipc", "unipc-karras"):
        from diffusers import UniPCMultistepScheduler

        s = UniPCMultistepScheduler.from_config(scheduler.config, **UNIPC_PINNED,
                                                use_karras_sigmas=kind.endswith("karras"))
    else:
        raise PlanError(f"solver {kind!r} does not run on DDPM models (ddim, dpm++2m, dpm++2m-karras, dpm++2m-sde, "
                        "dpm++2m-sde-karras, unipc, unipc-karras; euler, euler-karras, euler-a: runtime/euler.py)")
    s.set_timesteps(steps, device=device)
    if len(s.timesteps) != steps:
        raise PlanError(f"scheduler gave {len(s.timesteps)} steps, the plan has {steps}")
    if kind == "ddim":
        return DDIM(s, s.timesteps)
    if kind.startswith("unipc"):
        return UniPC(s, kind)
    return DPMSolverSDE(s, kind) if "sde" in kind else DPMSolverPP(s, kind)
