"""The one sampler: interprets a plan's step program for every model family (k-diffusion style).

A :class:`Run` is one sampling run: a job, or batch-compatible jobs of any plans as the rows of one
batch (runtime/batching.py). It draws each row's initial noise as the family's pipeline does (the
job's seed, a CPU generator), makes the family's solver, and instantiates the methods the jobs need
(runtime/methods/). :func:`sample` then walks the ops:

- ``denoise i → j``: the methods' ``before_denoise``; the family's guided model output, each model call
  shaped by the methods (``shape``: which text; ``modifiers``: attention modifiers; padding masked,
  :func:`runtime.backend.pad_masks`); the methods' ``output``; the solver's step (η from the op, noise
  from the job's noise stream); the methods' ``after_step``;
- ``fork``: the end of a coupling group's shared prefix (:func:`run_group`);
- any other op: the method that owns its type (``Method.ops``).

There is no method-specific branch here: a new method is a module under runtime/methods/.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from scenec.spec.errors import PlanError, RuntimeErrorBase, Unsupported
from scenec.spec.plan import Denoise, Fork, Job, Plan

from .backend import Call, Stream, TextSpec, host_to_device, pad_masks
from .finite import require_finite
from .methods import Method, registered
from .prompt_editing import at_level, texts

NOISE_SALT = 0x5EED_C0C0  # the job's noise stream (η steps, re-noising) is independent of its initial noise


def noise_generator(seed: int) -> torch.Generator:
    """The job's noise stream: a CPU generator seeded from the job seed (device-independent)."""
    return torch.Generator("cpu").manual_seed((int(seed) ^ NOISE_SALT) % (2**63))


@dataclass
class JobResult:
    image: object  # PIL.Image, or None when not decoded
    latents: torch.Tensor  # the final latent of the job's row
    timings: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)  # what methods measured (visual.refine's losses); sidecar


@dataclass
class Row:
    """One batch row: a job of a plan, its initial latent and the generator that drew it."""

    plan: Plan
    job: Job
    x: torch.Tensor
    gen: torch.Generator
    spec: TextSpec  # the job's own streams: [global | entities…]


def job_spec(job: Job) -> TextSpec:
    """A job's text as the plan gives it: the global prompt, then each entity over its region."""
    g = Stream(job.global_.prompt, job.global_.negative, as_global=True)
    return TextSpec(g, tuple(Stream.entity(e) for e in job.entities), (g,))


class Run:
    """One sampling run (see the module docstring); methods and families read its state."""

    def __init__(self, backend, pairs: list[tuple[Plan, Job]]):
        if not pairs:
            raise PlanError("a run needs at least one job")
        self.backend = backend
        self.plan = pairs[0][0]
        self.solver = backend.solver(self.plan)
        self.rows: list[Row] = []
        for plan, job in pairs:
            x, gen = backend.prepare_latents(plan, job.seed)
            self.rows.append(Row(plan, job, x, gen, job_spec(job)))
        self.x = torch.cat([r.x for r in self.rows])
        scale = getattr(self.solver, "start_scale", 1.0)  # the solver's initial noise std (runtime/euler.py)
        if scale != 1.0:
            self.x = (self.x.to(torch.float32) * scale).to(self.x.dtype)
        self._noise: torch.Generator | None = None
        self._conds: dict = {}
        self.init_latents: dict[int, torch.Tensor] = {}  # row → its init image's latent, given (runtime/hires.py)
        self.diagnostics: dict = {}  # methods' measurements for the job's sidecar (run_job's JobResult)
        classes = [M for M in registered() if any(M.wants(r.plan, r.job) for r in self.rows)]
        if len(self.rows) > 1:
            alone = [M.name for M in classes if not M.batchable]
            if alone:
                raise PlanError(f"jobs with {', '.join(alone)} run alone, not as batch rows")
        self.methods = [M(self) for M in classes]
        self.handlers = {t: m for m in self.methods for t in m.ops}

    @property
    def job(self) -> Job:
        """The run's job (methods that run only on single-job runs use this)."""
        return self.rows[0].job

    def setup(self) -> None:
        """Check that the family runs every method the jobs need, then each method's setup."""
        from scenec.compiler.caps import FAMILIES, METHODS

        fam = FAMILIES.get(self.backend.family)
        for m in self.methods:
            for cap in m.capabilities():
                if fam is not None and cap not in fam.methods:
                    raise Unsupported(f"job {self.job.id!r}: {METHODS.get(cap, cap)} is not supported by "
                                      f"{self.backend.family} models")
        for m in self.methods:
            m.setup()

    def sampled(self) -> None:
        """Each method's ``sampled``: sampling is over, the decode comes next."""
        for m in self.methods:
            m.sampled()

    def close(self) -> None:
        """Each method's ``close`` (LoRA hooks off the model), whatever happened: one that raises does not keep the
        others from undoing theirs (the plan's VAE stayed swapped in for every later plan); the first error is
        raised after."""
        first = None
        for m in self.methods:
            try:
                m.close()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                first = first or e
        if first is not None:
            raise first

    # -- noise ---------------------------------------------------------------------------------------
    def noise_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``x`` from the job's noise stream (drawn on the CPU)."""
        if self._noise is None:
            self._noise = noise_generator(self.job.seed)
        return host_to_device(torch.randn(x.shape, generator=self._noise, dtype=torch.float32), x.device)

    # -- model calls ----------------------------------------------------------------------------------
    def call(self, pairs: list[tuple[int, bool]], op: Denoise | None, level: int) -> Call:
        """A model call for ``(row, negative)`` pairs at ``level``: shaped by the methods (None ``op``:
        the plain model on each row's global prompt, no method takes part), text assembled (cached),
        modifiers collected, padding masked."""
        plain = op is None
        specs = [self.rows[r].spec for r, _ in pairs]
        if plain:
            specs = [TextSpec(s.global_, (), (s.global_,)) for s in specs]
        c = Call([r for r, _ in pairs], [n for _, n in pairs], specs, level,
                 regional=False if plain else op.regional, theta=None if plain else op.theta)
        methods = [] if plain else self.methods
        for m in methods:
            m.shape(c)
        # A1111's prompt editing: each row's plan as this step reads it, keyed by the texts it reads
        plans = [at_level(self.rows[r].plan, self.rows[r].job, level) for r in c.rows]
        read = [texts(p, s, n) for p, s, n in zip(plans, c.specs, c.negatives)]
        key = tuple(zip(c.rows, c.specs, c.negatives, read))
        if key not in self._conds:
            self._conds[key] = self.backend.cond(list(zip(plans, c.specs, c.negatives)))
        c.cond = self._conds[key]
        for m in methods:
            c.mods.extend(m.modifiers(c))
            if type(m).denoiser_inputs is not Method.denoiser_inputs:
                c.inputs.append(m.denoiser_inputs)
        be = self.backend
        c.mods.extend(pad_masks(c, be.sites, be.mask_impl, be.device))
        return c

    def predict(self, x: torch.Tensor, level: int, op: Denoise | None = None) -> torch.Tensor:
        """The family's guided model output for the op's calls (None ``op``: the plain model)."""
        return self.backend.predict(self, x, level, lambda pairs: self.call(pairs, op, level))

    def predict_plain(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """The plain model at a level on the global prompt with the sampler's guidance (inversion)."""
        return self.predict(x, level)


def model_output(run: Run, x: torch.Tensor, solver, mods: list = ()) -> torch.Tensor:
    """One model output outside the sampling loop (adapter training, runtime/train_adapter.py): the family's
    guided output at level 0 of ``solver`` (a one-level table: the training noise level) on each row's
    global prompt, no method taking part, with ``mods`` added to every call's attention modifiers. The
    families assemble the text and run the model as in sampling; called outside inference mode,
    gradients reach whatever ``mods`` hold."""
    def call(pairs):
        c = run.call(pairs, None, 0)
        c.mods = c.mods + list(mods)
        return c

    kept, run.solver = run.solver, solver
    try:
        return run.backend.predict(run, x, 0, call)
    finally:
        run.solver = kept


def denoise(run: Run, n: int, op: Denoise) -> torch.Tensor:
    """One sampler step (see the module docstring)."""
    for m in run.methods:
        m.before_denoise(n, op)
    x = run.x
    out = run.predict(x, op.from_, op)
    dtype = out.dtype
    for m in run.methods:
        out = m.output(n, op, x, out)
    x_new = run.solver.step(x, out, op.from_, op.to, op.eta, lambda: run.noise_like(x), dtype)
    for m in run.methods:
        x_new = m.after_step(n, op, x_new)
    return x_new


def sample(run: Run, program: list, start: int = 0, stop_at_fork: bool = False,
           progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Interpret ``program`` from op ``start`` on ``run.x``; ``stop_at_fork`` ends at the ``fork`` op."""
    for n, op in enumerate(program):
        if n < start:
            continue
        if isinstance(op, Fork):
            if stop_at_fork:
                break
        elif isinstance(op, Denoise):
            run.x = denoise(run, n, op)
        else:
            owner = run.handlers.get(type(op))
            if owner is None:
                raise Unsupported(f"step op {op.op!r} is not supported by this runtime yet")
            run.x = owner.run_op(n, op, run.x)
        if progress is not None:
            progress(n + 1)
    return run.x


def _job(plan: Plan, job) -> Job:
    """A plan's typed job from a job, its raw dict or its id (raises the job's validation error)."""
    if isinstance(job, Job):
        return job
    return plan.job(job["id"] if isinstance(job, dict) else job)


@torch.no_grad()  # not inference_mode: visual.refine takes gradients mid-run (methods/visual_refine.py)
def run_job(backend, plan: Plan, job, progress: Callable[[int], None] | None = None, decode: bool = True,
            stop_at_fork: bool = False, resume: tuple[int, torch.Tensor] | None = None,
            init_latent: torch.Tensor | None = None) -> JobResult:
    """Sample one job and decode it.

    Coupling groups: ``stop_at_fork`` ends at the program's ``fork`` op (the shared prefix's latent, not
    decoded); ``resume=(op index, latents)`` starts there with a copy (:func:`run_group`). ``init_latent``: the
    latent of the job's init image, given instead of encoding it (a hires pass upscaled in latent space)."""
    t0 = time.perf_counter()
    job = _job(plan, job)
    run = Run(backend, [(plan, job)])
    if init_latent is not None:
        run.init_latents[0] = init_latent
    start = 0
    if resume is not None:
        start, run.x = int(resume[0]), resume[1].clone()
    try:  # the decode is part of the run: what methods set up for it (the plan's VAE, tiling) still holds
        run.setup()
        t_enc = time.perf_counter()
        x = sample(run, job.program, start, stop_at_fork, progress)
        require_finite(x, "the final latent")
        run.sampled()
        t_den = time.perf_counter()
        image = backend.decode(x, plan) if decode else None
        t_dec = time.perf_counter()
    finally:
        run.close()
    return JobResult(image, x, {"encode_s": t_enc - t0, "denoise_s": t_den - t_enc, "decode_s": t_dec - t_den,
                                "total_s": t_dec - t0}, run.diagnostics)


@torch.no_grad()
def run_batch(backend, plan_jobs: list[tuple[Plan, object]], progress: Callable[[int], None] | None = None,
              ) -> list[JobResult | Exception]:
    """Sample batch-compatible jobs (runtime/batching.batch_key), possibly of different plans, as the
    rows of one batch: one model call per branch and step for all of them.

    Each row keeps its own noise (its seed's generator, as alone), text, regions and init image; texts
    are padded to the longest row and the padding masked, so a row computes what it computes alone, up
    to the float rounding of batched kernels. One JobResult per row, or the row's error (a job whose
    plan data is invalid fails alone)."""
    from .batching import require_compatible, row_timings

    if not plan_jobs:
        return []
    t0 = time.perf_counter()
    out: list[JobResult | Exception | None] = [None] * len(plan_jobs)
    live = []
    for k, (plan, job) in enumerate(plan_jobs):
        try:
            live.append((k, plan, _job(plan, job)))
        except RuntimeErrorBase as e:
            out[k] = e
    if not live:
        return out
    require_compatible([(p, j) for _, p, j in live])
    run = Run(backend, [(p, j) for _, p, j in live])
    try:  # decodes inside the run, as run_job's
        run.setup()
        t_enc = time.perf_counter()
        x = sample(run, live[0][2].program, progress=progress)
        run.sampled()
        t_den = time.perf_counter()
        for b, (k, plan, _) in enumerate(live):
            t1 = time.perf_counter()
            try:  # a row with NaN fails alone
                require_finite(x[b:b + 1], "the final latent")
                image = backend.decode(x[b:b + 1], plan)
            except RuntimeErrorBase as e:
                out[k] = e
                continue
            out[k] = JobResult(image, x[b:b + 1], row_timings(t_enc - t0, t_den - t_enc, time.perf_counter() - t1,
                                                              len(live)))
    finally:
        run.close()
    return out


# --- coupling groups: the shared θ = 0 prefix ------------------------------------------------------

def sharing_enabled(share: bool | None = None) -> bool:
    """``share`` if given, else the environment: SCENEC_SHARED_PREFIX=0 turns sharing off."""
    if share is not None:
        return bool(share)
    return os.environ.get("SCENEC_SHARED_PREFIX", "1").strip().lower() not in ("0", "false", "no", "off")


def _share_key(plan: Plan, job: Job) -> str | None:
    """What the prefix before a job's ``fork`` depends on, when it is only θ = 0 deterministic denoise
    steps and the job has no reference conditions: jobs with equal keys compute it identically. None under a
    multistep solver (its history would not carry over to the resumed runs) or an ancestral one (a resumed run
    would draw its noise stream again from the start): compiler/solvers.py."""
    from scenec.compiler.solvers import UNSHARED

    k = job.fork_at
    if not k or job.conditions or plan.sampler.kind in UNSHARED:
        return None
    pre = job.program[:k]
    if not all(isinstance(op, Denoise) and op.theta == 0.0 and not op.eta for op in pre):
        return None
    g = job.global_
    return json.dumps([job.seed, g.prompt, g.negative, job.init_image, job.inpaint_mask,
                       [op.model_dump(by_alias=True) for op in pre]], sort_keys=True)


def run_group(backend, plan: Plan, group, jobs: list, progress: Callable[[str, int], None] | None = None,
              share: bool | None = None, decode: bool = True) -> Iterator[tuple[Job, JobResult | RuntimeErrorBase]]:
    """Run a coupling group's jobs together; yields ``(job, JobResult | error)`` per job.

    Jobs whose leading θ = 0 steps are the same computation (same seed, background prompt and
    negative, init image and inpaint mask, the same prefix ops before the ``fork`` op, no reference
    conditions) run that prefix once, at batch 1; each then continues from a copy of the latent.
    With sharing off (``share=False`` or SCENEC_SHARED_PREFIX=0) every job runs alone; the images
    are identical either way. A failure fails only its job (a failing prefix: each job runs alone).
    ``progress(job_id, ops_done)``.
    """
    share = sharing_enabled(share) and int(group.shared_prefix) > 0
    jobs = [_job(plan, j) for j in jobs]
    buckets: dict[str, list[Job]] = {}
    order: list[tuple[str | None, Job]] = []
    for job in jobs:
        key = _share_key(plan, job) if share else None
        if key is not None:
            if key not in buckets:
                buckets[key] = []
                order.append((key, job))
            buckets[key].append(job)
        else:
            order.append((None, job))

    def cb(job):
        return None if progress is None else (lambda k, _id=job.id: progress(_id, k))

    def alone(job):
        try:
            return run_job(backend, plan, job, progress=cb(job), decode=decode)
        except RuntimeErrorBase as e:
            return e

    for key, job in order:
        if key is None or len(buckets[key]) < 2:
            for j in ([job] if key is None else buckets[key]):
                yield j, alone(j)
            continue
        members = buckets[key]
        t0 = time.perf_counter()
        try:
            head = run_job(backend, plan, members[0], stop_at_fork=True, decode=False)
        except RuntimeErrorBase:
            for j in members:
                yield j, alone(j)
            continue
        shared_s = time.perf_counter() - t0
        fork = members[0].fork_at
        for j in members:
            if progress is not None:
                progress(j.id, fork + 1)
            try:
                r = run_job(backend, plan, j, progress=cb(j), decode=decode, resume=(fork + 1, head.latents))
                r.timings.update(shared_prefix_s=shared_s, shared_prefix_steps=fork, shared_with=len(members))
            except RuntimeErrorBase as e:
                r = e
            yield j, r
