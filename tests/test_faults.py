"""Fault injection: damaged caches, manifests and memos, full and read-only disks, two builds into one
folder, kill -9 at random moments, NaN. Whatever happens, no wrong image is ever recorded as built, no
image is built twice, and every run ends with its summary line and its documented exit code (0 built,
1 a build failed, 2 a bad argument).

Everything runs on the tiny model at 64x64 with one or two steps; the builds that must be separate
processes (kill -9, two at once) are the slow part."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import scenec.build.manifest as manifest_mod
import scenec.build.planning as planning
import scenec.build.pool as pool
from scenec.build import memo
from scenec.build.driver import build_batch
from scenec.build.manifest import ManifestDoc
from scenec.build.options import BuildOptions
from scenec.build.reporting import status
from scenec.runtime import inversion
from scenec.spec.fsio import sha256_file

SUMMARY = re.compile(r"^scenec: \d+ built, \d+ cached, \d+ failed")
SCENE = ("scenec: 1\nmodel: tiny\ncanvas: {{width: 64, height: 64}}\nsampler: {{steps: {steps}, seed: [1, 2]}}\n"
         "background: {{prompt: \"scene number {i}\"}}\n"
         "entities:\n  - {{id: fox, prompt: \"a fox\", shape: {{box: [0.1, 0.5, 0.5, 0.9]}}}}\n"
         "output: {{dir: ../out}}\n")
COW = ("scenec: 1\nmodel: tiny\ncanvas: {width: 64, height: 64}\nsampler: {steps: 4, seed: 1}\n"
       "background: {prompt: \"a portrait studio\"}\n"
       "entities:\n  - id: face\n    prompt: \"a smiling face\"\n    shape: {box: [0.25, 0.25, 0.75, 0.75]}\n"
       "    reference: {image: face.png, window: [0.75, 0.5], cycles: 1}\n")


def make_project(root: Path, n: int = 3, steps: int = 1) -> Path:
    """``root/scenes/s*.yaml`` (n scenes, two seeds each) building into ``root/out``."""
    (root / "scenes").mkdir(parents=True)
    (root / "scenec.toml").write_text("[project]\n")
    for i in range(n):
        (root / "scenes" / f"s{i:02d}.yaml").write_text(SCENE.format(i=i, steps=steps))
    return root / "scenes"


@pytest.fixture
def tiny(monkeypatch):
    """In-process builds share one tiny backend (a model load per build would dominate)."""
    from scenec.runtime.testing import tiny_backend

    be = tiny_backend()
    monkeypatch.setattr(pool, "load_model", lambda m, **kw: be)
    return be


@pytest.fixture
def project(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("SCENEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return make_project(tmp_path)


def build(*targets, **kw) -> dict:
    return build_batch([str(t) for t in targets or ["scenes"]], BuildOptions(quiet=True, **kw))


def cli(*args) -> "object":
    """``scenec ARGS`` in this process (so monkeypatched faults apply): the click result."""
    from scenec.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def ends_with_summary(stderr: str) -> bool:
    lines = [x for x in stderr.splitlines() if x.strip()]
    return bool(lines) and SUMMARY.match(lines[-1]) is not None


def recorded_images_are_right(out: Path, want: dict[str, bytes] | None = None) -> dict:
    """Every output the manifest records is on disk as recorded (and, given ``want``, the right bytes);
    returns the manifest's outputs."""
    path = out / "scenec-manifest.json"
    if not path.exists():
        return {}
    doc = json.loads(path.read_text())
    ManifestDoc.model_validate(doc)
    for name, e in doc["outputs"].items():
        img = out / e["image"]
        assert img.is_file() and sha256_file(img) == e["sha256"], name
        assert (out / e["sidecar"]).is_file(), name
        if want is not None:
            assert img.read_bytes() == want[e["image"]], f"{name}: recorded, but not the image it should be"
    return doc["outputs"]


def pngs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


# --- the reference-inversion cache -------------------------------------------------------------------

def _cow_project(tmp_path: Path) -> Path:
    (tmp_path / "scenec.toml").write_text("[project]\n")
    yy, xx = np.mgrid[0:32, 0:32]
    Image.fromarray(np.dstack([xx * 8, yy * 8, (xx + yy) * 4]).astype(np.uint8)).save(tmp_path / "face.png")
    (tmp_path / "cow.yaml").write_text(COW)
    return tmp_path / "cow.yaml"


def _damage(p: Path, how: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(p), "pt") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if how == "flip":
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0x10
        p.write_bytes(bytes(b))
    elif how == "truncate":
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif how == "nan":
        save_file({k: torch.full_like(v, float("nan")) for k, v in t.items()}, str(p), metadata=meta)
    elif how == "reshape":
        save_file({k: v[..., :3].contiguous() for k, v in t.items()}, str(p), metadata=meta)
    elif how == "dtype":
        save_file({k: v.half() for k, v in t.items()}, str(p), metadata=meta)
    elif how == "no-metadata":
        save_file(t, str(p))
    elif how == "forged":  # NaN with a digest that matches: the value checks still refuse it
        bad = {k: torch.full_like(v, float("nan")) for k, v in t.items()}
        save_file(bad, str(p), metadata={**meta, "sha256": inversion.entry_digest(p.stem, bad)})


INVERSION_DAMAGE = ["flip", "truncate", "nan", "reshape", "dtype", "no-metadata", "forged"]


def test_a_damaged_inversion_entry_is_a_miss_never_a_wrong_image(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("SCENEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inversion, "INVERSION_REFINE", 2)  # speed: the same in every build of this test
    monkeypatch.chdir(tmp_path)
    warned: list[str] = []
    monkeypatch.setattr(inversion.CACHE, "warn", warned.append)
    inversion.CACHE.clear()
    scene = _cow_project(tmp_path)
    assert build(scene)["built"] == 1
    good = (tmp_path / "out" / "cow-1.png").read_bytes()
    [entry] = (tmp_path / "cache" / "inversion").glob("*.safetensors")
    for k, how in enumerate(INVERSION_DAMAGE):
        _damage(entry, how)
        inversion.CACHE.clear()  # a new process: only the disk cache
        inverted = inversion.CACHE.stats["inverted"]
        s = build(scene, force=True)
        assert (s["built"], s["failed"]) == (1, 0), how
        assert (tmp_path / "out" / "cow-1.png").read_bytes() == good, how  # inverted again: the same image
        assert inversion.CACHE.stats["inverted"] == inverted + 1, how
        assert len(warned) == k + 1 and "damaged inversion cache entry" in warned[-1], (how, warned)
    # the entry was written again and verifies: the next build reads it, without a warning
    inversion.CACHE.clear()
    disk = inversion.CACHE.stats["disk"]
    assert build(scene, force=True)["built"] == 1 and len(warned) == len(INVERSION_DAMAGE)
    assert inversion.CACHE.stats["disk"] == disk + 1
    inversion.CACHE.clear()


def test_an_inversion_entry_of_another_shape_is_a_miss(tmp_path, monkeypatch):
    monkeypatch.setenv("SCENEC_CACHE", str(tmp_path))
    warned: list[str] = []
    cache = inversion.InversionCache(warn=warned.append)
    cache.put("k" * 64, {3: torch.ones(1, 16, 64), 2: torch.ones(1, 16, 64)})
    cache.clear()
    assert cache.get("k" * 64, shape=(1, 16, 64)) is not None and warned == []
    cache.clear()
    assert cache.get("k" * 64, shape=(1, 4, 8, 8)) is None and "shape" in warned[0]
    assert not cache.path("k" * 64).exists()  # removed: one warning, not one per build
    cache.put("n" * 64, {3: torch.full((1, 4), float("nan"))})
    assert cache.get("n" * 64) is None and not cache.path("n" * 64).exists()  # NaN is never stored


# --- NaN ----------------------------------------------------------------------------------------------

def test_non_finite_latents_fail_the_job_and_write_no_png(project, monkeypatch):
    import scenec.runtime.sampler as sampler

    real = sampler.sample
    monkeypatch.setattr(sampler, "sample", lambda run, *a, **kw: real(run, *a, **kw) * float("nan"))
    r = cli("build", "scenes")
    assert r.exit_code == 1 and ends_with_summary(r.stderr), r.stderr
    assert "the final latent has NaN or infinite values; no image written" in r.stderr
    assert not list((project.parent / "out").glob("*.png")) and recorded_images_are_right(project.parent / "out") == {}
    assert status(["scenes"])["counts"] == {"new": 6}


def test_a_nan_row_fails_alone_in_a_batch(project, monkeypatch):
    import scenec.runtime.sampler as sampler

    real = sampler.sample

    def one_bad_row(run, *a, **kw):
        x = real(run, *a, **kw).clone()
        x[0] = float("nan")
        return x

    monkeypatch.setattr(sampler, "sample", one_bad_row)
    s = build(batch_size=2)
    assert s["failed"] == 3 and s["built"] == 3  # one row of each batch of two
    assert len(recorded_images_are_right(project.parent / "out")) == 3


def test_a_non_finite_decoded_image_fails_the_job(project, tiny, monkeypatch):
    decode = tiny.pipe.vae.decode
    monkeypatch.setattr(tiny.pipe.vae, "decode", lambda x, **kw: (decode(x, **kw)[0] * float("inf"),))
    s = build()
    assert s["failed"] == 6 and s["built"] == 0
    assert all("the decoded image has NaN or infinite values" in e for e in s["errors"]), s["errors"]
    assert not list((project.parent / "out").glob("*.png"))


# --- manifests ----------------------------------------------------------------------------------------

def _retype(doc: dict, how: str):
    name = sorted(doc["outputs"])[0]
    if how == "entry-is-a-string":
        doc["outputs"][name] = "built"
    elif how == "masks-is-a-number":
        doc["outputs"][name]["masks"] = 5
    elif how == "outputs-is-a-list":
        doc["outputs"] = list(doc["outputs"].values())
    elif how == "no-key":
        del doc["outputs"][name]["key"]
    return doc


MANIFEST_DAMAGE = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "not-json": lambda raw: b"\x00\xff garbage",
    "empty": lambda raw: b"",
    "deep": lambda raw: b'{"format": "scenec-manifest/1", "outputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "a-list": lambda raw: b"[1, 2, 3]",
    **{k: (lambda raw, k=k: json.dumps(_retype(json.loads(raw), k)).encode())
       for k in ("entry-is-a-string", "masks-is-a-number", "outputs-is-a-list", "no-key")},
}


@pytest.mark.parametrize("how", sorted(MANIFEST_DAMAGE))
def test_a_damaged_manifest_is_set_aside_and_recovered_from_the_sidecars(project, how):
    out = project.parent / "out"
    assert build()["built"] == 6
    want = pngs(out)
    man = out / "scenec-manifest.json"
    good = json.loads(man.read_text())["outputs"]
    man.write_bytes(MANIFEST_DAMAGE[how](man.read_bytes()))
    st = status(["scenes"])  # status reads the recovered state: it neither lies nor fails
    assert st["counts"] == {"cached": 6}
    assert [w.message for w in st["diagnostics"].warnings if "damaged manifest" in w.message]
    s = build()
    assert (s["built"], s["cached"], s["failed"]) == (0, 6, 0)  # nothing built twice
    warnings = [w for w in s["diagnostics"].warnings if "manifest" in w.message]
    assert len(warnings) == 1 and "damaged manifest" in warnings[0].message
    assert len(list(out.glob("scenec-manifest.json.damaged-*"))) == 1
    outputs = recorded_images_are_right(out, want)
    assert {n: e["key"] for n, e in outputs.items()} == {n: e["key"] for n, e in good.items()}
    s = build()
    assert s["cached"] == 6 and not [w for w in s["diagnostics"].warnings if "manifest" in w.message]


def test_recovery_trusts_only_images_their_sidecars_vouch_for(project):
    out = project.parent / "out"
    build()
    want = pngs(out)
    (out / "s00-1.png").write_bytes(b"\x89PNG not the image")  # tampered with
    side = json.loads((out / "s01-2.json").read_text())
    del side["build"]  # a sidecar without the build's stamp (an older scenec's)
    (out / "s01-2.json").write_text(json.dumps(side))
    (out / "scenec-manifest.json").write_text("{")
    s = build()
    assert sorted(o["name"] for o in s["outputs"] if o["status"] == "built") == ["s00-1", "s01-2"]
    assert s["cached"] == 4
    recorded_images_are_right(out, want)


# --- compile memos ------------------------------------------------------------------------------------

def _edit_jobs(raw: bytes, jobs) -> bytes:
    doc = json.loads(raw)
    doc["plan"]["jobs"] = jobs
    return json.dumps(doc).encode()


MEMO_DAMAGE = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "flipped": lambda raw: raw.replace(b'"seed": 1', b'"seed": 7', 1),
    "no-jobs": lambda raw: _edit_jobs(raw, []),  # hand-edited: would build nothing while status says up to date
    "jobs-retyped": lambda raw: _edit_jobs(raw, "x"),
    "deep": lambda raw: b"[" * 100_000 + b"]" * 100_000,
    "not-json": lambda raw: b"\xff\xfe",
}


@pytest.mark.parametrize("how", sorted(MEMO_DAMAGE))
def test_a_damaged_memo_is_set_aside_and_the_scene_compiled(project, monkeypatch, how):
    out = project.parent / "out"
    build()
    want = pngs(out)
    compiled: list[str] = []
    real = planning.compile_file
    monkeypatch.setattr(planning, "compile_file", lambda f, m, *a: compiled.append(f.name) or real(f, m, *a))
    target = next(f for f in memo.memo_dir().glob("*.json") if json.loads(f.read_bytes())["scene"].endswith("s01.yaml"))
    target.write_bytes(MEMO_DAMAGE[how](target.read_bytes()))
    st = status(["scenes"])
    assert st["counts"] == {"cached": 6} and compiled == ["s01.yaml"]
    assert len([w for w in st["diagnostics"].warnings if "damaged compile memo" in w.message]) == 1
    assert len(list(target.parent.glob(target.name + ".damaged-*"))) == 1
    compiled.clear()
    s = build()
    assert (s["built"], s["cached"]) == (0, 6) and compiled == []  # the new memo replays
    assert not [w for w in s["diagnostics"].warnings if "memo" in w.message]
    recorded_images_are_right(out, want)


# --- disks: full, read-only, not a directory -------------------------------------------------------

def _can_mount() -> str | None:
    """None when this process may mount a tmpfs, else why not."""
    if not shutil.which("mount") or os.geteuid() != 0:
        return "mounting a size-capped tmpfs needs root"
    probe = Path(f"/tmp/scenec-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
        if r.returncode != 0:
            return f"cannot mount a tmpfs here: {r.stderr.decode().strip() or r.returncode}"
        subprocess.run(["umount", str(probe)], check=True)
        return None
    finally:
        probe.rmdir()


@contextmanager
def tmpfs(path: Path, size: str, ro: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        if ro:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_fails_what_does_not_fit_and_the_next_build_finishes(project):
    why = _can_mount()
    if why:
        pytest.skip(why)
    ref = build(out=project.parent / "ref")
    want = pngs(project.parent / "ref")
    assert ref["built"] == 6
    with tmpfs(project.parent / "small", "40k") as d:
        r = cli("build", "scenes", "-o", d / "out")
        assert r.exit_code == 1 and ends_with_summary(r.stderr) and "Traceback" not in r.output, r.output
        assert "No space left on device" in r.stderr
        first = recorded_images_are_right(d / "out", want)
        assert len(first) < 6
        assert not [p for p in (d / "out").iterdir() if p.name.endswith(".tmp")]
        subprocess.run(["mount", "-o", "remount,size=8m", str(d)], check=True)
        s = build(out=d / "out")
        assert s["failed"] == 0 and s["cached"] == len(first) and s["built"] == 6 - len(first)
        assert len(recorded_images_are_right(d / "out", want)) == 6


def test_no_space_for_the_manifest_fails_the_units_and_records_nothing(project, monkeypatch):
    real = manifest_mod.atomic_write

    def full(path, data, durable=True):
        if Path(path).name == "scenec-manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data, durable)

    monkeypatch.setattr(manifest_mod, "atomic_write", full)
    r = cli("build", "scenes")
    assert r.exit_code == 1 and ends_with_summary(r.stderr) and "Traceback" not in r.output, r.output
    assert "scenec-manifest.json could not be written: No space left on device" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("scenec: 0 built, 0 cached, 6 failed")
    monkeypatch.setattr(manifest_mod, "atomic_write", real)
    s = build()  # not recorded, so built again: the build that failed recorded nothing wrong
    assert (s["built"], s["failed"]) == (6, 0)


@contextmanager
def read_only_dir(path: Path):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    why = _can_mount()
    if why:
        pytest.skip(f"root ignores file modes, and {why}")
    with tmpfs(path, "1m", ro=True):
        yield path


def test_a_read_only_output_folder_fails_the_build_in_one_line(project):
    with read_only_dir(project.parent / "ro") as d:
        r = cli("build", "scenes", "-o", d)
    assert r.exit_code == 1 and ends_with_summary(r.stderr) and "Traceback" not in r.output, r.output
    lines = [x for x in r.stderr.splitlines() if "cannot write to" in x]
    assert len(lines) == 6 and all(str(d) in x for x in lines), r.stderr  # the path and the cause
    assert "internal error" not in r.stderr


def test_bad_output_arguments_exit_2_in_one_line(project, tmp_path):
    (tmp_path / "a-file").write_text("x")
    r = cli("build", "scenes", "-o", tmp_path / "a-file")
    assert r.exit_code == 2 and ends_with_summary(r.stderr), r.output
    assert "a-file: not a directory" in r.stderr and "internal error" not in r.stderr
    r = cli("compile", project / "s00.yaml", "-o", tmp_path / "a-file")
    assert r.exit_code == 2 and r.stderr.strip() == f"scenec: {tmp_path / 'a-file'}: exists and is not a directory " \
                                                    "(-o names the plan directory)", r.output
    r = cli("preview", project / "s00.yaml", "-o", tmp_path)
    assert r.exit_code == 2 and "is a directory (-o names the PNG to write)" in r.stderr, r.output
    assert "Traceback" not in r.output and "internal error" not in r.output


@pytest.mark.parametrize("force", [False, True])
def test_a_build_that_waited_for_the_lock_builds_only_what_is_still_missing(project, monkeypatch, force):
    """The other build takes the lock first and makes everything (or, here, all but one output) while this
    one waits; this one then re-reads the manifest and builds only the rest, ``--force`` or not."""
    import scenec.build.driver as driver

    out = project.parent / "out"
    real = driver.locked_all

    others: list[dict] = []

    @contextmanager
    def after_another_build(dirs):
        if not others:
            others.append({})
            others[0] = build(force=force)  # the build that held the lock (it takes the real lock)
            man = json.loads((out / "scenec-manifest.json").read_text())
            del man["outputs"]["s02-2"]  # ... and made everything but this one
            (out / "scenec-manifest.json").write_text(json.dumps(man))
        with real(dirs) as failed:
            yield failed

    if force:
        build()  # forced builds rebuild what was built before they started, not what was built meanwhile
    monkeypatch.setattr(driver, "locked_all", after_another_build)
    s = build(force=force)
    assert others[0]["built"] == 6
    assert [o["name"] for o in s["outputs"] if o["status"] == "built"] == ["s02-2"]
    assert s["cached"] == 5
    recorded_images_are_right(out)


# --- processes: two builds at once, kill -9 -----------------------------------------------------------

def _env(tmp_path: Path) -> dict:
    # one torch thread: every process (and this one) makes the same bytes
    return {**os.environ, "OMP_NUM_THREADS": "1", "SCENEC_CACHE": str(tmp_path / "cache")}


def _reference(tmp_path: Path, n: int) -> dict[str, bytes]:
    """The images of an uninterrupted build, made in a subprocess as the builds under test are."""
    make_project(tmp_path / "ref", n=n, steps=2)
    r = subprocess.run([sys.executable, "-m", "scenec", "build", str(tmp_path / "ref" / "scenes")],
                       capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr
    return pngs(tmp_path / "ref" / "out")


def test_two_builds_into_one_folder_build_each_image_once(tmp_path):
    scenes = make_project(tmp_path / "run", n=6, steps=2)
    cmd = [sys.executable, "-m", "scenec", "build", str(scenes), "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
             for _ in range(2)]
    results = [(p.communicate(timeout=300), p.returncode) for p in procs]
    built: list[str] = []
    for (stdout, stderr), code in results:
        assert code == 0 and ends_with_summary(stderr), stderr
        summary = json.loads(stdout.splitlines()[-1])
        built += [o["name"] for o in summary["outputs"] if o["status"] == "built"]
    assert sorted(built) == sorted(f"s{i:02d}-{s}" for i in range(6) for s in (1, 2))  # each exactly once
    assert len(recorded_images_are_right(tmp_path / "run" / "out")) == 12


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_9_at_random_moments_never_records_a_wrong_image(tmp_path):
    seed = int(os.environ.get("SCENEC_FAULT_SEED", "16"))
    rnd = random.Random(seed)
    want = _reference(tmp_path, n=6)
    scenes = make_project(tmp_path / "run", n=6, steps=2)
    out = tmp_path / "run" / "out"
    cmd = [sys.executable, "-m", "scenec", "build", str(scenes), "--json"]
    killed = 0
    for attempt in range(3):
        # kill once a random number of new images have appeared (0: while starting or planning), a
        # random moment later: while sampling, writing an image or a sidecar, or saving the manifest
        n = len(pngs(out))
        k = n + rnd.randint(0, max(0, 11 - len(recorded_images_are_right(out))))
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(tmp_path))
        deadline = time.monotonic() + 240
        while p.poll() is None and len(list(out.glob("*.png")) if out.is_dir() else []) < k:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(rnd.uniform(0.0, 0.5 if k == n else 0.05))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
        killed += p.returncode == -signal.SIGKILL
        recorded_images_are_right(out, want)  # after each kill (seed: SCENEC_FAULT_SEED, default 16)
    assert killed, "every build finished before it could be killed"
    recorded = recorded_images_are_right(out, want)
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert r.returncode == 0 and ends_with_summary(r.stderr), r.stderr
    summary = json.loads(r.stdout.splitlines()[-1])
    assert summary["cached"] == len(recorded) and summary["built"] == 12 - len(recorded)  # none built twice
    assert pngs(out) == want and len(recorded_images_are_right(out, want)) == 12
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
