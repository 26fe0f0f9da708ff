"""Object-level visual prompts (arXiv 2501.01424) in the compiler: checks at FILE:LINE:COL and lowering.

``entities[].visual`` names the object's image and the adapter that turns it into tokens. The check
pass opens both through the same code as every other file a scene names (``compiler.files``: inside
the project root, regular files, the image pixel limit and format checks); an adapter is read only as
far as its safetensors header (no torch here). Lowering puts the image (scaled to at most
``MAX_VISUAL_SIDE`` a side, prepared as the adapter saw its training crops: :func:`prepare_image`), the
adapter's path and digest, the scale, the window as step indices and
the entity's region masks into each job that shows the entity (``spec.plan_visual.Visual``).
"""

from __future__ import annotations

import json
import struct

import numpy as np

from scenec.spec.diagnostics import Diagnostics
from scenec.spec.load import LoadedScene
from scenec.spec.plan_visual import MAX_VISUAL_SIDE, Visual

from .caps import ModelInfo
from .files import open_image, resolve_file
from .visual_refine import check_refine, group_thetas, lower_refine

GRAY = 128  # the visual prompt's background: transparent pixels and square padding (~0 after CLIP's normalisation)
KV_MIXED_FORMAT = "scenec-kv-mixed/1"  # the `format` entry of a kv-mixed adapter's safetensors metadata
MAX_HEADER = 100 << 20


def on_gray(im) -> np.ndarray:
    """A PIL image as uint8 RGB ``[h, w, 3]``, its transparent pixels composited onto gray ``GRAY`` (a cut-out's
    background is what the adapter saw outside its training objects' masks, not the RGB under alpha 0)."""
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        back = Image.new("RGBA", rgba.size, (GRAY, GRAY, GRAY, 255))
        return np.asarray(Image.alpha_composite(back, rgba).convert("RGB"), dtype=np.uint8)
    from .files import to_rgb

    return np.asarray(to_rgb(im), dtype=np.uint8)  # 16-bit grayscale scaled, not clipped to white


def pad_square(rgb: np.ndarray) -> np.ndarray:
    """uint8 ``[h, w, 3]`` centred in a gray square of side max(h, w): CLIP's processor (shortest-edge resize,
    centre crop) then keeps the whole object. The kv-mixed trainer pads its object crops with this function
    (runtime/train_adapter.py, the paper's object crops, arXiv 2501.01424 §3), so inference sees the same."""
    h, w = rgb.shape[:2]
    s = max(h, w)
    sq = np.full((s, s, 3), GRAY, np.uint8)
    sq[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = rgb
    return sq


def prepare_image(im, mode: str) -> np.ndarray:
    """A visual prompt's image as the plan holds it: alpha on gray (:func:`on_gray`); ``kv-mixed``: padded
    to a gray square (:func:`pad_square`, as the trainer's crops); ``ip-adapter``: as is (diffusers'
    preprocessing: CLIP's resize and centre crop); then at most ``MAX_VISUAL_SIDE`` a side."""
    from PIL import Image

    from .files import upright

    rgb = on_gray(upright(im))
    if mode == "kv-mixed":
        rgb = pad_square(rgb)
    if max(rgb.shape[:2]) > MAX_VISUAL_SIDE:
        small = Image.fromarray(rgb)
        small.thumbnail((MAX_VISUAL_SIDE, MAX_VISUAL_SIDE), Image.Resampling.LANCZOS)
        rgb = np.asarray(small, dtype=np.uint8)
    return rgb


def builtin_adapter(info: ModelInfo) -> bool:
    """The offline tiny models carry a deterministic random adapter built in code (no file needed)."""
    return info.source == "alias" and info.repo is None


def adapter_header(path) -> dict | None:
    """A safetensors file's header (tensor name → entry, ``__metadata__``), or None when it is not one."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                return None
            (n,) = struct.unpack("<Q", raw)
            if not 0 < n <= MAX_HEADER:
                return None
            head = json.loads(f.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return head if isinstance(head, dict) else None


# IP-Adapter checkpoints by tensor-name prefixes: (image projection, attention layers) — h94/IP-Adapter's for
# UNets (SD, SDXL), XLabs' for Flux (the names diffusers' IPAdapterMixin / FluxIPAdapterMixin read)
IP_NAMES = {"unet": ("image_proj.", "ip_adapter."), "flux": ("ip_adapter_proj_model.", "double_blocks.")}
IP_KINDS = {"unet": "an SD/SDXL IP-Adapter (h94/IP-Adapter's `image_proj.*`, `ip_adapter.*`)",
            "flux": "a Flux IP-Adapter (XLabs' `ip_adapter_proj_model.*`, `double_blocks.*`)"}


# a kv-mixed adapter's layers (its `config`'s module paths) tell the model kind it was made for
FLUX_LAYERS, UNET_LAYERS = ("transformer_blocks.", "single_transformer_blocks."), ("down_blocks.", "up_blocks.",
                                                                                  "mid_block.")


def encoder_dir(meta: dict, adapter):
    """The image encoder directory a kv-mixed adapter's metadata names (relative: beside the adapter)."""
    from pathlib import Path

    enc = Path(meta.get("image_encoder", ""))
    return enc if enc.is_absolute() else Path(adapter).parent / enc


def adapter_encoder(mode: str, adapter) -> str | None:
    """The absolute path of the image encoder directory an adapter file runs with, when it exists (kv-mixed:
    the one its metadata names; ip-adapter: ``image_encoder/`` beside it, h94's layout); None without one
    (the tiny models' built-in encoder)."""
    from pathlib import Path

    from scenec.spec.fsio import note_input

    if mode == "kv-mixed":
        head = adapter_header(adapter) or {}
        d = encoder_dir(head.get("__metadata__") or {}, adapter)
    else:
        d = Path(adapter).parent / "image_encoder"
    note_input(d / "config.json")  # the encoder appearing or going changes the plan
    return str(d.resolve()) if (d / "config.json").is_file() else None


def _kv_mixed_problem(meta: dict, family: str, where) -> str | None:
    """What the header of a kv-mixed adapter (``where``: its path) says against this model: its configuration,
    the model kind its layers belong to, its image encoder directory."""
    try:
        config = json.loads(meta.get("config", ""))
        layers = config["layers"]
        if not isinstance(layers, dict) or not layers:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        return "has no valid `config` in its metadata (JSON with `layers`): write it with save_adapter"
    kinds = {"flux" for n in layers if n.startswith(FLUX_LAYERS)} | \
        {"unet" for n in layers if n.startswith(UNET_LAYERS)}
    want = "flux" if family == "flux" else "unet"
    if kinds and want not in kinds:
        made = "a Flux model" if "flux" in kinds else "a UNet model (SD, SDXL)"
        return f"was made for {made} (its `config.layers`); this scene's model is {family}"
    enc = encoder_dir(meta, where)
    if not meta.get("image_encoder") or not (enc / "config.json").is_file():
        return (f"names its image encoder `{meta.get('image_encoder', '')}`, which is no CLIP vision directory "
                f"(looked for {enc / 'config.json'}): keep the image_encoder/ written beside it")
    return None


def _adapter_problem(head: dict | None, mode: str, family: str, where=".") -> str | None:
    if head is None:
        return "is not a safetensors file"
    names = [k for k in head if k != "__metadata__"]
    if mode == "kv-mixed":
        meta = head.get("__metadata__") or {}
        if meta.get("format") != KV_MIXED_FORMAT:
            return f"is not a kv-mixed adapter (its metadata has no `format: {KV_MIXED_FORMAT}`)"
        return _kv_mixed_problem(meta, family, where)
    kinds = [kind for kind, (proj, layers) in IP_NAMES.items()
             if any(k.startswith(proj) for k in names) and any(k.startswith(layers) for k in names)]
    want = "flux" if family == "flux" else "unet"
    if want in kinds:
        return None
    if kinds:
        return f"is {IP_KINDS[kinds[0]]}; {family} models load {IP_KINDS[want]}"
    return f"is not an IP-Adapter; {family} models load {IP_KINDS[want]}"


def check_visuals(ls: LoadedScene, info: ModelInfo, steps: int, diags: Diagnostics) -> None:
    """Every entity's ``visual``: its image, its adapter (present where the model needs one, a safetensors
    file of the mode's kind) and its window; problems at the key that has them, all of them."""
    from .levels import first_step, level_index, noise_levels, window_ok

    table = None
    sc = ls.scene
    shown = {}  # entity id → the groups whose variants show it
    for g in sc.groups:
        for var in g.variants:
            for eid in var.entities or ():
                shown.setdefault(eid, set()).add(g.id)
    thetas = None
    known = info.source != "unknown"
    for i, e in enumerate(sc.entities):
        v = e.visual
        if v is None:
            continue
        path = ("entities", i, "visual")
        open_image(ls, path + ("image",), v.image, diags, "visual prompt image")
        if v.adapter is not None:
            p = resolve_file(ls, path + ("adapter",), v.adapter, diags, "adapter")
            problem = None if p is None or not known else \
                _adapter_problem(adapter_header(p), v.mode, info.family.name, p)
            if problem:
                diags.error(ls.pos(path + ("adapter",)), f"adapter `{v.adapter}` {problem}",
                            hint="docs/visual-prompts.md says which weights each mode loads")
            elif p is not None and v.mode == "ip-adapter" and not builtin_adapter(info) and \
                    not (p.parent / "image_encoder" / "config.json").is_file():
                diags.error(ls.pos(path + ("adapter",)), f"IP-Adapter `{v.adapter}` has no `image_encoder` "
                            "directory beside it (its CLIP vision encoder)",
                            hint="put openai/clip-vit-large-patch14 in image_encoder/ beside it (docs/visual-"
                            "prompts.md)" if info.family.name == "flux" else
                            "lay it out as h94/IP-Adapter's `models/`: the .safetensors and image_encoder/")
        elif v.mode == "ip-adapter":
            diags.error(ls.pos(path), "`mode: ip-adapter` needs `adapter`: IP-Adapter weights in diffusers' format",
                        hint="add `adapter: path/to/ip-adapter.safetensors`")
        elif not builtin_adapter(info) and known:  # an unknown model: one error at `model` (compiler/resolve.py)
            diags.error(ls.pos(path), f"`visual` on `{info.spec}` needs `adapter`: a {v.mode} adapter's .safetensors "
                        "file (only the tiny models build one in code)",
                        hint="add `adapter: path/to/adapter.safetensors`")
        if not window_ok(ls, path, v.window, "visual", diags):
            continue
        hi, lo = v.window
        table = noise_levels(info, (ls.scene.canvas.width, ls.scene.canvas.height), steps,
                             ls.scene.sampler.solver) if table is None else table
        if level_index(hi, table) == level_index(lo, table, end=True):
            diags.warning(ls.pos(path + ("window",)), f"visual window [{hi:g}, {lo:g}] covers no sampler step at "
                          f"{steps} steps; the visual prompt does nothing", hint="widen the window or use more steps")
        elif 0 < (start := first_step(ls, table, steps))[0] < steps and level_index(lo, table, end=True) <= start[0]:
            diags.warning(ls.pos(path + ("window",)), f"visual window [{hi:g}, {lo:g}] ends before the steps that "
                          f"run: {start[1]}; the visual prompt does nothing",
                          hint="end the window later (e.g. [1.0, 0.0])")
        if v.refine is not None:
            if e.id in shown and thetas is None:
                thetas = group_thetas(ls, steps)
            check_refine(ls, path, v, table, steps, diags,
                         {g: th for g, th in (thetas or {}).items() if g in shown.get(e.id, ())})


def lower_visual(ir, i: int, masks: dict | None, tensors: dict) -> Visual:
    """Entity ``i``'s visual prompt for a job, its region's ``masks`` on every grid (None: the whole canvas)."""
    from PIL import Image

    from scenec.spec.fsio import sha256_file

    from .levels import level_index, noise_levels

    e = ir.scene.scene.entities[i]
    v, path = e.visual, ("entities", i, "visual")
    p = ir.scene.resolve(path + ("image",), v.image)
    name = f"visual/{e.id}/image"
    if name not in tensors:
        with Image.open(p) as im:
            tensors[name] = prepare_image(im, v.mode)
    adapter = digest = encoder = None
    if v.adapter is not None:
        a = ir.scene.resolve(path + ("adapter",), v.adapter)
        adapter, digest, encoder = str(a), sha256_file(a), adapter_encoder(v.mode, a)
    table = noise_levels(ir.info, ir.canvas, ir.steps, ir.solver)
    return Visual(entity=e.id, image=name, sha256=sha256_file(p), mode=v.mode, adapter=adapter,
                  adapter_sha256=digest, encoder=encoder, scale=v.scale, masks=masks,
                  window=(level_index(v.window[0], table), level_index(v.window[1], table, end=True)),
                  refine=lower_refine(v, table))
