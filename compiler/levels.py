"""Noise levels → step indices: where a reference's ``window`` and ``preserve`` land. numpy only.

A scene names COW's levels as noise levels ℓ ∈ [0, 1] (1 = pure noise, 0 = clean), as the paper does
(COW, arXiv 2306.08247, §4: its window 0.7 → 0.5 on DDPM's t/1000 scale). The plan's programs work
in step indices (index i = the level before sampling step i; 0 = pure noise, N = clean), so the
compiler maps each level to the index whose noise level is nearest, on the model's own schedule:

- flow-matching models (Flux): σ_i of the sampler's shifted sigma table (FluxPipeline: linear sigmas
  1 … 1/N, shifted by the resolution-dependent μ when the scheduler shifts dynamically, else by its
  static ``shift``; σ_N = 0);
- DDPM models (SD, SDXL; DDIM sampling): t_i / T of the scheduler's timesteps (``leading`` spacing
  with ``steps_offset``, as SD 1.5 / 2.1 / SDXL configure it; ``trailing`` and ``linspace`` too), T the
  training steps; level N is 0.

On FLUX.1-dev at 1024² the default window 0.7 → 0.5 is σ ≈ 0.70 → 0.50, no longer the step
fractions' σ 0.888 → 0.760. The scheduler settings are the model's: a local directory's (or a
cached hub model's) ``scheduler/scheduler_config.json`` when it has one, else the family's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scenec.spec.fsio import note_input

from .caps import cached_hub_file, config_home

if TYPE_CHECKING:
    from scenec.spec.load import LoadedScene

# FLUX.1-dev's scheduler (the offline `tiny` uses it too); FLUX.1-schnell does not shift
FLOW_DEV = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
            "base_image_seq_len": 256, "max_image_seq_len": 4096}
FLOW_SCHNELL = {**FLOW_DEV, "shift": 1.0, "use_dynamic_shifting": False}
# SD 1.5 / 2.1 and SDXL base: 1000 training steps, leading spacing, offset 1; SDXL-Turbo: trailing
DDPM_LEADING = {"num_train_timesteps": 1000, "timestep_spacing": "leading", "steps_offset": 1}
DDPM_TRAILING = {**DDPM_LEADING, "timestep_spacing": "trailing"}
KNOWN = {"flux-schnell": FLOW_SCHNELL, "black-forest-labs/FLUX.1-schnell": FLOW_SCHNELL,
         "sdxl-turbo": DDPM_TRAILING, "stabilityai/sdxl-turbo": DDPM_TRAILING}


def flow_sigmas(steps: int, canvas: tuple[int, int], config: dict) -> np.ndarray:
    """FluxPipeline's σ table (N + 1 values, σ_N = 0) for a canvas (w, h): ``np.linspace(1, 1/N, N)``
    shifted as FlowMatchEulerDiscreteScheduler shifts it (μ from the image's token count, FluxPipeline's
    ``calculate_shift``), in float32 as the scheduler keeps it."""
    c = {**FLOW_DEV, **config}
    s = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32).astype(np.float64)
    if c["use_dynamic_shifting"]:
        w, h = canvas
        seq = (h // 16) * (w // 16)  # the packed latent's length: one token per 16 × 16 px
        m = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
        mu = seq * m + c["base_shift"] - m * c["base_image_seq_len"]
        s = math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
    else:
        s = c["shift"] * s / (1.0 + (c["shift"] - 1.0) * s)
    return np.append(s.astype(np.float32), np.float32(0.0)).astype(np.float64)


def ddpm_timesteps(steps: int, config: dict) -> np.ndarray:
    """DDIMScheduler.set_timesteps' timesteps (noisiest first) for ``leading``, ``trailing`` or ``linspace``."""
    c = {**DDPM_LEADING, **config}
    T, spacing = int(c["num_train_timesteps"]), c["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    return (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64) + int(c["steps_offset"])


def noise_levels(info, canvas: tuple[int, int], steps: int, solver: str | None = None) -> np.ndarray:
    """The noise level at each step index 0..N of a model (``caps.ModelInfo``) on a canvas (w, h) under
    ``solver`` (compiler/solvers.py; None: the family's default)."""
    from .solvers import EULER, MULTISTEP, dpm_timesteps, euler_timesteps

    config = scheduler_config(info)
    if info.family.sampler == "flow-euler":
        return flow_sigmas(steps, canvas, config)
    T = float(config.get("num_train_timesteps", DDPM_LEADING["num_train_timesteps"]))
    if solver in MULTISTEP:  # DPM-Solver++ (ODE or SDE) and UniPC space their timesteps alike
        return np.append(dpm_timesteps(steps, config, karras=solver.endswith("karras")) / T, 0.0)
    if solver in EULER:
        return np.append(euler_timesteps(steps, config, karras=solver.endswith("karras")) / T, 0.0)
    return np.append(ddpm_timesteps(steps, config) / T, 0.0)


def check_zero_snr(ls, info, diags, where) -> None:
    """A scheduler config with ``rescale_betas_zero_snr: true`` (zero terminal SNR, Lin et al. 2023, arXiv 2305.08891,
    §3.1-3.2) needs a model that predicts v: at SNR 0 an ε-prediction says nothing about the image (DDIM divides by
    √ᾱ_T = 0 and fails the job with NaN; DPM-Solver, Euler and UniPC take σ_T ≈ 4096 and make noise). An error at
    ``where`` (the model) for any other ``prediction_type``."""
    if info.family.sampler == "flow-euler":
        return
    config = scheduler_config(info)
    kind = config.get("prediction_type", "epsilon")
    if config.get("rescale_betas_zero_snr") and kind != "v_prediction":
        diags.error(where, f"`{info.spec}`'s scheduler has zero terminal SNR (`rescale_betas_zero_snr: true`) with "
                    f"`prediction_type: {kind}`: at zero SNR only a v-prediction model can denoise (Lin et al. 2023, "
                    "§3.2)", hint="use the model with the scheduler config it was trained with (zero-SNR models "
                    "predict v: `prediction_type: v_prediction`)")


def window_ok(ls, path: tuple, window, what: str, diags) -> bool:
    """A ``[first, second]`` window of noise levels must go from a higher level to a lower one (error at
    ``path`` + window otherwise); whether it does."""
    hi, lo = window
    if hi > lo:
        return True
    diags.error(ls.pos(path + ("window",)), f"{what} window [{hi:g}, {lo:g}] must go from a higher noise level to "
                "a lower one", hint="e.g. [1.0, 0.0] (every step; 1 = pure noise)")
    return False


def level_index(level: float, levels: np.ndarray, end: bool = False) -> int:
    """The step index whose noise level is nearest ``level`` (ties: the noisier, earlier index). With ``end`` (a
    window's end, not included): past every step that starts at that same level. Karras' σ spacing of the multistep
    solvers ends on timestep 0 twice (diffusers' rounded timesteps): its last step starts at level 0, and a window
    ending at 0 runs it, as diffusers' ``control_guidance_end=1.0`` does."""
    levels = np.asarray(levels, np.float64)
    i = int(np.argmin(np.abs(levels - float(level))))
    while end and i + 1 < len(levels) and levels[i + 1] == levels[i]:
        i += 1
    return i


def scheduler_config(info) -> dict:
    """The scheduler settings of a model: its own ``scheduler/scheduler_config.json`` when it is here (a
    local directory, or a hub model in the Hugging Face cache; never downloaded), else the family's."""
    default = KNOWN.get(info.spec) or KNOWN.get(info.repo or "") or \
        (FLOW_DEV if info.family.sampler == "flow-euler" else DDPM_LEADING)
    path = None
    source, repo = config_home(info)  # a checkpoint file's: its `config`'s
    if source == "local" and repo:
        path = Path(repo) / "scheduler" / "scheduler_config.json"
        note_input(path)
    elif source == "hub" and repo:
        path = cached_hub_file(repo, "scheduler/scheduler_config.json")
        if path is not None:
            note_input(path)
    return {**default, **_read(path)} if path is not None else dict(default)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    keys = set(FLOW_DEV) | set(DDPM_LEADING) | {"beta_start", "beta_end", "beta_schedule", "trained_betas",
                                                "rescale_betas_zero_snr", "prediction_type"}  # ᾱ
    return {k: v for k, v in data.items() if k in keys and v is not None} if isinstance(data, dict) else {}


def first_step(ls: LoadedScene, table, steps: int) -> tuple[int, str]:
    """The first sampler step that any image of the scene runs, and why it is not 0: img2img runs the last
    steps (``background.strength``); references cycling from the seed (``init: seed``) start each image at
    their window's start, the steps before it never run (compiler/schedule.py ``build_program``)."""
    from .schedule import img2img_start

    sc = ls.scene
    if sc.background.strength is not None:
        start = img2img_start(steps, sc.background.strength)
        return start, f"`background.strength: {sc.background.strength:g}` runs the last {steps - start} of {steps}"
    ids = {e.id: i for i, e in enumerate(sc.entities)}
    images = [[ids[x] for x in (v.entities or []) if x in ids] for g in sc.groups for v in g.variants] \
        if sc.groups else [list(range(len(sc.entities)))]  # as check._check_reference_images
    first = steps
    for shown in images:
        refs = [sc.entities[i].reference for i in shown if sc.entities[i].reference is not None]
        cycling = [r for r in refs
                   if r.cycles > 0 and level_index(r.window[0], table) < level_index(r.window[1], table)]
        seeded = any(r.init == "seed" for r in cycling)
        first = min(first, min(level_index(r.window[0], table) for r in cycling) if seeded else 0)
    return first, f"the references' seed initialisation starts at step {first} of {steps}"
