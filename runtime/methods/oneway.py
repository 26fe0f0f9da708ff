"""Reference images by one-way diffusion: COW (arXiv 2306.08247) and SOW attention modulation.

The compiler unrolls the cycles into the job's step program (compiler/schedule.py); this method
executes their ops on any family, as COW's official pipeline runs them (``pipeline_COW.py``):

- **Inversion** of each placed reference — its RGBA composited on the neutral grey canvas (the
  reference inside its region × footprint, grey elsewhere) — VAE-encoded with the distribution's mode,
  along the sampler's own trajectory (runtime/inversion.py), stored at every level the program needs
  it and cached. Identical images (one reference: its own and the seed canvas) are inverted once.
- ``seed`` (§3, "seed initialization", one of COW's three parts): the latent becomes the inversion of
  the seed canvas — every listed reference placed on one grey canvas — at the window's end; the cycles
  start from it, not from a sample that came down from noise (without it, the paper's ablation shows a
  second subject).
- ``paste``: ``x ← m·x_ref(ℓ) + (1 − m)·x`` with m the condition's coverage × footprint on the latent
  grid (§3, the visual condition's preservation); exact inside the region.
- ``renoise`` a → b: the solver's closed-form forward transition (runtime/solvers.py), with fresh
  noise from the job's noise stream — COW's cycles (Alg. 1), at the levels the latents are at.
- **SOW** (runtime/methods/sow.py): inside the cycles, image–image attention modulation.
"""

from __future__ import annotations

import numpy as np
import torch

from scenec.spec.plan import Denoise, Paste, Renoise, Seed

from .. import inversion
from .base import Method
from .sow import Sow, SowTerm, sow_for, sow_share, sow_term, sow_unit_weights  # noqa: F401 - re-exported

GREY = 128  # the neutral canvas the compiler places references on (compiler/lower.NEUTRAL_GREY)


def paste(x: torch.Tensor, ref: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Replace the region (coverage m ∈ [0, 1], 1 = inside) of x with ref: m·ref + (1−m)·x."""
    out = m * ref.to(torch.float32) + (1 - m) * x.to(torch.float32)
    return torch.where(m >= 1, ref.to(torch.float32), out).to(x.dtype)  # exact inside


def placed(rgbas: list[np.ndarray]) -> np.ndarray:
    """References on one grey canvas: each RGBA composited in turn by its alpha (region × footprint)."""
    out = np.full(rgbas[0].shape[:2] + (3,), float(GREY))
    for t in rgbas:
        a = np.asarray(t[..., 3:4], np.float64) / 255.0
        out = out * (1.0 - a) + np.asarray(t[..., :3], np.float64) * a
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def needed_levels(job) -> tuple[dict[int, list[int]], list[Seed]]:
    """condition index → the sorted levels the program pastes it at; and the program's seed ops."""
    out: dict[int, set[int]] = {}
    seeds = []
    for op in job.program:
        if isinstance(op, Paste):
            out.setdefault(op.condition, set()).add(op.at)
        elif isinstance(op, Seed):
            seeds.append(op)
    return {c: sorted(v) for c, v in out.items()}, seeds


def inside_cycles(cond, op, cycle: int | None = None) -> bool:
    """A denoise op is inside a condition's cycles when it starts within the window (cycles > 0) and, given
    its cycle, that cycle is one of the condition's own (several references cycle as many times as the
    largest ``cycles`` asks)."""
    return cond.cycles > 0 and isinstance(op, Denoise) and cond.window[0] <= op.from_ < cond.window[1] and \
        (cycle is None or cycle < cond.cycles)


# --- the method --------------------------------------------------------------------------------------

class OneWay(Method):
    """COW's ops (seed, paste, renoise) and SOW's modulation for a job's reference conditions."""

    name = "reference"
    ops = (Paste, Renoise, Seed)
    batchable = False

    @classmethod
    def wants(cls, plan, job) -> bool:
        return bool(job.conditions) or any(isinstance(op, (Paste, Renoise, Seed)) for op in job.program)

    def capabilities(self) -> tuple[str, ...]:
        return ("reference", "sow") if any(c.sow for c in self.run.job.conditions) else ("reference",)

    def setup(self) -> None:
        run = self.run
        be, plan, job = run.backend, run.plan, run.job
        self.refs: dict[int, dict[int, torch.Tensor]] = {}
        self.masks: dict[int, torch.Tensor] = {}
        self.seeds: dict[tuple[int, ...], dict[int, torch.Tensor]] = {}
        self.inversions = 0
        lgrid = plan.grid("latent")
        pastes, seeds = needed_levels(job)
        wanted: dict[bytes, tuple[np.ndarray, set[int], list]] = {}  # image bytes → (image, levels, users)

        def want(rgb: np.ndarray, levels, user) -> None:
            key = rgb.tobytes()
            if key not in wanted:
                wanted[key] = (rgb, set(), [])
            wanted[key][1].update(levels)
            wanted[key][2].append(user)

        for ci, levels in pastes.items():
            cond = job.conditions[ci]
            m = plan.mask(cond.masks, "latent")
            self.masks[ci] = be.latent_mask(np.ones(lgrid, np.float32) if m is None else m)
            want(placed([np.asarray(plan.tensor(cond.image))]), levels, ("paste", ci))
        for op in seeds:
            rgbas = [np.asarray(plan.tensor(job.conditions[ci].image)) for ci in op.conditions]
            want(placed(rgbas), [op.at], ("seed", tuple(op.conditions)))
        for rgb, levels, users in wanted.values():
            lat = self._inverted(rgb, sorted(levels))
            for kind, who in users:
                (self.refs if kind == "paste" else self.seeds)[who] = lat
        cycles, k = [], 0
        for op in job.program:  # the COW cycle each op belongs to: renoise ops before it, less the seed's
            cycles.append(k)
            k += isinstance(op, Renoise)
        first = 1 if seeds else 0  # with the seed every cycle, the first included, starts with a renoise
        self.cycle_of = [max(0, c - first) for c in cycles]
        sites = frozenset(s.name for s in be.sites if s.image_keys)
        self.sow = sow_for(plan, job, be.image_grids, be.device, sites)
        self.armed = False

    def _inverted(self, rgb: np.ndarray, levels: list[int]) -> dict[int, torch.Tensor]:
        """A placed image inverted to every level in ``levels`` (cached by image, model and trajectory)."""
        from scenec import __version__

        run = self.run
        be, plan, job = run.backend, run.plan, run.job
        w, h = plan.canvas
        parts = {"family": be.family, "model": be.model_id, "dtype": str(be.dtype), "version": __version__,
                 "prompt": plan.prompt(job.global_.prompt), "negative": plan.prompt(job.global_.negative),
                 "sampler": plan.sampler.model_dump(), "msl": plan.model.max_sequence_length,
                 "levels": levels, "canvas": [w, h], **run.solver.identity(),
                 "refine": [inversion.refine_cap(be.dtype), inversion.inversion_tol(be.dtype)],
                 **({"lora": [[lo.sha256, lo.scale] for lo in plan.model.lora]} if plan.model.lora else {}),
                 **({"vae": [plan.model.vae, plan.model.vae_sha256]} if plan.model.vae else {}),
                 # a single file by its bytes and configs (its model id is the spec as written)
                 **({"checkpoint": [plan.model.sha256, plan.model.config]} if plan.model.sha256 else {}),
                 # how the prompts were read: the backend is shared across syntaxes (scenec/build/pool.py)
                 **({"syntax": plan.model.prompt_syntax} if plan.model.prompt_syntax != "plain" else {}),
                 **({"text": [[e.sha256, e.token] for e in plan.model.embeddings], "clip_skip": plan.model.clip_skip}
                    if plan.model.embeddings or plan.model.clip_skip else {})}  # the text the trajectory was guided by
        key = inversion.inversion_key(parts, {"rgb": rgb})
        cache = inversion.CACHE
        hit = cache.get(key, shape=tuple(run.x.shape))  # an entry of another shape is a miss
        x_dtype = run.x.dtype
        if hit is not None and all(lv in hit for lv in levels):
            return {lv: hit[lv].to(be.device, x_dtype) for lv in levels}
        z = be.encode_image(np.ascontiguousarray(rgb))
        out = inversion.invert(run.solver, run.predict_plain, z, levels)
        cache.stats["inverted"] += 1
        self.inversions += 1
        cache.put(key, out)
        return {lv: x.to(x_dtype) for lv, x in out.items()}

    def run_op(self, n: int, op, x: torch.Tensor) -> torch.Tensor:
        if isinstance(op, Paste):
            return paste(x, self.refs[op.condition][op.at], self.masks[op.condition])
        if isinstance(op, Seed):
            return self.seeds[tuple(op.conditions)][op.at].clone()
        return self.run.solver.renoise(x, op.from_, op.to, self.run.noise_like(x))

    def before_denoise(self, n: int, op) -> None:
        self.armed = False
        if self.sow is not None:
            cyc = self.cycle_of[n]
            inside = [inside_cycles(self.run.job.conditions[ci], op, cyc) for ci in self.sow.index]
            self.armed = self.sow.begin_step(cyc, inside)

    def modifiers(self, call) -> list:
        return [self.sow] if self.armed else []
