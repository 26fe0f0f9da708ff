"""The IR: typed nodes in a networkx graph (design.md, "The IR, in words").

Nodes are frozen dataclasses stored under the ``node`` attribute of a ``networkx.DiGraph``; edges
say who uses whom (job → stream → prompt/region, job → condition, group → job). What a pass
computes that is not a node (warnings, matrix values, θ tables, shared prefixes, step programs) is
a typed field of :class:`IR`. Passes never mutate an IR: they return a new one (``IR.evolve``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np

from scenec.spec.diagnostics import Diagnostic
from scenec.spec.plan import Op


@dataclass(frozen=True)
class PromptNode:
    id: str
    text: str


@dataclass(frozen=True)
class RegionNode:
    id: str
    entity: str
    geom: Any = field(compare=False, repr=False)  # shapely geometry, canvas pixels; None = whole canvas
    feather_px: float = 0.0
    z: float = 0.0


@dataclass(frozen=True)
class StreamNode:
    """One text condition acting on the image: prompt, region, gain (design.md)."""

    id: str
    role: str  # "global" | "entity"
    name: str  # entity or variant id; "global" for the background stream
    gain: str  # "1" | "theta" | "1-theta"
    entity: str | None = None  # the entity whose region this stream uses (None: whole canvas)


@dataclass(frozen=True)
class ConditionNode:
    """A reference image (COW/SOW): where it goes and how it is spread."""

    id: str
    entity: str
    image: str  # as written in the scene
    path: Any = field(compare=False)  # resolved pathlib.Path
    sha256: str
    fit: str
    window: tuple[float, float]
    cycles: int
    preserve: float | None
    eta: float
    related: Any = field(compare=False, repr=False)  # shapely geometry or None
    modulation: Any  # dict or False
    init: str = "seed"  # "seed" | "noise"
    eta_after: float = 0.0


@dataclass(frozen=True)
class JobNode:
    id: str  # the output name, unique in the scene
    seed: int
    index: int
    group: str | None
    variant: str | None
    entities: tuple[str, ...]  # entity ids present in this image, scene order
    line: int  # where the job comes from in the scene (variant or scene start)


@dataclass(frozen=True)
class GroupNode:
    id: str
    schedule: str  # the schedule as text
    line: int


@dataclass
class IR:
    scene: Any  # spec.load.LoadedScene
    info: Any  # caps.ModelInfo
    model_spec: str | None
    canvas: tuple[int, int]
    steps: int
    guidance: float
    true_cfg: float
    solver: str = ""  # the sampler's update rule (compiler/solvers.py; "" before initial_ir sets it)
    model_override: str | None = None  # --model, which replaces the scene's model and its LoRAs
    cli_lora: tuple[str, ...] = ()  # --lora PATH[:SCALE]
    graph: nx.DiGraph = field(default_factory=nx.DiGraph)
    passes: tuple[str, ...] = ()
    # what passes compute besides nodes, by the pass that sets it
    warnings: tuple[Diagnostic, ...] = ()  # check: the scene's warnings (errors stop the pipeline)
    loras: tuple = ()  # check: the whole image's LoRAs (spec.plan.Lora), in order
    entity_loras: dict[str, tuple] = field(default_factory=dict)  # check: entity id → its LoRAs
    embeddings: tuple = ()  # check: textual inversions (spec.plan_text.Embedding)
    clip_skip: int | None = None  # check: diffusers' clip_skip
    prompt_syntax: str = "plain"  # check: how prompts are read (compiler/prompt_check.py)
    vae: tuple[str | None, str | None] = (None, None)  # check: a VAE replacing the model's, its file's sha256
    matrix: dict[str, dict[str, Any]] = field(default_factory=dict)  # expand: job id → its matrix values
    theta: dict[str, np.ndarray] = field(default_factory=dict)  # schedule: group id → θ per step (float64)
    shared_prefix: dict[str, int] = field(default_factory=dict)  # schedule: group id → shared θ = 0 steps
    programs: dict[str, tuple[Op, ...]] = field(default_factory=dict)  # schedule: job id → step program

    def evolve(self, name: str) -> "IR":
        """A copy to build the next pass on (graph and tables copied; nodes and ops are immutable)."""
        return dataclasses.replace(self, graph=self.graph.copy(), passes=self.passes + (name,),
                                   matrix=dict(self.matrix), theta=dict(self.theta),
                                   shared_prefix=dict(self.shared_prefix), programs=dict(self.programs))

    # --- access -------------------------------------------------------------------------------
    def add(self, node: Any, **attrs) -> str:
        self.graph.add_node(node.id, node=node, kind=type(node).__name__, **attrs)
        return node.id

    def node(self, nid: str) -> Any:
        return self.graph.nodes[nid]["node"]

    def nodes(self, kind: type) -> list:
        return [d["node"] for _, d in self.graph.nodes(data=True) if isinstance(d.get("node"), kind)]

    def succ(self, nid: str, kind: type | None = None, rel: str | None = None) -> list:
        out = []
        for _, v, d in sorted(self.graph.out_edges(nid, data=True), key=lambda e: e[2].get("order", 0)):
            n = self.graph.nodes[v]["node"]
            if (kind is None or isinstance(n, kind)) and (rel is None or rel in _rels(d)):
                out.append(n)
        return out

    def jobs(self) -> list[JobNode]:
        return sorted(self.nodes(JobNode), key=lambda j: j.index)

    def streams(self, job_id: str) -> list[StreamNode]:
        return self.succ(job_id, StreamNode)

    def prompt_of(self, stream_id: str, rel: str = "prompt") -> PromptNode:
        return self.succ(stream_id, PromptNode, rel)[0]

    def region_of(self, stream_id: str) -> RegionNode | None:
        r = self.succ(stream_id, RegionNode)
        return r[0] if r else None


def _rels(edge: dict) -> tuple:
    """The relations an edge carries (``rel`` is one name, or a tuple when one edge serves several)."""
    r = edge.get("rel")
    return () if r is None else (r,) if isinstance(r, str) else tuple(r)
