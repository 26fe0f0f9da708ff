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


# --- LoRAs written by tests (and scenes/loras/make_loras.py) -------------------------------------------

# DiffSynth-Studio fuses q, k, v of a double-stream block (a_to_qkv: image, b_to_qkv: text) and q, k, v and
# the MLP's input of a single-stream block (to_qkv_mlp); a fused LoRA has one A for all the parts.
DIFFSYNTH_FUSED = {"attn.to_q": ("attn.a_to_qkv", 0), "attn.to_k": ("attn.a_to_qkv", 1),
                   "attn.to_v": ("attn.a_to_qkv", 2),
                   "attn.add_q_proj": ("attn.b_to_qkv", 0), "attn.add_k_proj": ("attn.b_to_qkv", 1),
                   "attn.add_v_proj": ("attn.b_to_qkv", 2)}
DIFFSYNTH_SINGLE_FUSED = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2, "proj_mlp": 3}
DIFFSYNTH_NAMES = {"attn.to_out.0": "attn.a_to_out", "attn.to_add_out": "attn.b_to_out", "ff.net.0.proj": "ff_a.0",
                   "ff.net.2": "ff_a.2", "ff_context.net.0.proj": "ff_b.0", "ff_context.net.2": "ff_b.2",
                   "norm1.linear": "norm1_a.linear", "norm1_context.linear": "norm1_b.linear",
                   "proj_out": "proj_out", "norm.linear": "norm.linear"}
DIFFSYNTH_TOP = {"x_embedder": "x_embedder", "context_embedder": "context_embedder", "proj_out": "final_proj_out",
                "norm_out.linear": "final_norm_out.linear"}


def _fused_group(name: str) -> str | None:
    """The DiffSynth layer a diffusers Flux module is fused into, or None."""
    blk = name.split(".", 2)
    if len(blk) < 3:
        return None
    if blk[0] == "transformer_blocks" and blk[2] in DIFFSYNTH_FUSED:
        return f"blocks.{blk[1]}.{DIFFSYNTH_FUSED[blk[2]][0]}"
    if blk[0] == "single_transformer_blocks" and blk[2] in DIFFSYNTH_SINGLE_FUSED:
        return f"single_blocks.{blk[1]}.to_qkv_mlp"
    return None


def lora_layers(denoiser, modules: list[str], rank: int = 4, seed: int = 0, std: float = 0.3) -> dict:
    """Random low-rank pairs ``{module: (A [r, in], B [out, r])}`` (numpy float32) for Linear layers of a
    denoiser; the parts DiffSynth fuses into one layer (q, k, v; and a single block's MLP input) share A."""
    import torch

    rng = np.random.default_rng(seed)
    mods = dict(denoiser.named_modules())
    out, shared = {}, {}
    for name in modules:
        m = mods[name]
        if not isinstance(m, torch.nn.Linear):
            raise TypeError(f"{name} is not a Linear layer")
        group = _fused_group(name)
        a = shared.get(group) if group else None
        if a is None:
            a = (rng.standard_normal((rank, m.in_features)) * std).astype(np.float32)
            if group:
                shared[group] = a
        out[name] = (a, (rng.standard_normal((m.out_features, rank)) * std).astype(np.float32))
    return out


def lora_file(layers: dict, path, naming: str = "diffusers", prefix: str = "transformer", alpha: float | None = None
              ) -> None:
    """Write ``lora_layers``' pairs as a safetensors LoRA in ``naming``: diffusers (``PREFIX.<module>.lora_A``),
    kohya (``lora_unet_<module with _>.lora_down`` + ``alpha`` (default: the rank); UNet names), or diffsynth
    (DiffSynth-Studio's Flux DiT names, ``.lora_A.default.weight``, fused layers with one A)."""
    from safetensors.numpy import save_file

    sd: dict[str, np.ndarray] = {}
    if naming == "diffusers":
        for m, (a, b) in layers.items():
            sd[f"{prefix}.{m}.lora_A.weight"], sd[f"{prefix}.{m}.lora_B.weight"] = a, b
    elif naming == "kohya":
        for m, (a, b) in layers.items():
            k = "lora_unet_" + m.replace(".", "_")
            sd[k + ".lora_down.weight"], sd[k + ".lora_up.weight"] = a, b
            sd[k + ".alpha"] = np.asarray(a.shape[0] if alpha is None else alpha, np.float32)
    elif naming == "diffsynth":
        fused: dict[str, dict[int, tuple]] = {}
        for m, (a, b) in layers.items():
            blk = m.split(".", 2)
            if m in DIFFSYNTH_TOP:  # DiffSynth's final norm orders its output [shift | scale]: B's halves swap
                top = DIFFSYNTH_TOP[m]
                if m == "norm_out.linear":
                    b = np.concatenate([b[b.shape[0] // 2:], b[:b.shape[0] // 2]])
                sd[f"{top}.lora_A.default.weight"], sd[f"{top}.lora_B.default.weight"] = a, b
                continue
            group = _fused_group(m)
            if group is not None:
                part = DIFFSYNTH_FUSED[blk[2]][1] if blk[0] == "transformer_blocks" else DIFFSYNTH_SINGLE_FUSED[blk[2]]
                fused.setdefault(group, {})[part] = (a, b)
                continue
            ds = ("blocks" if blk[0] == "transformer_blocks" else "single_blocks") + "." + blk[1] + "."
            sd[f"{ds}{DIFFSYNTH_NAMES[blk[2]]}.lora_A.default.weight"] = a
            sd[f"{ds}{DIFFSYNTH_NAMES[blk[2]]}.lora_B.default.weight"] = b
        for name, parts in fused.items():
            n = 4 if name.endswith("to_qkv_mlp") else 3
            if sorted(parts) != list(range(n)):
                raise ValueError(f"{name}: a fused DiffSynth layer needs all its {n} parts")
            sd[f"{name}.lora_A.default.weight"] = parts[0][0]
            sd[f"{name}.lora_B.default.weight"] = np.concatenate([parts[i][1] for i in range(n)])
    else:
        raise ValueError(f"unknown naming {naming!r}")
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))


def with_lora(plan_doc: dict, loras: list[dict], entity: str | None = None) -> None:
    """Put LoRAs (``spec.plan.Lora`` dicts) on a hand-made plan document: the model's, or an entity's."""
    for job in plan_doc["jobs"]:
        if entity is None:
            continue
        for e in job["entities"]:
            if e["id"] == entity:
                e["lora"] = list(loras)
    if entity is None:
        plan_doc["model"]["lora"] = list(loras)


def lora_entry(path, scale: float = 1.0, fmt: str = "diffusers") -> dict:
    """A plan LoRA entry for a file (its digest computed here)."""
    from scenec.spec.fsio import sha256_file

    return {"name": str(path), "path": str(path), "sha256": sha256_file(path), "scale": scale, "format": fmt}
