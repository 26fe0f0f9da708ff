"""Helpers for runtime tests: hand-built plans in the exact ``scenec-plan/1`` format, a cached tiny backend.

Plans here are written the way docs/plan-format.md specifies, so runtime tests double as format
tests; they never go through YAML or the compiler.
"""

from __future__ import annotations

import copy
import functools

import numpy as np

from scenec.spec.plan import FORMAT, Plan


@functools.lru_cache(maxsize=None)
def tiny_backend():
    """The tiny Flux backend on CPU in fp32, built once per process (tests share it; they must not mutate it)."""
    from .families import load_backend

    return load_backend("tiny", device="cpu", dtype="fp32")


@functools.lru_cache(maxsize=None)
def tiny_sd_backend():
    """The tiny SD backend on CPU in fp32, built once per process (shared by tests; do not mutate)."""
    from .families import load_backend

    return load_backend("tiny-sd", device="cpu", dtype="fp32")


def encode_init(backend, plan, job):
    """(z₀, m): a job's init image encoded and its inpaint mask, in the backend's latent layout."""
    return backend.encode_image(plan.tensor(job.init_image)), backend.latent_mask(plan.mask(job.inpaint_mask, "latent"))


def box(grid: tuple[int, int], y0: int, x0: int, y1: int, x1: int, value: float = 1.0) -> np.ndarray:
    """A float32 coverage mask on ``grid`` with ``value`` inside the box [y0:y1, x0:x1]."""
    m = np.zeros(grid, np.float32)
    m[y0:y1, x0:x1] = value
    return m


def token_to_latent(m: np.ndarray) -> np.ndarray:
    """A token-grid mask at the latent grid (each token covers 2x2 latent cells)."""
    return np.repeat(np.repeat(m, 2, 0), 2, 1).astype(np.float32)


def make_plan(prompt: str = "a meadow", negative: str = "", entities: list[dict] | None = None,
              seed: int = 1, width: int = 256, height: int = 256, steps: int = 4, guidance: float = 3.5,
              true_cfg: float = 1.0, image_self: str = "open", blocks: str = "all", pad_prompts: int | None = None,
              init_image: np.ndarray | None = None, program: list[dict] | None = None, seeds: list[int] | None = None,
              max_sequence_length: int = 32, edit=None) -> Plan:
    """A one-scene plan. ``entities``: dicts with ``id``, ``prompt``, optional ``negative`` and ``token``
    (a token-grid mask; None = whole canvas). Several jobs via ``seeds``. ``edit(doc, tensors)`` may
    change the document and tensors before the plan is validated (tests of bad or hand-made plans)."""
    th, tw = height // 16, width // 16
    lh, lw = height // 8, width // 8
    prompts: list[str] = []

    def idx(text: str) -> int:
        if text not in prompts:
            prompts.append(text)
        return prompts.index(text)

    tensors: dict[str, np.ndarray] = {}
    g = {"prompt": idx(prompt), "negative": idx(negative)}
    ents = []
    union_t = np.zeros((th, tw), np.float32)
    for e in entities or []:
        masks = None
        if e.get("token") is not None:
            t = np.asarray(e["token"], np.float32)
            tensors[f"region/{e['id']}/token"] = t
            tensors[f"region/{e['id']}/latent"] = token_to_latent(t)
            masks = {"latent": f"region/{e['id']}/latent", "token": f"region/{e['id']}/token"}
            union_t = np.maximum(union_t, t)
        else:
            union_t[:] = 1.0
        ents.append({"id": e["id"], "prompt": idx(e["prompt"]),
                     "negative": idx(e["negative"]) if e.get("negative") is not None else g["negative"],
                     "masks": masks})
    inpaint = None
    if init_image is not None:
        tensors["image/init"] = np.asarray(init_image, np.uint8)
        tensors["inpaint/u/token"] = union_t
        tensors["inpaint/u/latent"] = token_to_latent(union_t)
        inpaint = {"latent": "inpaint/u/latent", "token": "inpaint/u/token"}
    if program is None:
        program = [{"op": "denoise", "from": i, "to": i + 1, "regional": True, "theta": None, "eta": 0.0}
                   for i in range(steps)]
    jobs = []
    for s in seeds or [seed]:
        jobs.append({"id": f"test-{s}", "job_hash": f"jobhash-{s}", "name": f"test-{s}", "seed": s,
                     "group": None, "variant": None, "source": {"file": "scenes/test.yaml", "line": 1},
                     "global": dict(g), "entities": copy.deepcopy(ents),
                     "init_image": "image/init" if init_image is not None else None,
                     "inpaint_mask": inpaint, "conditions": [], "program": copy.deepcopy(program)})
    doc = {
        "format": FORMAT, "scenec_version": "0.1.0", "plan_hash": "planhash",
        "scene": {"name": "test", "file": "scenes/test.yaml"},
        "model": {"spec": "tiny", "family": "flux", "repo": None, "max_sequence_length": max_sequence_length},
        "canvas": {"width": width, "height": height},
        "grids": {"latent": [lh, lw], "token": [th, tw]},
        "sampler": {"kind": "flow-euler", "steps": steps, "guidance": guidance, "true_cfg": true_cfg},
        "attention": {"image_self": image_self, "blocks": blocks, "until": 1.0, "pad_prompts": pad_prompts},
        "prompts": prompts, "output": {"dir": "out", "ext": "png"}, "jobs": jobs, "groups": [],
    }
    if edit is not None:
        edit(doc, tensors)
    return Plan(doc, tensors)


def pool(m: np.ndarray, k: int) -> np.ndarray:
    """Max-pool a mask by k (a coarser SD attention grid)."""
    h, w = m.shape
    return m.reshape(h // k, k, w // k, k).max(axis=(1, 3)).astype(np.float32)


def sd_plan(guidance: float = 7.5, edit=None, **kw) -> Plan:
    """make_plan's Flux-shaped plan turned into an SD plan: model, sampler, and masks on every SD grid."""

    def to_sd(doc: dict, tensors: dict) -> None:
        w, h = doc["canvas"]["width"], doc["canvas"]["height"]
        doc["model"] = {"spec": "tiny-sd", "family": "sd", "repo": None, "max_sequence_length": 77}
        doc["grids"] = {"latent": [h // 8, w // 8], "a16": [h // 16, w // 16], "a32": [h // 32, w // 32],
                        "a64": [h // 64, w // 64]}
        doc["sampler"] = {"kind": "ddim", "steps": doc["sampler"]["steps"], "guidance": guidance, "true_cfg": 1.0}
        for name in list(tensors):
            if name.endswith("/token"):
                base, t = name[: -len("/token")], tensors[name]
                tensors[base + "/a16"] = t
                tensors[base + "/a32"] = pool(t, 2)
                tensors[base + "/a64"] = pool(t, 4)
        for job in doc["jobs"]:
            for d in [e.get("masks") for e in job["entities"]] + [job.get("inpaint_mask")]:
                if d:
                    base = d.pop("token")[: -len("/token")]
                    d.update({"a16": base + "/a16", "a32": base + "/a32", "a64": base + "/a64"})
        if edit is not None:
            edit(doc, tensors)

    return make_plan(edit=to_sd, **kw)
