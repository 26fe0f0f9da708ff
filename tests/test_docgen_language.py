"""docs/language.md's key tables are generated from the scene models (scenec/docgen_language.py): current,
complete, and only the marked tables change."""

import subprocess
import sys
from pathlib import Path

import pytest

from scenec.docgen_language import BEGIN, END, blocks, table, update_language
from scenec.spec.schema import scene_schema

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "language.md"


def test_language_md_tables_are_current():
    text = DOC.read_text(encoding="utf-8")
    assert update_language(text) == text, "run `python -m scenec.docgen language`"


def test_every_model_of_the_schema_has_a_table():
    """A model added to the language gets a table, or this fails."""
    schema = scene_schema()
    documented = {m.__name__ for spec in blocks().values() for m, _ in spec}
    with_keys = {name for name, d in schema["$defs"].items() if d.get("properties")} | {"Scene"}
    # EntityFields' keys are Entity's; EntityDef documents itself through `defs.entities` and the entity table
    assert with_keys - documented <= {"EntityDef"}, with_keys - documented


def test_a_table_has_a_row_per_key_with_description_and_example():
    from scenec.spec.models import Reference, Sampler

    schema = scene_schema()
    text = table([(Reference, "")], schema)
    rows = [r for r in text.splitlines()[2:] if r.startswith("| `")]
    assert [r.split("|")[1].strip(" `") for r in rows] == list(Reference.model_fields)
    steps = next(r for r in table([(Sampler, "")], schema).splitlines() if r.startswith("| `steps`"))
    cells = [c.strip() for c in steps.split("|")[1:-1]]
    assert cells == ["`steps`", "integer [1, 1000]", "none", Sampler.model_fields["steps"].description, "`28`"]


def test_a_description_change_reaches_the_doc_and_prose_is_kept(monkeypatch):
    from scenec.spec.models import Canvas

    text = DOC.read_text(encoding="utf-8")
    monkeypatch.setattr(Canvas.model_fields["width"], "description", "WIDTH CHANGED HERE")
    new = update_language(text)
    assert "WIDTH CHANGED HERE" in new and "WIDTH CHANGED HERE" not in text

    def outside(t: str) -> str:  # the hand-written text: everything but the marked tables
        out, inside = [], False
        for line in t.splitlines():
            if line.startswith("<!-- generated:keys"):
                inside = True
            if not inside:
                out.append(line)
            if line.startswith("<!-- /generated:keys"):
                inside = False
        return "\n".join(out)

    assert outside(new) == outside(text) and len(outside(text)) > 20000


def test_unknown_or_missing_tables_are_errors():
    text = DOC.read_text(encoding="utf-8")
    bad = text + "\n" + BEGIN.format(name="nosuch") + "\n" + END.format(name="nosuch") + "\n"
    with pytest.raises(ValueError, match="unknown generated table `nosuch`"):
        update_language(bad)
    start, end = text.index(BEGIN.format(name="canvas")), text.index(END.format(name="canvas"))
    with pytest.raises(ValueError, match="no generated table for: canvas"):
        update_language(text[:start] + text[end + len(END.format(name="canvas")):])


def test_command_checks_and_rewrites(tmp_path):
    doc = tmp_path / "language.md"
    text = DOC.read_text(encoding="utf-8")
    stale = text.replace("| `cycles` | integer [0, 100] | `10` |", "| `cycles` | integer | `7` |")
    assert stale != text
    doc.write_text(stale, encoding="utf-8")
    cmd = [sys.executable, "-m", "scenec.docgen", "language"]
    r = subprocess.run([*cmd, "--check", str(doc)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "stale" in r.stderr
    assert doc.read_text(encoding="utf-8") == stale  # --check writes nothing
    r = subprocess.run([*cmd, str(doc)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and doc.read_text(encoding="utf-8") == text
    r = subprocess.run([*cmd, "--check", str(doc)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
