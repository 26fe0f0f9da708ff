"""The plan format, ``scenec-plan/1`` (docs/plan-format.md): typed, with one validator.

A plan is what the compiler emits and the runtime executes: ``plan.json`` (the document) and
``tensors.safetensors`` (masks, images, θ tables). This module holds the document's types, the one
validator, and :class:`Plan` (document + tensors). No torch, no YAML, no compiler: the compiler
builds these types, the runtime reads them, and neither checks plan data again.

Validation is split so that one bad job fails alone: the plan-wide part (format, model, canvas,
grids, sampler, attention, groups) must be valid for the plan to load at all; each job is checked
on its own (types, prompt indices, tensors it names with their shapes and dtypes, the step program
against the step count), and a job that fails keeps its error in :attr:`Plan.invalid`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .errors import PlanError, Unsupported
from .ops import OP_KINDS, Denoise, Fork, Op, Paste, Renoise, Seed  # noqa: F401 - the step program, re-exported
from .plan_control import Control, check_control
from .plan_model import Canvas, FileText, Lora, Model  # noqa: F401 - re-exported
from .plan_sampler import FreeU, Sampler  # noqa: F401 - the sampler section, re-exported
from .plan_visual import Visual, check_visual

FORMAT = "scenec-plan/1"


class _T(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


# --- jobs -----------------------------------------------------------------------------------------

MaskRef = dict[str, str]  # grid name → tensor name


class GlobalStream(_T):
    """EliGen's global prompt (the background prompt): its text, negative and coupling gain."""

    prompt: int
    negative: int
    gain: Literal["1", "1-theta"] | None = None


class EntityStream(_T):
    """An entity's prompt acting on its region (``masks`` None = the whole canvas)."""

    id: str
    prompt: int
    negative: int
    gain: Literal["1", "theta"] | None = None
    masks: MaskRef | None = None
    region: str | None = None
    lora: list[Lora] = []  # acting only on this stream's prompt tokens and its region's image tokens


class Modulation(_T):
    """SOW attention modulation of a reference condition."""

    suppress: float = 1.0
    enhance: float = 1.0
    decay: float = 0.8
    distance: float = 1.0
    threshold: float = 0.5


class Condition(_T):
    """A reference image (COW/SOW): the reference placed on a grey canvas, its window and cycles."""

    entity: str
    image: str  # uint8 [H, W, 4]: the placed reference, alpha = region
    sha256: str = ""
    fit: Literal["contain", "cover", "stretch"] = "contain"
    window: tuple[int, int]
    cycles: int = Field(ge=0)
    preserve: int | None = None
    eta: float = Field(1.0, ge=0.0, le=1.0)
    masks: MaskRef | None = None
    related: MaskRef | None = None
    modulation: Modulation | Literal[False] | None = None

    @property
    def sow(self) -> Modulation | None:
        """The SOW modulation when it acts (a modulation and cycles to act in), else None."""
        return self.modulation if self.modulation and self.cycles > 0 else None




class Source(_T):
    file: FileText
    line: int


class Job(_T):
    """One output image: seed, streams, init image, conditions and the step program."""

    id: str
    job_hash: str = ""
    name: str
    seed: int
    index: int | None = None
    group: str | None = None
    variant: str | None = None
    source: Source | None = None
    global_: GlobalStream = Field(alias="global")
    entities: list[EntityStream] = []
    init_image: str | None = None
    inpaint_mask: MaskRef | None = None
    # background.overlay: float [H, W] at canvas size, 1 = painted; the init image's pixels are pasted back where < 1
    overlay: str | None = None
    # img2img (background.strength): the level the init image is noised to, where the program starts;
    # None: the program starts from noise and inpainting keeps the outside of the regions
    init_level: int | None = None
    conditions: list[Condition] = []
    visuals: list[Visual] = []  # object-level visual prompts (spec/plan_visual.py)
    controls: list[Control] = []  # ControlNet conditions (spec/plan_control.py)
    program: list[Op]
    matrix: dict[str, Any] | None = None

    @property
    def coupled(self) -> bool:
        """A member of a coupling group: its step program carries θ."""
        return any(isinstance(op, Denoise) and op.theta is not None for op in self.program)

    @property
    def fork_at(self) -> int | None:
        """The index of the program's ``fork`` op, or None."""
        return next((i for i, op in enumerate(self.program) if isinstance(op, Fork)), None)


# --- plan-wide ------------------------------------------------------------------------------------

class SceneRef(_T):
    name: str
    file: FileText
    overrides: list[str] = []  # the command-line overrides it was compiled with (``--steps 8``)
    resolved: str = ""  # the scene as canonical YAML, self-contained (compiler/provenance.py)
    files: dict[str, str] = {}  # the files `resolved` names, relative to the project root: their sha256


class Attention(_T):
    image_self: Literal["open", "restricted"] = "open"
    blocks: Literal["all", "double", "single"] = "all"
    until: float = 1.0
    pad_prompts: int | None = None


class Output(_T):
    dir: str = "out"
    ext: str = "png"


class Group(_T):
    id: str
    jobs: list[str]
    theta: str  # float32 [steps]
    schedule: str | None = None
    shared_prefix: int = Field(0, ge=0)


class Hires(_T):
    """The hires pass (compiler/hires.py): how each image is enlarged, and the second pass's plan — a whole plan
    document at the larger canvas whose jobs (the same ids) start from the init image :data:`HIRES_INIT`, which the
    runtime supplies per job (a ``latent…`` upscaler: the init image's latent instead); its tensors lie in this
    plan's tensors under ``hires/``."""

    upscaler: Literal["lanczos", "bicubic", "bilinear", "nearest", "latent", "latent-bicubic", "latent-nearest",
                      "latent-nearest-exact"]
    plan: dict[str, Any]


HIRES_INIT = "hires/init"


class Document(_T):
    """The plan-wide part of ``plan.json``; jobs are parsed one by one (:class:`Plan`)."""

    format: Literal["scenec-plan/1"]
    scenec_version: str = ""
    plan_hash: str = ""
    scene: SceneRef
    model: Model
    canvas: Canvas
    grids: dict[str, tuple[int, int]]
    sampler: Sampler
    attention: Attention = Attention()
    prompts: list[str]
    output: Output = Output()
    jobs: list[Any]
    groups: list[Group] = []
    hires: Hires | None = None


_JOB = TypeAdapter(Job)


def _first_error(e: ValidationError, what: str) -> PlanError | Unsupported:
    """One sentence from pydantic's first error: where in the document, and what is wrong."""
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "union_tag_invalid":
        tag = (err.get("ctx") or {}).get("tag")
        return Unsupported(f"{what}: step op {tag!r} is not supported by this runtime yet")
    return PlanError(f"{what}: {loc or 'document'}: {err['msg']}")


class Plan:
    """A plan in memory: the document as written (``json``), its tensors (name → numpy array), and
    the typed, validated views: plan-wide settings (``doc``) and the valid ``jobs``.

    ``invalid`` maps the id of each job that failed validation to its error; ``job(id)`` raises it.
    """

    def __init__(self, json_doc: dict, tensors: dict | None = None):
        if not isinstance(json_doc, dict):
            raise PlanError(f"not a plan document: {type(json_doc).__name__}")
        fmt = json_doc.get("format")
        if fmt != FORMAT:
            raise PlanError(f"unknown plan format {fmt!r}; this runtime reads {FORMAT!r}")
        self.json = json_doc
        self.tensors: dict = dict(tensors or {})
        try:
            self.doc = Document.model_validate(json_doc)
        except ValidationError as e:
            raise _first_error(e, "plan") from None
        self._check_plan()
        self.jobs: list[Job] = []
        self.invalid: dict[str, PlanError | Unsupported] = {}
        self._order: list[str] = []
        for k, raw in enumerate(self.doc.jobs):
            jid = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else f"#{k}"
            self._order.append(jid)
            try:
                job = _JOB.validate_python(raw)
                self._check_job(job)
            except ValidationError as e:
                self.invalid[jid] = _first_error(e, f"job {jid!r}")
            except (PlanError, Unsupported) as e:
                what = f"job {jid!r}"
                self.invalid[jid] = e if str(e).startswith(what) else type(e)(f"{what}: {e}")
            else:
                self.jobs.append(job)
        if self.doc.hires is not None:
            self._check_hires()

    # -- plan-wide settings ------------------------------------------------------------------------
    @property
    def plan_hash(self) -> str:
        return self.doc.plan_hash

    @property
    def model(self) -> Model:
        return self.doc.model

    @property
    def canvas(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.doc.canvas.width, self.doc.canvas.height

    @property
    def sampler(self) -> Sampler:
        return self.doc.sampler

    @property
    def steps(self) -> int:
        return self.doc.sampler.steps

    @property
    def attention(self) -> Attention:
        return self.doc.attention

    @property
    def prompts(self) -> list[str]:
        return self.doc.prompts

    @property
    def groups(self) -> list[Group]:
        return self.doc.groups

    def prompt(self, index: int) -> str:
        if not isinstance(index, int) or not 0 <= index < len(self.doc.prompts):
            raise PlanError(f"prompt index {index!r} out of range")
        return self.doc.prompts[index]

    def grid(self, name: str) -> tuple[int, int]:
        try:
            h, w = self.doc.grids[name]
        except KeyError:
            raise PlanError(f"the plan has no {name!r} grid (grids: {sorted(self.doc.grids)})") from None
        return int(h), int(w)

    # -- jobs ----------------------------------------------------------------------------------------
    def job(self, job_id: str) -> Job:
        """The valid job ``job_id``; its validation error if it has one."""
        if job_id in self.invalid:
            raise self.invalid[job_id]
        for j in self.jobs:
            if j.id == job_id:
                return j
        raise PlanError(f"no job {job_id!r} in plan")

    def all_jobs(self) -> list[tuple[str, Job | PlanError | Unsupported]]:
        """Every job of the document in order: (id, the job, or its validation error)."""
        valid = {j.id: j for j in self.jobs}
        return [(jid, valid.get(jid) or self.invalid[jid]) for jid in self._order]

    def group(self, group_id: str) -> Group:
        for g in self.doc.groups:
            if g.id == group_id:
                return g
        raise PlanError(f"no group {group_id!r} in plan")

    def hires_stage(self, job_id: str | None = None, init=None) -> "Plan":
        """The hires pass's plan (``doc.hires``) of job ``job_id`` (None: every job) starting from ``init``, the
        enlarged first image (uint8 ``[H, W, 3]`` at the second canvas; None: a black placeholder, to validate)."""
        import numpy as np

        if self.doc.hires is None:
            raise PlanError("the plan has no hires pass")
        d = dict(self.doc.hires.plan)
        if job_id is not None:
            d["jobs"] = [j for j in d.get("jobs") or [] if isinstance(j, dict) and j.get("id") == job_id]
        if init is None:
            c = d.get("canvas") if isinstance(d.get("canvas"), dict) else {}
            h, w = (v if isinstance(v, int) and v > 0 else 1 for v in (c.get("height"), c.get("width")))
            init = np.broadcast_to(np.zeros(1, np.uint8), (h, w, 3))
        try:
            stage = Plan(d, {**self.tensors, HIRES_INIT: init})
        except (PlanError, Unsupported) as e:
            raise type(e)(f"hires: {e}") from None
        stage.first_pass_steps = self.steps  # prompt editing goes on from the first pass (runtime/prompt_editing.py)
        return stage

    def __iter__(self) -> Iterator[Job]:
        return iter(self.jobs)

    # -- tensors -------------------------------------------------------------------------------------
    def tensor(self, name: str):
        try:
            return self.tensors[name]
        except KeyError:
            raise PlanError(f"plan names tensor {name!r} but tensors.safetensors lacks it") from None

    def mask(self, masks: MaskRef | None, grid: str):
        """A mask of a ``masks`` dict on ``grid`` as float32 numpy, or None (the whole canvas)."""
        import numpy as np

        if not masks:
            return None
        name = masks.get(grid)
        if name is None:
            raise PlanError(f"mask dict {masks!r} has no {grid!r} grid")
        return np.asarray(self.tensor(name), dtype=np.float32)

    # -- the validator ---------------------------------------------------------------------------------
    def _check_plan(self) -> None:
        d = self.doc
        for name, hw in d.grids.items():
            if min(hw) <= 0:
                raise PlanError(f"grid {name!r} has size {list(hw)}")
        for g in d.groups:
            t = self.tensor(g.theta)
            if tuple(getattr(t, "shape", ())) != (d.sampler.steps,):
                raise PlanError(f"group {g.id!r}: θ table of shape {list(getattr(t, 'shape', []))}, "
                                f"the plan has {d.sampler.steps} steps")

    def _check_hires(self) -> None:
        """The second pass is a valid plan with the same jobs; a job whose second pass is invalid fails with it."""
        stage = self.hires_stage()
        ids = {j.id for j in stage.jobs}
        for job in list(self.jobs):
            if job.id not in ids:
                err = stage.invalid.get(job.id) or PlanError(f"job {job.id!r}: the hires pass has no such job")
                self.invalid[job.id] = type(err)(f"hires: {err}")
                self.jobs.remove(job)

    def _check_masks(self, masks: MaskRef | None, what: str, required=None) -> None:
        """A mask dict names a float mask of the right shape on each grid it lists, and lists every grid
        in ``required`` (default: all the plan's grids)."""
        if masks is None:
            return
        for g in self.doc.grids if required is None else required:
            if g not in masks:
                raise PlanError(f"{what}: no mask on the {g!r} grid")
        for g, name in masks.items():
            t = self.tensor(name)
            shape = tuple(getattr(t, "shape", ()))
            if shape != self.grid(g):
                raise PlanError(f"{what}: {g} mask of shape {list(shape)} does not match the {g} grid "
                                f"{list(self.grid(g))}")
            if getattr(getattr(t, "dtype", None), "kind", None) != "f":
                raise PlanError(f"{what}: {g} mask {name!r} is not a float mask")

    def _check_image(self, name: str, channels: tuple[int, ...], what: str) -> None:
        t = self.tensor(name)
        w, h = self.canvas
        shape = tuple(getattr(t, "shape", ()))
        if str(getattr(t, "dtype", "")) != "uint8" or len(shape) != 3 or shape[:2] != (h, w) or \
                shape[2] not in channels:
            raise PlanError(f"{what} {name!r}: need uint8 [{h}, {w}, {channels[-1]}], got "
                            f"{getattr(t, 'dtype', '?')} {list(shape)}")

    def _check_job(self, job: Job) -> None:
        what = f"job {job.id!r}"
        steps = self.doc.sampler.steps
        self.prompt(job.global_.prompt)
        self.prompt(job.global_.negative)
        for e in job.entities:
            self.prompt(e.prompt)
            self.prompt(e.negative)
            self._check_masks(e.masks, f"{what}: entity {e.id!r}")
        if (job.init_image is None) != (job.inpaint_mask is None):
            raise PlanError(f"{what}: an init image needs an inpaint_mask and the reverse")
        if job.init_image is not None:
            self._check_image(job.init_image, (3,), "init image")
            self._check_masks(job.inpaint_mask, f"{what}: inpaint mask")
        if job.overlay is not None:
            t, (w, h) = self.tensor(job.overlay), self.canvas
            if job.init_image is None or tuple(getattr(t, "shape", ())) != (h, w) or \
                    getattr(getattr(t, "dtype", None), "kind", None) != "f":
                raise PlanError(f"{what}: overlay {job.overlay!r} needs an init image and a float [{h}, {w}] mask")
        if job.init_level is not None and (job.init_image is None or not 0 <= job.init_level <= steps):
            raise PlanError(f"{what}: init_level {job.init_level} needs an init image and a level in 0..{steps}")
        for c in job.conditions:
            cw = f"{what}: condition {c.entity!r}"
            self._check_image(c.image, (3, 4), "reference")
            # pasted on the latent grid; SOW biases attention on every grid
            self._check_masks(c.masks, cw, None if c.sow else ("latent",))
            self._check_masks(c.related, f"{cw} (related)", None if c.sow else ())
            if not 0 <= c.window[0] <= c.window[1] <= steps:
                raise PlanError(f"{cw}: window {list(c.window)} outside 0..{steps}")
        for vp in job.visuals:
            check_visual(self, vp, what)
        for c in job.controls:
            check_control(self, c, what)
        if job.group is not None and job.coupled:
            self.group(job.group)
        forks = 0
        for op in job.program:
            if isinstance(op, Denoise):
                if not 0 <= op.from_ < steps or op.to != op.from_ + 1:
                    raise PlanError(f"{what}: denoise {op.from_}→{op.to}: need to = from + 1 within 0..{steps}")
                if op.theta is not None and not 0.0 <= op.theta <= 1.0:
                    raise PlanError(f"{what}: theta {op.theta!r} outside [0, 1]")
                if not 0.0 <= op.eta <= 1.0:
                    raise PlanError(f"{what}: eta must lie in [0, 1], got {op.eta!r}")
            elif isinstance(op, Renoise):
                if not 0 <= op.to < op.from_ <= steps:
                    raise PlanError(f"{what}: renoise needs integers 0 ≤ to < from ≤ {steps}, got "
                                    f"{op.from_}→{op.to}")
            elif isinstance(op, (Paste, Seed)):
                for ci in [op.condition] if isinstance(op, Paste) else op.conditions:
                    if not 0 <= ci < len(job.conditions):
                        raise PlanError(f"{what}: {op.op} of condition {ci}, the job has {len(job.conditions)}")
                if not 0 <= op.at <= steps:
                    raise PlanError(f"{what}: {op.op} at {op.at} outside 0..{steps}")
            else:
                forks += 1
        if forks > 1:
            raise PlanError(f"{what}: {forks} fork ops (at most one)")


def load_plan(directory: str | Path) -> Plan:
    """Read ``plan.json`` and ``tensors.safetensors`` from a plan directory and validate them."""
    from safetensors.numpy import load_file

    d = Path(directory)
    try:
        doc = json.loads((d / "plan.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanError(f"{d}: no plan.json (compile the scene first: scenec compile)") from None
    except ValueError as e:
        raise PlanError(f"{d / 'plan.json'}: not valid JSON ({e})") from None
    tpath = d / "tensors.safetensors"
    try:
        tensors = load_file(str(tpath)) if tpath.is_file() else {}
    except Exception as e:  # noqa: BLE001 - safetensors' own error type: a damaged file, not an internal error
        raise PlanError(f"{tpath}: not a readable safetensors file ({e})") from None
    return Plan(doc, tensors)


def write_plan(plan: Plan, out_dir: str | Path) -> Path:
    """Write ``plan.json`` and ``tensors.safetensors`` atomically (tensors first, the JSON last)."""
    import numpy as np
    from safetensors.numpy import save

    from .fsio import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "tensors.safetensors", save({k: np.ascontiguousarray(v) for k, v in plan.tensors.items()}))
    text = json.dumps(plan.json, sort_keys=True, indent=1, ensure_ascii=False) + "\n"
    atomic_write(out / "plan.json", text.encode("utf-8"))
    return out
