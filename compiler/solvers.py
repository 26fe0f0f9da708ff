"""The sampler's solver: which update rule a scene's steps use (``sampler.solver``), its noise levels and what
it cannot run. numpy only.

Flux samples with flow-matching Euler (``flow-euler``); SD and SDXL with DDIM (``ddim``, the default: its
step is deterministic, can be inverted and re-noised, so every method runs on it) or DPM-Solver++(2M)
(Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
arXiv 2211.01095, Algorithm 2), as diffusers' ``DPMSolverMultistepScheduler`` with
``algorithm_type="dpmsolver++"``, ``solver_order=2``, on the model's own timestep spacing
(``dpm++2m``), or on Karras et al.'s σ spacing (arXiv 2206.00364, Eq. 5, ρ = 7: ``dpm++2m-karras``, what
A1111 calls "DPM++ 2M Karras"), or Euler's method on the probability-flow ODE in σ-space (Karras et al.
2022, arXiv 2206.00364, Eq. 4/Alg. 1 without churn), as diffusers' ``EulerDiscreteScheduler`` on the model's
spacing (``euler``, A1111's "Euler") or Karras' σ (``euler-karras``), or its ancestral variant
(``EulerAncestralDiscreteScheduler``, η = 1: each step goes down to σ_down and adds fresh noise of std σ_up,
``euler-a``, A1111's "Euler a"), or the SDE variant of DPM-Solver++(2M) (``dpm++2m-sde``,
``dpm++2m-sde-karras``: A1111's "DPM++ 2M SDE" and "DPM++ 2M SDE Karras", ``algorithm_type="sde-dpmsolver++"``,
Lu et al. 2022, arXiv 2211.01095, §5: each step solves the reverse SDE and adds fresh noise).

DPM-Solver++(2M) is a multistep method: each step reads the previous step's prediction. COW's cycles
(``reference``) re-noise the latent and invert the sampler's step, neither of which a multistep history
survives, so a scene with references needs ``ddim``; a coupling group's shared θ = 0 prefix is not shared
under it (each variant runs its prefix, the same images as with sharing off). The Euler solvers step from
the latent alone, but COW's cycles need DDIM's η steps and its inversion, so references need ``ddim`` there
too; ``euler-a`` draws fresh noise at every step from the job's noise stream, so a group's prefix is not
shared under it either (a resumed run would draw that stream again from its start) and its jobs run alone,
never as batch rows. The SDE solvers are both: multistep, and drawing fresh noise at every step.
"""

from __future__ import annotations

import math

import numpy as np

SDE = frozenset({"dpm++2m-sde", "dpm++2m-sde-karras"})  # DPM-Solver++(2M) on the reverse SDE
MULTISTEP = frozenset({"dpm++2m", "dpm++2m-karras", "unipc", "unipc-karras"}) | SDE
EULER = frozenset({"euler", "euler-karras", "euler-a"})
FRESH_NOISE = frozenset({"euler-a"}) | SDE  # ancestral, SDE: fresh noise each step (the job's stream); never batched
NO_REFERENCE = MULTISTEP | EULER  # COW's cycles need DDIM's η steps, re-noising and inversion
UNSHARED = MULTISTEP | FRESH_NOISE  # a coupling group's θ = 0 prefix cannot be run once and resumed
NAMES = ("flow-euler", "ddim", "dpm++2m", "dpm++2m-karras", "euler", "euler-karras",
         "euler-a", "unipc", "unipc-karras", "dpm++2m-sde",
         "dpm++2m-sde-karras")  # the language's enum (spec/models_parts.py)


def unshared_reason(name: str) -> str | None:
    """Why a group's θ = 0 prefix is not shared under a solver (None: it is)."""
    if name in MULTISTEP:
        return f"{name} is multistep" + (" and draws fresh noise at every step" if name in FRESH_NOISE else "")
    if name in FRESH_NOISE:
        return f"{name} draws fresh noise at every step"
    return None


def solver_of(scene_solver: str | None, family) -> str:
    """The solver a scene runs: its ``sampler.solver``, else its family's default (``Family.sampler``)."""
    return scene_solver or family.sampler


def check_solver(ls, info, diags) -> None:
    """``sampler.solver`` against the model's family and the scene's methods, at the key that has the problem."""
    sc = ls.scene
    name = sc.sampler.solver
    if name is None:
        return
    fam = info.family
    if name not in fam.solvers:
        diags.error(ls.pos(("sampler", "solver")), f"solver `{name}` does not run {fam.name} models such as "
                    f"`{info.spec}`", hint=f"{fam.name} models run: " + ", ".join(fam.solvers))
        return
    if name in NO_REFERENCE:
        why = (f"which {name}'s multistep history does not survive" if name in MULTISTEP else
               f"with DDIM's η steps and DDIM's inversion, which {name} does not have")
        for i, e in enumerate(sc.entities):
            if e.reference is not None:
                diags.error(ls.key_pos(("entities", i, "reference")), f"`reference` needs `solver: ddim`: COW's "
                            f"cycles re-noise the latent and invert the sampler's step, {why}",
                            hint="drop `sampler.solver` (ddim is the default)")


def alphas_cumprod(config: dict) -> np.ndarray:
    """ᾱ_t of a DDPM scheduler config, float32 as diffusers computes it (``trained_betas``, ``linear``,
    ``scaled_linear``, ``squaredcos_cap_v2``: ``betas_for_alpha_bar``'s cosine, β ≤ 0.999)."""
    T = int(config.get("num_train_timesteps", 1000))
    b0, b1 = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    kind = config.get("beta_schedule", "scaled_linear")
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float32)
    elif kind == "scaled_linear":
        betas = np.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=np.float32) ** 2
    elif kind == "linear":
        betas = np.linspace(b0, b1, T, dtype=np.float32)
    elif kind == "squaredcos_cap_v2":
        def bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - bar((i + 1) / T) / bar(i / T), 0.999) for i in range(T)], dtype=np.float32)
    else:
        raise ValueError(f"beta schedule {kind!r}: scenec reads linear, scaled_linear and squaredcos_cap_v2")
    if config.get("rescale_betas_zero_snr"):
        betas = zero_terminal_snr(betas)
    return np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32)  # torch accumulates in float64


def zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """β rescaled to zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", arXiv 2305.08891, Algorithm 1), in float32 as diffusers' ``rescale_zero_terminal_snr`` computes it
    (``rescale_betas_zero_snr: true`` in a scheduler config): √ᾱ shifted so that its last value is 0 and scaled so
    that its first is kept; ᾱ_T = 0."""
    a = np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32) ** np.float32(0.5)
    a0, aT = a[0], a[-1]
    a = (a - aT) * (a0 / (a0 - aT))
    bar = a * a
    return (np.float32(1.0) - np.concatenate([bar[:1], bar[1:] / bar[:-1]])).astype(np.float32)


def sigma_table(config: dict) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) as diffusers' DPM-Solver, Euler and UniPC schedulers keep it: under zero terminal SNR
    their last ᾱ is 2⁻²⁴ (σ ≈ 4096) rather than 0, "so the first sigma is not inf"."""
    a = alphas_cumprod(config)
    if config.get("rescale_betas_zero_snr"):
        a[-1] = 2.0 ** -24
    return ((1 - a) / a) ** 0.5


def _karras_t(steps: int, sig: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Karras' σ (ρ = 7, Eq. 5) from ``hi`` down to ``lo``, each mapped to its fractional timestep by log-σ
    interpolation in the schedule's σ table ``sig`` (diffusers' ``_convert_to_karras`` and ``_sigma_to_t``)."""
    log_sig = np.log(sig)
    ramp = np.linspace(0, 1, steps)
    karras = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    ls = np.log(np.maximum(karras, 1e-10))
    dists = ls - log_sig[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sig) - 2)
    w = np.clip((log_sig[low] - ls) / (log_sig[low] - log_sig[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_timesteps(steps: int, config: dict) -> np.ndarray:
    """The timesteps of Karras' σ spacing (ρ = 7) between the schedule's σ_max and σ_min, each the (rounded)
    timestep of its σ by log-σ interpolation: DPMSolverMultistepScheduler with ``use_karras_sigmas``."""
    sig = sigma_table(config)
    t = _karras_t(steps, sig, float(sig[0]), float(sig[-1]))
    # diffusers rounds them, except on the cosine schedule, where its int64 cast truncates: there a t that
    # falls on an integer may come out 1 lower in diffusers (torch's float32 σ differ from numpy's in the last bit)
    return (t if config.get("beta_schedule") == "squaredcos_cap_v2" else t.round()).astype(np.int64)


def dpm_timesteps(steps: int, config: dict, karras: bool = False) -> np.ndarray:
    """DPMSolverMultistepScheduler.set_timesteps' timesteps (noisiest first) for the model's spacing, or Karras'
    (UniPCMultistepScheduler's are the same: its set_timesteps spaces them alike; so are the SDE variant's)."""
    if karras:
        return karras_timesteps(steps, config)
    T, spacing = int(config.get("num_train_timesteps", 1000)), config.get("timestep_spacing", "leading")
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "trailing":
        return np.arange(T, 0, -T / steps).round().astype(np.int64) - 1
    return (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1].astype(np.int64) + \
        int(config.get("steps_offset", 0))


def euler_timesteps(steps: int, config: dict, karras: bool = False) -> np.ndarray:
    """EulerDiscreteScheduler.set_timesteps' timesteps (noisiest first, float32 as diffusers keeps them; also
    EulerAncestralDiscreteScheduler's) for the model's spacing, or Karras' σ between the σ of that spacing's
    first and last timestep (diffusers' Euler takes Karras' range from its spaced σ, not the whole table) at
    fractional timesteps. Unlike DDIM's, ``linspace`` timesteps are not rounded."""
    T, spacing = int(config.get("num_train_timesteps", 1000)), config.get("timestep_spacing", "leading")
    if spacing == "linspace":
        t = np.linspace(0, T - 1, steps, dtype=np.float32)[::-1]
    elif spacing == "trailing":
        t = np.arange(T, 0, -T / steps).round().astype(np.float32) - 1
    else:
        t = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.float32) + int(config.get("steps_offset", 0))
    if karras:
        sig = sigma_table(config)
        spaced = np.interp(t, np.arange(0, len(sig)), sig)
        t = _karras_t(steps, sig, float(spaced[-1]), float(spaced[0]))
    return np.asarray(t, dtype=np.float32)
