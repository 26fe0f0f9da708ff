"""The cache key of an output (docs/batch.md, "The cache key"): sha256 of the job's ``job_hash``, the
identity of the model's weights, the seed, the scenec version and its runtime's code. No torch, no
model load."""

from __future__ import annotations

import hashlib
import json
import os
from functools import cache
from importlib.util import find_spec
from pathlib import Path

from scenec.spec.fsio import sha256_file


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface" / "hub"


def weights_digest(directory: Path, mode: str = "stat") -> str:
    """Digest of a local model directory: every file's relative path + size + mtime (``stat``), or
    + its content's sha256 (``content``, slower, survives copies and touch)."""
    h = hashlib.sha256(mode.encode())
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith("."):
                continue
            p = Path(root) / f
            st = p.stat()
            rel = p.relative_to(directory).as_posix()
            # surrogateescape: a file name that is not UTF-8 hashes as its bytes
            if mode == "content":
                h.update(f"{rel}\0{st.st_size}\0{sha256_file(p)}\n".encode("utf-8", "surrogateescape"))
            else:
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def model_identity(model: dict, weights_hash: str = "stat") -> dict:
    """The model's identity (:func:`_weights_identity`), with that of a VAE replacing its own (``model.vae``: a
    file by the plan's sha256, a directory digested as a local model directory)."""
    out = _weights_identity(model, weights_hash)
    vae = model.get("vae")
    if vae:
        out = {**out, "vae": f"sha256:{model['vae_sha256']}" if model.get("vae_sha256") else
               f"{weights_hash}:{weights_digest(Path(vae), weights_hash)}" if Path(vae).is_dir() else "missing"}
    return out


def _weights_identity(model: dict, weights_hash: str = "stat") -> dict:
    """What identifies the weights a plan runs on (part of every cache key; docs/batch.md).

    Built-in models (``tiny``): the alias (their weights are made by scenec's code, versioned with
    it). A local directory: a digest of its files. A hub id: the id + the commit that the local
    Hugging Face cache resolves ``main`` to, or ``unresolved`` when the cache does not hold it. A single-file
    checkpoint: its sha256 (the plan's) and its config directory's or hub id's identity, as above.
    """
    spec, repo = model.get("spec"), model.get("repo")
    if not repo:
        return {"id": spec or "tiny", "revision": "builtin"}
    if model.get("sha256"):  # a single-file checkpoint: its content (hashed at compile, as LoRA files) and configs
        config = _weights_identity({"spec": model.get("config"), "repo": model.get("config")}, weights_hash)
        return {"id": f"file:{Path(repo).name}", "weights": f"sha256:{model['sha256']}", "config": config}
    p = Path(repo)
    if p.is_dir():
        return {"id": f"local:{p.name}", "weights": f"{weights_hash}:{weights_digest(p, weights_hash)}"}
    ref = _hf_cache_dir() / ("models--" + repo.replace("/", "--")) / "refs" / "main"
    try:
        rev = ref.read_text().strip() or "unresolved"
    except OSError:
        rev = "unresolved"
    return {"id": repo, "revision": rev}


def job_identity(identity: dict, job: dict, weights_hash: str = "stat", digests: dict | None = None) -> dict:
    """The model's identity, and that of the image encoders of the job's visual prompts (their directories'
    files, digested as a local model directory's): a changed encoder rebuilds exactly its images.
    ``digests``: the encoders digested so far in this build (one walk per directory, not one per job)."""
    encoders = sorted({vp["encoder"] for vp in job.get("visuals") or () if vp.get("encoder")} |
                      {c["model"] for c in job.get("controls") or () if c.get("model")})  # ControlNets too
    if not encoders:
        return identity
    digests = {} if digests is None else digests
    for e in encoders:
        if e not in digests:
            digests[e] = f"{weights_hash}:{weights_digest(Path(e), weights_hash)}" if Path(e).is_dir() else "missing"
    return {**identity, "encoders": " ".join(digests[e] for e in encoders)}


@cache
def runtime_code() -> str:
    """sha256 of every source file of ``scenec.runtime`` (its families and methods too) and of the
    compiler and spec modules those files import (:func:`_imported`), first 16 hex.

    What a plan's images look like is the plan (its ``job_hash``), the weights, and this code: a
    change to a solver or a method changes images without changing the version string of a checkout
    (an editable install), so outputs built before it must count as stale. The runtime runs some of
    the compiler's and spec's code itself (``compiler.lora.split_key`` maps a LoRA file's keys onto the
    model at load, ``spec.plan`` decodes the plan's masks): a change there changes images and no plan.
    Located without importing the runtime (no torch here); ~1 MB hashed once per process."""
    spec = find_spec("scenec.runtime")
    h = hashlib.sha256()
    files: list[tuple[str, Path]] = []
    for d in (spec.submodule_search_locations or []) if spec else []:
        files += [(p.relative_to(d).as_posix(), p) for p in sorted(Path(d).rglob("*.py"))]
    used = sorted({m for _, p in files for m in _imported(p)})
    for name, p in files + [(m, q) for m in used if (q := _module_file(m)) is not None]:
        h.update(name.encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def _imported(path: Path) -> set[str]:
    """The ``scenec.compiler.*`` and ``scenec.spec.*`` modules a source file imports (``from M import …``,
    ``import M``; read with ast, nothing imported)."""
    import ast

    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return set()
    out = set()
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            # `from scenec.compiler import lora` names a module too (_module_file skips what is not one)
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out.update(n for n in names if n.startswith(("scenec.compiler.", "scenec.spec.")))
    return out


def _module_file(name: str) -> Path | None:
    """A ``scenec.compiler.X`` / ``scenec.spec.X`` module's source file, found from its package's location."""
    pkg, _, rest = name.partition(".")[2].partition(".")
    spec = find_spec(f"scenec.{pkg}")
    for d in (spec.submodule_search_locations or []) if spec else []:
        p = Path(d, *rest.split(".")).with_suffix(".py")
        if p.is_file():
            return p
    return None


def cache_key(job_hash: str, identity: dict, seed: int) -> str:
    """sha256 of (job_hash, model identity, seed, scenec version, runtime code): canonical JSON."""
    from scenec import __version__

    doc = {"job_hash": job_hash, "model": identity, "seed": seed, "scenec": __version__,
           "runtime": runtime_code()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
