"""Shapes and θ schedules of scene language v1 (re-exported by ``scenec.spec.models``).

Every field's ``description`` and ``examples`` are the one source of the JSON Schema's hover help and of
docs/language.md's key tables (``python -m scenec.docgen language``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Point = Annotated[list[float], Field(min_length=2, max_length=2)]


class Node(BaseModel):
    # allow_inf_nan=False: `.nan`/`.inf` are valid YAML floats, but a NaN z has no order and an infinite
    # guidance would reach plan.json as `Infinity` (not JSON)
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


# --- shapes -----------------------------------------------------------------------------------

class ShapeBase(Node):
    units: Literal["norm", "px"] | None = Field(
        None, description="coordinate units: `norm` (fractions of the canvas, the default) or `px` (canvas "
        "pixels); the children of a boolean shape inherit it", examples=["px"])


class BoxShape(ShapeBase):
    box: Annotated[list[float], Field(min_length=4, max_length=4)] = Field(
        description="a box `[x0, y0, x1, y1]`: top-left and bottom-right corners (x0 < x1, y0 < y1)",
        examples=[[0.05, 0.5, 0.55, 0.95]])


class PolygonShape(ShapeBase):
    polygon: Annotated[list[Point], Field(min_length=3)] = Field(
        description="a polygon `[[x, y], ...]`: at least 3 points, simple (edges do not cross); closed "
        "automatically", examples=[[[0.55, 0.1], [0.95, 0.15], [0.75, 0.45]]])


class EllipseSpec(Node):
    center: Point = Field(description="the centre `[x, y]`", examples=[[0.7, 0.25]])
    radii: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=2, max_length=2)] = Field(
        description="`[rx, ry]`, each > 0; normalized `rx` is a fraction of the width and `ry` of the height, "
        "so a circle on a non-square canvas needs rx ≠ ry (or `units: px`)", examples=[[0.2, 0.12]])


class EllipseShape(ShapeBase):
    ellipse: EllipseSpec = Field(description="an axis-aligned ellipse `{center, radii}`",
                                 examples=[{"center": [0.7, 0.25], "radii": [0.2, 0.12]}])


class MaskShape(ShapeBase):
    mask: Annotated[str, Field(min_length=1)] = Field(
        description="an image file: white = inside; any size, scaled to the canvas; relative to the file that "
        "names it", examples=["refs/pond-mask.png"])


_TWO = [{"box": [0.1, 0.1, 0.5, 0.5]}, {"ellipse": {"center": [0.5, 0.5], "radii": [0.2, 0.2]}}]


class UnionShape(ShapeBase):
    union: Annotated[list["Shape"], Field(min_length=1)] = Field(
        description="inside any of these shapes (a non-empty list)", examples=[_TWO])


class IntersectionShape(ShapeBase):
    intersection: Annotated[list["Shape"], Field(min_length=1)] = Field(
        description="inside all of these shapes (a non-empty list)", examples=[_TWO])


class DifferenceShape(ShapeBase):
    difference: Annotated[list["Shape"], Field(min_length=1)] = Field(
        description="the first shape minus the rest (a non-empty list)", examples=[_TWO])


SHAPE_KINDS = ("box", "polygon", "ellipse", "mask", "union", "intersection", "difference")


def _shape_tag(v: Any) -> str | None:
    if isinstance(v, dict):  # two kinds in one mapping fit none (it read as a box with an unknown key `ellipse`)
        kinds = [k for k in SHAPE_KINDS if k in v]
        return kinds[0].capitalize() if len(kinds) == 1 else None
    for k in SHAPE_KINDS:
        if hasattr(v, k):
            return k.capitalize()
    return None


def tagged(members: dict[str, type], tag, error_type: str, message: str):
    """A union of models told apart by ``tag`` (a value → its member's tag), with one error when none fits."""
    return Annotated[Union[tuple(Annotated[m, Tag(t)] for t, m in members.items())],
                     Discriminator(tag, custom_error_type=error_type, custom_error_message=message)]


Shape = tagged({"Box": BoxShape, "Polygon": PolygonShape, "Ellipse": EllipseShape, "Mask": MaskShape,
                 "Union": UnionShape, "Intersection": IntersectionShape, "Difference": DifferenceShape},
                _shape_tag, "shape_kind", "a shape needs exactly one of: " + ", ".join(SHAPE_KINDS))

SHAPE_MODELS = (BoxShape, PolygonShape, EllipseShape, MaskShape, UnionShape, IntersectionShape, DifferenceShape)


# --- schedules --------------------------------------------------------------------------------

_FORM = ("the form: `step` (0 before `center`, 1 from it); `linear` or `sin` (a ramp from 0 to 1 across "
         "[center − width/2, center + width/2]); `arctan` (½ + atan((t − center)/scale)/π)")
_CENTER = dict(description="where θ crosses ½ (step: where it jumps to 1), as a fraction of sampling progress",
               examples=[0.4])


class StepSchedule(Node):
    shape: Literal["step"] = Field(description=_FORM, examples=["step"])
    center: Unit = Field(**_CENTER)


class RampSchedule(Node):
    shape: Literal["linear", "sin"] = Field(description=_FORM, examples=["sin"])
    center: Unit = Field(**_CENTER)
    width: Annotated[float, Field(gt=0.0, le=2.0)] = Field(
        description="the ramp's width in sampling progress, 0 < width ≤ 2", examples=[0.3])


class ArctanSchedule(Node):
    shape: Literal["arctan"] = Field(description=_FORM, examples=["arctan"])
    center: Unit = Field(**_CENTER)
    scale: Annotated[float, Field(gt=0.0)] = Field(description="> 0; smaller is steeper", examples=[0.1])


class ValuesSchedule(Node):
    values: Annotated[list[Unit], Field(min_length=1)] = Field(
        description="θ per step, as given: exactly `sampler.steps` values in [0, 1], non-decreasing",
        examples=[[0.0, 0.0, 0.5, 1.0]])


class FileSchedule(Node):
    file: Annotated[str, Field(min_length=1)] = Field(
        description="a JSON schedule written by `scenec tune` (`{steps, values}` or a bare list), relative to "
        "the file that names it", examples=["schedules/forest-tuned.json"])


def _schedule_tag(v: Any) -> str | None:
    if isinstance(v, dict):
        if sum(k in v for k in ("values", "file", "shape")) > 1:  # two forms fit none (as two shape kinds)
            return None
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


Schedule = tagged({"Step": StepSchedule, "Ramp": RampSchedule, "Arctan": ArctanSchedule, "Values": ValuesSchedule,
                    "File": FileSchedule}, _schedule_tag, "schedule_kind",
                   "a schedule is {shape: step|linear|sin|arctan, ...}, {values: [...]} or {file: ...}")

SCHEDULE_MODELS = (StepSchedule, RampSchedule, ArctanSchedule, ValuesSchedule, FileSchedule)

DEFAULT_SCHEDULE = RampSchedule(shape="sin", center=0.4, width=0.3)
