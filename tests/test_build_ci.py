"""`scenec build` as a CI script drives it: --json on stdout however the build ends, SIGTERM (a CI
runner's cancel, `timeout`) handled like Ctrl-C, and `status` after a build that did not finish."""

import json
import subprocess
import sys
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
