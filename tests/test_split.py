"""scenec split: the heuristic on the paper's pairs, the LLM path with a fake generator, the written scene."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scenec.split import SplitError, heuristic_split, llm_instruction, llm_split, parse_canvas, phrases, scene_text

ROOT = Path(__file__).resolve().parents[1]

PAIRS = [
    (["an eagle soaring in a vibrant meadow under a clear blue sky",
      "a red fox running in a vibrant meadow under a clear blue sky"],
     "a vibrant meadow under a clear blue sky", ["an eagle soaring", "a red fox running"], ["eagle", "fox"]),
    (["a jazz saxophonist playing on a Tokyo street at night",
      "a young woman dancing on a Tokyo street at night"],
     "a Tokyo street at night", ["a jazz saxophonist playing", "a young woman dancing"], ["saxophonist", "woman"]),
    (["a majestic stag standing in a misty forest",
      "a squirrel sitting on a branch in a misty forest"],
     "a misty forest", ["a majestic stag standing", "a squirrel sitting on a branch"], ["stag", "squirrel"]),
]


@pytest.mark.parametrize("prompts,background,entities,ids", PAIRS)
def test_paper_pairs(prompts, background, entities, ids):
    s = heuristic_split(prompts)
    assert s.background == background
    assert s.entities == entities
    assert s.ids == ids
    assert not s.warnings


def test_phrases_commas_case_and_three_prompts():
    assert phrases("A cat on a sofa, oil painting.") == [("", "A cat"), (" ", "on a sofa"), (", ", "oil painting")]
    s = heuristic_split(["A cat sleeping on a sofa, oil painting", "a dog on a sofa, Oil  painting",
                         "a parrot on a sofa, oil painting"])
    assert s.background == "a sofa, oil painting"
    assert s.entities == ["A cat sleeping", "a dog", "a parrot"] and s.ids == ["cat", "dog", "parrot"]


def test_nothing_shared_and_duplicates():
    s = heuristic_split(["a cat", "a dog"])
    assert s.background == "" and s.entities == ["a cat", "a dog"] and "share no phrase" in s.warnings[0]
    s = heuristic_split(["a fox in a field", "a fox running in a field"])
    assert s.ids == ["fox", "fox-2"]
    with pytest.raises(SplitError, match="at least two"):
        heuristic_split(["only one"])


def test_llm_split_with_a_fake_generator():
    seen = []

    def fake(prompt):
        seen.append(prompt)
        return ' Sure. {"background": "a vibrant meadow", "entities": ["an eagle", "a red fox"]} trailing'

    prompts = PAIRS[0][0]
    s = llm_split(prompts, fake)
    assert s.background == "a vibrant meadow" and s.entities == ["an eagle", "a red fox"] and s.ids == ["eagle", "fox"]
    assert seen == [llm_instruction(prompts)] and "1. an eagle soaring" in seen[0]
    with pytest.raises(SplitError, match="not the JSON"):
        llm_split(prompts, lambda p: "I cannot do that")
    with pytest.raises(SplitError, match="gave 1 entity prompts for 2"):
        llm_split(prompts, lambda p: '{"background": "x", "entities": ["a"]}')


def test_scene_text_is_a_valid_scene(tmp_path):
    from scenec.compiler import compile_scene

    text = scene_text(heuristic_split(PAIRS[1][0]), model="tiny", width=512, height=256, source="p.txt")
    assert text.splitlines()[0].startswith("# yaml-language-server: $schema=")
    f = tmp_path / "tokyo.yaml"
    f.write_text(text)
    plan = compile_scene(f)
    assert plan.json["canvas"] == {"width": 512, "height": 256} and plan.json["model"]["spec"] == "tiny"
    jobs = plan.json["jobs"]
    assert [j["variant"] for j in jobs] == ["saxophonist", "woman"]
    assert plan.json["prompts"][jobs[0]["global"]["prompt"]] == "a Tokyo street at night"
    assert plan.json["prompts"][jobs[1]["entities"][0]["prompt"]] == "a young woman dancing"


def test_parse_canvas():
    assert parse_canvas("1024x768") == (1024, 768) and parse_canvas(" 64 X 64 ") == (64, 64)
    with pytest.raises(SplitError, match="WIDTHxHEIGHT"):
        parse_canvas("big")


def test_cli_split_writes_a_scene_that_validates_without_torch(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PAIRS[0][0]) + "\n\n# a comment\n", encoding="utf-8")
    out = tmp_path / "scene.yaml"
    code = (
        "import sys\n"
        f"sys.argv = ['scenec', 'split', {str(p)!r}, '-o', {str(out)!r}]\n"
        "from scenec.cli import app\n"
        "try:\n    app()\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy), 'CODE=' + str(code), file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "HEAVY= " in r.stderr and ("CODE=0" in r.stderr or "CODE=None" in r.stderr), r.stderr
    text = out.read_text()
    assert text.startswith("# yaml-language-server: $schema=")
    assert "model: tiny\n" in text and "canvas: {width: 1024, height: 1024}" in text
    assert 'prompt: "a vibrant meadow under a clear blue sky"' in text
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", str(out)], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    # no overwrite without --force; --model and --canvas
    r = subprocess.run([sys.executable, "-m", "scenec", "split", str(p), "-o", str(out)], capture_output=True,
                       text=True, cwd=ROOT, timeout=120, env={**os.environ})
    assert r.returncode == 2 and "--force" in r.stderr
    r = subprocess.run([sys.executable, "-m", "scenec", "split", str(p), "-o", str(out), "--force", "--model",
                        "flux-dev", "--canvas", "1024x768"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "model: flux-dev\n" in out.read_text() and "height: 768" in out.read_text()
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", str(out)], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr


def test_cli_split_one_prompt_is_an_error(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("just one prompt\n")
    r = subprocess.run([sys.executable, "-m", "scenec", "split", str(p), "-o", str(tmp_path / "s.yaml")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "at least two prompts" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("group", ["BAD!", "Animals", "a: b", "x" * 65, ""])
def test_cli_split_a_bad_group_id_is_an_error(tmp_path, group):
    # it wrote `- id: BAD!` (an invalid scene, or YAML that does not parse) and exited 0
    p = tmp_path / "p.txt"
    p.write_text("a fox in a meadow\nan owl in a meadow\n")
    r = subprocess.run([sys.executable, "-m", "scenec", "split", str(p), "-o", str(tmp_path / "s.yaml"),
                        "--group", group], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "is not a valid id" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "s.yaml").exists()


def _modeline_target(scene: Path) -> Path:
    first = scene.read_text().splitlines()[0]
    prefix = "# yaml-language-server: $schema="
    assert first.startswith(prefix), first
    ref = first[len(prefix):]
    assert "://" not in ref and not Path(ref).is_absolute(), ref  # a relative path, no URL that may not be served
    return scene.parent / ref


def test_cli_split_writes_the_schema_its_modeline_points_at(tmp_path):
    """In a project (scenec.toml), the schema goes under the project root, as `scenec init` puts it; the
    modeline is the path from the scene to it."""
    from scenec.spec.schema import scene_schema_text

    proj = tmp_path / "proj"
    (proj / "scenes").mkdir(parents=True)
    (proj / "scenec.toml").write_text("[project]\n")
    p = proj / "prompts.txt"
    p.write_text("\n".join(PAIRS[0][0]) + "\n", encoding="utf-8")
    out = proj / "scenes" / "meadow.yaml"
    r = subprocess.run([sys.executable, "-m", "scenec", "split", str(p), "-o", str(out)], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    target = _modeline_target(out)
    assert out.read_text().splitlines()[0].endswith("=../schemas/scene.schema.json")
    assert target.resolve() == (proj / "schemas" / "scene.schema.json").resolve()
    assert target.read_text() == scene_schema_text()
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", str(out)], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr


def test_split_schema_without_a_project_goes_beside_the_scene(tmp_path):
    from scenec.spec.schema import scene_schema_text
    from scenec.split import write_schema_for

    out = tmp_path / "a" / "b.yaml"
    out.parent.mkdir()
    (out.parent / "schemas").mkdir()
    (out.parent / "schemas" / "scene.schema.json").write_text("{}")  # stale: rewritten with this scenec's schema
    ref = write_schema_for(out)
    assert ref == "schemas/scene.schema.json"
    out.write_text(scene_text(heuristic_split(PAIRS[1][0]), schema=ref))
    assert _modeline_target(out).read_text() == scene_schema_text()
