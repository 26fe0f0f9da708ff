"""The CLI: exit codes, error format, outputs, and no torch for the compile-side commands."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCENES = Path(__file__).parent / "scenes"


def scenec(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "scenec", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


@pytest.mark.parametrize("cmd", [
    ["validate", SCENES / "regional.yaml"],
    ["compile", SCENES / "regional.yaml", "-o", "{tmp}/plan"],
    ["explain", SCENES / "reference.yaml"],
    ["preview", SCENES / "coupled.yaml", "-o", "{tmp}/p.png"],
    ["schema"],
])
def test_compile_side_commands_do_not_import_torch(cmd, tmp_path):
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in cmd]
    code = (
        "import sys\n"
        f"sys.argv = ['scenec', *{args!r}]\n"
        "from scenec.cli import app\n"
        "try:\n    app()\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy), 'CODE=' + str(code), file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "HEAVY= " in r.stderr, r.stderr
    assert "CODE=0" in r.stderr or "CODE=None" in r.stderr, r.stderr


def test_invalid_scene_exits_2_with_positions_and_no_traceback(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("scenec: 1\ncanvas: {width: 250, height: 256}\nentities:\n  - {id: a, prompt: x}\n  - {id: a, prompt: y}\n"
                 "colour: red\n")
    r = scenec("validate", f)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"{f.name}:6:1: error: unknown key `colour`" in r.stderr.replace(str(tmp_path) + "/", "")


def test_semantic_errors_all_reported(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("scenec: 1\ncanvas: {width: 250, height: 256}\nentities:\n  - {id: a, prompt: x}\n  - {id: a, prompt: y}\n")
    r = scenec("validate", f)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if ": error: " in l]
    assert any(":2:" in l and "250" in l for l in lines), r.stderr
    assert any(":5:" in l and "duplicate" in l for l in lines), r.stderr


def test_validate_and_compile_check_the_model_family(tmp_path):
    """63 entities in one image: over the 62 of regional attention; `--model` decides whose limit, for validate
    and compile alike."""
    f = ROOT / "tests" / "bad" / "too-many-entities.yaml"
    for cmd in (["validate", f], ["compile", f, "-o", tmp_path / "plan"]):
        for model, family in (("tiny", "flux"), ("tiny-sd", "sd")):
            r = scenec(*cmd, "--model", model)
            assert r.returncode == 2, r.stderr
            assert (f"too-many-entities.yaml:69:5: error: the scene has 63 entities, more than the 62 {family} models "
                    f"such as `{model}`") in r.stderr, r.stderr


def test_compile_prints_hash_and_writes_plan(tmp_path):
    r = scenec("compile", SCENES / "regional.yaml", "-o", tmp_path / "plan")
    assert r.returncode == 0, r.stderr
    h = r.stdout.strip()
    assert len(h) == 64
    assert json.loads((tmp_path / "plan" / "plan.json").read_text())["plan_hash"] == h


def test_explain_after_and_masks(tmp_path):
    r = scenec("explain", SCENES / "regional.yaml", "--after", "expand")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("; scenec IR after check > expand")
    r = scenec("explain", SCENES / "regional.yaml", "--masks", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    pngs = sorted(p.relative_to(tmp_path / "m").as_posix() for p in (tmp_path / "m").rglob("*.png"))
    assert pngs == ["regional-1/eagle.png", "regional-1/fox.png", "regional-1/rock.png",
                    "regional-2/eagle.png", "regional-2/fox.png", "regional-2/rock.png"]
    r = scenec("explain", SCENES / "regional.yaml", "--after", "nope")
    assert r.returncode == 2
    # --masks naming a file: refused before the IR is printed (it printed it all, then
    # `scenec: FILE/regional-1: Not a directory`)
    (tmp_path / "f").write_text("x")
    r = scenec("explain", SCENES / "regional.yaml", "--masks", tmp_path / "f")
    assert r.returncode == 2 and r.stdout == "", r.stdout[:200]
    assert r.stderr == f"scenec: {tmp_path / 'f'}: exists and is not a directory (--masks names the directory for " \
                       "the mask PNGs)\n", r.stderr


def test_schema_command_matches_checked_in_file():
    r = scenec("schema")
    assert r.returncode == 0
    assert r.stdout == (ROOT / "schemas" / "scene.schema.json").read_text()


def test_init_creates_a_valid_project(tmp_path):
    r = scenec("init", tmp_path / "proj")
    assert r.returncode == 0, r.stderr
    # every file it names is where it says (the schema was named `schemas/…`, relative to nothing)
    assert f"and {tmp_path / 'proj' / 'schemas' / 'scene.schema.json'};" in r.stderr
    r = scenec("validate", tmp_path / "proj" / "scene.yaml")
    assert r.returncode == 0, r.stderr
    # the modeline points at the schema written beside it (no URL that may not be served)
    first = (tmp_path / "proj" / "scene.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=schemas/scene.schema.json"
    assert (tmp_path / "proj" / "schemas" / "scene.schema.json").read_text() == (ROOT / "schemas" /
                                                                                 "scene.schema.json").read_text()
    assert scenec("init", tmp_path / "proj").returncode == 2  # refuses to overwrite
    # a file for DIRECTORY was "scenec: FILE: File exists"
    (tmp_path / "f.txt").write_text("x")
    r = scenec("init", tmp_path / "f.txt")
    assert r.returncode == 2 and r.stderr == f"scenec: {tmp_path / 'f.txt'}: exists and is not a directory (init " \
                                             "takes the project directory)\n", r.stderr


def test_cli_reference_is_current():
    from scenec.docgen import cli_markdown

    assert (ROOT / "docs" / "cli.md").read_text() == cli_markdown(), "run `python -m scenec.docgen > docs/cli.md`"


def test_a_bad_model_flag_is_reported_at_the_flag_once():
    # it was `FILE:1:1: error: --model nope: …`, once per file: a position in no file, repeated
    r = scenec("validate", SCENES / "regional.yaml", SCENES / "coupled.yaml", "--model", "nope")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ": error: " in ln]
    assert lines == ["--model nope: error: `nope` is no alias, local diffusers directory or hub id (ORG/NAME); "
                     "aliases: flux-dev, flux-schnell, tiny, sd15, sd21, tiny-sd, sdxl, sdxl-turbo, tiny-sdxl"], \
        r.stderr
    assert "2 of 2 files invalid" in r.stderr
    r = scenec("validate", SCENES / "regional.yaml", SCENES / "coupled.yaml", "--steps", "abc")
    assert r.returncode == 2 and r.stderr.count("--steps abc: error:") == 1, r.stderr


def test_no_scene_arguments_mean_the_project(tmp_path):
    """As `dbt run` runs its project: `validate`, `status` and `build` without scene arguments take the directory of
    the nearest scenec.toml from here up; outside a project they say so (exit 2)."""
    assert scenec("init", tmp_path / "p").returncode == 0
    sub = tmp_path / "p" / "deep"
    sub.mkdir()
    r = scenec("validate", cwd=sub)
    assert r.returncode == 0 and "1 file valid" in r.stdout + r.stderr, r.stderr
    r = scenec("status", cwd=sub)
    assert r.returncode == 0 and "1 to build" in r.stdout + r.stderr, r.stdout + r.stderr
    r = scenec("build", "--dry-run", cwd=sub)
    assert r.returncode == 0 and "scene-1" in r.stdout + r.stderr, r.stdout + r.stderr
    if not any((d / "scenec.toml").exists() for d in (tmp_path, *tmp_path.parents)):
        r = scenec("build", cwd=tmp_path)
        assert r.returncode == 2 and "no scenec.toml here or above" in r.stderr and "Traceback" not in r.stderr
