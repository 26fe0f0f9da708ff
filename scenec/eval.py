"""``scenec eval``: the coupled-generation metrics of built images, per coupling group.

The metrics (Coupled Image Generation, arXiv 2506.06826, §4; docs/eval-tune-split.md) are BgSim and
the combined a · BgSim + b · CLIPScore (:mod:`scenec.metrics`) and CLIPScore (:mod:`scenec.clip`);
this module applies them to the groups of built images.

The plan is where group, variant, prompts and region masks come from. Sidecars name their job, scene
and plan hash but not the scene file, so :func:`evaluate_dir` recompiles the scene (found next to the
outputs, or given with ``--scene``/``--plan``) and checks the plan hash. torch and transformers are
imported only inside the CLIP functions.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from scenec.spec.prompt_editing import text_at
from scenec.spec.prompt_syntax import parse

from .clip import ClipScorer, load_clip
from .metrics import EvalError, Segmenter, bg_similarity, combined, to_float_image, upsample_mask

FULL_COVER = 0.999  # an entity mask at least this everywhere has no region of its own


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

def prompt_text(plan, index: int) -> str:
    """A plan prompt as CLIP scores it: the words, without A1111's or ComfyUI's weight syntax (A1111's prompt editing:
    the text of the last step, spec/prompt_editing.py)."""
    text = plan.prompt(index)
    if plan.model.prompt_syntax == "a1111":
        text = text_at(text, plan.steps, plan.steps)
    return parse(text, plan.model.prompt_syntax).text


def job_text(plan, job: dict, mode: str = "full") -> str:
    """The text an image is scored against: ``full`` = entity prompts then the background prompt, joined
    with ", "; ``entity`` = the entity prompts only (the background prompt when there are none)."""
    ents = [prompt_text(plan, e["prompt"]) for e in job.get("entities") or []]
    ents = [t for t in ents if t]
    bg = prompt_text(plan, job["global"]["prompt"])
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
    mean_sq: float | None
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
    gjobs = [j for j in plan.json["jobs"] if j.get("group") == group]
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
    rows, sqs, vals = [], [], []
    for seed, js in sorted(by_seed.items(), key=lambda kv: str(kv[0])):
        inside = static.copy()
        if segmenter is not None:
            for j, e in regionless:
                # a region-less subject: segment it in each image of this seed that shows it
                if j["seed"] != seed or j["id"] not in imgs:
                    continue
                seg = segmenter(imgs[j["id"]], prompt_text(plan, e["prompt"]))
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
            if r["mean_sq"] is not None:
                sqs.append(r["mean_sq"])
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
        mean_sq=float(np.mean(sqs)) if sqs else None, validity=float(np.mean(vals)) if vals else None,
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


def find_outputs(directory: str | Path, warns: list[str] | None = None) -> list[Output]:
    """Every image with a scenec sidecar under ``directory`` (recursively); a sidecar that does not parse
    beside an image of its name is one warning in ``warns`` (other JSON files are not sidecars)."""
    d = Path(directory)
    if not d.is_dir():
        raise EvalError(f"{d}: not a directory (eval takes the directory of built images)" if d.exists()
                        else f"{d}: no such directory")
    out = []
    for p in sorted(d.rglob("*.json")):
        try:
            meta = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            if warns is not None and p.with_suffix(".png").is_file():
                warns.append(f"{p.name}: sidecar does not parse; {p.with_suffix('.png').name} skipped")
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
                 segmenter: Segmenter | None = None, text: str = "full", model: str | None = None, lora=(),
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
    from scenec.spec.errors import PlanError
    from scenec.spec.plan import Plan, load_plan

    directory = Path(directory)
    warns: list[str] = []
    outputs = find_outputs(directory, warns)
    if not outputs:
        raise EvalError(f"{directory}: no built images with scenec sidecars (build first: scenec build)")
    plans: dict[str, Plan] = {}
    for pd in plan_dirs:
        try:
            p = load_plan(pd)
        except PlanError as e:  # a --plan that is no plan is bad input (exit 2), not a failed run
            raise EvalError(f"--plan {e}" if str(e).startswith(str(pd)) else f"--plan {pd}: {e}") from None
        plans[p.json.get("scene", {}).get("name", "")] = p
    for sf in scenes:
        p = compile_scene(sf, model=model, lora=lora)
        plans[p.json.get("scene", {}).get("name", "")] = p
    if lora and plan_dirs:  # a compiled plan carries the LoRAs it was compiled with
        warns.append("--lora applies to the scenes compiled here, not to the --plan directories (they keep the "
                     "LoRAs they were compiled with)")
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
            plan = compile_scene(sf, model=model, lora=lora)
            plans[scene] = plan
        hashes = {o.plan_hash for o in outs}
        if plan.plan_hash not in hashes:
            warns.append(f"scene `{scene}`: the images were built from another plan (hash "
                         f"{sorted(hashes)[0][:12]}…, now {plan.plan_hash[:12]}…): the scene changed since the "
                         "build or it was built with another --model or --lora; regions and prompts are today's")
        elif len(hashes) > 1:
            warns.append(f"scene `{scene}`: images from {len(hashes)} different plans; regions and prompts are today's")
        jobs = {j["id"]: j for j in plan.json["jobs"]}
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
            try:
                with Image.open(o.image) as im:
                    images.setdefault(j["group"], {})[o.job] = to_float_image(im)
            except (OSError, ValueError) as e:  # a damaged file is one image less, not an internal error
                warns.append(f"{o.image.name}: not a readable image ({e}); skipped")
        if images and isinstance(clip, str):
            try:
                clip = load_clip(clip)
            except EvalError as e:  # CLIPScore weighs nothing at b = 0: it may be missing
                if weights[1] != 0 or e.exit_code != 1:
                    raise
                warns.append(f"{e}; CLIPScore left out (its weight is 0)")
                clip = None
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


def _fmt_small(v: float | None) -> str:
    """BgSim on its scale (≈ −1e-4 for coupled backgrounds): three significant digits."""
    return "—" if v is None else f"{v:.3g}"


def render_table(report: dict):
    """A rich table of a report: one row per group (``--json`` has per-image scores and the mean squared
    difference too)."""
    from rich.table import Table

    a, b = report["weights"]
    t = Table(title=f"scenec eval {report['dir']}  (combined = {a:g}·BgSim + {b:g}·CLIPScore)", title_justify="left")
    t.add_column("scene/group")
    for col in ("images", "BgSim", "ρ", "CLIPScore", "combined"):
        t.add_column(col, justify="right")
    t.add_column("masking")
    for g in report["groups"]:
        t.add_row(f"{g['scene']}/{g['group']}", str(g["images"]), _fmt_small(g["bgsim"]), _fmt(g["validity"], 3),
                  _fmt(g["clipscore"]), _fmt(g["combined"]), g["masking"])
    return t
