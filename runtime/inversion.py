"""Inverting the sampler's own trajectory (COW's reference inversion), and the cache of its results.

:func:`invert` runs from a clean latent up to a noise level, along the solver's deterministic step
under the plain model (the job's global prompt, the sampler's guidance, no region mask, no
modulation): each level's first guess is the solver's (reverse Euler for flow matching, DDIM
inversion for DDPM), then up to :data:`INVERSION_REFINE` Anderson-accelerated fixed-point iterations
make the sampler's own step map it back exactly (random tiny weights need it, see docs/references.md).
In bf16/fp16 the tolerance is the dtype's (:func:`inversion_tol`) and the passes are capped
(:func:`refine_cap`): below the model's own rounding noise more passes only cost forwards.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

INVERSION_REFINE = 20  # fixed-point iterations per inverted step in fp32 (0 = the first guess only)
INVERSION_REFINE_HALF = 6  # the cap in bf16/fp16: the residual reaches the dtype's noise in a few passes
INVERSION_TOL = 1e-5  # stop refining when max |Δx| ≤ tol · max(1, max |x|) (fp32; see inversion_tol)
CHECK_EVERY_CUDA = 3  # on CUDA the stopping test (a host sync) runs every few passes, not every pass


def inversion_tol(dtype: torch.dtype) -> float:
    """The stopping tolerance for a model run in ``dtype``: :data:`INVERSION_TOL`, but never below 4 ulps
    of the dtype (bf16's ulp is 2⁻⁷: a tolerance under it is never met, and every pass would run)."""
    return max(INVERSION_TOL, 4 * torch.finfo(dtype).eps)


def refine_cap(dtype: torch.dtype) -> int:
    """Refinement passes per inverted step for a model run in ``dtype``."""
    return INVERSION_REFINE if torch.finfo(dtype).bits >= 32 else min(INVERSION_REFINE, INVERSION_REFINE_HALF)


def _anderson(df: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """γ = argmin ‖f − ΔF γ‖ (float64): LAPACK's least squares on the CPU; on a GPU the 2–5 column normal
    equations with a tiny ridge, solved where the data is (no host round trip)."""
    if df.device.type == "cpu":
        return torch.linalg.lstsq(df, f[:, None]).solution
    g = df.T @ df
    ridge = 1e-12 * g.diagonal().sum() + 1e-300
    a = g + ridge * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    return torch.linalg.solve_ex(a, (df.T @ f)[:, None], check_errors=False).result  # solve() would sync


def refine_step(x_next: torch.Tensor, x_guess: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor],
                iters: int = INVERSION_REFINE, tol: float = INVERSION_TOL, memory: int = 5,
                check_every: int | None = None) -> torch.Tensor:
    """Solve step(x) = x_next for x, from x_guess: the sampler's own deterministic step, inverted.

    Fixed point of G(x) = x + (x_next − step(x)) with Anderson acceleration (type II, ``memory``
    last iterates; plain iteration does not contract on large steps of random tiny weights). Stops
    when max |x_next − step(x)| ≤ tol · max(1, max |x_next|) (tested every ``check_every`` passes: each
    test is a host sync; default every pass on the CPU, every :data:`CHECK_EVERY_CUDA` on a GPU) or after
    ``iters`` model calls.
    """
    if check_every is None:
        check_every = 1 if x_next.device.type == "cpu" else CHECK_EVERY_CUDA
    x = x_guess
    bound = tol * x_next.abs().max().clamp_min(1.0)  # stays on the device
    gs: list[torch.Tensor] = []
    fs: list[torch.Tensor] = []
    for it in range(iters):
        f = x_next - step(x)
        if it % check_every == 0 and bool(f.abs().max() <= bound):
            break
        g = x + f
        gs.append(g.flatten().double())
        fs.append(f.flatten().double())
        if len(gs) > memory + 1:
            gs.pop(0)
            fs.pop(0)
        if len(fs) >= 2:
            df = torch.stack([fs[i + 1] - fs[i] for i in range(len(fs) - 1)], 1)
            dg = torch.stack([gs[i + 1] - gs[i] for i in range(len(gs) - 1)], 1)
            gamma = _anderson(df, fs[-1])
            x = (gs[-1] - (dg @ gamma).flatten()).to(x_next.dtype).view_as(x_next)
        else:
            x = g
    return x


@torch.no_grad()
def invert(solver, model: Callable[[torch.Tensor, int], torch.Tensor], z: torch.Tensor, levels: list[int],
           refine: int | None = None) -> dict[int, torch.Tensor]:
    """From the clean latent ``z`` (level N) up to ``min(levels)``; returns {level: float32 latent}.

    ``model(x, level)``: the plain model's output at a level (x in the model's dtype)."""
    refine = refine_cap(z.dtype) if refine is None else refine
    tol = inversion_tol(z.dtype)
    n = solver.n
    out: dict[int, torch.Tensor] = {}
    x = z.to(torch.float32)
    if n in levels:
        out[n] = x.clone()
    for i in range(n - 1, min(levels) - 1, -1):
        guess = solver.inversion_guess(x, i, model, z.dtype)
        if refine > 0:
            def step(y, i=i):
                return solver.inversion_step(y, i, model, z.dtype)

            guess = refine_step(x, guess, step, refine, tol)
        x = guess
        if i in levels:
            out[i] = x.clone()
    return out


# --- the cache -------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """``$SCENEC_CACHE/inversion``, else ``~/.cache/scenec/inversion``."""
    root = os.environ.get("SCENEC_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "scenec"
    return base / "inversion"


def inversion_key(parts: dict, tensors: dict[str, np.ndarray] | None = None) -> str:
    """sha256 over canonical JSON of ``parts`` and the raw bytes of ``tensors`` (name order)."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode())
    for name in sorted(tensors or {}):
        t = np.ascontiguousarray(tensors[name])
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.tobytes())
    return h.hexdigest()


FORMAT = "scenec-inversion/2"  # written into each file's metadata; another format is a plain miss


def entry_digest(key: str, latents: dict[str, torch.Tensor]) -> str:
    """sha256 of an entry's key and every tensor's name, dtype, shape and bytes: a file whose content
    was flipped, truncated, reshaped, retyped or copied from another key does not match it."""
    h = hashlib.sha256(f"{FORMAT}\0{key}".encode())
    for name in sorted(latents):
        t = latents[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}:{t.dtype}:{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _warn(message: str) -> None:
    import sys

    print(f"scenec: warning: {message}", file=sys.stderr)


@dataclass
class InversionCache:
    """Inverted latents by key: in memory, and as ``<key>.safetensors`` under :func:`cache_dir`.

    Disk writes are atomic (temp file, fsync, rename), with the format and a digest
    (:func:`entry_digest`) in the file's metadata. A file that does not verify — unreadable, digest
    mismatch, not float32, not the shape the caller expects, NaN or infinite values — is a miss: it is
    deleted, ``warn`` says so once, and the caller inverts again. Non-finite latents are never stored.
    ``stats`` counts memory hits, disk hits, inversions actually run and damaged entries.
    """

    memory: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {"memory": 0, "disk": 0, "inverted": 0, "damaged": 0})
    disk: bool = True
    warn: Callable[[str], None] = _warn

    def path(self, key: str) -> Path:
        return cache_dir() / f"{key}.safetensors"

    def get(self, key: str, shape: tuple[int, ...] | None = None) -> dict[int, torch.Tensor] | None:
        """The latents stored under ``key`` (each of ``shape`` when given), or None."""
        if key in self.memory:
            self.stats["memory"] += 1
            return self.memory[key]
        if not self.disk:
            return None
        p = self.path(key)
        if not p.is_file():
            return None
        lat, why = _read(p, key, shape)
        if why is not None:
            self.stats["damaged"] = self.stats.get("damaged", 0) + 1
            self.warn(f"damaged inversion cache entry {p} ({why}); inverting again")
            try:
                p.unlink()
            except OSError:
                pass
            return None
        if not lat:
            return None
        self.stats["disk"] += 1
        self.memory[key] = lat
        return lat

    def put(self, key: str, latents: dict[int, torch.Tensor]) -> None:
        lat = {int(k): v.detach().to("cpu", torch.float32).contiguous() for k, v in latents.items()}
        if not all(bool(torch.isfinite(v).all()) for v in lat.values()):
            return  # never keep NaN or infinity: the job fails on them, the next build inverts again
        self.memory[key] = lat
        if self.disk:
            from safetensors.torch import save

            from scenec.spec.fsio import atomic_write

            named = {f"level/{k}": v for k, v in lat.items()}
            try:
                atomic_write(self.path(key), save(named, metadata={"format": FORMAT,
                                                                   "sha256": entry_digest(key, named)}))
            except OSError:  # a read-only home directory must not fail the build
                pass

    def clear(self) -> None:
        self.memory.clear()


def _read(p: Path, key: str, shape: tuple[int, ...] | None) -> tuple[dict[int, torch.Tensor] | None, str | None]:
    """``(latents, None)`` for a file that verifies, ``(None, None)`` for one of another format (an older
    scenec's: a plain miss), ``(None, why)`` for a damaged one."""
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            named = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the reader raise, it is a miss
        return None, f"unreadable: {type(e).__name__}"
    fmt = meta.get("format")
    if fmt != FORMAT:  # another scenec's entry is a plain miss; a file without our format is damaged
        return None, (None if str(fmt).startswith("scenec-inversion/") else "no format in its metadata")
    if meta.get("sha256") != entry_digest(key, named):
        return None, "digest mismatch"
    try:
        lat = {int(k.split("/", 1)[1]): v for k, v in named.items()}
    except (IndexError, ValueError):
        return None, "unexpected tensor names"
    shape = shape if shape is not None else next((tuple(v.shape) for v in lat.values()), None)
    for v in lat.values():
        if v.dtype != torch.float32:
            return None, f"dtype {str(v.dtype).replace('torch.', '')}, not float32"
        if tuple(v.shape) != tuple(shape):
            return None, f"shape {list(v.shape)}, not {list(shape)}"
        if not bool(torch.isfinite(v).all()):
            return None, "non-finite values"
    return lat, None


CACHE = InversionCache()
