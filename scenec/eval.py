"""``scenec eval``: the coupled-generation metrics of built images, per coupling group.

Metrics (Coupled Image Generation, arXiv 2506.06826, §4; docs/eval-tune-split.md):

- **BgSim** = −ρ · mean_{p ∉ R} ‖x_i(p) − x_j(p)‖₂, averaged over the pairs (i, j) of variants built
  with the same seed; R is the joint entity region (the union of the entity regions of every variant
  of the group), ρ = |pixels ∉ R| / |pixels| the validity ratio, pixels RGB in [0, 1].
- **CLIPScore** (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
  Captioning"): 2.5 · max(cos(E_image, E_text), 0), averaged over the group's images.
- **combined** = a · BgSim + b · CLIPScore (``--weights a,b``; default 1,1).

The plan is where group, variant, prompts and region masks come from. Sidecars name their job, scene
and plan hash but not the scene file, so :func:`evaluate_dir` recompiles the scene (found next to the
outputs, or given with ``--scene``/``--plan``) and checks the plan hash. torch and transformers are
imported only inside the CLIP functions.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
CLIP_W = 2.5  # Hessel et al.'s rescaling of the cosine
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FULL_COVER = 0.999  # an entity mask at least this everywhere has no region of its own

# (image HxWx3 float in [0, 1], text) -> bool mask HxW of the subject, or None when it finds none
Segmenter = Callable[[np.ndarray, str], "np.ndarray | None"]


class EvalError(Exception):
    """An expected failure of ``scenec eval`` / ``scenec tune``: one sentence a user can act on.

    ``exit_code``: 2 for invalid input (the default), 1 for what is missing or failed at run time.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


# --- metrics: small pure functions ------------------------------------------------------------------

def to_float_image(img: Any) -> np.ndarray:
    """A PIL image or array → float64 HxWx3 in [0, 1] (uint8 is divided by 255; alpha dropped)."""
    a = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    a = a[..., :3]
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    return np.clip(a.astype(np.float64), 0.0, 1.0)


def upsample_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A coverage grid ``[h, w]`` → boolean ``[H, W]`` (``size`` = (H, W)): a pixel is inside when its cell's
    coverage is > 0 (nearest neighbour; feathered edges count as entity, so the background stays clean)."""
    m = np.asarray(mask, dtype=np.float64)
    H, W = size
    h, w = m.shape
    ys = np.minimum((np.arange(H) * h) // H, h - 1)
    xs = np.minimum((np.arange(W) * w) // W, w - 1)
    return m[np.ix_(ys, xs)] > 0.0


def bg_similarity(images: Sequence[np.ndarray], inside: np.ndarray | None) -> dict:
    """BgSim = −ρ · mean over pixels outside ``inside`` and over image pairs of the per-pixel RGB L2 distance.

    ``ρ`` (validity ratio) = fraction of pixels outside the joint entity region. Returns
    ``{"bgsim", "mean_l2", "validity"}``; ``bgsim`` is None with fewer than two images, and 0 when no
    pixel lies outside (ρ = 0).
    """
    imgs = [to_float_image(x) for x in images]
    shape = imgs[0].shape[:2] if imgs else (0, 0)
    outside = np.ones(shape, bool) if inside is None else ~np.asarray(inside, bool)
    validity = float(outside.mean()) if outside.size else 0.0
    if len(imgs) < 2:
        return {"bgsim": None, "mean_l2": None, "validity": validity}
    if any(x.shape != imgs[0].shape for x in imgs):
        raise EvalError(f"the images of a group differ in size ({sorted({x.shape[:2] for x in imgs})})")
    if not outside.any():
        return {"bgsim": 0.0, "mean_l2": None, "validity": 0.0}
    d = [np.linalg.norm(a[outside] - b[outside], axis=-1).mean() for a, b in itertools.combinations(imgs, 2)]
    mean_l2 = float(np.mean(d))
    return {"bgsim": -validity * mean_l2, "mean_l2": mean_l2, "validity": validity}


def combined(bgsim: float | None, clipscore: float | None, weights: tuple[float, float]) -> float | None:
    """a·BgSim + b·CLIPScore; a term whose weight is 0 may be missing; otherwise None when one is."""
    a, b = weights
    total = 0.0
    for w, v in ((a, bgsim), (b, clipscore)):
        if w == 0:
            continue
        if v is None:
            return None
        total += w * v
    return total


def parse_weights(text: str) -> tuple[float, float]:
    """``"a,b"`` → (a, b); raises EvalError with one sentence."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        a, b = (float(p) for p in parts)
    except ValueError:
        raise EvalError(f"--weights must be two numbers `a,b` (a·BgSim + b·CLIPScore), not `{text}`") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise EvalError(f"--weights must be finite numbers, not `{text}`")
    return a, b


# --- CLIP ---------------------------------------------------------------------------------------------

class ClipScorer:
    """CLIPScore with a transformers ``CLIPModel`` and tokenizer; images preprocessed by hand (resize the
    short side, centre crop, normalise), as CLIPImageProcessor does, so torchvision is not needed."""

    def __init__(self, model, tokenizer, name: str = "clip", image_size: int | None = None,
                 mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                 device: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.image_size = int(image_size or model.config.vision_config.image_size)
        self.mean = np.asarray(mean, np.float32).reshape(1, 1, 3)
        self.std = np.asarray(std, np.float32).reshape(1, 1, 3)
        self.device = device or "cpu"
        self.max_length = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    @classmethod
    def load(cls, spec: str, device: str | None = None) -> "ClipScorer":
        """``tiny`` (random, offline: noise scores), a local directory, or a hub id."""
        if spec == "tiny":
            return tiny_clip()
        import torch  # noqa: F401 - fail early with the import error, not inside transformers
        from transformers import AutoTokenizer, CLIPModel

        try:
            try:  # the local cache first: no network round trips when the model is here
                model = CLIPModel.from_pretrained(spec, local_files_only=True)
                tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
            except (OSError, ValueError):
                if Path(spec).exists():
                    raise
                model = CLIPModel.from_pretrained(spec)
                tok = AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError) as e:
            raise EvalError(f"CLIP model `{spec}` is not available here ({type(e).__name__}); pass --clip with a "
                            "local directory or a downloaded hub id, or --clip none to skip CLIPScore", exit_code=1) from e
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        pp = Path(spec) / "preprocessor_config.json"
        if pp.is_file():
            try:
                cfg = json.loads(pp.read_text())
                mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
            except ValueError:
                pass
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        return cls(model, tok, name=spec, mean=mean, std=std, device=device)

    def preprocess(self, image: Any) -> np.ndarray:
        """Resize the short side to ``image_size`` (bicubic), centre crop, normalise → float32 [3, S, S]."""
        from PIL import Image

        a = to_float_image(image)
        im = Image.fromarray(np.round(a * 255).astype(np.uint8))
        s = self.image_size
        w, h = im.size
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - s) // 2, (nh - s) // 2
        im = im.crop((left, top, left + s, top + s))
        x = (np.asarray(im, np.float32) / 255.0 - self.mean) / self.std
        return x.transpose(2, 0, 1)

    def cosine(self, images: Sequence[Any], texts: Sequence[str]) -> np.ndarray:
        """cos(E_image_i, E_text_i) for each pair."""
        import torch

        if len(images) != len(texts):
            raise ValueError("one text per image")
        if not images:
            return np.zeros(0)
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        pix = torch.from_numpy(np.stack([self.preprocess(x) for x in images]))
        dtype = next(self.model.parameters()).dtype
        with torch.no_grad():
            out = self.model(input_ids=tok["input_ids"].to(self.device),
                             attention_mask=tok["attention_mask"].to(self.device),
                             pixel_values=pix.to(self.device, dtype))
        ie = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        te = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return (ie * te).sum(-1).cpu().numpy().astype(np.float64)

    def score(self, images: Sequence[Any], texts: Sequence[str]) -> np.ndarray:
        """CLIPScore per pair: 2.5 · max(cos, 0) (Hessel et al. 2021)."""
        return CLIP_W * np.maximum(self.cosine(images, texts), 0.0)


def tiny_clip(seed: int = 0) -> ClipScorer:
    """A small random CLIP (CLIPConfig at toy size, the offline tokenizer of ``runtime/tiny.py``): scores
    are noise, but the whole metric path runs with no download."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from scenec.runtime.tiny import build_tokenizers

    tok, _ = build_tokenizers()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    return ClipScorer(CLIPModel(cfg).eval().requires_grad_(False), tok, name="tiny")


def load_clip(spec: str | None, device: str | None = None) -> ClipScorer | None:
    """``None``/``"none"`` → no CLIPScore; else :meth:`ClipScorer.load`."""
    if spec is None or str(spec).lower() == "none":
        return None
    return ClipScorer.load(spec, device=device)


def load_segmenter(spec: str | None) -> Segmenter | None:
    """``module:function`` → the function (called as ``fn(image, text) -> bool mask HxW or None``)."""
    if not spec:
        return None
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise EvalError(f"--segmenter must be `module:function`, not `{spec}`")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise EvalError(f"cannot load segmenter `{spec}` ({type(e).__name__}: {e})") from None


# --- one group ---------------------------------------------------------------------------------------

def job_text(plan, job: dict, mode: str = "full") -> str:
    """The text an image is scored against: ``full`` = entity prompts then the background prompt, joined
    with ", "; ``entity`` = the entity prompts only (the background prompt when there are none)."""
    ents = [plan.prompt(e["prompt"]) for e in job.get("entities") or []]
    ents = [t for t in ents if t]
    bg = plan.prompt(job["global"]["prompt"])
    if mode == "entity":
        return ", ".join(ents) or bg
    if mode != "full":
        raise EvalError(f"--text must be full or entity, not `{mode}`")
    return ", ".join([*ents, bg] if bg else ents)


def _regionless(plan, e: dict) -> bool:
    m = plan.mask(e.get("masks"), "latent") if e.get("masks") else None
    return m is None or float(np.min(m)) >= FULL_COVER


@dataclass
class GroupEval:
    """The metrics of one group; ``as_dict`` is what ``--json`` prints."""

    scene: str
    group: str
    bgsim: float | None
    mean_l2: float | None
    validity: float | None
    clipscore: float | None
    combined: float | None
    images: int
    seeds: list
    variants: list
    masking: str  # "regions" | "regions+segmentation" | "partial" | "none"
    per_image: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def evaluate_group(plan, group: str, images: dict[str, Any], clip: ClipScorer | None = None,
                   weights: tuple[float, float] = (1.0, 1.0), segmenter: Segmenter | None = None,
                   text: str = "full") -> GroupEval:
    """Metrics of one coupling group of ``plan`` from ``images`` (job id → image).

    The joint entity region is the union of the ``latent``-grid region masks of every entity of every
    variant of the group (from the plan, so variants not built still count), upsampled to the image.
    Entities without a region of their own (prompt variants, shape-less entities) need ``segmenter``;
    without one they are not masked out, with a warning.
    """
    from scenec.runtime.plan import Plan

    plan = Plan.of(plan)
    gjobs = [j for j in plan.jobs if j.get("group") == group]
    if not gjobs:
        raise EvalError(f"plan has no group `{group}`")
    warns: list[str] = []
    have = [j for j in gjobs if j["id"] in images]
    if not have:
        raise EvalError(f"group `{group}`: none of its images is here")
    imgs = {j["id"]: to_float_image(images[j["id"]]) for j in have}
    H, W = next(iter(imgs.values())).shape[:2]

    static = np.zeros((H, W), bool)
    regionless: list[tuple[dict, dict]] = []  # (job, entity)
    for j in gjobs:
        for e in j.get("entities") or []:
            if _regionless(plan, e):
                regionless.append((j, e))
            else:
                static |= upsample_mask(plan.mask(e["masks"], "latent"), (H, W))
    masking = "regions"
    if regionless:
        names = sorted({j.get("variant") or j["id"] for j, _ in regionless})
        if segmenter is None:
            masking = "partial" if static.any() else "none"
            warns.append(f"group `{group}`: variant{'s' if len(names) > 1 else ''} {', '.join(names)} "
                         "ha" + ("ve" if len(names) > 1 else "s") + " no entity region (prompt variant or "
                         "shape-less entity); no segmentation hook, so "
                         + ("that subject is" if len(names) == 1 else "those subjects are") + " not masked out")
        else:
            masking = "regions+segmentation"

    by_seed: dict[Any, list[dict]] = {}
    for j in have:
        by_seed.setdefault(j["seed"], []).append(j)
    rows, l2s, vals = [], [], []
    for seed, js in sorted(by_seed.items(), key=lambda kv: str(kv[0])):
        inside = static.copy()
        if segmenter is not None:
            for j, e in regionless:
                # a region-less subject: segment it in each image of this seed that shows it
                if j["seed"] != seed or j["id"] not in imgs:
                    continue
                seg = segmenter(imgs[j["id"]], plan.prompt(e["prompt"]))
                if seg is None:
                    warns.append(f"group `{group}`: the segmentation hook found no `{e['id']}` in {j['id']}")
                    continue
                seg = np.asarray(seg)
                if seg.shape != (H, W):
                    seg = upsample_mask(seg.astype(np.float64), (H, W))
                inside |= seg.astype(bool)
        r = bg_similarity([imgs[j["id"]] for j in js], inside)
        vals.append(r["validity"])
        if r["bgsim"] is not None:
            rows.append(r["bgsim"])
            if r["mean_l2"] is not None:
                l2s.append(r["mean_l2"])
    if not rows:
        warns.append(f"group `{group}`: BgSim needs two variants built with the same seed")
    bgsim = float(np.mean(rows)) if rows else None

    per_image = [{"job": j["id"], "variant": j.get("variant"), "seed": j["seed"], "clipscore": None} for j in have]
    clipscore = None
    if clip is not None:
        scores = clip.score([imgs[j["id"]] for j in have], [job_text(plan, j, text) for j in have])
        for row, s in zip(per_image, scores):
            row["clipscore"] = float(s)
        clipscore = float(np.mean(scores))
    return GroupEval(
        scene=plan.json.get("scene", {}).get("name", ""), group=group, bgsim=bgsim,
        mean_l2=float(np.mean(l2s)) if l2s else None, validity=float(np.mean(vals)) if vals else None,
        clipscore=clipscore, combined=combined(bgsim, clipscore, weights), images=len(have),
        seeds=sorted({j["seed"] for j in have}, key=str), variants=sorted({j.get("variant") for j in have}, key=str),
        masking=masking, per_image=per_image, warnings=warns)


# --- a directory of outputs --------------------------------------------------------------------------

@dataclass
class Output:
    sidecar: Path
    image: Path
    job: str
    scene: str
    plan_hash: str
    meta: dict


def find_outputs(directory: str | Path) -> list[Output]:
    """Every image with a scenec sidecar under ``directory`` (recursively)."""
    d = Path(directory)
    if not d.is_dir():
        raise EvalError(f"{d}: no such directory")
    out = []
    for p in sorted(d.rglob("*.json")):
        try:
            meta = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if not isinstance(meta, dict) or "scenec:job" not in meta:
            continue
        img = p.with_name(str(meta.get("image") or p.stem + ".png"))
        if not img.is_file():
            continue
        out.append(Output(p, img, str(meta["scenec:job"]), str(meta.get("scenec:scene", "")),
                          str(meta.get("scenec:plan_hash", "")), meta))
    return out


def _scene_name(path: Path) -> str | None:
    """The name a scene file's outputs carry (`name:` or the stem), or None if it is not a scene."""
    import yaml

    try:
        if path.stat().st_size > 1_000_000:
            return None
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(data, dict) or "scenec" not in data or "canvas" not in data:
        return None
    name = data.get("name")
    return name if isinstance(name, str) else path.stem


def locate_scene(directory: Path, scene: str, meta: dict | None = None, limit: int = 2000) -> Path | None:
    """Find the scene file whose outputs are in ``directory``: ``scenec:scene_file`` in the sidecar if
    present; else a scene named ``scene`` in ``directory`` or an ancestor up to the project root; else
    anywhere under the project root (at most ``limit`` YAML files looked at)."""
    from scenec.spec.paths import PROJECT_FILE

    if meta and meta.get("scenec:scene_file"):
        p = Path(meta["scenec:scene_file"])
        for base in (directory, *directory.resolve().parents):
            if (base / p).is_file():
                return base / p
    # the build's manifest, when it names the scene file (relative to the manifest's directory)
    man = directory / "scenec-manifest.json"
    if man.is_file():
        try:
            doc = json.loads(man.read_text(encoding="utf-8"))
            for o in (doc.get("outputs") or {}).values():
                sc = o.get("scene") if isinstance(o, dict) else None
                if isinstance(sc, dict) and sc.get("name") == scene and isinstance(sc.get("file"), str):
                    p = (directory / sc["file"]).resolve()
                    if p.is_file():
                        return p
        except (OSError, ValueError, AttributeError):
            pass
    d = directory.resolve()
    chain = [d, *d.parents]
    root = next((x for x in chain if (x / PROJECT_FILE).is_file()), None)
    chain = chain[: chain.index(root) + 1] if root is not None else chain[:3]
    for base in chain:
        for p in sorted([*base.glob("*.yaml"), *base.glob("*.yml")]):
            if _scene_name(p) == scene:
                return p
    if root is not None:
        n = 0
        for p in sorted(root.rglob("*.y*ml")):
            if any(part.startswith(".") or part in ("out", "node_modules") for part in p.relative_to(root).parts[:-1]):
                continue
            n += 1
            if n > limit:
                break
            if _scene_name(p) == scene:
                return p
    return None


def evaluate_dir(directory: str | Path, scenes: Iterable[str | Path] = (), plan_dirs: Iterable[str | Path] = (),
                 clip: ClipScorer | str | None = None, weights: tuple[float, float] = (1.0, 1.0),
                 segmenter: Segmenter | None = None, text: str = "full", model: str | None = None,
                 groups: Iterable[str] | None = None) -> dict:
    """Metrics of every coupling group whose images are in ``directory``.

    Plans come from ``plan_dirs`` (compiled with ``scenec compile``), ``scenes`` (compiled here), or the
    scene file located next to the outputs (:func:`locate_scene`). A plan-hash mismatch (the scene
    changed since the build, or it was built with another ``--model``) is a warning: regions and
    prompts are taken from the current plan. ``clip`` may be a spec string: it is loaded only once the
    images and plans are found (a missing model is reported after the cheaper problems).
    """
    from PIL import Image

    from scenec.compiler import compile_scene
    from scenec.runtime.plan import Plan, load_plan

    directory = Path(directory)
    outputs = find_outputs(directory)
    if not outputs:
        raise EvalError(f"{directory}: no built images with scenec sidecars (build first: scenec build)")
    plans: dict[str, Plan] = {}
    for pd in plan_dirs:
        p = load_plan(pd)
        plans[p.json.get("scene", {}).get("name", "")] = p
    for sf in scenes:
        p = Plan.of(compile_scene(sf, model=model))
        plans[p.json.get("scene", {}).get("name", "")] = p
    warns: list[str] = []
    by_scene: dict[str, list[Output]] = {}
    for o in outputs:
        by_scene.setdefault(o.scene, []).append(o)
    report_groups: list[dict] = []
    want = set(groups) if groups else None
    for scene, outs in sorted(by_scene.items()):
        plan = plans.get(scene)
        if plan is None:
            sf = locate_scene(outs[0].sidecar.parent, scene, outs[0].meta)
            if sf is None:
                raise EvalError(f"cannot find the scene file of `{scene}` (images in {directory}); "
                                "pass it with --scene FILE or a compiled plan with --plan DIR")
            plan = Plan.of(compile_scene(sf, model=model))
            plans[scene] = plan
        hashes = {o.plan_hash for o in outs}
        if plan.plan_hash not in hashes:
            warns.append(f"scene `{scene}`: the images were built from another plan (hash "
                         f"{sorted(hashes)[0][:12]}…, now {plan.plan_hash[:12]}…): the scene changed since the "
                         "build or it was built with another --model; regions and prompts are today's")
        elif len(hashes) > 1:
            warns.append(f"scene `{scene}`: images from {len(hashes)} different plans; regions and prompts are today's")
        jobs = {j["id"]: j for j in plan.jobs}
        images: dict[str, dict[str, Any]] = {}
        for o in outs:
            j = jobs.get(o.job)
            if j is None:
                warns.append(f"{o.sidecar.name}: job `{o.job}` is not in today's plan of `{scene}`; skipped")
                continue
            if not j.get("group"):
                continue
            if want is not None and j["group"] not in want:
                continue
            with Image.open(o.image) as im:
                images.setdefault(j["group"], {})[o.job] = to_float_image(im)
        if images and isinstance(clip, str):
            clip = load_clip(clip)
        for g in sorted(images):
            ge = evaluate_group(plan, g, images[g], clip=clip, weights=weights, segmenter=segmenter, text=text)
            warns.extend(ge.warnings)
            report_groups.append(ge.as_dict())
    if not report_groups:
        raise EvalError(f"{directory}: no images of coupling groups (scenes with `groups:`)"
                        + (f" named {', '.join(sorted(want))}" if want else ""))
    return {"dir": str(directory), "weights": list(weights), "clip": getattr(clip, "name", clip), "text": text,
            "groups": report_groups, "warnings": warns}


def _fmt(v: float | None, digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def render_table(report: dict):
    """A rich table of a report: one row per group (``--json`` has per-image scores and mean L2 too)."""
    from rich.table import Table

    a, b = report["weights"]
    t = Table(title=f"scenec eval {report['dir']}  (combined = {a:g}·BgSim + {b:g}·CLIPScore)", title_justify="left")
    t.add_column("scene/group")
    for col in ("images", "BgSim", "ρ", "CLIPScore", "combined"):
        t.add_column(col, justify="right")
    t.add_column("masking")
    for g in report["groups"]:
        t.add_row(f"{g['scene']}/{g['group']}", str(g["images"]), _fmt(g["bgsim"]), _fmt(g["validity"], 3),
                  _fmt(g["clipscore"]), _fmt(g["combined"]), g["masking"])
    return t
