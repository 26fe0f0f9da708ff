"""Images that rebuild themselves: reading a built PNG's scenec text chunks (`scenec show`) and building the
image again from them (`scenec build --from IMAGE.png`).

Every PNG scenec writes carries, in tEXt/iTXt chunks named ``scenec:*`` (runtime/outputs.py): the resolved
scene as canonical YAML (``scenec:scene.yaml``, compiler/provenance.py), the files it names with their
sha256 (``scenec:files``, paths relative to the project root), the sampler settings, the model and LoRA
identities, the device and dtype, the job and its ``job_hash`` and the scenec version. A rebuild writes
the scene into the project root, checks every file's digest, compiles it, checks that the job compiles to
the same ``job_hash``, runs that one job (its whole group, for a coupled group) and writes the image with
the original's text chunks: on the same model, device and dtype the file is byte-identical.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from pathlib import Path

from scenec.spec.diagnostics import SceneError, printable

PREFIX = "scenec:"
JSON_KEYS = ("files", "sampler", "loras", "hires")
NEEDED = ("scene.yaml", "job", "job_hash")


class RebuildError(Exception):
    """A PNG that cannot be shown or rebuilt, in one sentence; exit 2."""


def read_metadata(png: str | Path) -> dict[str, str]:
    """The ``scenec:*`` text chunks of ``png`` (prefix kept), in file order; raises RebuildError."""
    from PIL import Image, UnidentifiedImageError

    p = Path(png)
    name = printable(str(png))
    try:
        with Image.open(p) as im:
            if im.format != "PNG":
                raise RebuildError(f"{name}: not a PNG ({im.format or 'unknown format'})")
            im.load()  # text chunks after the image data are read only then
            text = dict(getattr(im, "text", {}) or {})
    except FileNotFoundError:
        raise RebuildError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise RebuildError(f"{name}: is a directory") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise RebuildError(f"{name}: not a readable image ({getattr(e, 'strerror', None) or e})") from None
    meta = {k: str(v) for k, v in text.items() if k.startswith(PREFIX)}
    if not meta:
        raise RebuildError(f"{name}: no scenec metadata (not built by scenec, or its text chunks were removed)")
    return meta


def as_record(meta: dict[str, str]) -> dict:
    """The metadata for machines: keys without the prefix, JSON-valued chunks parsed."""
    out: dict = {}
    for k, v in meta.items():
        key = k[len(PREFIX):]
        if key in JSON_KEYS:
            try:
                v = json.loads(v)
            except ValueError:
                pass
        out[key] = v
    return out


def describe(png: str | Path, meta: dict[str, str]) -> str:
    """The metadata for people (`scenec show`)."""
    r = as_record(meta)
    s = r.get("sampler") if isinstance(r.get("sampler"), dict) else {}
    lines = [f"{printable(str(png))}: built by scenec {r.get('version', '?')}"]

    def row(label: str, value) -> None:
        if value not in (None, "", [], {}):
            lines.append(f"  {label:<9} {value}")

    row("scene", f"{r.get('scene', '?')} ({r.get('scene_file', '?')})")
    row("overrides", r.get("overrides"))
    where = ", ".join(f"{k} {s[k]}" for k in ("group", "variant") if s.get(k))
    row("job", f"{r.get('job', '?')}" + (f" ({where})" if where else ""))
    row("model", _model_row(r))
    row("options", _options_row(r))
    row("device", " ".join(x for x in (r.get("device"), r.get("dtype")) if x))
    row("sampler", ", ".join(f"{k} {s[k]}" for k in ("seed", "steps", "guidance", "true_cfg", "kind", "cfg_rescale")
                             if s.get(k) is not None))
    row("freeu", ", ".join(f"{k} {v}" for k, v in (s.get("freeu") or {}).items()))
    hr = r.get("hires") if isinstance(r.get("hires"), dict) else None
    if hr:  # the second pass (runtime/hires.py)
        size = "×".join(str(v) for v in hr.get("size") or [])
        row("hires", f"{size}, {hr.get('upscaler')}, {hr.get('steps')} of {hr.get('of')} steps")
    for lo in r.get("loras") or []:
        if isinstance(lo, dict):
            digest = str(lo.get("sha256"))[:12]
            te = ", text encoders too" if lo.get("text_encoder") else ""
            row("lora", f"{lo.get('name')} ×{lo.get('scale')} ({lo.get('format')}{te}, sha256 {digest}…)")
    for f, digest in (r.get("files") or {}).items():
        row("file", f"{f} (sha256 {str(digest)[:12]}…)")
    row("job_hash", r.get("job_hash"))
    row("plan_hash", r.get("plan_hash"))
    if r.get("scene.yaml"):
        lines += ["", "# the resolved scene (scenec build --from rebuilds the image from it)", r["scene.yaml"].rstrip()]
    else:
        lines.append("  (no embedded scene: built by an older scenec; it cannot be rebuilt with --from)")
    return "\n".join(lines)


def _model_row(r: dict) -> str | None:
    """The model as the embedded scene names it (a directory or file of the project from its root, as ``--from``
    reads it), with what the runtime loaded where that says more (``scenec:model``: the absolute path of a directory
    on the machine that built the image, an alias's hub id; not a checkpoint's spelling in the scene, relative to
    the scene's own directory)."""
    import yaml

    loaded = r.get("model")
    try:
        scene = yaml.safe_load(str(r.get("scene.yaml") or ""))
        named = scene.get("model") if isinstance(scene, dict) else None
    except (yaml.YAMLError, RecursionError, ValueError):
        named = None
    named = named.get("id") if isinstance(named, dict) else named
    if not isinstance(named, str) or not named or named == loaded:
        return loaded
    alias = "/" not in named and not Path(named).suffix
    return f"{named} (loaded from {loaded})" if loaded and (alias or Path(loaded).is_absolute()) else named


def _options_row(r: dict) -> str | None:
    """What else the embedded scene sets that changes every pixel and the sampler line does not show: the model's
    VAE, clip skip and embeddings, the prompt syntax, tiling (A1111's infotext names them too)."""
    import yaml

    try:
        scene = yaml.safe_load(str(r.get("scene.yaml") or ""))
    except (yaml.YAMLError, RecursionError, ValueError):
        return None
    if not isinstance(scene, dict):
        return None
    model = scene.get("model") if isinstance(scene.get("model"), dict) else {}
    canvas = scene.get("canvas") if isinstance(scene.get("canvas"), dict) else {}
    embeddings = [e.get("token") or Path(str(e.get("file", ""))).stem for e in model.get("embeddings") or []
                  if isinstance(e, dict)]
    out = [f"vae {model['vae']}" if model.get("vae") else "",
           f"clip_skip {model['clip_skip']}" if model.get("clip_skip") is not None else "",
           f"embeddings {', '.join(embeddings)}" if embeddings else "",
           f"prompt_syntax {scene['prompt_syntax']}" if scene.get("prompt_syntax") not in (None, "plain") else "",
           f"tiling {canvas['tiling']}" if canvas.get("tiling") not in (None, "none") else ""]
    return ", ".join(x for x in out if x) or None


def project_root(start: Path | None = None) -> Path:
    """The project a copied PNG is rebuilt in: the nearest directory from ``start`` (default: the current
    one) up holding scenec.toml, else ``start`` itself."""
    from scenec.spec.paths import PROJECT_FILE

    d = (start or Path.cwd()).resolve()
    for c in (d, *d.parents):
        if (c / PROJECT_FILE).is_file():
            return c
    return d


def check_files(png: str | Path, meta: dict[str, str], root: Path) -> None:
    """Every file the embedded scene names must be under ``root`` with the digest it had; else RebuildError
    naming the first that is missing or different."""
    from scenec.spec.fsio import sha256_file

    name = printable(str(png))
    try:
        files = json.loads(meta.get(PREFIX + "files") or "{}")
    except ValueError:
        raise RebuildError(f"{name}: {PREFIX}files is not valid JSON (was the image edited?)") from None
    for rel, digest in files.items():
        p = Path(rel) if Path(rel).is_absolute() else root / rel
        if not p.is_file():
            raise RebuildError(f"{name}: the scene needs `{rel}`, not found under the project root {root} "
                               "(rebuild inside the project, or pass --project)")
        got = sha256_file(p)
        if got != digest:
            raise RebuildError(f"{name}: `{rel}` under {root} differs from the file the image was built with "
                               f"(sha256 {got[:12]}…, expected {str(digest)[:12]}…)")


def rebuild(png: str | Path, out: Path, root: Path | None = None, device: str | None = None,
            dtype: str | None = None, say=None) -> dict:
    """Build the image ``png`` again into ``out``; returns its result dict (``status`` built or failed) with
    ``identical``: whether the new file's bytes equal ``png``'s. Raises RebuildError (exit 2) for a PNG
    that cannot be rebuilt, SceneError for an embedded scene that no longer compiles."""
    import hashlib

    from scenec.compiler import compile_scene

    meta = read_metadata(png)
    name = printable(str(png))
    missing = [k for k in NEEDED if not meta.get(PREFIX + k)]
    if missing:
        raise RebuildError(f"{name}: no {PREFIX}{missing[0]} chunk (built by an older scenec?): it cannot be rebuilt")
    root = (root or project_root()).resolve()
    if not root.is_dir():
        raise RebuildError(f"--project {printable(str(root))}: not a directory")
    check_files(png, meta, root)
    stem = Path(meta.get(PREFIX + "scene_file") or "scene.yaml").stem or "scene"
    scene = root / f".scenec-from-{os.getpid()}-{secrets.token_hex(4)}-{stem}.yaml"
    try:
        text, outside = _outside_loras(meta[PREFIX + "scene.yaml"])
    except ValueError as e:  # yaml.YAMLError is no ValueError: _outside_loras turns it into one
        raise RebuildError(f"{name}: {PREFIX}scene.yaml is not valid YAML (was the image edited?): {e}") from None
    try:
        scene.write_text(text, encoding="utf-8")
        plan = compile_scene(scene, lora=outside)
    except OSError as e:
        raise RebuildError(f"cannot write the embedded scene into {root}: {e.strerror or e}") from None
    except SceneError as e:  # at the chunk, not at the temporary file (gone when the message is read)
        raise SceneError([dataclasses.replace(d, pos=dataclasses.replace(d.pos, file=f"{name}[{PREFIX}scene.yaml]"))
                          if d.pos.file.endswith(scene.name) else d for d in e.diagnostics]) from None
    finally:
        scene.unlink(missing_ok=True)
    job_id = meta[PREFIX + "job"]
    job = next((j for j in plan.jobs if j.id == job_id), None)
    if job is None:
        raise RebuildError(f"{name}: the embedded scene has no job `{job_id}`")
    if job.job_hash != meta[PREFIX + "job_hash"]:
        raise RebuildError(f"{name}: the embedded scene compiles to another job (job_hash {job.job_hash[:12]}…, "
                           f"the image's {meta[PREFIX + 'job_hash'][:12]}…): another scenec version?")
    result = _run(plan, job, meta, out, device or _device(meta.get(PREFIX + "device")),
                  dtype or _dtype(meta.get(PREFIX + "dtype")), say)
    if result.get("status") == "built":
        original = hashlib.sha256(Path(png).read_bytes()).hexdigest()
        result["identical"] = result["sha256"] == original
    return result


def _outside_loras(text: str) -> tuple[str, list[str]]:
    """The embedded scene without its whole-image LoRAs given by absolute path (a ``--lora`` outside the
    project: a scene may not name one), and those as ``--lora PATH:SCALE`` arguments (a build's ``--lora``
    come after the scene's own, as here)."""
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ValueError((getattr(e, "problem", None) or str(e).splitlines()[0])
                         + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark else "")) from None
    model = doc.get("model") if isinstance(doc, dict) else None
    loras = model.get("lora") if isinstance(model, dict) else None
    if not loras:
        return text, []
    outside = [lo for lo in loras if Path(str(lo.get("file", ""))).is_absolute()]
    if not outside:
        return text, []
    model["lora"] = [lo for lo in loras if lo not in outside]
    if not model["lora"]:
        del model["lora"]
        doc["model"] = model["id"]
    return (yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=None, width=100),
            [f"{lo['file']}:{lo.get('scale', 1.0)!r}" for lo in outside])


def _device(d: str | None) -> str | None:
    if not d:
        return None
    return "cuda" if d == "cuda:0" else d


def _dtype(d: str | None) -> str | None:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(d or "")


def _run(plan, job, meta: dict[str, str], out: Path, device: str | None, dtype: str | None, say) -> dict:
    from scenec.runtime.families import load_backend
    from scenec.runtime.hires import decodes, finish, run_image
    from scenec.runtime.outputs import write_result
    from scenec.runtime.sampler import run_group
    from scenec.spec.errors import RuntimeErrorBase

    if say is not None:
        say(f"loading {plan.json['model'].get('spec') or 'the model'} on {device or 'the default device'}")
    backend = load_backend(plan.json["model"], device=device, dtype=dtype)
    try:
        groups = {g.id for g in plan.groups}
        r = None
        try:
            if job.group in groups:  # a coupled group's images are sampled together
                members = [j for j in plan.jobs if j.group == job.group]
                for j, res in run_group(backend, plan, plan.group(job.group), members, decode=decodes(plan)):
                    if j.id == job.id:
                        r = finish(backend, plan, j, res)  # its hires pass (runtime/hires.py)
            else:
                r = run_image(backend, plan, job)  # with its hires pass (runtime/hires.py)
        except RuntimeErrorBase as e:
            r = e
        out.mkdir(parents=True, exist_ok=True)
        return write_result(plan, job, r, backend, out, meta=meta)
    finally:
        backend.clear_cache()
