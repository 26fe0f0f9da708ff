"""Reference images by one-way diffusion: COW (arXiv 2306.08247) and SOW attention modulation.

The compiler unrolls the cycles into the job's step program (``compiler/schedule.py``); this module
gives the runtime what the ops need, for both backends:

- **Inversion** of each condition's placed reference (the RGB of its RGBA tensor: the reference in its
  region on a grey canvas), VAE-encoded with the distribution's mode, along the sampler's own
  trajectory conditioned on the job's global prompt: the reverse Euler ODE for flow matching
  (Flux), DDIM inversion for SD. The latents are stored at every level the program pastes at and
  cached (memory + safetensors files on disk, see :class:`InversionCache`).
- ``paste``: ``x ← m·x_ref(ℓ) + (1 − m)·x`` with m the condition's coverage on the latent grid.
- ``renoise`` a → b (b < a, more noise), closed form, fresh noise ε ~ N(0, I):
    rectified flow (x_t = (1−σ)x₀ + σε):  x_b = ((1−σ_b)/(1−σ_a))·x_a + sqrt(σ_b² − ((1−σ_b)σ_a/(1−σ_a))²)·ε
    DDPM (x_t = √ᾱ x₀ + √(1−ᾱ) ε):       x_b = √(ᾱ_b/ᾱ_a)·x_a + √(1 − ᾱ_b/ᾱ_a)·ε
  Both are the forward transition q(x_b | x_a): given x₀, x_b has exactly the marginal of level b.
- ``denoise`` with η > 0 (flow matching): from v predict x̂₀ = x − σ_i·v and ε̂ = x + (1−σ_i)·v, then
  x_j = (1−σ_j)·x̂₀ + σ_j·(√(1−η²)·ε̂ + η·ξ), ξ ~ N(0, I): η = 0 is the Euler step exactly, η = 1 is
  fully re-noised. (SD uses DDIM's own η.)
- **SOW** modulation of image–image attention logits inside the cycles (:class:`SowModulation`).

All noise comes from a CPU generator seeded from the job's seed (:func:`noise_generator`), so a job
gives the same image on any device and on every run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import PlanError

COW_SEED_SALT = 0x5EED_C0C0  # the COW noise stream is independent of the initial-latent stream


# --- small pure functions ------------------------------------------------------------------------

def noise_generator(seed: int) -> torch.Generator:
    """The job's COW noise stream: a CPU generator seeded from the job seed (device-independent)."""
    return torch.Generator("cpu").manual_seed((int(seed) ^ COW_SEED_SALT) % (2**63))


def randn_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn on the CPU from ``gen``, moved to x's device."""
    return torch.randn(x.shape, generator=gen, dtype=torch.float32).to(device=x.device)


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
    """DDPM forward transition ᾱ_r → ᾱ_b (ᾱ_b < ᾱ_r): x_b = √(ᾱ_b/ᾱ_r)·x_r + √(1−ᾱ_b/ᾱ_r)·ε."""
    a_r, a_b = float(a_r), float(a_b)
    if not (0.0 < a_b < a_r <= 1.0):
        raise PlanError(f"renoise needs 0 < ᾱ_b < ᾱ_r ≤ 1, got ᾱ_r={a_r:g}, ᾱ_b={a_b:g}")
    r = a_b / a_r
    return math.sqrt(r) * x_r.to(torch.float32) + math.sqrt(1.0 - r) * noise


def flow_step_eta(x: torch.Tensor, v: torch.Tensor, s_i: float, s_j: float, eta: float,
                  noise: torch.Tensor | None) -> torch.Tensor:
    """Stochastic flow-matching step σ_i → σ_j: x̂₀ = x − σ_i v, ε̂ = x + (1−σ_i) v,
    x_j = (1−σ_j) x̂₀ + σ_j (√(1−η²) ε̂ + η ξ). η = 0 is the Euler step; η = 1 fully re-noised."""
    x, v = x.to(torch.float32), v.to(torch.float32)
    s_i, s_j, eta = float(s_i), float(s_j), float(eta)
    if not 0.0 <= eta <= 1.0:
        raise PlanError(f"eta must lie in [0, 1], got {eta:g}")
    x0 = x - s_i * v
    eps = x + (1.0 - s_i) * v
    if eta > 0.0 and noise is not None:
        eps = math.sqrt(1.0 - eta * eta) * eps + eta * noise
    return (1.0 - s_j) * x0 + s_j * eps


def paste(x: torch.Tensor, ref: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Replace the region (coverage m ∈ [0, 1], 1 = inside) of x with ref: m·ref + (1−m)·x."""
    out = m * ref.to(torch.float32) + (1 - m) * x.to(torch.float32)
    return torch.where(m >= 1, ref.to(torch.float32), out).to(x.dtype)  # exact inside


def cycle_index(program: list[dict], n: int) -> int:
    """The COW cycle an op belongs to: the number of renoise ops before position n."""
    return sum(1 for op in program[:n] if op.get("op") == "renoise")


def paste_levels(job: dict) -> dict[int, list[int]]:
    """condition index → the sorted levels the program pastes it at."""
    out: dict[int, set[int]] = {}
    conds = job.get("conditions") or []
    for op in job.get("program") or []:
        if op.get("op") == "paste":
            c, at = op.get("condition"), op.get("at")
            if not isinstance(c, int) or not 0 <= c < len(conds):
                raise PlanError(f"job {job['id']!r}: paste of condition {c!r}, the job has {len(conds)}")
            if not isinstance(at, int):
                raise PlanError(f"job {job['id']!r}: paste op without integer 'at': {op!r}")
            out.setdefault(c, set()).add(at)
    return {c: sorted(v) for c, v in out.items()}


def inside_cycles(cond: dict, op: dict) -> bool:
    """A denoise op is inside a condition's cycles when it starts within the window (cycles > 0)."""
    w = cond.get("window") or [0, 0]
    return int(cond.get("cycles") or 0) > 0 and op.get("op") == "denoise" and int(w[0]) <= int(op["from"]) < int(w[1])


def reference_rgb(plan, cond: dict, height: int, width: int) -> np.ndarray:
    """The RGB of the condition's placed reference (uint8 [H, W, 3]); alpha is the region."""
    arr = np.asarray(plan.tensor(cond["image"]))
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[:2] != (height, width):
        raise PlanError(f"reference {cond['image']!r}: need uint8 [{height}, {width}, 4], got {arr.dtype} "
                        f"{list(arr.shape)}")
    return np.ascontiguousarray(arr[..., :3])


# --- the inversion cache -------------------------------------------------------------------------

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


@dataclass
class InversionCache:
    """Inverted latents by key: in memory, and as ``<key>.safetensors`` under :func:`cache_dir`.

    Disk writes are atomic (temp file, fsync, rename); an unreadable file is treated as a miss.
    ``stats`` counts memory hits, disk hits and inversions actually run.
    """

    memory: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {"memory": 0, "disk": 0, "inverted": 0})
    disk: bool = True

    def path(self, key: str) -> Path:
        return cache_dir() / f"{key}.safetensors"

    def get(self, key: str) -> dict[int, torch.Tensor] | None:
        if key in self.memory:
            self.stats["memory"] += 1
            return self.memory[key]
        if self.disk:
            p = self.path(key)
            if p.is_file():
                try:
                    from safetensors.torch import load_file

                    lat = {int(k.split("/", 1)[1]): v for k, v in load_file(str(p)).items()}
                except Exception:  # a damaged cache file is a miss, not an error
                    lat = None
                if lat:
                    self.stats["disk"] += 1
                    self.memory[key] = lat
                    return lat
        return None

    def put(self, key: str, latents: dict[int, torch.Tensor]) -> None:
        lat = {int(k): v.detach().to("cpu", torch.float32).contiguous() for k, v in latents.items()}
        self.memory[key] = lat
        if self.disk:
            from safetensors.torch import save

            from scenec.spec.fsio import atomic_write

            try:
                atomic_write(self.path(key), save({f"level/{k}": v for k, v in lat.items()}))
            except OSError:  # a read-only home directory must not fail the build
                pass

    def clear(self) -> None:
        self.memory.clear()


CACHE = InversionCache()


# --- SOW attention modulation --------------------------------------------------------------------

@dataclass
class SowTerm:
    """One condition's modulation on the image-token grid (flattened, row-major)."""

    cond: torch.Tensor  # bool [n]: token in the condition region (coverage > 0)
    related: torch.Tensor  # bool [n]: token in the related region (empty when none)
    fall: torch.Tensor  # float [n]: exp(−distance · |p − centre| / diagonal)
    suppress: float
    enhance: float
    decay: float
    threshold: float


def sow_term(cond_mask: np.ndarray, related_mask: np.ndarray | None, params: dict) -> SowTerm:
    """Build a condition's SOW term from its token-grid coverage masks and ``modulation`` dict."""
    cm = np.asarray(cond_mask, np.float32)
    h, w = cm.shape
    if cm.sum() <= 0:
        raise PlanError("reference condition with an empty region")
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (ys * cm).sum() / cm.sum(), (xs * cm).sum() / cm.sum()  # coverage-weighted centre
    d = np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2) / math.hypot(h, w)
    fall = np.exp(-float(params.get("distance", 1.0)) * d)
    rel = np.zeros_like(cm, dtype=bool) if related_mask is None else np.asarray(related_mask) > 0
    if rel.shape != cm.shape:
        raise PlanError(f"related mask {list(rel.shape)} does not match the condition's grid {[h, w]}")
    return SowTerm(torch.from_numpy((cm > 0).reshape(-1)), torch.from_numpy(rel.reshape(-1).copy()),
                   torch.from_numpy(fall.reshape(-1).astype(np.float32)),
                   float(params.get("suppress", 2.0)), float(params.get("enhance", 2.0)),
                   float(params.get("decay", 0.8)), float(params.get("threshold", 0.5)))


def sow_unit_bias(t: SowTerm) -> torch.Tensor:
    """A term's image–image bias at gain 1, dense float ``[n, n]`` (query, key) on its grid:
    −suppress·f(k) where q ∈ C and k ∉ C, +enhance·f(q) where q ∈ R and k ∈ C, 0 elsewhere.
    Family-neutral (Flux token grid, SD UNet grids); the step's bias is Σ gain_term · unit_term."""
    sup = (t.cond[:, None] & ~t.cond[None, :]).float() * t.fall[None, :]
    enh = (t.related[:, None] & t.cond[None, :]).float() * t.fall[:, None]
    return t.enhance * enh - t.suppress * sup


def sow_spread(t: SowTerm, q: torch.Tensor, k: torch.Tensor, n_txt: int = 0,
               allow: torch.Tensor | None = None) -> float:
    """The SOW indicator of one term from one attention call's *unbiased* logits (q, k: [b, h, N, d],
    image tokens after ``n_txt`` text tokens; ``allow`` an optional bool [N, N] regional mask): mean over
    batch, heads and queries q ∈ R \\ C (the outside of C when R is empty) of Σ_{k ∈ C} softmax[q, k]."""
    rq = t.related & ~t.cond
    if not bool(rq.any()):
        rq = ~t.cond
    qi = n_txt + torch.nonzero(rq).flatten()
    logits = (q[:, :, qi].float() @ k.float().transpose(-1, -2)) / (q.shape[-1] ** 0.5)
    if allow is not None:
        logits = logits.masked_fill(~allow[qi][None, None], float("-inf"))
    p = torch.softmax(logits, dim=-1)[..., n_txt:]  # [b, h, |rq|, n_img]
    return float(p[..., t.cond].sum(-1).mean())


class SowModulation:
    """SOW: an additive bias on image–image attention logits inside COW's cycles.

    For image query q and image key k (token grid), per condition with region C, related region R,
    fall-off f(p) = exp(−distance·|p − centre(C)|/diagonal) and gain g = decay^cycle:

        B[q, k] −= suppress · g · f(k)   if q ∈ C and k ∉ C   (the condition region does not read
                                                                the outside: one-way)
        B[q, k] += enhance  · g · f(q)   if q ∈ R and k ∈ C   (the related region reads the condition)

    Indicator (per denoise op, per condition): in the first attention call of the step's positive
    forward, the spread s = mean over heads and over queries q ∈ R \\ C (the outside of C when R is
    empty) of Σ_{k ∈ C} softmax(QKᵀ/√d + log M)[q, k], from the *unbiased* logits (with the regional
    mask M if any). The term applies to that step's forwards only while s < threshold.
    Text tokens are never biased. Dense additive bias through SDPA on CPU; FlexAttention score_mod on
    CUDA (with the regional BlockMask when there is one).
    """

    def __init__(self, terms: list[SowTerm], n_img: int, device):
        self.terms = [SowTerm(t.cond.to(device), t.related.to(device), t.fall.to(device), t.suppress, t.enhance,
                              t.decay, t.threshold) for t in terms]
        self.n_img = n_img
        self.device = torch.device(device)
        self.gains = torch.zeros(len(terms), device=device)  # per-term gain this step (0 = off)
        self._g = [0.0] * len(terms)  # the same gains on the host: read per attention call without a device sync
        self._score_mods: dict[int, object] = {}
        self.cycle = 0
        self.pending = False  # measure the indicator at the next attention call
        self.history: list[dict] = []  # per step: cycle, spread per term, gains (diagnostics, tests)
        self._dense: dict = {}
        self._units: dict[int, torch.Tensor] = {}  # per term: its bias at gain 1 (built once per job)

    # per step, from the backend's loop
    def begin_step(self, cycle: int, inside: list[bool]) -> bool:
        """Arm for one denoise op; False when no term is inside its cycles (then do not install)."""
        self.cycle = cycle
        self._inside = inside
        g = torch.tensor([(t.decay ** cycle) if ins else 0.0 for t, ins in zip(self.terms, inside)],
                         dtype=torch.float32)
        self.gains.copy_(g)  # in place: the CUDA score_mod captured this tensor
        self._g = g.tolist()
        self._dense.clear()
        self.pending = any(inside)
        return self.pending

    def image_bias(self) -> torch.Tensor:
        """Dense float ``[n_img, n_img]`` bias for the current gains."""
        b = torch.zeros(self.n_img, self.n_img, device=self.device)
        for ti, (t, g) in enumerate(zip(self.terms, self._g)):
            if g == 0.0:
                continue
            if ti not in self._units:
                self._units[ti] = sow_unit_bias(t)
            b = b + g * self._units[ti]
        return b

    def _measure(self, q: torch.Tensor, k: torch.Tensor, n_txt: int, allow: torch.Tensor | None) -> None:
        """The indicator from one attention call's unbiased logits; switches off spread terms."""
        spreads = []
        for ti, t in enumerate(self.terms):
            if self._g[ti] == 0.0:
                spreads.append(None)
                continue
            s = sow_spread(t, q, k, n_txt, allow)
            spreads.append(s)
            if s >= t.threshold:
                self.gains[ti] = 0.0
                self._g[ti] = 0.0
        self.history.append({"cycle": self.cycle, "spread": spreads, "gains": list(self._g)})
        self._dense.clear()

    def attend(self, q, k, v, built, probe: list | None = None):
        """Attention with the bias (and the regional mask ``built`` if any); q, k, v: [b, h, N, d]."""
        import torch.nn.functional as F

        N = q.shape[2]
        n_txt = N - self.n_img
        if n_txt < 0:
            raise PlanError(f"SOW: {N} tokens but {self.n_img} image tokens")
        if self.pending:
            self.pending = False
            allow = None
            if built is not None:
                allow = built.layout.dense(q.device) if built.impl == "flex" else built.mask[0, 0]
            self._measure(q, k, n_txt, allow)
        if not any(g != 0.0 for g in self._g):  # host copy: no device sync per attention call
            if built is None:
                return F.scaled_dot_product_attention(q, k, v)
            if built.impl == "flex":
                from .attention import _flex

                return _flex()(q, k, v, block_mask=built.mask)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=built.mask)
        if q.device.type == "cuda" and (built is None or built.impl == "flex"):
            return self._flex(q, k, v, built, n_txt)
        key = (N, id(built))
        if key not in self._dense:
            full = torch.zeros(N, N, device=q.device, dtype=torch.float32)
            full[n_txt:, n_txt:] = self.image_bias().to(q.device)
            if built is not None:
                full = full.masked_fill(~built.mask[0, 0], float("-inf"))
            self._dense[key] = full.to(q.dtype)[None, None]
        bias = self._dense[key]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if probe is not None:
            logits = (q.float() @ k.float().transpose(-1, -2)) / (q.shape[-1] ** 0.5)
            probe.append({"kind": "sow", "logits": logits, "bias": bias[0, 0].float(), "n_txt": n_txt,
                          "expected": torch.softmax(logits + bias[0, 0].float(), -1) @ v.float(), "out": out.float()})
        return out

    def _flex(self, q, k, v, built, n_txt: int):
        """CUDA: the same bias as a FlexAttention score_mod over per-token tables (no dense N×N)."""
        from .attention import _flex

        if n_txt not in self._score_mods:  # one closure per text length: compiled once, gains read in place
            self._score_mods[n_txt] = self._make_score_mod(n_txt)
        return _flex()(q, k, v, score_mod=self._score_mods[n_txt],
                       block_mask=None if built is None else built.mask)

    def _make_score_mod(self, n_txt: int):
        n = self.n_img
        terms, gains = self.terms, self.gains

        def score_mod(score, b, h, q_idx, kv_idx):
            qi = (q_idx - n_txt).clamp(0, n - 1)
            ki = (kv_idx - n_txt).clamp(0, n - 1)
            img = (q_idx >= n_txt) & (kv_idx >= n_txt)
            add = score * 0
            for ti, t in enumerate(terms):
                g = gains[ti]
                sup = t.cond[qi] & ~t.cond[ki]
                enh = t.related[qi] & t.cond[ki]
                add = add - torch.where(sup, t.suppress * g * t.fall[ki], 0.0) \
                    + torch.where(enh, t.enhance * g * t.fall[qi], 0.0)
            return score + torch.where(img, add, 0.0)

        return score_mod


# --- shared plan checks ----------------------------------------------------------------------------

def check_cow_ops(job: dict, steps: int) -> None:
    """Field checks of the COW ops (paste / renoise) and of η, with one-sentence errors."""
    conds = job.get("conditions") or []
    for op in job.get("program") or []:
        kind = op.get("op")
        if kind == "renoise":
            a, b = op.get("from"), op.get("to")
            if not isinstance(a, int) or not isinstance(b, int) or not (0 <= b < a <= steps):
                raise PlanError(f"job {job['id']!r}: renoise needs integers 0 ≤ to < from ≤ {steps}, got {op!r}")
        elif kind == "paste":
            c, at = op.get("condition"), op.get("at")
            if not isinstance(c, int) or not 0 <= c < len(conds):
                raise PlanError(f"job {job['id']!r}: paste of condition {c!r}, the job has {len(conds)}")
            if not isinstance(at, int) or not 0 <= at <= steps:
                raise PlanError(f"job {job['id']!r}: paste at {at!r} outside 0..{steps}")
        elif kind == "denoise":
            eta = op.get("eta") or 0.0
            if not isinstance(eta, (int, float)) or not 0.0 <= float(eta) <= 1.0:
                raise PlanError(f"job {job['id']!r}: eta must lie in [0, 1], got {eta!r}")


def latent_mask(plan, masks: dict | None, grid_hw: tuple[int, int], what: str) -> np.ndarray:
    m = plan.mask(masks, "latent")
    if m is None:
        return np.ones(grid_hw, np.float32)
    if m.shape != tuple(grid_hw):
        raise PlanError(f"{what}: mask of shape {list(m.shape)} does not match the latent grid {list(grid_hw)}")
    return m


def sow_terms(plan, job: dict, grid: str) -> list[SowTerm | None]:
    """Per condition of the job, its SOW term on ``grid`` (None: no modulation or no cycles)."""
    terms = []
    for c in job.get("conditions") or []:
        mod = c.get("modulation")
        if not mod or int(c.get("cycles") or 0) <= 0:
            terms.append(None)
            continue
        cm = plan.mask(c.get("masks"), grid)
        if cm is None:
            cm = np.ones(plan.grid(grid), np.float32)
        rel = plan.mask(c.get("related"), grid) if c.get("related") else None
        terms.append(sow_term(cm, rel, mod))
    return terms


def sow_for(plan, job: dict, grid: str, device) -> SowModulation | None:
    """The job's SOW modulation on ``grid`` (Flux: "token"), or None when no active condition has one."""
    terms = sow_terms(plan, job, grid)
    if not any(t is not None for t in terms):
        return None
    h, w = plan.grid(grid)
    sow = SowModulation([t for t in terms if t is not None], h * w, device)
    sow.index = [i for i, t in enumerate(terms) if t is not None]  # term → condition index
    return sow


class SowGrids:
    """SOW on image-only self-attention at several resolutions (SD: the UNet's ``attn1`` everywhere).

    The bias and the indicator are :class:`SowModulation`'s (:func:`sow_unit_bias`, :func:`sow_spread`),
    with each grid's own terms (condition / related masks, centre, fall-off and diagonal on that grid),
    picked per attention call by the query's token count. The unit tables (bias at gain 1) are built
    once per job and grid; per denoise op only the per-term gains change (decay^cycle, 0 once the
    indicator says the information has spread), and the combined bias is formed once per op and grid.
    The indicator is measured at the op's first attention call, on the batch rows ``rows`` (the
    positive pass: the backend sets them when CFG batches [negative, positive]).
    Kernel: a dense additive ``[n, n]`` bias through SDPA on every device (the sequences are short).
    """

    def __init__(self, grids: dict[int, list[SowTerm]], index: list[int], device):
        self.device = torch.device(device)
        self.grids = {n: [SowTerm(t.cond.to(device), t.related.to(device), t.fall.to(device), t.suppress,
                                  t.enhance, t.decay, t.threshold) for t in ts] for n, ts in grids.items()}
        self.index = index  # term → condition index
        first = next(iter(self.grids.values()))
        self.decay = [t.decay for t in first]
        self.gains = [0.0] * len(first)  # per term, this op (0 = off)
        self.cycle = 0
        self.pending = False  # measure the indicator at the next attention call
        self.rows = slice(None)  # batch rows of the positive pass (indicator)
        self.history: list[dict] = []  # per op: cycle, grid, spread per term, gains (diagnostics, tests)
        self._units: dict[int, list[torch.Tensor]] = {}  # token count → per-term bias at gain 1
        self._bias: dict = {}  # (token count, dtype) → this op's [1, 1, n, n] bias

    def begin_step(self, cycle: int, inside: list[bool]) -> bool:
        """Arm for one denoise op; False when no term is inside its cycles (then do not install)."""
        self.cycle = cycle
        self.gains = [(d ** cycle) if ins else 0.0 for d, ins in zip(self.decay, inside)]
        self._bias.clear()
        self.rows = slice(None)
        self.pending = any(inside)
        return self.pending

    def terms_for(self, n: int) -> list[SowTerm]:
        ts = self.grids.get(n)
        if ts is None:
            raise PlanError(f"SOW: no grid has {n} tokens (grids: {sorted(self.grids)})")
        return ts

    def units(self, n: int) -> list[torch.Tensor]:
        if n not in self._units:
            self._units[n] = [sow_unit_bias(t) for t in self.terms_for(n)]
        return self._units[n]

    def bias(self, n: int, dtype) -> torch.Tensor | None:
        """This op's ``[1, 1, n, n]`` bias on the grid of n tokens (None when every gain is 0)."""
        if not any(g != 0.0 for g in self.gains):
            return None
        key = (n, dtype)
        if key not in self._bias:
            b = torch.zeros(n, n, device=self.device)
            for g, u in zip(self.gains, self.units(n)):
                if g != 0.0:
                    b = b + g * u
            self._bias[key] = b.to(dtype)[None, None]
        return self._bias[key]

    def measure(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """The indicator from one call's unbiased logits (q, k: [b, h, n, d]); switches off spread terms."""
        n = q.shape[2]
        spreads = []
        for ti, t in enumerate(self.terms_for(n)):
            if self.gains[ti] == 0.0:
                spreads.append(None)
                continue
            s = sow_spread(t, q[self.rows], k[self.rows])
            spreads.append(s)
            if s >= t.threshold:
                self.gains[ti] = 0.0
        self.history.append({"cycle": self.cycle, "grid": n, "spread": spreads, "gains": list(self.gains)})
        self._bias.clear()

    def attend(self, q, k, v, probe: list | None = None):
        """Self-attention with this op's bias; q, k, v: [b, h, n, d], all image tokens."""
        import torch.nn.functional as F

        n = q.shape[2]
        if self.pending:
            self.pending = False
            self.measure(q, k)
        bias = self.bias(n, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if probe is not None and bias is not None:
            logits = (q.float() @ k.float().transpose(-1, -2)) / (q.shape[-1] ** 0.5)
            probe.append({"kind": "sow", "n_q": n, "logits": logits, "bias": bias[0, 0].float(), "n_txt": 0,
                          "expected": torch.softmax(logits + bias[0, 0].float(), -1) @ v.float(),
                          "out": out.float()})
        return out


def sow_grids(plan, job: dict, grids, device) -> SowGrids | None:
    """The job's SOW on every plan grid of ``grids`` present in the plan (SD: latent, a16, a32, a64),
    keyed by token count, or None when no active condition has a modulation."""
    by_n: dict[int, list[SowTerm]] = {}
    index: list[int] = []
    for g in grids:
        if g not in plan.json["grids"]:
            continue
        terms = sow_terms(plan, job, g)
        index = [i for i, t in enumerate(terms) if t is not None]
        if not index:
            return None
        h, w = plan.grid(g)
        by_n[h * w] = [t for t in terms if t is not None]
    if not by_n:
        return None
    return SowGrids(by_n, index, device)


# --- Flux ------------------------------------------------------------------------------------------

class FluxCow:
    """COW/SOW state of one Flux job: inverted references, packed masks, noise stream, modulation.

    The backend's loop calls :meth:`before` for every op (paste / renoise are done here; for denoise
    it arms SOW) and :meth:`step_eta` for denoise ops with η > 0.
    """

    def __init__(self, backend, plan, job: dict, sig, guidance, img_ids, latents: torch.Tensor,
                 height: int, width: int, cache: InversionCache | None = None):
        self.backend, self.plan, self.job = backend, plan, job
        self.program = job["program"]
        self.conds = job.get("conditions") or []
        self.sig = [float(s) for s in sig]
        self.steps = len(self.sig) - 1
        check_cow_ops(job, self.steps)
        self.gen = noise_generator(job["seed"])
        self.cache = CACHE if cache is None else cache
        pipe = backend.pipe
        self.lh, self.lw = 2 * (height // (pipe.vae_scale_factor * 2)), 2 * (width // (pipe.vae_scale_factor * 2))
        self.c = latents.shape[2] // 4
        self.dtype = latents.dtype
        self.refs: dict[int, dict[int, torch.Tensor]] = {}
        self.masks: dict[int, torch.Tensor] = {}
        self.inversions = 0
        for ci, levels in paste_levels(job).items():
            cond = self.conds[ci]
            m = latent_mask(plan, cond.get("masks"), (self.lh, self.lw), f"condition {cond.get('entity')!r}")
            self.masks[ci] = self.pack(torch.from_numpy(np.ascontiguousarray(m, np.float32)))
            self.refs[ci] = self._inverted(cond, m, levels, guidance, img_ids, height, width)
        self.sow = sow_for(plan, job, "token", backend.device)

    def pack(self, m: torch.Tensor) -> torch.Tensor:
        """A latent-grid mask packed like the latents ([1, tokens, 4·c]), as flux.py's inpaint mask."""
        c = self.c
        mt = m.to(self.backend.device)[None, None].expand(1, c, self.lh, self.lw).contiguous()
        return self.backend.pipe._pack_latents(mt, 1, c, self.lh, self.lw)

    @torch.inference_mode()
    def encode_reference(self, cond: dict, height: int, width: int) -> torch.Tensor:
        """Packed z_ref: the placed reference's RGB, VAE-encoded with the distribution's mode."""
        from PIL import Image

        pipe = self.backend.pipe
        rgb = reference_rgb(self.plan, cond, height, width)
        img = pipe.image_processor.preprocess(Image.fromarray(rgb), height=height, width=width)
        z = pipe.vae.encode(img.to(device=self.backend.device, dtype=pipe.vae.dtype)).latent_dist.mode()
        z = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        c, lh, lw = z.shape[1:]
        return pipe._pack_latents(z.to(self.dtype), 1, c, lh, lw)

    def _key(self, cond: dict, m: np.ndarray, levels: list[int], guidance, height: int, width: int) -> str:
        from scenec import __version__

        be, plan = self.backend, self.plan
        parts = {"family": "flux", "model": be.model_id, "dtype": str(self.dtype), "version": __version__,
                 "prompt": plan.prompt(self.job["global"]["prompt"]),
                 "msl": int(plan.model.get("max_sequence_length") or 512),
                 "guidance": None if guidance is None else float(guidance[0]), "sigmas": [repr(s) for s in self.sig],
                 "levels": levels, "canvas": [width, height], "solver": "reverse-euler",
                 "refine": [INVERSION_REFINE, INVERSION_TOL]}
        return inversion_key(parts, {"rgba": np.asarray(self.plan.tensor(cond["image"])), "mask": m})

    @torch.inference_mode()
    def _inverted(self, cond, m, levels, guidance, img_ids, height, width) -> dict[int, torch.Tensor]:
        key = self._key(cond, m, levels, guidance, height, width)
        hit = self.cache.get(key)
        if hit is not None and all(lv in hit for lv in levels):
            return {lv: hit[lv].to(self.backend.device, self.dtype) for lv in levels}
        z = self.encode_reference(cond, height, width)
        out = invert_flow(self.backend, self.plan, self.job, z, self.sig, levels, guidance, img_ids)
        self.cache.stats["inverted"] += 1
        self.inversions += 1
        self.cache.put(key, out)
        return {lv: x.to(self.dtype) for lv, x in out.items()}

    # -- the loop's hooks -----------------------------------------------------------------------
    def before(self, n: int, op: dict, latents: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Do op n if it is a COW op (returns (latents, True)); for denoise, arm SOW (returns False)."""
        kind = op.get("op")
        if kind == "paste":
            ci, at = op["condition"], op["at"]
            return paste(latents, self.refs[ci][at], self.masks[ci]), True
        if kind == "renoise":
            a, b = op["from"], op["to"]
            x = renoise_flow(latents, self.sig[a], self.sig[b], randn_like(latents, self.gen))
            return x.to(latents.dtype), True
        if kind == "denoise":
            reg = self.backend.regional
            reg.modulation = None
            if self.sow is not None:
                inside = [inside_cycles(self.conds[ci], op) for ci in self.sow.index]
                if self.sow.begin_step(cycle_index(self.program, n), inside):
                    reg.modulation = self.sow
        return latents, False

    def step_eta(self, x: torch.Tensor, v: torch.Tensor, s_from, s_to, eta: float) -> torch.Tensor:
        noise = randn_like(x, self.gen) if float(s_to) > 0 else None
        return flow_step_eta(x, v, s_from, s_to, eta, noise)


INVERSION_REFINE = 20  # fixed-point iterations per inverted step (0 = plain reverse Euler)
INVERSION_TOL = 1e-5  # stop refining when max |Δx| ≤ tol · max(1, max |x|)


def refine_step(x_next: torch.Tensor, x_guess: torch.Tensor, step, iters: int = INVERSION_REFINE,
                tol: float = INVERSION_TOL, memory: int = 5) -> torch.Tensor:
    """Solve step(x) = x_next for x, from x_guess: the sampler's own deterministic step, inverted.

    Fixed point of G(x) = x + (x_next − step(x)) with Anderson acceleration (type II, ``memory``
    last iterates; plain iteration does not contract on large steps of random tiny weights). Stops
    when max |x_next − step(x)| ≤ tol · max(1, max |x_next|) or after ``iters`` model calls.
    """
    x = x_guess
    scale = max(1.0, float(x_next.abs().max()))
    gs: list[torch.Tensor] = []
    fs: list[torch.Tensor] = []
    for _ in range(iters):
        f = x_next - step(x)
        if float(f.abs().max()) <= tol * scale:
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
            gamma = torch.linalg.lstsq(df.cpu(), fs[-1].cpu()[:, None]).solution.to(df.device)
            x = (gs[-1] - (dg @ gamma).flatten()).to(x_next.dtype).view_as(x_next)
        else:
            x = g
    return x


@torch.inference_mode()
def invert_flow(backend, plan, job: dict, z: torch.Tensor, sig: list[float], levels: list[int], guidance,
                img_ids, refine: int | None = None) -> dict[int, torch.Tensor]:
    """Reverse Euler ODE for flow matching, from σ_N = 0 up to the lowest pasted level.

    x_i = x_{i+1} + (σ_i − σ_{i+1})·v(x_{i+1}, σ_{i+1}), v from the plain model (no region mask, no
    modulation) on the job's global prompt with the sampler's guidance; then up to ``refine``
    (Anderson-accelerated) fixed-point iterations of the implicit step x_i = x_{i+1} − (σ_{i+1} − σ_i)·v(x_i, σ_i) (the sampler's own
    Euler step, inverted exactly: random tiny weights need it, see docs/references.md).
    Returns {level: latent}.
    """
    n = len(sig) - 1
    refine = INVERSION_REFINE if refine is None else refine
    g = backend.encode_global(plan.prompt(job["global"]["prompt"]), int(plan.model.get("max_sequence_length") or 512))
    txt_ids = torch.zeros(g.seq.shape[1], 3, device=backend.device, dtype=backend.pipe.text_encoder.dtype)
    reg = backend.regional
    saved = (reg.current, reg.kinds, reg.modulation)
    reg.current, reg.kinds, reg.modulation = None, (), None

    def vel(x, s):
        # the sampler's timestep exactly (flux.run_job): float32 σ·1000 (the scheduler's timesteps), cast to
        # the model dtype, then / 1000 — not σ cast directly (bf16: 0.6211 vs 0.625, a different step)
        t = (torch.full([x.shape[0]], s, device=x.device, dtype=torch.float32) * 1000).to(x.dtype) / 1000
        return backend.transformer(hidden_states=x, timestep=t, guidance=guidance, pooled_projections=g.pooled,
                                   encoder_hidden_states=g.seq, txt_ids=txt_ids, img_ids=img_ids,
                                   joint_attention_kwargs={}, return_dict=False)[0].to(torch.float32)

    out: dict[int, torch.Tensor] = {}
    x = z.to(torch.float32)
    try:
        if n in levels:
            out[n] = x.clone()
        for i in range(n - 1, min(levels) - 1, -1):
            guess = x + (sig[i] - sig[i + 1]) * vel(x.to(z.dtype), sig[i + 1])
            if refine > 0:
                def step(y, i=i):
                    return y + (sig[i + 1] - sig[i]) * vel(y.to(z.dtype), sig[i])

                guess = refine_step(x, guess, step, refine, INVERSION_TOL)
            x = guess
            if i in levels:
                out[i] = x.clone()
    finally:
        reg.current, reg.kinds, reg.modulation = saved
    return out
