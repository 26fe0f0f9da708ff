"""Batch builds (issue #6): discovery, selection, the content-addressed cache, the manifest, status.

dbt's model, for images (docs/batch.md):

- ``discover`` turns ``DIR | GLOB | FILE`` arguments into scene files (a YAML file is a scene when it
  has ``scenec:`` and ``canvas:`` at top level; library files are skipped);
- every scene is compiled (no torch); an invalid one is reported with its diagnostics and the others
  go on;
- each job gets a **cache key** = sha256 of (``job_hash``, model identity, seed, scenec version);
- ``OUTDIR/scenec-manifest.json`` records, per output, its key and the sha256 of the image: a job
  whose key matches and whose image is on disk with that sha256 is *cached* and not rebuilt;
- the manifest is rewritten atomically after every completed unit of work, so a kill loses at most
  the job in flight, and the next run starts by removing our stale temp files.

Nothing here imports torch: ``scenec status`` and ``scenec build --dry-run`` run in any CI. The
executors (local here, Ray in ``scenec/ray_executor.py``) load models only when something is built.
"""

from __future__ import annotations

import fnmatch
import glob as globmod
import hashlib
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from scenec import memo
from scenec.spec.fsio import atomic_write, recording_inputs, sha256_file

MANIFEST = "scenec-manifest.json"
MANIFEST_FORMAT = "scenec-manifest/1"
LOCK = ".scenec-manifest.lock"
SCENE_SUFFIXES = (".yaml", ".yml")
SKIP_DIRS = {"node_modules", "__pycache__", "site-packages"}
_GLOB_CHARS = re.compile(r"[*?\[]")
# tempfile.mkstemp(prefix=".NAME.", suffix=".tmp") as runtime.outputs.atomic_write and this module use it
_OUR_TMP = re.compile(r"^\..+\.(png|json)\.[a-z0-9_]{8}\.tmp$")


class BatchError(Exception):
    """A problem with the command line itself (bad --select, unknown executor); exit 2."""


# --- discovery ------------------------------------------------------------------------------------

_TOP_KEY = re.compile(r"^(scenec|canvas)\s*:", re.MULTILINE)


def is_scene_file(path: Path) -> bool:
    """A scene has top-level ``scenec:`` and ``canvas:`` keys; a library (defs only) has no canvas.

    A cheap textual test (block style at column 0, or a flow mapping ``{scenec: 1, canvas: …}``), so
    that a broken scene is still found and reported rather than skipped.
    """
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return False
    found = set(_TOP_KEY.findall(text))
    if found == {"scenec", "canvas"}:
        return True
    body = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")).lstrip()
    return body.startswith("{") and re.search(r"[{,]\s*scenec\s*:", body) is not None \
        and re.search(r"[{,]\s*canvas\s*:", body) is not None


def _walk(d: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x not in SKIP_DIRS)
        for f in sorted(files):
            if f.endswith(SCENE_SUFFIXES) and not f.startswith("."):
                p = Path(root) / f
                if is_scene_file(p):
                    yield p


def discover(targets: Iterable[str | Path]) -> tuple[list[Path], list]:
    """Scene files named by ``DIR | GLOB | FILE`` arguments, in order, each once; and diagnostics.

    A directory is searched recursively for ``*.yaml`` / ``*.yml`` scenes (hidden directories
    skipped); a glob (``scenes/**/*.yaml``) likewise keeps only scenes; a file named explicitly is
    always taken (so that an invalid one is reported). A target that matches nothing is an error.
    """
    from scenec.spec.diagnostics import Diagnostic, Pos

    found: dict[Path, Path] = {}
    problems = []

    def add(p: Path) -> None:
        found.setdefault(p.resolve(), p)

    for t in targets:
        s = str(t)
        p = Path(s)
        if p.is_dir():
            n = len(found)
            for f in _walk(p):
                add(f)
            if len(found) == n:
                problems.append(Diagnostic(Pos(s), "no scene files here (a scene has top-level `scenec:` and "
                                                   "`canvas:`)", "warning"))
        elif p.is_file():
            add(p)
        elif _GLOB_CHARS.search(s):
            n = len(found)
            for m in sorted(globmod.glob(s, recursive=True)):
                mp = Path(m)
                if mp.is_dir():
                    for f in _walk(mp):
                        add(f)
                elif mp.suffix in SCENE_SUFFIXES and is_scene_file(mp):
                    add(mp)
            if len(found) == n:
                problems.append(Diagnostic(Pos(s), "the pattern matches no scene file", "warning"))
        else:
            problems.append(Diagnostic(Pos(s), "no such file or directory"))
    return list(found.values()), problems


# --- selection ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Selector:
    """One ``--select`` term: the intersection of its comma-separated parts."""

    text: str
    parts: tuple[tuple[str, str], ...]  # (method, pattern)

    def matches(self, job: dict) -> bool:
        return all(_match_part(m, p, job) for m, p in self.parts)


METHODS = ("scene", "path", "group", "seed", "matrix")


def parse_selectors(exprs: Iterable[str] | None) -> list[Selector]:
    """Parse ``--select``/``--exclude`` values: whitespace separates a union, commas an intersection.

    Terms: ``NAME`` (scene name or group id, glob), ``GROUP/VARIANT`` (globs), ``scene:GLOB``,
    ``group:GLOB[/GLOB]``, ``path:GLOB`` (scene file), ``seed:N``, ``KEY=GLOB`` (a matrix value),
    and a path ending in ``.yaml``/``.yml``. See docs/batch.md.
    """
    out = []
    for e in exprs or ():
        for term in str(e).split():
            parts = []
            for raw in term.split(","):
                if not raw:
                    raise BatchError(f"--select `{term}`: empty part (commas join terms that must all match)")
                parts.append(_parse_part(raw, term))
            out.append(Selector(term, tuple(parts)))
    return out


def _parse_part(raw: str, term: str) -> tuple[str, str]:
    if ":" in raw:
        method, _, pat = raw.partition(":")
        if method not in METHODS:
            raise BatchError(f"--select `{term}`: unknown method `{method}:`; methods: "
                             + ", ".join(m + ":" for m in METHODS))
        if not pat:
            raise BatchError(f"--select `{term}`: `{method}:` needs a pattern")
        if method == "seed" and not pat.isdigit():
            raise BatchError(f"--select `{term}`: `seed:` takes an integer")
        if method == "matrix" and "=" not in pat:
            raise BatchError(f"--select `{term}`: write `matrix:KEY=VALUE` or `KEY=VALUE`")
        return method, pat
    if "=" in raw:
        return "matrix", raw
    if raw.endswith(SCENE_SUFFIXES):
        return "path", raw
    if "/" in raw:
        return "variant", raw
    return "name", raw


def _glob(pat: str, value: Any) -> bool:
    return value is not None and fnmatch.fnmatchcase(str(value), pat)


def _match_part(method: str, pat: str, job: dict) -> bool:
    if method == "scene":
        return _glob(pat, job["scene"])
    if method == "name":
        return _glob(pat, job["scene"]) or _glob(pat, job.get("group"))
    if method == "group":
        if "/" in pat:
            g, _, v = pat.partition("/")
            return _glob(g, job.get("group")) and _glob(v, job.get("variant"))
        return _glob(pat, job.get("group"))
    if method == "variant":
        g, _, v = pat.partition("/")
        return _glob(g, job.get("group")) and _glob(v, job.get("variant"))
    if method == "seed":
        return int(pat) == job.get("seed")
    if method == "path":
        f = job["file"]
        pat = pat.rstrip("/")
        return fnmatch.fnmatchcase(f, pat) or f.startswith(pat + "/") or fnmatch.fnmatchcase(Path(f).name, pat)
    if method == "matrix":
        k, _, v = pat.partition("=")
        vals = dict(job.get("matrix") or {})
        vals.setdefault("seed", job.get("seed"))
        if k not in vals:
            return False
        from scenec.compiler.matrix import slug

        return _glob(v, vals[k]) or _glob(v, slug(vals[k]))
    raise AssertionError(method)


def selected(job: dict, select: list[Selector], exclude: list[Selector]) -> bool:
    if select and not any(s.matches(job) for s in select):
        return False
    return not any(s.matches(job) for s in exclude)


# --- model identity and the cache key ---------------------------------------------------------------

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
            if mode == "content":
                h.update(f"{rel}\0{st.st_size}\0{sha256_file(p)}\n".encode())
            else:
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def model_identity(model: dict, weights_hash: str = "stat") -> dict:
    """What identifies the weights a plan runs on (part of every cache key; docs/batch.md).

    Built-in models (``tiny``): the alias (their weights are made by scenec's code, versioned with
    it). A local directory: a digest of its files. A hub id: the id + the commit that the local
    Hugging Face cache resolves ``main`` to, or ``unresolved`` when the cache does not hold it.
    """
    spec, repo = model.get("spec"), model.get("repo")
    if not repo:
        return {"id": spec or "tiny", "revision": "builtin"}
    p = Path(repo)
    if p.is_dir():
        return {"id": f"local:{p.name}", "weights": f"{weights_hash}:{weights_digest(p, weights_hash)}"}
    ref = _hf_cache_dir() / ("models--" + repo.replace("/", "--")) / "refs" / "main"
    try:
        rev = ref.read_text().strip() or "unresolved"
    except OSError:
        rev = "unresolved"
    return {"id": repo, "revision": rev}


def cache_key(job_hash: str, identity: dict, seed: int) -> str:
    """sha256 of (job_hash, model identity, seed, scenec version): canonical JSON."""
    from scenec import __version__

    doc = {"job_hash": job_hash, "model": identity, "seed": seed, "scenec": __version__}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- files: atomic writes, our temp files, the lock -------------------------------------------------

def clean_temp_files(out_dir: Path) -> list[Path]:
    """Remove temp files our atomic writes left behind (a killed build); returns what was removed."""
    removed = []
    if not out_dir.is_dir():
        return removed
    for root, dirs, files in os.walk(out_dir):
        for f in files:
            if _OUR_TMP.match(f):
                p = Path(root) / f
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


@contextmanager
def locked(out_dir: Path):
    """An exclusive lock on OUTDIR for one build at a time (``flock``: a killed process releases it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out_dir / LOCK, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"scenec: waiting for another build of {out_dir} to finish", file=sys.stderr)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --- the manifest ---------------------------------------------------------------------------------

class Manifest:
    """``OUTDIR/scenec-manifest.json``: one entry per output name (docs/batch.md, "Manifest")."""

    def __init__(self, out_dir: Path, data: dict | None = None):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / MANIFEST
        self.data = data or {"format": MANIFEST_FORMAT, "outputs": {}}
        self.problem: str | None = None

    @classmethod
    def load(cls, out_dir: Path) -> "Manifest":
        m = cls(out_dir)
        try:
            data = json.loads(m.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return m
        except (OSError, ValueError) as e:
            m.problem = f"{m.path}: unreadable manifest ({type(e).__name__}); every output counts as new"
            return m
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or \
                not isinstance(data.get("outputs"), dict):
            m.problem = f"{m.path}: not a {MANIFEST_FORMAT} manifest; every output counts as new"
            return m
        m.data = data
        return m

    @property
    def outputs(self) -> dict[str, dict]:
        return self.data["outputs"]

    def save(self) -> None:
        from scenec import __version__

        self.data["scenec_version"] = __version__
        self.data["updated"] = _now()
        self.data["outputs"] = dict(sorted(self.outputs.items()))
        text = json.dumps(self.data, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
        atomic_write(self.path, text.encode("utf-8"))

    def check(self, name: str, key: str, masks: bool = False) -> tuple[str, str]:
        """(state, reason) of one output: cached | new | changed | missing | modified."""
        e = self.outputs.get(name)
        if e is None:
            return "new", "not built yet"
        if e.get("key") != key:
            return "changed", _what_changed(e)
        img = self.out_dir / e.get("image", name + ".png")
        if not img.is_file():
            return "missing", "image deleted"
        side = self.out_dir / e.get("sidecar", name + ".json")
        if not side.is_file():
            return "missing", "sidecar deleted"
        if masks and not e.get("masks") and e.get("has_entities"):
            return "changed", "masks requested"
        try:
            if sha256_file(img) != e.get("sha256"):
                return "modified", "image differs from the manifest's sha256"
        except OSError as err:
            return "missing", f"image unreadable ({err.strerror})"
        return "cached", "up to date"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _what_changed(e: dict) -> str:
    from scenec import __version__

    if e.get("scenec_version") not in (None, __version__):
        return f"scenec version {e.get('scenec_version')} → {__version__}"
    return "job or model changed"


# --- planning: scenes → jobs with keys and states -----------------------------------------------------

@dataclass
class Item:
    """One output of the batch: the job, where it goes, its key and what the cache says of it."""

    scene_file: Path
    display: str  # the scene file as shown to the user
    plan: Any  # runtime.plan.Plan
    job: dict
    out_dir: Path
    name: str
    key: str
    identity: dict
    state: str = "new"  # new | changed | missing | modified | forced | cached
    reason: str = ""
    selected: bool = True

    @property
    def info(self) -> dict:
        return {"scene": self.plan.json["scene"]["name"], "file": self.display, "group": self.job.get("group"),
                "variant": self.job.get("variant"), "seed": self.job.get("seed"), "matrix": self.job.get("matrix")}

    @property
    def image(self) -> Path:
        return self.out_dir / (self.name + ".png")

    @property
    def todo(self) -> bool:
        return self.selected and self.state != "cached"


@dataclass
class BatchPlan:
    items: list[Item] = field(default_factory=list)
    scenes: list[Path] = field(default_factory=list)
    diagnostics: Any = None  # spec.diagnostics.Diagnostics
    invalid: list[str] = field(default_factory=list)  # scene files that did not compile
    failed_compile: list[tuple[str, str]] = field(default_factory=list)  # (file, message): internal errors
    manifests: dict[Path, Manifest] = field(default_factory=dict)
    compile_s: float = 0.0


def _display(p: Path) -> str:
    from scenec.spec.diagnostics import display_path

    return display_path(p)


def plan_batch(targets: Iterable[str | Path], out: str | Path | None = None, model: str | None = None,
               select: Iterable[str] | None = None, exclude: Iterable[str] | None = None, force: bool = False,
               masks: bool = False, weights_hash: str = "stat",
               compile_fn: Callable | None = None) -> BatchPlan:
    """Discover, compile (no torch), key and check every job against the manifests. Never raises for
    bad scenes: their diagnostics are collected and the other scenes go on."""
    from scenec.spec.diagnostics import Diagnostics, Pos, SceneError

    if weights_hash not in ("stat", "content"):
        raise BatchError(f"--weights-hash must be stat or content, not `{weights_hash}`")
    sel, exc = parse_selectors(select), parse_selectors(exclude)
    bp = BatchPlan(diagnostics=Diagnostics())
    files, problems = discover(targets)
    bp.diagnostics.extend(problems)
    if any(d.severity == "error" for d in problems):
        bp.invalid += [d.pos.file for d in problems if d.severity == "error"]
    bp.scenes = files
    if not files and not problems:
        bp.diagnostics.error(Pos("."), "no scene files given")
    identities: dict[str, dict] = {}
    owners: dict[tuple[Path, str], Item] = {}
    partial = compile_fn is None and memo.enabled()  # a test's compile_fn must always run
    compile_fn = compile_fn or _compile

    def compile_one(f: Path):
        """Compile ``f`` (recording what it reads, for its memo); None when it did not compile."""
        from scenec.runtime.plan import Plan

        try:
            with recording_inputs() as inputs:
                compiled = compile_fn(f, model)
                plan = Plan.of(compiled)
        except SceneError as e:
            bp.diagnostics.extend(e.diagnostics)
            if not e.diagnostics.has_errors():
                bp.diagnostics.error(Pos(_display(f)), "invalid scene")
            bp.invalid.append(_display(f))
            return None
        except Exception as e:  # noqa: BLE001 - one scene's internal error must not stop the batch
            if os.environ.get("SCENEC_DEBUG"):
                raise
            bp.failed_compile.append((_display(f), f"internal error while compiling: {type(e).__name__}: {e}"))
            return None
        ir = getattr(compiled, "ir", None)
        warnings = list(ir.extra.get("warnings", [])) if ir is not None else []
        if partial:
            memo.store(f, model, list(inputs), plan.json, warnings)
        return plan, warnings

    def add_scene(f: Path, plan, warnings) -> list[Item]:
        bp.diagnostics.extend(warnings)
        mkey = json.dumps(plan.model, sort_keys=True)
        if mkey not in identities:
            identities[mkey] = model_identity(plan.model, weights_hash)
        identity = identities[mkey]
        out_dir = Path(out) if out is not None else f.resolve().parent / (plan.json.get("output") or {}).get("dir", "out")
        out_dir = Path(os.path.abspath(out_dir))
        display = _display(f)
        added = []
        for job in plan.jobs:
            name = job.get("name", job["id"])
            item = Item(f, display, plan, job, out_dir, name, cache_key(job.get("job_hash", ""), identity, job["seed"]),
                        identity)
            item.selected = selected(item.info, sel, exc)
            other = owners.get((out_dir, name))
            if other is not None:
                bp.diagnostics.error(Pos(display, job.get("source", {}).get("line", 1)),
                                     f"output `{name}` in {out_dir} is also made by "
                                     f"{other.display}:{other.job.get('source', {}).get('line', 1)}",
                                     hint="give the scenes different `name`s or `output.dir`s")
                if display not in bp.invalid:
                    bp.invalid.append(display)
                continue
            owners[(out_dir, name)] = item
            added.append(item)
        return added

    t0 = time.perf_counter()
    for f in files:
        hit = memo.load(f, model) if partial else None
        if hit is not None:
            bp.items += add_scene(f, hit[0], memo.warnings_of(hit[1]))
            continue
        got = compile_one(f)
        if got is not None:
            bp.items += add_scene(f, *got)
    bp.compile_s = time.perf_counter() - t0

    def check(items: list[Item]) -> None:
        for item in items:
            if item.out_dir not in bp.manifests:
                bp.manifests[item.out_dir] = Manifest.load(item.out_dir)
            man = bp.manifests[item.out_dir]
            item.state, item.reason = man.check(item.name, item.key, masks=masks)
            if force and item.selected and item.state == "cached":
                item.state, item.reason = "forced", "--force"

    check(bp.items)
    # a replayed scene with something to build is compiled for real: building needs its plan
    replayed = list(dict.fromkeys(it.scene_file for it in bp.items if getattr(it.plan, "memo", False) and it.todo))
    if replayed:
        t1 = time.perf_counter()
        for f in replayed:
            old = [it for it in bp.items if it.scene_file == f]
            for it in old:
                owners.pop((it.out_dir, it.name), None)
            got = compile_one(f)  # its warnings equal the replayed ones: Diagnostics drops repeats
            new_items = add_scene(f, *got) if got is not None else []
            check(new_items)
            gone = {id(it) for it in old}  # by identity: Items compare by value
            at = next(i for i, it in enumerate(bp.items) if id(it) in gone)
            bp.items = [it for it in bp.items[:at] if id(it) not in gone] + new_items + \
                [it for it in bp.items[at:] if id(it) not in gone]
        bp.compile_s += time.perf_counter() - t1
    for man in bp.manifests.values():
        if man.problem:
            bp.diagnostics.warning(Pos(str(man.path)), man.problem)
    return bp


def _compile(path: Path, model: str | None):
    from scenec.compiler import compile_scene

    return compile_scene(path, model=model)


# --- units of work and sub-plans ----------------------------------------------------------------------

@dataclass
class Unit:
    """Jobs executed together: one job, or the jobs to build of one coupling group (shared prefix)."""

    items: list[Item]

    @property
    def plan(self):
        return self.items[0].plan

    @property
    def out_dir(self) -> Path:
        return self.items[0].out_dir


def units_of(items: list[Item]) -> list[Unit]:
    """Group the items to build into units, in scene order; coupled jobs of one group stay together."""
    units: list[Unit] = []
    by_group: dict[tuple[int, str], Unit] = {}
    for it in items:
        gid = it.job.get("group")
        groups = {g["id"] for g in it.plan.json.get("groups") or []}
        if gid and gid in groups:
            k = (id(it.plan), gid)
            if k not in by_group:
                by_group[k] = Unit([])
                units.append(by_group[k])
            by_group[k].items.append(it)
        else:
            units.append(Unit([it]))
    return units


def batches_of(units: list[Unit], batch_size: int = 1) -> list[list[Unit]]:
    """Units grouped into what runs as one batch: single-job units whose jobs are batch-compatible
    (runtime/batching.batch_key: same model, canvas, sampler, program; any scene) go together, up to
    ``batch_size``; every other unit runs alone. A batch sits where its first unit was."""
    if batch_size <= 1:
        return [[u] for u in units]
    from scenec.runtime.batching import batch_key

    out: list[list[Unit]] = []
    filling: dict[str, list[Unit]] = {}
    for u in units:
        key = batch_key(u.plan.json, u.items[0].job) if len(u.items) == 1 else None
        if key is None:
            out.append([u])
            continue
        if key not in filling:
            filling[key] = []
            out.append(filling[key])
        filling[key].append(u)
        if len(filling[key]) >= batch_size:
            del filling[key]
    return out


_TENSOR_PREFIXES = ("region", "inpaint", "image", "cond", "related", "group", "job")


def subplan(plan, jobs: list[dict]):
    """The plan restricted to ``jobs`` (their groups and the tensors they name): what one unit ships."""
    from scenec.runtime.plan import Plan

    ids = {j["id"] for j in jobs}
    doc = dict(plan.json)
    doc["jobs"] = [j for j in plan.json["jobs"] if j["id"] in ids]
    groups = []
    for g in plan.json.get("groups") or []:
        members = [x for x in g.get("jobs", []) if x in ids]
        if members:
            groups.append({**g, "jobs": members})
    doc["groups"] = groups
    names: set[str] = set()

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k != "matrix":
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str) and x in plan.tensors:
            names.add(x)

    walk(doc["jobs"])
    walk(groups)
    return Plan(doc, {n: plan.tensors[n] for n in names})


# --- recording results ----------------------------------------------------------------------------------

def record(item: Item, result: dict, manifest: Manifest) -> dict:
    """Update the manifest entry of a built output (the caller saves the manifest)."""
    img = Path(result["image"])
    side = Path(result["sidecar"])
    rel = lambda p: os.path.relpath(p, manifest.out_dir).replace(os.sep, "/")  # noqa: E731
    from scenec import __version__

    entry = {
        "key": item.key,
        "job_hash": item.job.get("job_hash", ""),
        "model": item.identity,
        "seed": item.job["seed"],
        "scenec_version": __version__,
        "image": rel(img),
        "sha256": sha256_file(img),
        "sidecar": rel(side),
        "masks": [rel(Path(p)) for p in result.get("masks") or []],
        "has_entities": bool(item.job.get("entities")),
        "scene": {"name": item.plan.json["scene"]["name"],
                  "file": rel(item.scene_file.resolve()),
                  "line": (item.job.get("source") or {}).get("line"),
                  "job": item.job["id"], "group": item.job.get("group"), "variant": item.job.get("variant"),
                  "matrix": item.job.get("matrix")},
        "timings": result.get("timings") or {},
        "built_at": _now(),
    }
    manifest.outputs[item.name] = entry
    return entry


# --- the build ----------------------------------------------------------------------------------------

def build_batch(targets: Iterable[str | Path], out: str | Path | None = None, model: str | None = None,
                select: Iterable[str] | None = None, exclude: Iterable[str] | None = None, force: bool = False,
                dry_run: bool = False, device: str | None = None, dtype: str | None = None, masks: bool = False,
                executor: str = "local", address: str | None = None, workers: int | None = None,
                weights_hash: str = "stat", quiet: bool = False, compile_fn: Callable | None = None,
                execute_fn: Callable | None = None, stream=None, batch_size: int = 1,
                execute_batch_fn: Callable | None = None) -> dict:
    """Build every selected, not up-to-date job of the scenes found in ``targets``.

    Returns ``{"built", "cached", "failed", "invalid", "outputs", "errors", "diagnostics", "plan"}``;
    ``outputs`` has one entry per selected job (``status``: built | cached | failed | would-build).
    ``execute_fn(plan, backend, out_dir, masks=...)`` runs one unit (default:
    ``scenec.build.execute_unit``); with ``batch_size > 1`` batch-compatible jobs of any scenes run
    together through ``execute_batch_fn`` (default ``scenec.build.execute_batched``).
    """
    if batch_size < 1:
        raise BatchError(f"--batch-size must be at least 1, not {batch_size}")
    stream = stream or sys.stderr
    if executor not in ("local", "ray"):
        raise BatchError(f"--executor must be local or ray, not `{executor}`")
    if executor == "ray":
        from .ray_executor import require_ray

        require_ray()  # before compiling: a missing extra is a usage error
    t0 = time.perf_counter()
    bp = plan_batch(targets, out=out, model=model, select=select, exclude=exclude, force=force, masks=masks,
                    weights_hash=weights_hash, compile_fn=compile_fn)
    summary: dict[str, Any] = {"built": 0, "cached": 0, "failed": 0, "invalid": len(bp.invalid), "outputs": [],
                               "errors": [], "diagnostics": bp.diagnostics, "plan": bp}

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=stream)

    for d in bp.diagnostics.sorted():
        say(d.format())
    if bp.invalid:
        say(f"scenec: {len(bp.invalid)} invalid scene{'s' if len(bp.invalid) != 1 else ''}; building the others")
    for f, msg in bp.failed_compile:
        summary["failed"] += 1
        summary["errors"].append(f"{f}: {msg}")
        say(f"scenec: {f}: {msg}")
    chosen = [it for it in bp.items if it.selected]
    for it in chosen:
        if it.state == "cached":
            summary["cached"] += 1
            summary["outputs"].append(_cached_output(it, bp.manifests[it.out_dir]))
    todo = [it for it in chosen if it.todo]
    if dry_run:
        for it in todo:
            summary["outputs"].append({"job": it.job["id"], "name": it.name, "seed": it.job["seed"],
                                       "status": "would-build", "state": it.state, "reason": it.reason,
                                       "image": str(it.image), "scene": f"{it.display}:{_line(it)}"})
        summary["seconds"] = time.perf_counter() - t0
        return summary

    if todo:
        out_dirs = sorted({it.out_dir for it in todo})
        with _locks(out_dirs):
            for d in out_dirs:
                for p in clean_temp_files(d):
                    say(f"scenec: removed a stale temp file {p}")
                # re-read under the lock: another build may have finished meanwhile
                bp.manifests[d] = Manifest.load(d)
            units = units_of(todo)

            def done(unit: Unit, results: list[dict] | None, error: str | None = None) -> None:
                man = bp.manifests[unit.out_dir]
                by_id = {r["job"]: r for r in results or []}
                for it in unit.items:
                    r = by_id.get(it.job["id"])
                    if r is not None and r.get("status") == "built":
                        record(it, r, man)
                        summary["built"] += 1
                        summary["outputs"].append({**r, "state": it.state, "reason": it.reason})
                        t = (r.get("timings") or {}).get("total_s")
                        say(f"  built   {it.name}" + (f"  ({t:.2f} s)" if t is not None else "")
                            + f"  [{it.state}: {it.reason}]")
                    else:
                        msg = (r or {}).get("error") or error or "no result"
                        summary["failed"] += 1
                        summary["errors"].append(f"{it.display}:{_line(it)}: {it.name}: {msg}")
                        summary["outputs"].append({"job": it.job["id"], "name": it.name, "seed": it.job["seed"],
                                                   "status": "failed", "error": msg})
                        say(f"scenec: {it.display}:{_line(it)}: {it.name}: {msg}")
                if any((by_id.get(it.job["id"]) or {}).get("status") == "built" for it in unit.items):
                    man.save()  # manifest last: after the unit's images and sidecars

            if executor == "ray":
                from .ray_executor import run_ray

                run_ray(units, done, device=device, dtype=dtype, masks=masks, address=address, workers=workers,
                        batch_size=batch_size,
                        say=say)
            else:
                run_local(units, done, device=device, dtype=dtype, masks=masks, execute_fn=execute_fn,
                          batch_size=batch_size, execute_batch_fn=execute_batch_fn)
    summary["seconds"] = time.perf_counter() - t0
    say(f"scenec: {summary['built']} built, {summary['cached']} cached, {summary['failed']} failed"
        + (f", {summary['invalid']} invalid" if summary["invalid"] else "")
        + (f", {len(bp.items) - len(chosen)} not selected" if len(chosen) < len(bp.items) else "")
        + f" ({summary['seconds']:.1f} s)")
    return summary


@contextmanager
def _locks(dirs: list[Path]):
    from contextlib import ExitStack

    with ExitStack() as stack:
        for d in dirs:  # sorted: two builds never wait on each other in a cycle
            stack.enter_context(locked(d))
        yield


def _line(it: Item) -> int:
    return (it.job.get("source") or {}).get("line") or 1


def _cached_output(it: Item, man: Manifest) -> dict:
    e = man.outputs[it.name]
    return {"job": it.job["id"], "name": it.name, "seed": it.job["seed"], "job_hash": it.job.get("job_hash", ""),
            "status": "cached", "image": str(man.out_dir / e["image"]), "sidecar": str(man.out_dir / e["sidecar"]),
            "masks": [str(man.out_dir / p) for p in e.get("masks") or []], "timings": e.get("timings") or {}}


def run_local(units: list[Unit], done: Callable, device=None, dtype=None, masks: bool = False,
              execute_fn: Callable | None = None, batch_size: int = 1,
              execute_batch_fn: Callable | None = None) -> None:
    """Run units in this process; each model is loaded once and reused by every scene that uses it.

    With ``batch_size > 1``, batch-compatible jobs of different scenes run as one batch
    (``execute_batch_fn(entries, backend, masks=...)``, default ``scenec.build.execute_batched``)."""
    if execute_fn is None:
        from scenec.build import execute_unit as execute_fn
    if execute_batch_fn is None:
        from scenec.build import execute_batched as execute_batch_fn
    from scenec.runtime.errors import RuntimeErrorBase

    backends: dict[str, Any] = {}
    for batch in batches_of(units, batch_size):
        unit = batch[0]
        m = unit.plan.model
        mkey = json.dumps(m, sort_keys=True)
        if mkey not in backends:
            try:
                from scenec.build import load_model

                backends[mkey] = load_model(m, device=device, dtype=dtype)
            except RuntimeErrorBase as e:
                backends[mkey] = e
        be = backends[mkey]
        if isinstance(be, Exception):
            for u in batch:
                done(u, None, str(be))
            continue
        if len(batch) > 1:
            try:
                results = execute_batch_fn([(u.plan, u.items[0].job, u.out_dir) for u in batch], be, masks=masks)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - the batch fails, the build goes on
                if os.environ.get("SCENEC_DEBUG"):
                    raise
                for u in batch:
                    done(u, None, f"{type(e).__name__}: {e}")
                continue
            for u, r in zip(batch, results):
                done(u, [r])
            continue
        try:
            results = execute_fn(subplan(unit.plan, [it.job for it in unit.items]), be, unit.out_dir, masks=masks)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - one unit's failure (OOM, a bug) must not stop the batch
            if os.environ.get("SCENEC_DEBUG"):
                raise
            done(unit, None, f"{type(e).__name__}: {e}")
            continue
        done(unit, results)


# --- status ---------------------------------------------------------------------------------------------

STALE_STATES = ("new", "changed", "missing", "modified")


def status(targets: Iterable[str | Path], out: str | Path | None = None, model: str | None = None,
           select: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
           weights_hash: str = "stat") -> dict:
    """What a build would do, like ``git status``: each output's state, and manifest entries of these
    scenes that no scene makes any more (``orphaned``). Never imports torch."""
    bp = plan_batch(targets, out=out, model=model, select=select, exclude=exclude, weights_hash=weights_hash)
    rows = []
    for it in bp.items:
        if it.selected:
            rows.append({"state": it.state, "reason": it.reason, "name": it.name, "image": str(it.image),
                         "scene": it.display, "line": _line(it)})
    made = {(it.out_dir, it.name) for it in bp.items}
    scanned = {f.resolve() for f in bp.scenes}
    orphans = []
    for d, man in bp.manifests.items():
        for name, e in man.outputs.items():
            src = (man.out_dir / (e.get("scene") or {}).get("file", "")).resolve()
            if src in scanned and (d, name) not in made:
                orphans.append({"state": "orphaned", "name": name, "image": str(d / e.get("image", name + ".png")),
                                "scene": _display(src), "reason": "no scene makes it any more"})
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return {"outputs": rows, "orphaned": orphans, "counts": counts,
            "stale": sum(counts.get(s, 0) for s in STALE_STATES), "invalid": bp.invalid,
            "failed_compile": bp.failed_compile, "diagnostics": bp.diagnostics, "scenes": len(bp.scenes)}


def format_status(rep: dict, verbose: bool = False) -> str:
    lines = []
    n = len(rep["outputs"])
    cached = rep["counts"].get("cached", 0)
    lines.append(f"{rep['scenes']} scene{'s' if rep['scenes'] != 1 else ''}, {n} output{'s' if n != 1 else ''}: "
                 f"{cached} up to date, {rep['stale']} to build"
                 + (f", {len(rep['invalid'])} invalid scene{'s' if len(rep['invalid']) != 1 else ''}"
                    if rep["invalid"] else ""))
    cwd = Path.cwd()
    for r in rep["outputs"] + rep["orphaned"]:
        if r["state"] == "cached" and not verbose:
            continue
        try:
            shown = str(Path(r["image"]).relative_to(cwd))
        except ValueError:
            shown = r["image"]
        where = f"{r['scene']}:{r['line']}" if "line" in r else r["scene"]
        lines.append(f"  {r['state'] + ':':<10} {shown}  ({r['reason']}; {where})")
    return "\n".join(lines)
