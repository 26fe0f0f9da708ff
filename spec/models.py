"""Pydantic models of scene language v1 (docs/language.md).

The models are the single source of the JSON Schema in ``schemas/scene.schema.json``. They check
structure only (keys, types, ranges); meaning (references between ids, geometry, files) is checked
by the compiler's ``check`` pass, which reports at the same source positions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

ID_PATTERN = r"^[a-z0-9_-]+$"
NAME_PATTERN = r"^[a-z0-9._-]+$"

Id = Annotated[str, Field(pattern=ID_PATTERN, min_length=1, max_length=64)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Point = Annotated[list[float], Field(min_length=2, max_length=2)]

MAX_CANVAS = 8192


class _Node(BaseModel):
    # allow_inf_nan=False: `.nan`/`.inf` are valid YAML floats, but a NaN z has no order and an infinite
    # guidance would reach plan.json as `Infinity` (not JSON)
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


# --- shapes -----------------------------------------------------------------------------------

class _ShapeBase(_Node):
    units: Literal["norm", "px"] | None = Field(
        None, description="Coordinate units: `norm` (fractions of the canvas, the default) or `px`. "
        "Children of a boolean op inherit it.")


class BoxShape(_ShapeBase):
    box: Annotated[list[float], Field(min_length=4, max_length=4, description="[x0, y0, x1, y1]")]


class PolygonShape(_ShapeBase):
    polygon: Annotated[list[Point], Field(min_length=3, description="[[x, y], ...]: at least 3 points, simple")]


class EllipseSpec(_Node):
    center: Point
    radii: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=2, max_length=2)]


class EllipseShape(_ShapeBase):
    ellipse: EllipseSpec


class MaskShape(_ShapeBase):
    mask: Annotated[str, Field(min_length=1, description="image file: white = inside; scaled to the canvas")]


class UnionShape(_ShapeBase):
    union: Annotated[list["Shape"], Field(min_length=1)]


class IntersectionShape(_ShapeBase):
    intersection: Annotated[list["Shape"], Field(min_length=1)]


class DifferenceShape(_ShapeBase):
    difference: Annotated[list["Shape"], Field(min_length=1, description="the first minus the rest")]


SHAPE_KINDS = ("box", "polygon", "ellipse", "mask", "union", "intersection", "difference")


def _shape_tag(v: Any) -> str | None:
    if isinstance(v, dict):
        for k in SHAPE_KINDS:
            if k in v:
                return k.capitalize()
        return None
    for k in SHAPE_KINDS:
        if hasattr(v, k):
            return k.capitalize()
    return None


def _tagged(members: dict[str, type], tag, error_type: str, message: str):
    """A union of models told apart by ``tag`` (a value → its member's tag), with one error when none fits."""
    return Annotated[Union[tuple(Annotated[m, Tag(t)] for t, m in members.items())],
                     Discriminator(tag, custom_error_type=error_type, custom_error_message=message)]


Shape = _tagged({"Box": BoxShape, "Polygon": PolygonShape, "Ellipse": EllipseShape, "Mask": MaskShape,
                 "Union": UnionShape, "Intersection": IntersectionShape, "Difference": DifferenceShape},
                _shape_tag, "shape_kind", "a shape needs exactly one of: " + ", ".join(SHAPE_KINDS))


# --- schedules --------------------------------------------------------------------------------

class StepSchedule(_Node):
    shape: Literal["step"]
    center: Unit


class RampSchedule(_Node):
    shape: Literal["linear", "sin"]
    center: Unit
    width: Annotated[float, Field(gt=0.0, le=2.0)]


class ArctanSchedule(_Node):
    shape: Literal["arctan"]
    center: Unit
    scale: Annotated[float, Field(gt=0.0)]


class ValuesSchedule(_Node):
    values: Annotated[list[Unit], Field(min_length=1, description="θ per step; one per sampler step")]


class FileSchedule(_Node):
    file: Annotated[str, Field(min_length=1, description="a JSON schedule written by `scenec tune`")]


def _schedule_tag(v: Any) -> str | None:
    if isinstance(v, dict):
        if "values" in v:
            return "Values"
        if "file" in v:
            return "File"
        s = v.get("shape")
        if s == "step":
            return "Step"
        if s in ("linear", "sin"):
            return "Ramp"
        if s == "arctan":
            return "Arctan"
        return None
    return {StepSchedule: "Step", RampSchedule: "Ramp", ArctanSchedule: "Arctan",
            ValuesSchedule: "Values", FileSchedule: "File"}.get(type(v))


Schedule = _tagged({"Step": StepSchedule, "Ramp": RampSchedule, "Arctan": ArctanSchedule, "Values": ValuesSchedule,
                    "File": FileSchedule}, _schedule_tag, "schedule_kind",
                   "a schedule is {shape: step|linear|sin|arctan, ...}, {values: [...]} or {file: ...}")

DEFAULT_SCHEDULE = RampSchedule(shape="sin", center=0.4, width=0.3)


# --- scene parts ------------------------------------------------------------------------------

class Canvas(_Node):
    width: Annotated[int, Field(ge=16, le=MAX_CANVAS)]
    height: Annotated[int, Field(ge=16, le=MAX_CANVAS)]


Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


class Sampler(_Node):
    steps: Annotated[int, Field(ge=1, le=1000)] | None = Field(None, description="default: the model's")
    guidance: Annotated[float, Field(ge=0.0)] | None = Field(
        None, description="Flux guidance embedding; CFG scale for CFG models. Default: the model's")
    true_cfg: Annotated[float, Field(ge=1.0)] = Field(
        1.0, description="> 1 runs a negative pass (negative prompts take effect)")
    seed: Seed | Annotated[list[Seed], Field(min_length=1)] = Field(0, description="an int, or a list: one image per seed")


class Background(_Node):
    prompt: str = ""
    negative: str = ""
    image: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="start from this image; only entity regions change (inpainting fusion)")
    strength: Unit | None = Field(
        None, description="img2img: repaint the whole `image`, starting from it noised to this level (1 = pure "
        "noise, the image ignored; 0 = unchanged); default: none (only entity regions change)")


class Modulation(_Node):
    """SOW attention modulation (scene option; see docs/language.md and docs/references.md)."""

    suppress: Unit = Field(1.0, description="strength pulling condition region → outside scores to their "
                           "row's minimum (min–max scaled, DenseDiffusion-style)")
    enhance: Unit = Field(1.0, description="strength pulling related region → condition region scores to their "
                          "row's maximum")
    decay: Annotated[float, Field(ge=0.0, le=1.0)] = Field(0.8, description="multiplier per cycle")
    distance: Annotated[float, Field(ge=0.0)] = Field(1.0, description="fall-off with distance from the region's centre")
    threshold: Unit = Field(0.5, description="the indicator's target: modulation scales with how far below it "
                            "the attention share reaching the condition is")


class Reference(_Node):
    image: Annotated[str, Field(min_length=1)]
    fit: Literal["contain", "cover", "stretch"] = "contain"
    window: Annotated[list[Unit], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [0.7, 0.5], description="noise levels (1 = pure noise: σ on flow models, t/1000 "
        "on DDPM models) between which cycles run")
    cycles: Annotated[int, Field(ge=0, le=100)] = 10
    init: Literal["seed", "noise"] = Field(
        "seed", description="seed: cycles start from the inverted seed canvas (the reference on grey); "
        "noise: sample from noise down to the window")
    preserve: Unit | None = Field(0.4, description="noise level of the last region replacement; null = none")
    eta: Unit = Field(1.0, description="stochasticity of the steps inside cycles (COW: 1)")
    eta_after: Unit = Field(0.1, description="stochasticity of the steps after the cycles (COW: 0.1)")
    related: Shape | None = None
    modulation: Modulation | Literal[False] = Field(
        default_factory=Modulation, description="SOW attention modulation; false turns it off")


class Lora(_Node):
    """A LoRA (low-rank adapter): a safetensors file in the project, or a file of a hub repository.

    Formats: diffusers/peft, kohya, xlabs and DiffSynth-Studio (EliGen's own); docs/models.md, LoRAs."""

    file: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="a .safetensors file, relative to the file that names it")
    repo: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="a hub repository (`org/name`) holding the LoRA, read from the local Hugging Face cache")
    weight_name: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="the .safetensors file in `repo`")
    scale: Annotated[float, Field(ge=-16.0, le=16.0)] = Field(1.0, description="the delta's multiplier; 0 = no LoRA")


class ModelSpec(_Node):
    """A model with its LoRAs: ``model: {id: flux-dev, lora: [...]}``."""

    id: Annotated[str, Field(min_length=1)] = Field(description="a built-in alias, a model id, or a local diffusers "
                                                    "directory")
    lora: list[Lora] = Field(default_factory=list, description="LoRAs applied to the whole image, in order")
class Visual(_Node):
    """An object-level visual prompt (arXiv 2501.01424; docs/visual-prompts.md): the entity's look from an
    image, as extra key/value tokens seen only by the image tokens of the entity's region."""

    image: Annotated[str, Field(min_length=1, description="the object's image (under the project root)")]
    mode: Literal["kv-mixed", "ip-adapter"] = Field(
        "kv-mixed", description="kv-mixed: keys from a coarse adapter, values from a fine one (the paper); "
        "ip-adapter: keys and values from one IP-Adapter")
    adapter: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="adapter weights (.safetensors, under the project root); optional only on the tiny "
        "models, which build a deterministic random adapter")
    scale: Annotated[float, Field(ge=0.0, le=10.0)] = Field(1.0, description="weight of the visual tokens; 0 = off")
    window: Annotated[list[Unit], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [1.0, 0.0], description="noise levels (1 = pure noise) between which the "
        "visual tokens act: the sampler steps that start inside [first, second)")


class EntityFields(_Node):
    """The fields an entity and an entity def share."""

    prompt: str | None = None
    negative: str | None = None
    shape: Shape | None = None
    feather: Annotated[float, Field(ge=0.0, le=0.5)] | None = None
    z: float | None = None
    reference: Reference | None = None
    lora: list[Lora] | None = Field(None, description="LoRAs acting only on this entity's prompt tokens and its "
                                    "region's image tokens")
    visual: Visual | None = None


def _entity_schema(schema: dict) -> None:
    # `prompt` may come from the def named by `use`; pydantic checks it after defs are applied
    schema["required"] = [r for r in schema.get("required", []) if r != "prompt"]
    schema["anyOf"] = [{"required": ["prompt"]}, {"required": ["use"]}]


class Entity(EntityFields):
    model_config = ConfigDict(json_schema_extra=_entity_schema)

    id: Id
    use: Id | None = Field(None, description="start from defs.entities.<use>, then override")
    prompt: str  # required once defs are applied


class EntityDef(EntityFields):
    pass


class Variant(_Node):
    id: Id
    entities: list[Id] | None = None
    prompt: str | None = None
    negative: str | None = None


class Group(_Node):
    id: Id
    schedule: Schedule = Field(default=DEFAULT_SCHEDULE, description="θ(t); default {shape: sin, center: 0.4, width: 0.3}")
    variants: Annotated[list[Variant], Field(min_length=1)]


class Defs(_Node):
    entities: dict[Id, EntityDef] = Field(default_factory=dict)


class Output(_Node):
    dir: Annotated[str, Field(min_length=1)] = "out"
    name: Annotated[str, Field(min_length=1)] = "{scene}-{group}-{variant}-{seed}"


class Attention(_Node):
    image_self: Literal["open", "restricted"] = Field(
        "open", description="image–image attention: open (EliGen) or restricted to the same region (InstantX)")
    blocks: Literal["all", "double", "single"] = Field("all", description="which transformer blocks use the regional mask")
    until: Unit = Field(1.0, description="regional masking only while sampling progress < until")
    pad_prompts: Annotated[int, Field(ge=1, le=512)] | None = Field(
        None, description="pad each entity prompt to this many tokens (512 matches EliGen exactly)")


MatrixKey = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]*$", max_length=32)]
MatrixValue = Union[str, int, float]


class Scene(_Node):
    """A scene file (scene language v1)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False,
                              title="scenec scene (language v1)")

    scenec: Literal[1] = Field(description="the language version")
    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=128)] | None = Field(None, description="default: the file's stem")
    model: Annotated[str, Field(min_length=1)] | ModelSpec | None = Field(
        None, description="an alias, a model id or a local diffusers directory; or {id, lora} with LoRAs")
    canvas: Canvas
    sampler: Sampler = Field(default_factory=Sampler)
    background: Background = Field(default_factory=Background)
    entities: list[Entity] = Field(default_factory=list)
    groups: list[Group] = Field(default_factory=list)
    defs: Defs = Field(default_factory=Defs)
    include: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    output: Output = Field(default_factory=Output)
    attention: Attention = Field(default_factory=Attention)
    matrix: dict[MatrixKey, Annotated[list[MatrixValue], Field(min_length=1, max_length=1000)]] = Field(
        default_factory=dict,
        description="one image per combination of these values: {KEY} in prompts and output.name is replaced; "
        "`seed` replaces sampler.seed (docs/language.md, matrix)")


class Library(_Node):
    """An included file: only `scenec`, `defs` and `include` are read; other scene keys are ignored."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    scenec: Literal[1]
    defs: Defs = Field(default_factory=Defs)
    include: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    name: Any = None
    model: Any = None
    canvas: Any = None
    sampler: Any = None
    background: Any = None
    entities: Any = None
    groups: Any = None
    output: Any = None
    attention: Any = None
    matrix: Any = None


SCENE_KEYS = tuple(Scene.model_fields)
