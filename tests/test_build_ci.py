"""`scenec build` as a CI script drives it: --json on stdout however the build ends, SIGTERM (a CI
runner's cancel, `timeout`) handled like Ctrl-C, and `status` after a build that did not finish."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HEAD = "scenec: 1\nmodel: tiny\ncanvas: {width: 64, height: 64}\nsampler: {steps: 2}\n"


def scenec(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "scenec", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def write(d: Path, name: str, text: str) -> Path:
    p = d / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("args, error", [
    (["-s", "nosuch"], "--select `nosuch` matched nothing"),
    (["-s", "tag:x"], "unknown method `tag:`"),
    (["--set", "sampler.steps"], "--set sampler.steps: write --set KEY.PATH=VALUE"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_json_is_printed_when_the_build_stops_on_a_bad_argument(tmp_path, args, error):
    f = write(tmp_path, "s.yaml", HEAD + "background: {prompt: x}\n")
    r = scenec("build", f, "--json", *args)
    assert r.returncode == 2, r.stderr
    doc = json.loads(r.stdout)  # one line of JSON, as for a build that ran
    assert (doc["built"], doc["cached"], doc["failed"], doc["invalid"], doc["outputs"]) == (0, 0, 0, 0, [])
    assert error in doc["error"], doc
    assert "scenec: 0 built, 0 cached, 0 failed" in r.stderr  # and the summary line, as before


def start_build_and_signal_at_first_image(tmp_path: Path, sig: int, *args) -> tuple[subprocess.Popen, str, str]:
    """Start a build of 40 images, send ``sig`` once the first is recorded; its (process, stdout, stderr)."""
    f = write(tmp_path, "many.yaml", HEAD.replace("steps: 2", f"steps: 2, seed: {list(range(1, 41))}")
              + "background: {prompt: x}\nentities: [{id: a, prompt: y, shape: {box: [0, 0, 0.5, 0.5]}}]\n")
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "scenec", "build", str(f), "--json", *map(str, args)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not (out / "scenec-manifest.json").is_file():  # the first image recorded
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(p.pid, sig)
    stdout, stderr = p.communicate(timeout=120)
    return p, stdout, stderr


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_sigterm_stops_the_build_like_ctrl_c(tmp_path, executor):
    """`timeout 10m scenec build`, a cancelled CI job: exit 143, the summary line and JSON, what was
    built recorded, no temp file left; a rerun would build only the rest. With Ray too, whose ray.init
    puts its own SIGTERM handlers in place (an abort, exit 134; or exit 1 without a word)."""
    if executor == "ray":
        pytest.importorskip("ray")
    p, stdout, stderr = start_build_and_signal_at_first_image(tmp_path, signal.SIGTERM, "--executor", executor)
    assert p.returncode == 143, (p.returncode, stderr)
    assert "scenec: terminated (SIGTERM)" in stderr and "built, 0 cached, 0 failed" in stderr.splitlines()[-1]
    doc = json.loads(stdout)
    assert 1 <= doc["built"] < 40, "signalled too late to test anything"
    assert doc["error"] == "terminated (SIGTERM)"
    out = tmp_path / "out"
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    recorded = json.loads((out / "scenec-manifest.json").read_text())["outputs"]
    assert set(recorded) == {o["name"] for o in doc["outputs"] if o["status"] == "built"}
    assert all((out / e["image"]).is_file() and (out / e["sidecar"]).is_file() for e in recorded.values())
    from scenec.build.reporting import status

    counts = status([tmp_path / "many.yaml"])["counts"]  # what a rerun would build: only the rest
    assert counts.get("cached") == doc["built"] and sum(counts.values()) == 40, counts


def test_status_follows_a_build_o_that_was_stopped_halfway(tmp_path, monkeypatch):
    """`build -o renders` stopped (Ctrl-C, SIGTERM, a crash) after a finished `build -o old`: status
    without -o compares with renders, not with old (whose outputs it would call up to date)."""
    from scenec.build import driver
    from scenec.build.driver import build_batch
    from scenec.build.options import BuildOptions
    from scenec.build.reporting import status

    monkeypatch.setenv("SCENEC_CACHE", str(tmp_path / "cache"))
    f = write(tmp_path, "s.yaml", HEAD + "background: {prompt: x}\n")
    stop = []

    def build(todo, bp, *args):  # no model: each directory gets its manifest, then the build ends (or is stopped)
        for d in {it.out_dir for it in todo}:
            d.mkdir(parents=True, exist_ok=True)
            (d / "scenec-manifest.json").write_text('{"format": "scenec-manifest/1", "outputs": {}}')
        if stop:
            raise KeyboardInterrupt

    monkeypatch.setattr(driver, "_build", build)
    build_batch([f], BuildOptions(out=tmp_path / "old", quiet=True))
    follow = BuildOptions(last_out=True)  # as `scenec status` without -o
    assert [str(d) for d in status([f], follow)["followed"].values()] == [str(tmp_path / "old")]
    stop.append(True)
    with pytest.raises(KeyboardInterrupt):
        build_batch([f], BuildOptions(out=tmp_path / "renders", quiet=True))
    rep = status([f], follow)
    assert [str(d) for d in rep["followed"].values()] == [str(tmp_path / "renders")], rep["followed"]


def test_json_lists_the_masks_that_build_masks_wrote(tmp_path):
    """--masks writes them after the images: the summary (--json) lists them, built now or cached."""
    from scenec.build.driver import build_batch
    from scenec.build.options import BuildOptions

    f = write(tmp_path, "s.yaml", HEAD + "background: {prompt: x}\n"
              "entities: [{id: cat, prompt: a cat, shape: {box: [0, 0, 0.5, 0.5]}}]\n")
    for status in ("built", "cached"):
        s = build_batch([f], BuildOptions(masks=True, quiet=True))
        [o] = s["outputs"]
        assert o["status"] == status
        assert o["masks"] == [str(tmp_path / "out" / "s-0.mask-cat.png")], o
        assert Path(o["masks"][0]).is_file()


def test_select_matching_nothing_lists_the_matrix_values(tmp_path):
    """`-s 'light=Golden Hour'` (a union of two terms) matches nothing: the message lists the values as
    KEY=VALUE selects them (by slug), as it lists scenes, groups and seeds."""
    f = write(tmp_path, "mx.yaml", HEAD + "matrix:\n  light: [2.5, 10, \"Golden Hour\"]\n"
              "background: {prompt: \"a room, light {light}\"}\n")
    r = scenec("build", f, "--dry-run", "-s", "light=Golden Hour")
    assert r.returncode == 2
    assert "matched nothing; scenes: mx; seeds: 0; matrix: light=2.5, light=10, light=golden-hour" in r.stderr, r.stderr
    assert scenec("build", f, "--dry-run", "-s", "light=golden-hour").returncode == 0


def test_status_select_names_only_the_selected_scenes_last_directories(tmp_path, monkeypatch):
    """`status -s a` after `build a -o A` and `build b -o B`: one `(a.yaml: outputs of its last …)` line,
    none for b, which was not asked about."""
    from scenec.build.lastout import remember
    from scenec.build.options import BuildOptions
    from scenec.build.reporting import format_status, status

    monkeypatch.setenv("SCENEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    for n in "ab":
        write(tmp_path, f"{n}.yaml", HEAD + "background: {prompt: x}\n")
        (tmp_path / n.upper()).mkdir()
        (tmp_path / n.upper() / "scenec-manifest.json").write_text('{"format": "scenec-manifest/1", "outputs": {}}')
        remember({tmp_path / f"{n}.yaml": tmp_path / n.upper()})
    rep = status([tmp_path], BuildOptions(last_out=True, select=("a",)))
    assert list(rep["followed"]) == ["a.yaml"], rep["followed"]
    assert "(b.yaml" not in format_status(rep)


def test_status_says_once_which_directory_scenes_built_into_together(tmp_path, monkeypatch):
    """Scenes last built into one directory: one line naming them, not one line per scene (a project of 40 scenes
    printed 40 identical lines)."""
    from scenec.build.reporting import format_status

    rep = {"outputs": [], "orphaned": [], "counts": {}, "stale": 0, "invalid": [], "scenes": 5,
           "followed": {f"s{i}.yaml": "/p/out" for i in range(5)} | {"x.yaml": "/p/other"}}
    out = format_status(rep)
    assert out.count("/p/out") == 1 and "(s0.yaml and 4 more scenes: outputs of their last" in out, out
    assert "(x.yaml: outputs of its last `scenec build -o /p/other`" in out


def test_dry_run_with_an_invalid_scene_does_not_say_building(tmp_path):
    """--dry-run builds nothing: "1 invalid scene; building the others" said otherwise."""
    write(tmp_path, "good.yaml", HEAD + "background: {prompt: x}\n")
    write(tmp_path, "bad.yaml", HEAD + "background: {prompt: x}\nentities: [{id: a}]\n")
    r = scenec("build", tmp_path, "--dry-run")
    assert r.returncode == 2 and "scenec: 1 invalid scene; the others would build" in r.stderr, r.stderr
    assert "building" not in r.stderr and "good-0.png" in r.stdout


def test_the_summary_says_where_the_images_are(tmp_path):
    """A scene in scenes/ without `output.dir` or `-o` writes to scenes/out/ (beside the scene): the summary line
    says so, as it would not otherwise be seen without reading docs/language.md's `output`."""
    (tmp_path / "scenes").mkdir()
    write(tmp_path / "scenes", "s.yaml", HEAD + "background: {prompt: x}\n")
    r = scenec("build", "scenes/s.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[-1].endswith("; images in scenes/out/"), r.stderr
    r = scenec("build", "scenes/s.yaml", "-o", tmp_path / "elsewhere", cwd=tmp_path)
    assert r.stderr.splitlines()[-1].endswith("; images in elsewhere/"), r.stderr
