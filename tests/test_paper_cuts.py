"""The paper cuts of a user's first hour, each as a real command: --version, validate DIR and library
files, default names that do not stutter, status after build -o, explain after every pass, split
--canvas, YAML indentation in words, one run for all of a file's problems, the docs' command table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def scenec(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "scenec", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300, env=env)


def write(d: Path, name: str, body: str) -> Path:
    (d / "scenec.toml").write_text("[project]\n")
    p = d / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(body)
    return p


HEAD = "scenec: 1\nmodel: tiny\ncanvas: {width: 64, height: 64}\nsampler: {steps: 1, seed: 7}\n"


def test_version():
    from scenec import __version__

    r = scenec("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"scenec {__version__}"


def test_validate_takes_directories_globs_and_library_files(tmp_path):
    write(tmp_path, "a.yaml", HEAD + "background: {prompt: x}\n")
    write(tmp_path, "lib/defs.yaml", "scenec: 1\ndefs: {entities: {fox: {prompt: a fox}}}\n")
    write(tmp_path, "notes.yaml", "title: not a scene\n")
    r = scenec("validate", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ok: 2 files valid" in r.stderr
    r = scenec("validate", tmp_path / "lib" / "defs.yaml")  # a library alone: no "missing canvas"
    assert r.returncode == 0 and "ok: 1 file valid" in r.stderr, r.stderr
    write(tmp_path, "lib/bad.yaml", "scenec: 1\ndefs: {entities: {owl: {prompt: 3}}}\n")
    r = scenec("validate", str(tmp_path / "lib") + "/*.yaml")
    assert r.returncode == 2
    assert "bad.yaml:2:33: error: `defs.entities.owl.prompt` must be a string, found number `3`" in r.stderr
    assert "1 of 2 files invalid" in r.stderr


def test_default_names_do_not_stutter(tmp_path):
    f = write(tmp_path, "harbor.yaml", HEAD + "background: {prompt: x}\ngroups:\n  - id: harbor\n"
                                              "    variants: [{id: boat, prompt: a boat}, {id: cat, prompt: a cat}]\n")
    r = scenec("build", f, "--dry-run", "-o", tmp_path / "out")
    assert "harbor-boat-7.png" in r.stdout and "harbor-cat-7.png" in r.stdout, r.stdout
    f.write_text(f.read_text() + "output: {name: \"{scene}-{group}-{variant}-{seed}\"}\n")  # written: as written
    assert "harbor-harbor-boat-7.png" in scenec("build", f, "--dry-run", "-o", tmp_path / "out").stdout


def test_status_after_build_o_reads_that_directory(tmp_path):
    f = write(tmp_path, "s.yaml", HEAD + "background: {prompt: x}\n")
    assert scenec("build", f, "-o", tmp_path / "renders").returncode == 0
    r = scenec("status", f)
    assert "1 up to date, 0 to build" in r.stdout, r.stdout
    assert "outputs of its last `scenec build -o" in r.stdout
    r = scenec("status", f, "-o", tmp_path / "elsewhere")
    assert "0 up to date, 1 to build" in r.stdout


def test_explain_prints_every_pass_then_the_plan(tmp_path):
    scene = ROOT / "tests" / "scenes" / "regional.yaml"
    r = scenec("explain", scene)
    heads = [ln for ln in r.stdout.splitlines() if ln.startswith("; ")]
    assert heads == ["; scenec IR after check", "; scenec IR after check > expand",
                     "; scenec IR after check > expand > geometry",
                     "; scenec IR after check > expand > geometry > schedule", "; after lower: the plan (plan.json)"]
    lower = scenec("explain", scene, "--after", "lower").stdout
    schedule = scenec("explain", scene, "--after", "schedule").stdout
    assert lower != schedule
    assert json.loads(lower)["format"] == "scenec-plan/1"


def test_split_refuses_a_canvas_the_model_cannot_run(tmp_path):
    (tmp_path / "p.txt").write_text("a red fox in a meadow\nan eagle in a meadow\n")
    r = scenec("split", tmp_path / "p.txt", "-o", tmp_path / "s.yaml", "--canvas", "100x100")
    assert r.returncode == 2
    assert "--canvas 100x100: the width 100 must be a multiple of 16" in r.stderr and "nearest: 96 or 112" in r.stderr
    assert not (tmp_path / "s.yaml").exists()
    r = scenec("split", tmp_path / "p.txt", "-o", tmp_path / "s.yaml", "--canvas", "128x96")
    assert r.returncode == 0
    assert scenec("validate", tmp_path / "s.yaml").returncode == 0


def test_an_indentation_mistake_in_words(tmp_path):
    f = write(tmp_path, "s.yaml", HEAD + "background:\n  prompt: x\n negative: y\n")
    r = scenec("validate", f)
    assert r.returncode == 2
    assert "s.yaml:7:2: error: invalid YAML: this line is indented less or more than the mapping" in r.stderr
    assert "hint: keys of one mapping start in the same column" in r.stderr


def test_every_problem_of_a_file_in_one_run(tmp_path):
    f = write(tmp_path, "s.yaml", HEAD.replace("64", "256") + "background: {prompt: x}\nentities:\n"
              "  - {id: a, prompt: a, shape: {box: [0.5, 0.5, 0.9, 0.9]}, feather: 9}\n"
              "  - {id: b, prompt: b, shape: {box: [0.1, 0.1, 0.1, 0.9]}}\n"
              "  - {id: c, prompt: c, shape: {polygon: [[0, 0], [1, 1], [1, 0], [0, 1]]}}\n"
              "  - {id: a, prompt: d, shape: {box: [0, 0, 1, 1]}}\n"
              "  - {id: e, prompt: e, shape: {box: [0.1, 0.1, 0.2, 0.2]}, z: -5}\n")
    for cmd in (["validate", f], ["compile", f, "-o", tmp_path / "plan"]):
        r = scenec(*cmd)
        assert r.returncode == 2
        err = r.stderr
        assert "s.yaml:7:69: error: `entities.0.feather` must be less than or equal to 0.5" in err
        assert "s.yaml:8:31: error: degenerate box" in err
        assert "s.yaml:9:31: error: polygon is not simple" in err
        assert "s.yaml:10:10: error: duplicate entity id `a`" in err
        assert "s.yaml:11:31: error: the region of `e` is hidden entirely" in err


def test_a_failed_include_or_unknown_use_adds_no_missing_prompt(tmp_path):
    f = write(tmp_path, "s.yaml", HEAD + "include: [nolib.yaml]\nentities:\n  - {id: fox, use: fox}\n"
                                         "  - {id: owl, use: owll}\n")
    r = scenec("validate", f)
    assert r.returncode == 2
    assert "included file `nolib.yaml` not found" in r.stderr and "unknown def `fox`" in r.stderr
    assert "an include did not load (see its error), and it may define it" in r.stderr
    assert "missing required key" not in r.stderr
    # a library that is there but broken: its error is printed after the scene's (by file name), not "above"
    write(tmp_path, "zlib.yaml", "defs: {entities: {fox: {prompt: a fox}}}\n")
    f.write_text(f.read_text().replace("nolib.yaml", "zlib.yaml"))
    r = scenec("validate", f)
    assert "(above)" not in r.stderr and "zlib.yaml:1:1: error: missing required key `scenec`" in r.stderr


def test_the_concepts_command_table_lists_every_command():
    import typer.main

    from scenec.cli import app

    text = (ROOT / "docs" / "concepts.md").read_text()
    for name in typer.main.get_command(app).commands:
        assert f"| `scenec {name}" in text, name


def test_the_error_example_of_concepts_md_is_what_compile_prints(tmp_path):
    # the page showed `shap` at 9:5 before `missing required key` at 10:5: an order and lines no run prints
    import re

    text = (ROOT / "docs" / "concepts.md").read_text()
    i = text.index("For example, a scene where `shape` is misspelt")
    scene = re.search(r"```yaml\n(.*?)```", text[i:], re.S).group(1)
    shown = re.search(r"```\n\$ scenec compile scenes/meadow.yaml -o plan\n(.*?)\$ echo \$\?\n2\n```", text[i:], re.S)
    (tmp_path / "scenec.toml").write_text('[project]\ndefault_model = "tiny"\n')
    (tmp_path / "scenes").mkdir()
    (tmp_path / "scenes" / "meadow.yaml").write_text(scene)
    r = subprocess.run([sys.executable, "-m", "scenec", "compile", "scenes/meadow.yaml", "-o", "plan"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr == shown.group(1), r.stderr


@pytest.mark.parametrize("args,expect", [
    # "not a regular file", "no such directory" (it exists) and "cannot read it as UTF-8 text (Is a directory)"
    (["compile", "{dir}", "-o", "{tmp}/p"], "d.yaml:1:1: error: is a directory, not a scene file"),
    (["eval", "{file}"], "scenec: {file}: not a directory (eval takes the directory of built images)"),
    (["split", "{dir}", "-o", "{tmp}/s.yaml"], "scenec: {dir}: is a directory, not a text file of prompts"),
])
def test_a_directory_for_a_file_and_a_file_for_a_directory_say_so(tmp_path, args, expect):
    (tmp_path / "d.yaml").mkdir()
    (tmp_path / "f.txt").write_text("x\n")
    sub = {"{dir}": str(tmp_path / "d.yaml"), "{file}": str(tmp_path / "f.txt"), "{tmp}": str(tmp_path)}

    def fill(a):
        for k, v in sub.items():
            a = a.replace(k, v)
        return a
    r = subprocess.run([sys.executable, "-m", "scenec", *map(fill, args)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and fill(expect) in r.stderr, r.stderr


@pytest.mark.parametrize("args", [
    ["preview", str(ROOT / "tests" / "scenes" / "regional.yaml"), "-o", "{f}/p.png"],
    ["watch", str(ROOT / "tests" / "scenes" / "regional.yaml"), "-o", "{f}", "--max-cycles", "1"],
])
def test_an_output_folder_that_is_a_file_says_so(tmp_path, args):
    # "scenec: FILE: File exists" (mkdir's errno text), as if the file were the problem for existing
    (tmp_path / "f.txt").write_text("x")
    f = str(tmp_path / "f.txt")
    r = subprocess.run([sys.executable, "-m", "scenec", *(a.replace("{f}", f) for a in args)], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"scenec: {f}: exists and is not a directory", r.stderr
