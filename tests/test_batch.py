"""Batch builds: discovery, selection, cache keys, manifest, status, failures, matrix."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import scenec.build.pool as pool
from scenec.build.discovery import discover
from scenec.build.driver import build_batch
from scenec.build.keys import cache_key, model_identity
from scenec.build.manifest import Manifest
from scenec.build.options import BatchError, BuildOptions
from scenec.build.planning import plan_batch
from scenec.build.reporting import format_status, status
from scenec.build.selection import parse_selectors
from scenec.build.units import batches_of, units_of
from scenec.spec.fsio import sha256_file

ROOT = Path(__file__).resolve().parents[1]


def write_scene(d: Path, name: str, prompt: str = "a meadow", seeds=(1, 2), extra: str = "", sub: str = "") -> Path:
    p = d / sub / f"{name}.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("scenec: 1\nmodel: tiny\ncanvas: {width: 64, height: 64}\n"
                 f"sampler: {{steps: 2, seed: {list(seeds)}}}\n"
                 f"background: {{prompt: \"{prompt}\"}}\n"
                 "entities:\n  - {id: fox, prompt: \"a fox\", shape: {box: [0.1, 0.5, 0.5, 0.9]}}\n" + extra)
    return p


@pytest.fixture(scope="module")
def tiny():
    from scenec.runtime.testing import tiny_backend

    return tiny_backend()


@pytest.fixture
def project(tmp_path, monkeypatch, tiny):
    """A project dir with two scenes; model loads counted (the real tiny backend, loaded once per module)."""
    (tmp_path / "scenec.toml").write_text("[project]\ndefault_model = \"tiny\"\n")
    write_scene(tmp_path, "alpha", "a meadow")
    write_scene(tmp_path, "beta", "a forest", sub="more")
    loads = []
    monkeypatch.setattr(pool, "load_model", lambda m, **kw: loads.append(m) or tiny)
    monkeypatch.chdir(tmp_path)
    return tmp_path, loads


def run(targets, **kw):
    kw.setdefault("quiet", True)
    return build_batch(targets, BuildOptions(**kw))


# --- discovery and selection ----------------------------------------------------------------------

def test_discover_dirs_globs_files_skips_libraries(tmp_path):
    write_scene(tmp_path, "a")
    write_scene(tmp_path, "b", sub="x/y")
    (tmp_path / "lib.yaml").write_text("scenec: 1\ndefs: {entities: {x: {prompt: y}}}\n")
    (tmp_path / "workflow.yml").write_text("on: push\njobs: {}\n")
    (tmp_path / "flow.yaml").write_text("{scenec: 1, canvas: {width: 64, height: 64}}\n")
    write_scene(tmp_path, "hidden", sub=".cache")
    files, problems = discover([tmp_path])
    assert sorted(p.name for p in files) == ["a.yaml", "b.yaml", "flow.yaml"] and not problems
    files, _ = discover([str(tmp_path / "**" / "*.yaml")])
    assert sorted(p.name for p in files) == ["a.yaml", "b.yaml", "flow.yaml"]
    files, _ = discover([tmp_path / "lib.yaml", tmp_path / "a.yaml", tmp_path])  # named: always taken, once
    assert [p.name for p in files][:2] == ["lib.yaml", "a.yaml"] and len(files) == 4
    _, problems = discover([tmp_path / "nope.yaml"])
    assert problems[0].severity == "error" and "no such file" in problems[0].message


def test_selectors():
    job = {"scene": "meadow", "file": "scenes/meadow.yaml", "group": "animals", "variant": "fox", "seed": 2,
           "matrix": {"style": "oil painting"}, "name": "meadow-animals-fox-oil-painting-2"}
    yes = ["meadow", "mea*", "animals", "animals/fox", "*/f*", "scene:meadow", "group:animals",
           "group:animals/fox", "path:scenes/*.yaml", "path:scenes", "meadow.yaml", "seed:2", "style=oil*",
           "style=oil-painting", "matrix:seed=2", "meadow,seed:2",
           "meadow-animals-fox-oil-painting-2", "meadow-*-2"]  # the image's name, as build and status print it
    no = ["forest", "animals/eagle", "scene:animals", "seed:1", "style=water*", "meadow,seed:1", "path:other"]
    for s in yes:
        assert parse_selectors([s])[0].matches(job), s
    for s in no:
        assert not parse_selectors([s])[0].matches(job), s
    assert len(parse_selectors(["a b", "c"])) == 3  # whitespace and repeated options: union
    for bad in ["tag:x", "seed:x", "a,,b", "scene:"]:
        with pytest.raises(BatchError):
            parse_selectors([bad])


# --- incremental builds and the manifest ------------------------------------------------------------

def test_incremental_build_cache_and_manifest(project):
    d, loads = project
    s = run(["."])
    assert (s["built"], s["cached"], s["failed"], s["invalid"]) == (4, 0, 0, 0)
    assert len(loads) == 1  # one model load for both scenes
    man = json.loads((d / "out" / "scenec-manifest.json").read_text())
    assert man["format"] == "scenec-manifest/1" and set(man["outputs"]) == {"alpha-1", "alpha-2"}
    e = man["outputs"]["alpha-1"]
    assert e["scene"]["file"] == "../alpha.yaml" and e["scene"]["line"] == 1 and e["model"]["id"] == "tiny"
    assert e["sha256"] == sha256_file(d / "out" / "alpha-1.png") and "total_s" in e["timings"]
    assert (d / "more" / "out" / "scenec-manifest.json").is_file()  # one manifest per output directory
    assert not list(d.rglob("*.tmp"))

    loads.clear()
    s = run(["."])
    assert (s["built"], s["cached"]) == (0, 4) and not loads  # no-op: no model load at all

    write_scene(d, "beta", "a dark forest", sub="more")  # edit one scene
    s = run(["."])
    assert s["built"] == 2 and s["cached"] == 2
    assert {o["name"] for o in s["outputs"] if o["status"] == "built"} == {"beta-1", "beta-2"}

    (d / "out" / "alpha-1.png").unlink()  # a deleted output is rebuilt
    (d / "out" / "alpha-2.png").write_bytes(b"not the image")  # and so is a modified one
    plan = plan_batch(["."])
    states = {i.name: i.state for i in plan.items}
    assert states == {"alpha-1": "missing", "alpha-2": "modified", "beta-1": "cached", "beta-2": "cached"}
    s = run(["."])
    assert s["built"] == 2 and s["cached"] == 2

    s = run(["."], force=True, select=["alpha"])
    assert s["built"] == 2 and s["cached"] == 0  # --force with --select: only the selection


def test_dry_run_lists_reasons_and_writes_nothing(project):
    d, loads = project
    s = run(["."], dry_run=True)
    assert {o["state"] for o in s["outputs"]} == {"new"} and s["built"] == 0
    assert not (d / "out").exists() and not loads
    run(["."], select=["alpha"])
    write_scene(d, "beta", "another forest", sub="more")
    run(["more"])
    write_scene(d, "beta", "a third forest", sub="more")
    s = run(["."], dry_run=True, force=False)
    assert {(o["name"], o["state"]) for o in s["outputs"] if o["status"] == "would-build"} == \
        {("beta-1", "changed"), ("beta-2", "changed")}
    s = run(["."], dry_run=True, force=True)
    assert {o["state"] for o in s["outputs"]} == {"forced", "changed"}


def test_key_covers_model_identity_seed_and_version(tmp_path, monkeypatch):
    ident = {"id": "tiny", "revision": "builtin"}
    k = cache_key("h", ident, 1)
    assert k != cache_key("h", ident, 2) and k != cache_key("g", ident, 1)
    assert k != cache_key("h", {"id": "tiny", "revision": "x"}, 1)
    import scenec

    monkeypatch.setattr(scenec, "__version__", "9.9.9")
    assert k != cache_key("h", ident, 1)
    # a local model directory: a digest of its files' names, sizes and mtimes (or contents)
    m = tmp_path / "model"
    (m / "transformer").mkdir(parents=True)
    (m / "model_index.json").write_text("{}")
    (m / "transformer" / "w.safetensors").write_bytes(b"1234")
    a = model_identity({"spec": str(m), "repo": str(m)})
    c = model_identity({"spec": str(m), "repo": str(m)}, "content")
    (m / "transformer" / "w.safetensors").write_bytes(b"12345")
    assert model_identity({"spec": str(m), "repo": str(m)}) != a
    assert model_identity({"spec": str(m), "repo": str(m)}, "content") != c
    hub = model_identity({"spec": "flux-dev", "repo": "black-forest-labs/FLUX.1-dev"})
    assert hub["id"] == "black-forest-labs/FLUX.1-dev" and "revision" in hub


def test_runtime_code_change_makes_outputs_stale(project, monkeypatch, tmp_path_factory, request):
    """A checkout's version string does not change with its code: the key holds the runtime's sources."""
    import scenec.build.keys as keys

    src = tmp_path_factory.mktemp("rt")
    (src / "methods").mkdir()
    (src / "solvers.py").write_text("x = 1\n")
    (src / "methods" / "m.py").write_text("y = 1\n")
    real = keys.find_spec

    class Spec:
        submodule_search_locations = [str(src)]

    monkeypatch.setattr(keys, "find_spec", lambda name: Spec if name == "scenec.runtime" else real(name))
    keys.runtime_code.cache_clear()
    request.addfinalizer(keys.runtime_code.cache_clear)  # later tests see the real code's stamp
    a = keys.runtime_code()
    d, _ = project
    run(["."], select=["alpha"])
    assert {o["status"] for o in run(["."], dry_run=True, select=["alpha"])["outputs"]} == {"cached"}
    (src / "methods" / "m.py").write_text("y = 2\n")  # a method's code changed
    keys.runtime_code.cache_clear()
    assert keys.runtime_code() != a
    s = run(["."], dry_run=True, select=["alpha"])
    assert {(o["state"], o["reason"]) for o in s["outputs"]} == \
        {("changed", "scenec's runtime code changed (same version " + __import__("scenec").__version__ + ")")}


def test_runtime_code_covers_the_compiler_code_the_runtime_runs(monkeypatch, tmp_path, request):
    """The runtime runs some compiler code itself (runtime/lora.py maps a LoRA file's keys with
    compiler.lora.split_key): a change there changes images and no plan, so it changes the key too. A compiler
    module the runtime does not import does not."""
    import scenec.build.keys as keys

    rt, comp = tmp_path / "rt", tmp_path / "comp"
    rt.mkdir()
    comp.mkdir()
    (rt / "lora.py").write_text("from scenec.compiler.lora import split_key\nimport scenec.spec.plan\n")
    (rt / "other.py").write_text("from scenec.compiler import keys\n")
    (comp / "lora.py").write_text("def split_key(k): return k\n")
    (comp / "printer.py").write_text("x = 1\n")
    real = keys.find_spec

    def spec(path):
        return type("Spec", (), {"submodule_search_locations": [str(path)]})

    fakes = {"scenec.runtime": spec(rt), "scenec.compiler": spec(comp)}
    monkeypatch.setattr(keys, "find_spec", lambda name: fakes.get(name) or real(name))
    request.addfinalizer(keys.runtime_code.cache_clear)  # later tests see the real code's stamp

    def stamp():
        keys.runtime_code.cache_clear()
        return keys.runtime_code()

    a = stamp()
    (comp / "printer.py").write_text("x = 2\n")  # not the runtime's
    assert stamp() == a
    (comp / "lora.py").write_text("def split_key(k): return k.lower()\n")
    assert stamp() != a
    b = stamp()
    (comp / "keys.py").write_text("z = 1\n")  # `from scenec.compiler import keys`: a module too
    assert stamp() != b


def test_stale_temp_files_are_removed_and_manifest_is_atomic(project):
    d, _ = project
    run(["."], select=["alpha"])
    out = d / "out"
    stale = [out / ".alpha-1.png.abc123_x.tmp", out / ".scenec-manifest.json.zz9zz9zz.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    keep = out / "notes.tmp"
    keep.write_text("not ours")
    (out / "alpha-1.png").unlink()
    run(["."], select=["alpha"])
    assert not any(p.exists() for p in stale) and keep.exists()
    m = Manifest.load(out)
    assert m.problem is None and set(m.outputs) == {"alpha-1", "alpha-2"}


def test_any_file_name_the_os_allows_builds(project):
    """A scene file and folder whose names are not UTF-8: validated, built, recorded and reported."""
    import os

    d, _ = project
    odd = d / os.fsdecode(b"d\xff")  # a folder name in latin-1 bytes
    odd.mkdir()
    src = write_scene(odd, os.fsdecode(b"caf\xe9"))
    s = run([odd])
    assert (s["built"], s["failed"], s["invalid"]) == (2, 0, 0), s["errors"]
    names = sorted(o["name"] for o in s["outputs"])
    assert names == ["caf\ufffd-1", "caf\ufffd-2"]  # the stem's undecodable byte, in valid UTF-8
    man = Manifest.load(odd / "out")
    assert man.problem is None and set(man.outputs) == set(names)
    assert man.outputs[names[0]]["scene"]["file"] == "../" + src.name  # the real name, escaped in JSON
    st = status([odd])
    assert st["counts"] == {"cached": 2}
    assert format_status(st, verbose=True).encode("utf-8")
    assert run([odd])["cached"] == 2


# --- failures and exit codes ------------------------------------------------------------------------

def test_one_failing_scene_does_not_stop_the_others(project, monkeypatch):
    d, _ = project
    (d / "broken.yaml").write_text("scenec: 1\ncanvas: {width: 64, height: 64}\nentities: [\n")
    (d / "wrong.yaml").write_text("scenec: 1\ncanvas: {width: 60, height: 64}\n")
    execute_unit = pool.execute_unit

    def flaky(plan, backend, out_dir, **kw):
        if plan.json["scene"]["name"] == "beta":
            raise RuntimeError("CUDA out of memory (simulated)")
        return execute_unit(plan, backend, out_dir, **kw)

    monkeypatch.setattr(pool, "execute_unit", flaky)
    s = run(["."])
    assert s["built"] == 2 and s["failed"] == 2 and s["invalid"] == 2
    msgs = [x.format() for x in s["diagnostics"].sorted()]
    assert any(m.startswith("broken.yaml:") and ": error: " in m for m in msgs), msgs
    assert any(m.startswith("wrong.yaml:2:17: error: canvas width 60") for m in msgs), msgs
    assert any("out of memory" in e for e in s["errors"])
    man = Manifest.load(d / "out")
    assert set(man.outputs) == {"alpha-1", "alpha-2"}


def test_colliding_outputs_across_scenes_are_invalid(project):
    d, _ = project
    (d / "alpha2.yaml").write_text((d / "alpha.yaml").read_text() + "name: alpha\n")
    s = run(["."], dry_run=True)
    assert s["invalid"] == 1
    assert any("also made by" in x.message for x in s["diagnostics"].errors)


def scenec(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "scenec", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300, env=env)


def test_cli_exit_codes_status_and_no_torch(tmp_path):
    write_scene(tmp_path, "a", seeds=(1,))
    r = scenec("status", tmp_path, "--exit-code")
    assert r.returncode == 1 and "new:" in r.stdout, r.stdout + r.stderr
    assert scenec("status", tmp_path).returncode == 0
    r = scenec("build", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["built"] == 1
    r = scenec("status", tmp_path, "--exit-code", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["counts"] == {"cached": 1}
    (tmp_path / "bad.yaml").write_text("scenec: 1\ncanvas: {width: 60, height: 64}\n")
    r = scenec("build", tmp_path, "--json")
    assert r.returncode == 2 and "bad.yaml:2:17: error:" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["cached"] == 1
    r = scenec("build", tmp_path, "--batch-size", "0")
    assert r.returncode == 2 and "--batch-size must be at least 1" in r.stderr
    r = scenec("build", tmp_path, "--select", "tag:x")
    assert r.returncode == 2 and "unknown method" in r.stderr
    # status and --dry-run never import torch
    for cmd in (["status", str(tmp_path)], ["build", str(tmp_path), "--dry-run"]):
        code = ("import sys\n"
                f"sys.argv = ['scenec', *{cmd!r}]\n"
                "from scenec.cli import app\n"
                "try:\n    app()\nexcept SystemExit as e:\n    pass\n"
                "print('HEAVY=' + ','.join(m for m in ('torch', 'diffusers') if m in sys.modules), file=sys.stderr)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert "HEAVY=\n" in r.stderr or r.stderr.rstrip().endswith("HEAVY="), r.stderr


def test_executor_ray_without_ray_exits_2(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(BatchError, match=r"pip install 'scenec\[ray\]'"):
        build_batch([tmp_path], BuildOptions(executor="ray", quiet=True))


# --- matrix ---------------------------------------------------------------------------------------

MATRIX = """\
scenec: 1
model: tiny
canvas: {width: 64, height: 64}
sampler: {steps: 2, seed: 7}
matrix:
  style: ["oil painting", "Water Colour!"]
  n: [1, 2.5]
background: {prompt: "a harbour, {style}, {{literal}} x{n}"}
entities:
  - {id: boat, prompt: "a boat in {style}", shape: {box: [0.1, 0.5, 0.5, 0.9]}}
"""


def test_matrix_expands_fills_prompts_and_names(tmp_path):
    from scenec.compiler import compile_scene

    f = tmp_path / "m.yaml"
    f.write_text(MATRIX)
    plan = compile_scene(f)
    jobs = plan.json["jobs"]
    assert [j["name"] for j in jobs] == ["m-oil-painting-1-7", "m-oil-painting-2.5-7", "m-water-colour-1-7",
                                         "m-water-colour-2.5-7"]
    assert jobs[1]["matrix"] == {"style": "oil painting", "n": 2.5} and jobs[1]["seed"] == 7
    texts = {plan.json["prompts"][j["global"]["prompt"]] for j in jobs}
    assert "a harbour, Water Colour!, {literal} x2.5" in texts and len(texts) == 4
    assert len({j["job_hash"] for j in jobs}) == 4

    f.write_text(MATRIX.replace("sampler: {steps: 2, seed: 7}", "sampler: {steps: 2}")
                 .replace("matrix:\n", "matrix:\n  seed: [1, 2]\n") + "output: {name: \"{scene}-{style}-{n}-{seed}\"}\n")
    names = [j["name"] for j in compile_scene(f).json["jobs"]]
    assert len(names) == 8 and names[:2] == ["m-oil-painting-1-1", "m-oil-painting-2.5-1"]  # keys in written order, last fastest


def test_matrix_job_hash_ignores_key_names(tmp_path):
    from scenec.compiler import compile_scene

    a = tmp_path / "a.yaml"
    a.write_text(MATRIX)
    b = tmp_path / "b.yaml"
    b.write_text(MATRIX.replace("{n}", "{count}").replace("  n: [", "  count: ["))
    ha = sorted(j["job_hash"] for j in compile_scene(a).json["jobs"])
    hb = sorted(j["job_hash"] for j in compile_scene(b).json["jobs"])
    assert ha == hb


def test_matrix_errors_have_positions(tmp_path):
    from scenec.compiler.check import validate_file

    f = tmp_path / "bad.yaml"
    f.write_text("scenec: 1\nmodel: tiny\ncanvas: {width: 64, height: 64}\n"
                 "matrix: {style: [a, b, a], index: [1], seed: [x]}\n"
                 "background: {prompt: \"a {stlye} harbour\"}\n"
                 "output: {name: \"{scene}-{seed}\"}\n")
    _, d = validate_file(f)
    errs = [x.format() for x in d.errors]
    assert any(":5:25: error: unknown placeholder `{stlye}`" in e and "did you mean `style`" in e for e in errs), errs
    assert any(":4:10: error: matrix key `index` is reserved" in e for e in errs) or \
        any("matrix key `index` is reserved" in e for e in errs), errs
    assert any("listed twice" in e for e in errs), errs
    assert any("output names collide" in e for e in errs), errs


def test_matrix_example_scene_and_default_names(tmp_path):
    from scenec.compiler import compile_scene

    plan = compile_scene(ROOT / "scenes" / "matrix-styles.yaml")
    assert len(plan.json["jobs"]) == 4 and plan.json["canvas"] == {"width": 256, "height": 256}
    assert (ROOT / "scenes" / "matrix-styles.yaml").read_text().startswith(
        "# yaml-language-server: $schema=../schemas/scene.schema.json\n")
    f = tmp_path / "d.yaml"
    f.write_text("scenec: 1\nmodel: tiny\ncanvas: {width: 64, height: 64}\nmatrix: {style: [a, b], seed: [3]}\n"
                 "background: {prompt: \"x {style}\"}\n")
    assert [j["name"] for j in compile_scene(f).json["jobs"]] == ["d-a-3", "d-b-3"]  # default name gains {style}


def test_select_by_the_image_name_build_prints(project):
    """`built   m-oil-painting-1-7` names the image: `--select m-oil-painting-1-7` rebuilds it (it matched nothing,
    and the list of what there is to select did not name images)."""
    d, _ = project
    (d / "m.yaml").write_text(MATRIX)
    s = run(["m.yaml"], select=["m-water-colour-*"], dry_run=True)
    assert sorted(Path(o["image"]).stem for o in s["outputs"]) == ["m-water-colour-1-7", "m-water-colour-2.5-7"]
    with pytest.raises(BatchError) as e:
        run(["m.yaml"], select=["m-nothing"], dry_run=True)
    assert "; images: m-oil-painting-1-7, m-oil-painting-2.5-7, m-water-colour-1-7, m-water-colour-2.5-7" \
        in str(e.value)


def test_matrix_selection(project):
    d, _ = project
    (d / "m.yaml").write_text(MATRIX)
    s = run(["m.yaml"], select=["style=water*"], dry_run=True)
    assert sorted(o["name"] for o in s["outputs"]) == ["m-water-colour-1-7", "m-water-colour-2.5-7"]


# --- batching compatible jobs across scenes (--batch-size) ------------------------------------------

def count_forwards(monkeypatch, backend) -> list[int]:
    """The batch size of every transformer forward."""
    sizes: list[int] = []
    fwd = backend.transformer.forward

    def counted(*a, **kw):
        sizes.append(kw["hidden_states"].shape[0])
        return fwd(*a, **kw)

    monkeypatch.setattr(backend.transformer, "forward", counted)
    return sizes


def test_batch_size_runs_compatible_jobs_of_different_scenes_together(project, monkeypatch, tiny):
    from PIL import Image

    d, _ = project
    write_scene(d, "gamma", "a desert", seeds=(3,), extra="")
    (d / "gamma.yaml").write_text((d / "gamma.yaml").read_text().replace("steps: 2", "steps: 3"))
    sizes = count_forwards(monkeypatch, tiny)
    s = run(["."], batch_size=4)
    assert (s["built"], s["failed"]) == (5, 0), s["errors"]
    # alpha ×2 and beta ×2 (two scenes, two output dirs): one batch of 4; gamma (3 steps) alone
    assert sorted(sizes) == [1, 1, 1, 4, 4]
    side = json.loads((d / "more" / "out" / "beta-2.json").read_text())
    assert side["timings"]["batch"] == 4 and side["scenec:job"] == "beta-2"
    assert set(Manifest.load(d / "out").outputs) == {"alpha-1", "alpha-2", "gamma-3"}
    assert set(Manifest.load(d / "more" / "out").outputs) == {"beta-1", "beta-2"}
    # the cache key does not depend on how jobs were batched
    assert run(["."], batch_size=1)["cached"] == 5
    # the same images as one by one, up to float rounding (at most one level of 255 per pixel)
    sizes.clear()
    s1 = run(["."], batch_size=1, force=True, out=d / "single")
    assert s1["built"] == 5 and sizes == [1] * 11  # 4 jobs × 2 steps + 3 steps
    for o in s["outputs"]:
        a = np.asarray(Image.open(o["image"]), np.int16)
        b = np.asarray(Image.open(d / "single" / Path(o["image"]).name), np.int16)
        assert np.abs(a - b).max() <= 1, o["name"]


def test_batches_of_respects_size_keys_and_groups(project):
    d, _ = project
    (d / "pair.yaml").write_text(
        "scenec: 1\nmodel: tiny\ncanvas: {width: 64, height: 64}\nsampler: {steps: 2, seed: 1}\n"
        "background: {prompt: \"a meadow\"}\n"
        "entities:\n  - {id: fox, prompt: \"a fox\", shape: {box: [0.1, 0.5, 0.5, 0.9]}}\n"
        "groups:\n  - id: g\n    schedule: {shape: step, center: 0.5}\n"
        "    variants:\n      - {id: a, prompt: \"a cat\"}\n      - {id: b, prompt: \"a dog\"}\n")
    from scenec.runtime.batching import batch_key

    bp = plan_batch(["."])
    assert not bp.invalid
    units = units_of([it for it in bp.items if it.todo])
    assert [len(b) for b in batches_of(units, 1)] == [1] * len(units)
    batches = batches_of(units, 3)
    flat = [u for b in batches for u in b]
    assert sorted(map(id, flat)) == sorted(map(id, units))  # every unit exactly once
    sizes = sorted(len(b) for b in batches)
    assert sizes == [1, 1, 3]  # 4 compatible single jobs in 3 + 1; the coupling group is one unit, alone
    for b in batches:
        if len(b) > 1:
            assert len({batch_key(u.plan.json, u.items[0].job) for u in b}) == 1
    group = [b for b in batches if len(b[0].items) == 2]
    assert len(group) == 1 and len(group[0]) == 1
    with pytest.raises(BatchError, match="at least 1"):
        run(["."], batch_size=0)


def test_text_encodings_are_kept_across_scenes(project, monkeypatch, tiny):
    d, _ = project
    write_scene(d, "delta", "a meadow")  # the same background prompt as alpha
    calls: list[str] = []
    enc = tiny.pipe.encode_prompt
    monkeypatch.setattr(tiny.pipe, "encode_prompt",
                        lambda prompt, **kw: calls.append(prompt) or enc(prompt=prompt, **kw))
    tiny.clear_cache()
    s = run(["."])
    assert s["built"] == 6
    assert calls.count("a meadow") == 1 and calls.count("a forest") == 1


def test_batch_size_on_sd_batches_both_cfg_branches_of_every_row(tmp_path, monkeypatch):
    """SD jobs of two scenes in one batch: one UNet forward of 2 × 2 rows (CFG) per step, same images."""
    from PIL import Image

    from scenec.runtime.testing import tiny_sd_backend

    sd = tiny_sd_backend()
    (tmp_path / "scenec.toml").write_text("[project]\n")
    monkeypatch.setattr(pool, "load_model", lambda m, **kw: sd)
    monkeypatch.chdir(tmp_path)
    for name, prompt, ent in (("one", "a meadow", "a fox"), ("two", "a city street at night", "a yellow taxi")):
        (tmp_path / f"{name}.yaml").write_text(
            "scenec: 1\nmodel: tiny-sd\ncanvas: {width: 64, height: 64}\nsampler: {steps: 2, seed: 3}\n"
            f"background: {{prompt: \"{prompt}\", negative: \"blurry\"}}\n"
            f"entities:\n  - {{id: e, prompt: \"{ent}\", shape: {{box: [0.1, 0.5, 0.5, 0.9]}}}}\n")
    sizes: list[int] = []
    fwd = sd.unet.forward
    monkeypatch.setattr(sd.unet, "forward", lambda x, *a, **kw: sizes.append(x.shape[0]) or fwd(x, *a, **kw))
    s = run(["."], batch_size=2)
    assert (s["built"], s["failed"]) == (2, 0), s["errors"]
    assert sizes == [4, 4]  # [negatives | positives] of both scenes, each of the 2 steps
    sizes.clear()
    assert run(["."], batch_size=1, force=True, out=tmp_path / "single")["built"] == 2
    assert sizes == [1] * 8  # alone, a regional job runs its two CFG branches one after the other
    for o in s["outputs"]:
        a = np.asarray(Image.open(o["image"]), np.int16)
        c = np.asarray(Image.open(tmp_path / "single" / Path(o["image"]).name), np.int16)
        assert np.abs(a - c).max() <= 1, o["name"]


def test_cli_only_invalid_scenes_says_nothing_else_is_built(tmp_path):
    # a build of one invalid scene said "1 invalid scene; building the others" with no others to build
    (tmp_path / "bad.yaml").write_text("scenec: 1\ncanvas: {width: 60, height: 64}\n")
    r = scenec("build", tmp_path / "bad.yaml", "-o", tmp_path / "out")
    assert r.returncode == 2 and "scenec: 1 invalid scene; nothing else to build" in r.stderr, r.stderr
    assert "building the others" not in r.stderr
    write_scene(tmp_path, "good", seeds=(1,))
    r = scenec("build", tmp_path, "-o", tmp_path / "out", "--dry-run")
    assert r.returncode == 2 and "scenec: 1 invalid scene; the others would build" in r.stderr, r.stderr


def test_bad_workers_is_refused_before_an_executor_starts(tmp_path, monkeypatch):
    # `--executor ray --workers 0` started a local Ray (seconds, and its warnings) before saying no
    import scenec.build.driver as driver

    write_scene(tmp_path, "a", seeds=(1,))
    monkeypatch.setattr(driver, "make_executor", lambda *a, **k: pytest.fail("an executor was made"))
    with pytest.raises(BatchError, match="--workers must be at least 1, not 0"):
        build_batch([tmp_path], BuildOptions(executor="ray", workers=0, quiet=True))


def test_dry_run_of_invalid_scenes_does_not_say_all_is_up_to_date(tmp_path):
    # it printed "nothing to build: 0 up to date" on stdout, as if the build were complete
    (tmp_path / "bad.yaml").write_text("scenec: 1\ncanvas: {width: 60, height: 64}\n")
    r = scenec("build", tmp_path / "bad.yaml", "-o", tmp_path / "out", "--dry-run")
    assert r.returncode == 2 and r.stdout == "nothing to build: 0 up to date, 1 invalid scene (above)\n", r.stdout


def test_a_scene_or_library_saved_with_a_bom_is_found(tmp_path):
    # editors on Windows save UTF-8 with a BOM: such a scene validated when named, but a directory build
    # skipped it ("has scene keys but no top-level `scenec: 1`") and a library was not checked as one
    write_scene(tmp_path, "a", seeds=(1,))
    (tmp_path / "b.yaml").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "a.yaml").read_bytes())
    (tmp_path / "lib.yaml").write_bytes(b"\xef\xbb\xbfscenec: 1\ndefs:\n  entities:\n    fox: {prompt: a fox}\n")
    found, problems = discover([tmp_path])
    assert sorted(p.name for p in found) == ["a.yaml", "b.yaml"] and not problems, problems
    found, problems = discover([tmp_path], libraries=True)
    assert sorted(p.name for p in found) == ["a.yaml", "b.yaml", "lib.yaml"] and not problems, problems


def test_status_lists_orphans_and_says_when_their_image_is_gone(project):
    # an orphan whose image had been deleted was listed as if the file were there
    d, _ = project
    run(["alpha.yaml"])
    write_scene(d, "alpha", "a meadow", seeds=(1,))
    [o] = status(["alpha.yaml"])["orphaned"]
    assert (o["name"], o["reason"]) == ("alpha-2", "no scene makes it any more")
    Path(o["image"]).unlink()
    [o] = status(["alpha.yaml"])["orphaned"]
    assert o["reason"] == "no scene makes it any more; the image is gone too"


def test_status_with_a_file_for_out_is_refused_as_build_refuses_it(tmp_path):
    # it warned "unreadable manifest (Not a directory)", listed outputs under the file, and exited 0
    write_scene(tmp_path, "a", seeds=(1,))
    (tmp_path / "f.txt").write_text("x")
    r = scenec("status", tmp_path / "a.yaml", "-o", tmp_path / "f.txt")
    assert r.returncode == 2 and f"scenec: -o {tmp_path / 'f.txt'}: not a directory" in r.stderr, r.stderr
    assert "unreadable manifest" not in r.stderr and r.stdout == ""


def test_an_out_dir_below_a_file_is_bad_input(tmp_path):
    # `-o notes.txt/renders`: "unreadable manifest (Not a directory)", then every job failed "cannot write", exit 1
    write_scene(tmp_path, "a", seeds=(1,))
    (tmp_path / "f.txt").write_text("x")
    for cmd in ("build", "status"):
        r = scenec(cmd, tmp_path / "a.yaml", "-o", tmp_path / "f.txt" / "sub")
        assert r.returncode == 2, (cmd, r.stderr)
        assert f"scenec: -o {tmp_path / 'f.txt' / 'sub'}: {tmp_path / 'f.txt'} is not a directory" in r.stderr
        assert "unreadable manifest" not in r.stderr and "cannot write" not in r.stderr


def test_an_output_last_built_by_another_scene_warns(project, capsys):
    """Two scene files writing one output, built one at a time: each build would silently replace the other's
    image (built together it is an error); the second build says so at its job's line."""
    d, _ = project
    for sub, prompt in (("a", "a meadow"), ("b", "a forest")):
        write_scene(d, "x", prompt, seeds=(1,), sub=sub, extra="output: {dir: ../out}\n")
    run(["a/x.yaml"])
    capsys.readouterr()
    run(["a/x.yaml"], quiet=False)  # its own output: no warning
    assert "last built by" not in capsys.readouterr().err
    run(["b/x.yaml"], quiet=False)
    err = capsys.readouterr().err
    assert "b/x.yaml:1:1: warning: output `x-1`" in err and "was last built by a/x.yaml, which still exists" in err
    assert "1 built" in err  # and it was replaced
    (d / "a" / "x.yaml").unlink()  # the other scene is gone (renamed, moved): nothing to warn about
    run(["b/x.yaml"], force=True, quiet=False)
    assert "last built by" not in capsys.readouterr().err


def test_matrix_key_in_no_prompt_warns_under_the_default_name(tmp_path):
    """An X/Y/Z-plot habit: `matrix: {cfg: [5, 7]}` varies no sampler setting; its images are identical. The
    default output name gains every key, which silenced the warning (the key was 'used' by the name)."""
    from scenec.compiler.check import validate_file

    f = tmp_path / "x.yaml"
    f.write_text("scenec: 1\nmodel: tiny\ncanvas: {width: 64, height: 64}\nmatrix: {style: [a, b], cfg: [5, 7]}\n"
                 "background: {prompt: \"a {style} harbour\"}\n")
    _, d = validate_file(f)
    warns = [x.format() for x in d.warnings]
    assert any(":4:25: warning: matrix key `cfg` appears in no prompt" in w for w in warns), warns
    assert not any("`style`" in w for w in warns), warns
    f.write_text(f.read_text() + "output: {name: \"{scene}-{style}-{cfg}-{seed}\"}\n")  # named apart, still identical
    _, d = validate_file(f)
    assert any("matrix key `cfg` appears in no prompt" in x.format() for x in d.warnings)


def test_discovery_finds_upper_case_suffixes_and_names_utf16_scenes(tmp_path):
    """A directory's `SCENE.YAML` (Windows) is a scene; a UTF-16 one (Notepad's "Unicode") is not read but named
    in a warning (both were passed over without a word)."""
    write_scene(tmp_path, "a")
    (tmp_path / "a.yaml").rename(tmp_path / "UPPER.YAML")
    (tmp_path / "wide.yaml").write_bytes("scenec: 1\ncanvas: {width: 64, height: 64}\n".encode("utf-16"))
    files, problems = discover([tmp_path])
    assert [p.name for p in files] == ["UPPER.YAML"]
    assert [(p.pos.file.endswith("wide.yaml"), p.severity, p.message) for p in problems] == [
        (True, "warning", "skipped: is UTF-16 text (save it as UTF-8)")], problems


def test_an_edited_image_is_kept_when_its_sidecar_is_gone_too(project, capsys):
    """Nothing is lost: an image changed since it was built is kept as NAME.edited.png before it is remade, found by
    its manifest's sha256 when the sidecar that the runtime compares with was deleted too."""
    d, _ = project
    run(["alpha.yaml"])
    img, side = d / "out" / "alpha-1.png", d / "out" / "alpha-1.json"
    original = img.read_bytes()
    img.write_bytes(original + b"an edit")
    side.unlink()
    s = run(["alpha.yaml"], quiet=False)
    assert s["built"] == 1 and (d / "out" / "alpha-1.edited.png").read_bytes() == original + b"an edit"
    assert img.read_bytes() == original and "kept    out/alpha-1.edited.png" in capsys.readouterr().err
