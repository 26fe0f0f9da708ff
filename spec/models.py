"""Pydantic models of scene language v1 (docs/language.md).

The models are the single source of the JSON Schema in ``schemas/scene.schema.json`` and of the key
tables in docs/language.md (``python -m scenec.docgen language``): every field has a ``description`` and
``examples``. They check structure only (keys, types, ranges); meaning (references between ids, geometry,
files) is checked by the compiler's ``check`` pass, which reports at the same source positions.

Split by concept: shapes and schedules in models_shapes.py, the scene's parts in models_parts.py; every
name is importable from here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Field

from .models_parts import (
    MAX_CANVAS,
    Attention,
    Background,
    Canvas,
    Control,
    Embedding,
    FreeU,
    Hires,
    Lora,
    ModelSpec,
    Modulation,
    Output,
    Reference,
    Sampler,
    Seed,
    Visual,
    VisualRefine,
)
from .models_shapes import (
    DEFAULT_SCHEDULE,
    SCHEDULE_MODELS,
    SHAPE_KINDS,
    SHAPE_MODELS,
    ArctanSchedule,
    BoxShape,
    DifferenceShape,
    EllipseShape,
    EllipseSpec,
    FileSchedule,
    IntersectionShape,
    MaskShape,
    Node,
    Point,
    PolygonShape,
    RampSchedule,
    Schedule,
    Shape,
    ShapeBase,
    StepSchedule,
    UnionShape,
    Unit,
    ValuesSchedule,
    tagged,
)

__all__ = [
    "ID_PATTERN", "NAME_PATTERN", "Id", "Unit", "Point", "MAX_CANVAS", "Seed", "SHAPE_KINDS", "SHAPE_MODELS",
    "SCHEDULE_MODELS", "DEFAULT_SCHEDULE", "BoxShape", "PolygonShape", "EllipseSpec", "EllipseShape", "MaskShape",
    "UnionShape", "IntersectionShape", "DifferenceShape", "Shape", "StepSchedule", "RampSchedule", "ArctanSchedule",
    "ValuesSchedule", "FileSchedule", "Schedule", "Canvas", "FreeU", "Sampler", "Background", "Modulation", "Reference",
    "Hires", "Lora", "Embedding", "ModelSpec", "Visual", "VisualRefine", "EntityFields", "Entity", "EntityDef",
    "Variant", "Group", "Defs",
    "Output", "Attention", "Scene", "Library", "SCENE_KEYS", "Node", "ShapeBase", "tagged",
]

ID_PATTERN = r"^[a-z0-9_-]+$"
NAME_PATTERN = r"^[a-z0-9._-]+$"

Id = Annotated[str, Field(pattern=ID_PATTERN, min_length=1, max_length=64)]


class EntityFields(Node):
    """The fields an entity and an entity def share."""

    prompt: str | None = Field(None, description="acts only inside the entity's region", examples=["a red fox running"])
    negative: str | None = Field(None, description="used by the negative pass (`true_cfg > 1`); default: the "
                                 "background's `negative`", examples=["cartoon"])
    shape: Shape | None = Field(None, description="the region (a shape); default: the whole canvas",
                                examples=[{"box": [0.05, 0.45, 0.45, 0.95]}])
    feather: Annotated[float, Field(ge=0.0, le=0.5)] | None = Field(
        None, description="0 – 0.5: soft edge width as a fraction of min(width, height), ramping inward; default 0",
        examples=[0.02])
    z: float | None = Field(None, description="stacking order where regions overlap: higher wins, ties: later wins; "
                            "default: the entity's list index (0, 1, …)", examples=[1])
    reference: Reference | None = Field(None, description="a reference image for this region (one-way diffusion)",
                                        examples=[{"image": "refs/face.png", "cycles": 10}])
    lora: list[Lora] | None = Field(None, description="LoRAs acting only on this entity's prompt tokens and its "
                                    "region's image tokens",
                                    examples=[[{"file": "loras/watercolor.safetensors", "scale": 0.9}]])
    visual: Visual | None = Field(None, description="the object's look from an image, in this region",
                                  examples=[{"image": "refs/fox.png", "scale": 0.8}])


def _entity_schema(schema: dict) -> None:
    # `prompt` may come from the def named by `use`; pydantic checks it after defs are applied
    schema["required"] = [r for r in schema.get("required", []) if r != "prompt"]
    schema["anyOf"] = [{"required": ["prompt"]}, {"required": ["use"]}]


class Entity(EntityFields):
    model_config = ConfigDict(json_schema_extra=_entity_schema)

    id: Id = Field(description="unique in the scene; variants name entities by it", examples=["fox"])
    use: Id | None = Field(None, description="start from `defs.entities.<use>` (own or included), then override "
                           "key by key", examples=["bird"])
    prompt: str = Field(description="acts only inside the entity's region; required once `use` is applied",
                        examples=["a red fox running"])


class EntityDef(EntityFields):
    pass


class Variant(Node):
    id: Id = Field(description="unique in its group; `{variant}` in output names", examples=["fox"])
    entities: list[Id] | None = Field(None, description="the scene's entities this image shows (by id)",
                                      examples=[["fox"]])
    prompt: str | None = Field(None, description="a subject prompt acting on the whole canvas",
                               examples=["a young woman in a red dress dancing"])
    negative: str | None = Field(None, description="its negative; default: the background's `negative`",
                                 examples=["blurry"])


class Group(Node):
    id: Id = Field(description="unique among groups; `{group}` in output names", examples=["animals"])
    schedule: Schedule = Field(default=DEFAULT_SCHEDULE, description="θ(t) shared by the group's variants",
                               examples=[{"shape": "sin", "center": 0.4, "width": 0.3}])
    variants: Annotated[list[Variant], Field(min_length=1)] = Field(
        description="the images of the group (coupled: they share the background)",
        examples=[[{"id": "fox", "entities": ["fox"]}, {"id": "dancer", "prompt": "a dancer"}]])


class Defs(Node):
    entities: dict[Id, EntityDef] = Field(
        default_factory=dict, description="entity templates by name, for `use`: any entity key but `id` and `use`",
        examples=[{"bird": {"prompt": "an eagle soaring", "negative": "cage"}}])


MatrixKey = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]*$", max_length=32)]
MatrixValue = Union[str, int, float]


class Scene(Node):
    """A scene file (scene language v1)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False,
                              title="scenec scene (language v1)")

    scenec: Literal[1] = Field(description="the language version", examples=[1])
    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=128)] | None = Field(
        None, description="the scene's name (`{scene}` in output names); default: the file's stem",
        examples=["meadow"])
    model: Annotated[str, Field(min_length=1)] | ModelSpec | None = Field(
        None, description="a built-in alias, a model id, a local diffusers directory or a single-file `.safetensors` "
        "checkpoint (SD, SDXL); or `{id, config, lora, embeddings, clip_skip}` with a checkpoint's configs, LoRAs and "
        "text options. Default: `--model`, else scenec.toml's `default_model`, "
        "else flux-dev", examples=["flux-dev"])
    canvas: Canvas = Field(description="image size in pixels", examples=[{"width": 1024, "height": 768}])
    sampler: Sampler = Field(default_factory=Sampler, description="steps, guidance, true CFG, seeds",
                             examples=[{"steps": 4, "seed": [1, 2]}])
    background: Background = Field(default_factory=Background, description="the prompt acting everywhere; "
                                   "optional init image", examples=[{"prompt": "a vibrant meadow"}])
    entities: list[Entity] = Field(
        default_factory=list, description="regional prompts, each with a shape and optional reference",
        examples=[[{"id": "fox", "prompt": "a red fox running", "shape": {"box": [0.05, 0.5, 0.55, 0.95]}}]])
    control: list[Control] = Field(
        default_factory=list, description="ControlNet conditions on the whole image (SD, SDXL, Flux)",
        examples=[[{"image": "refs/edges.png", "model": "lllyasviel/control_v11p_sd15_canny"}]])
    groups: list[Group] = Field(default_factory=list, description="coupled images sharing one background",
                                examples=[[{"id": "animals", "variants": [{"id": "fox", "entities": ["fox"]}]}]])
    defs: Defs = Field(default_factory=Defs, description="reusable entity templates for `use`",
                       examples=[{"entities": {"bird": {"prompt": "an eagle soaring"}}}])
    include: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="files whose `defs` this scene may use, relative to this file",
        examples=[["lib/animals.yaml"]])
    output: Output = Field(default_factory=Output, description="where images go and their names",
                           examples=[{"dir": "out", "name": "{scene}-{group}-{variant}-{seed}"}])
    hires: Hires | None = Field(
        None, description="a second, larger pass: upscale each image and repaint it by img2img (A1111's \"Hires. "
        "fix\"); default: none", examples=[{"scale": 2, "strength": 0.5}])
    attention: Attention = Field(default_factory=Attention, description="regional attention options (scene option "
                                 "beyond the contract)", examples=[{"image_self": "restricted"}])
    prompt_syntax: Literal["plain", "a1111", "comfy"] | None = Field(
        None, description="how prompts are read: `plain` as diffusers reads them (the text as written; CLIP cuts it at "
        "77 tokens), `a1111` or `comfy` with A1111's or ComfyUI's weights (`(word:1.3)`, `(word)`; A1111 also "
        "`[word]`, `BREAK`, prompt editing `[from:to:when]` and alternation `[a|b]`) and CLIP prompts longer than 75 "
        "tokens read in chunks. Default: scenec.toml's `prompt_syntax`, else plain", examples=["a1111"])
    matrix: dict[MatrixKey, Annotated[list[MatrixValue], Field(min_length=1, max_length=1000)]] = Field(
        default_factory=dict,
        description="one image per combination of these values: {KEY} in prompts and output.name is replaced; "
        "`seed` replaces sampler.seed", examples=[{"style": ["oil painting", "watercolor"]}])


class Library(Node):
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
    prompt_syntax: Any = None
    matrix: Any = None


SCENE_KEYS = tuple(Scene.model_fields)
