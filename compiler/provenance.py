"""The resolved scene an image carries (issue 15, item 4): canonical YAML that rebuilds it.

The scene after includes, ``use`` and command-line overrides, self-contained: no ``include``, ``defs`` or
``use``; the model with every whole-image LoRA (the scene's and ``--lora``'s: a hub file as its ``repo``,
a file outside the project root by its absolute path, which ``--from`` passes back as ``--lora``); each
file it names (reference, visual, init and mask images, schedules, adapters, LoRAs) as a path relative to
the project root, with the file's sha256 in ``files``. ``scenec build --from IMAGE.png`` writes it back into the
project (scenec/rebuild.py) and checks those digests before building.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from scenec.spec.fsio import sha256_big_file
from scenec.spec.models import NAME_PATTERN

# keys whose string values are file paths (under `output`, none are)
PATH_KEYS = ("image", "adapter", "mask", "file")


def hub_file(path: Path) -> tuple[str, str] | None:
    """(repo, file name) of a file in the Hugging Face cache (``…/models--ORG--NAME/snapshots/REV/FILE``), or
    None: how a ``repo:`` LoRA travels in the resolved scene."""
    parts = path.parts
    for i, part in enumerate(parts[:-3]):
        if part.startswith("models--") and "--" in part[8:] and parts[i + 1] == "snapshots":
            return part[8:].replace("--", "/", 1), "/".join(parts[i + 3:])
    return None


def at_root(p: str, root: Path) -> str:
    """An absolute path inside the project root as the path from the (resolved) root, POSIX-style; anything
    else (a path outside it, an alias, a hub id) as given."""
    q = Path(p)
    return q.relative_to(root).as_posix() if q.is_absolute() and q.is_relative_to(root) else p


def model_directory_at(repo: str, root: Path) -> str | None:
    """How a local diffusers model directory (``repo``: its resolved absolute path) is known wherever the project
    lies: its path from the project root, or None for a directory outside the project (where it lies is not what it
    is: the build's cache key digests its files, scenec/build/keys.py)."""
    rel = at_root(repo, Path(root).resolve())
    return None if Path(rel).is_absolute() else rel


def resolved_scene(ls, model_spec: str | None, loras=(), embeddings=(), clip_skip=None,
                   prompt_syntax: str = "plain",
                   checkpoint: tuple[str, str] | None = None, vae: str | None = None,
                   directory: str | None = None) -> tuple[str, dict[str, str]]:
    """(canonical YAML of the scene, {path relative to the root: sha256}) for a loaded scene ``ls``
    compiled with ``model_spec``, the whole-image ``loras`` (``spec.plan.Lora``), the text options
    (``spec.plan_text.Embedding``s, ``clip_skip``) and the prompt syntax (scenec.toml's too: self-contained).
    ``checkpoint``: a single-file model's (file, config) as resolved (absolute paths or a hub id), written
    relative to the root (the file is not hashed again: the plan carries its digest). ``vae``: the VAE replacing
    the model's as resolved (a hub snapshot directory travels as its repo id). ``directory``: a local diffusers
    model directory as resolved (its absolute path), written relative to the root as files are (the scene's
    ``model`` is relative to the scene's own directory, scenec.toml's to the root: neither is, from the root where
    ``--from`` compiles the embedded scene); one outside the root keeps its absolute path."""
    root = Path(ls.root).resolve()
    data = ls.scene.model_dump(mode="json", exclude_unset=True)
    data.pop("include", None)
    data.pop("defs", None)
    data["entities"] = [{"id": e.pop("id"), **{k: v for k, v in e.items() if k != "use"}}
                        for e in data.get("entities") or []]
    if not data["entities"]:
        del data["entities"]
    if re.fullmatch(NAME_PATTERN, ls.name):  # the outputs keep their names whatever the file is called
        data["name"] = ls.name
    data.pop("model", None)
    data.pop("prompt_syntax", None)
    if prompt_syntax != "plain":
        data["prompt_syntax"] = prompt_syntax
    files: dict[str, str] = {}

    def rel(p: Path) -> str:
        p = p.resolve()
        r = p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)
        if r not in files and p.is_file():
            files[r] = sha256_big_file(p)  # a VAE or LoRA file: hashed once per process
        return r

    def walk(x: Any, path: tuple) -> Any:
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                if k in PATH_KEYS and isinstance(v, str):
                    out[k] = rel(ls.resolve(path + (k,), v))
                else:
                    out[k] = walk(v, path + (k,))
            return out
        if isinstance(x, list):
            return [walk(v, path + (i,)) for i, v in enumerate(x)]
        return x

    body = {k: (v if k == "output" else walk(v, (k,))) for k, v in data.items()}

    model: dict[str, Any] = {"id": at_root(model_spec, root)} if model_spec else {}
    if directory is not None:
        model = {"id": at_root(directory, root)}
    if checkpoint is not None:
        model = {"id": at_root(checkpoint[0], root), "config": at_root(checkpoint[1], root)}
    whole = []
    for lo in loras:  # a hub file as its repo (the cache is no project path); one outside the root by its path
        hub = hub_file(Path(lo.path))
        whole.append({"repo": hub[0], "weight_name": hub[1], "scale": lo.scale} if hub and not
                     Path(lo.path).resolve().is_relative_to(root) else {"file": rel(Path(lo.path)), "scale": lo.scale})
    if whole:
        model["lora"] = whole
    embs = []
    for e in embeddings:  # as LoRAs: a hub file as its repo, a project file by its path
        hub = hub_file(Path(e.path))
        embs.append({"repo": hub[0], "weight_name": hub[1], "token": e.token} if hub and not
                    Path(e.path).resolve().is_relative_to(root) else {"file": rel(Path(e.path)), "token": e.token})
    if embs:
        model["embeddings"] = embs
    if clip_skip:
        model["clip_skip"] = clip_skip
    if vae is not None:
        hub = hub_file(Path(vae) / "config.json")
        model["vae"] = hub[0] if hub and not Path(vae).is_relative_to(root) else rel(Path(vae))
    ordered = {"scenec": body.pop("scenec", 1), **({"name": body.pop("name")} if "name" in body else {})}
    if model:
        ordered["model"] = model if set(model) - {"id"} else model["id"]
    ordered.update(body)
    text = yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True, default_flow_style=None, width=100)
    return text, dict(sorted(files.items()))
