"""scenec.toml: strict keys, and every problem at its own line (TOML parsers keep no positions)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCENE = "scenec: 1\ncanvas: {width: 256, height: 256}\nsampler: {steps: 2}\nbackground: {prompt: x}\n"


@pytest.mark.parametrize("toml,expect", [
    # a typo was silently no default model (flux-dev, a download), `ok: 1 file valid`
    ('[project]\ndefault_modle = "tiny"\n', "scenec.toml:2:1: error: unknown key `default_modle` in `[project]`\n"
                                            "  hint: did you mean `default_model`?"),
    ('# x\n[projekt]\ndefault_model = "tiny"\n', "scenec.toml:2:1: error: unknown table `projekt` in scenec.toml\n"
                                                 "  hint: did you mean `project`?"),
    ('default_model = "tiny"\n', "scenec.toml:1:1: error: unknown key `default_model` in scenec.toml\n"
                                 "  hint: write it under `[project]`"),
    # these were all at scenec.toml:1:1, the parser's own position only inside the message
    ("# x\n[project\n", "scenec.toml:2:9: error: invalid scenec.toml: Expected ']' at the end of a table declaration"),
    ("[project]\n\ndefault_model = 5\n", "scenec.toml:3:1: error: `default_model` must be a string or a table"),
    ('[project]\n\ndefault_model = "nope"\n', "scenec.toml:3:1: error: `nope` is no alias"),
])
def test_scenec_toml_problems_are_errors_at_their_line(tmp_path, toml, expect):
    (tmp_path / "scenec.toml").write_text(toml)
    (tmp_path / "s.yaml").write_text(SCENE)
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", "s.yaml"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_good_scenec_toml_is_quiet(tmp_path):
    (tmp_path / "scenec.toml").write_text('# project\n[project]\ndefault_model = "tiny"\n')
    (tmp_path / "s.yaml").write_text(SCENE)
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", "s.yaml"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and r.stderr == "ok: 1 file valid\n", r.stderr
