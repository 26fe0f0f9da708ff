"""Inpainting fusion (EliGen, arXiv 2501.01097, §3.3): with an init image, only entity regions change.

The init image (``background.image``, fitted to the canvas by the compiler) is VAE-encoded with the
distribution's mode to z₀; m is the union of entity regions on the latent grid (1 = the model draws,
0 = keep the init image). How the outside is kept follows the solver's parameterisation:

- flow matching: the model's velocity is fused with the velocity that leads straight back to z₀,
  v = m·v_model + (1 − m)·(x − z₀)/σ (EliGen's formulation), and the last step sets the outside to z₀
  exactly;
- DDPM: after each step the outside is the init latent noised to the new level with the job's fixed
  noise, √ᾱ·z₀ + √(1−ᾱ)·ε (the inpainting pipelines' convention), and z₀ itself at the end.

Either way the final latent equals z₀ outside the regions. Rows of a batch without an init image get
m ≡ 1 (the model everywhere, unchanged).

Unlike EliGen's reference pipeline (DiffSynth-Studio: the positive branch fused before CFG, with a
binary mask) the fusion here is on the guided output (after true CFG, so the outside returns to z₀
exactly for any guidance scale) with the soft coverage mask (feathered edges blend); with CFG 1 and a
hard-edged region the two agree (docs/runtime.md).
"""

from __future__ import annotations

import torch

from .base import Method


class Inpaint(Method):
    name = "inpaint"

    @classmethod
    def wants(cls, plan, job) -> bool:
        return job.init_image is not None

    def setup(self) -> None:
        run = self.run
        be = run.backend
        self.flow = run.solver.kind == "flow"
        zs, ms, fixed = [], [], []
        for b, row in enumerate(run.rows):
            x = row.x
            if row.job.init_image is not None:
                z = run.init_latents.get(b)  # given: a hires pass upscaled in latent space (runtime/hires.py)
                if z is None:
                    z = be.encode_image(row.plan.tensor(row.job.init_image))
                m = be.latent_mask(row.plan.mask(row.job.inpaint_mask, "latent"))
                # DDPM keeps the outside on the init latent noised with fixed noise, drawn from the job's
                # generator right after its initial latents
                e = None if self.flow else torch.randn(x.shape, generator=row.gen, dtype=torch.float32).to(be.device)
            else:  # m ≡ 1: the model's output everywhere, exactly as without fusion
                z = torch.zeros_like(x)
                m = torch.ones_like(x, dtype=torch.float32) if self.flow else \
                    torch.ones_like(x[:, :1], dtype=torch.float32)
                e = None if self.flow else torch.zeros_like(x, dtype=torch.float32)
            zs.append(z)
            ms.append(m)
            fixed.append(e)
        self.z0, self.m = torch.cat(zs), torch.cat(ms)
        self.fixed = None if self.flow else torch.cat(fixed)
        self._img2img(zs)

    def _img2img(self, zs: list) -> None:
        """Rows with an ``init_level`` (background.strength) start from their init latent noised to that
        level with the row's own initial noise (diffusers' img2img); their mask is all ones."""
        run = self.run
        if not any(row.job.init_level is not None for row in run.rows):
            return
        xs = []
        for b, (row, z) in enumerate(zip(run.rows, zs)):
            lv = row.job.init_level  # rows without one keep the run's start (the solver may scale its noise)
            xs.append(run.x[b:b + 1] if lv is None else run.solver.noised(z.to(row.x.dtype), row.x, lv).to(row.x.dtype))
        run.x = torch.cat(xs)

    def output(self, n: int, op, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not self.flow:
            return out
        x32, zf = x.to(torch.float32), self.z0.to(torch.float32)
        v_keep = (x32 - zf) / self.run.solver.sigmas[op.from_]
        return self.m * out.to(torch.float32) + (1 - self.m) * v_keep

    def after_step(self, n: int, op, x: torch.Tensor) -> torch.Tensor:
        solver = self.run.solver
        if self.flow:
            if solver.sig[op.to] == 0.0:
                return torch.where(self.m == 0, self.z0.to(torch.float32), x.to(torch.float32)).to(x.dtype)
            return x
        keep = solver.noised(self.z0, self.fixed, op.to)
        # m is float32: cast back, or fp16/bf16 latents turn float32 and the next forward fails on mixed dtypes
        return torch.where(self.m == 0, keep, self.m * x + (1 - self.m) * keep).to(x.dtype)
