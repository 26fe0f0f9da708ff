"""`scenec build`'s live progress on a real terminal: model loading, each image's steps with steps/s and
the time left, one kept line per finished image; nothing of it when stderr is not a terminal, nor with
--quiet; --json unchanged. Under tmux (send-keys, capture-pane) when it is installed, and on a pty."""

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCENE = "scenec: 1\nmodel: tiny\ncanvas: {width: 64, height: 64}\nsampler: {steps: 300, seed: [1, 2]}\n" \
        "background: {prompt: \"a meadow\"}\n"


def project(tmp_path: Path) -> Path:
    (tmp_path / "scenec.toml").write_text("[project]\n")
    (tmp_path / "s.yaml").write_text(SCENE)
    return tmp_path


def test_progress_under_tmux(tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (the pty test below covers the display)")
    d = project(tmp_path)
    session = f"scenec-test-{os.getpid()}"
    cmd = f"cd {d} && {sys.executable} -m scenec build s.yaml -o out; echo \"EXIT\"=$?"  # typed: not EXIT=
    env = {**os.environ, "TMUX": ""}
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "150", "-y", "20"], check=True, env=env)
    try:
        subprocess.run(["tmux", "send-keys", "-t", session, cmd, "Enter"], check=True, env=env)
        seen, deadline = [], time.time() + 240
        while time.time() < deadline:
            pane = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True,
                                  env=env).stdout
            seen.append(pane)
            if any(ln.startswith("EXIT=") for ln in pane.splitlines()):
                break
            time.sleep(0.3)
        frames = "\n".join(seen)
        assert "EXIT=0" in seen[-1], seen[-1]
        assert "steps/s" in frames and "eta" in frames  # a step bar was on screen
        assert any("s-1" in f and "/300" in f for f in seen)
        # what stays: one line per image and the summary, the bars gone
        final = seen[-1]
        assert "built   s-1" in final and "built   s-2" in final and "2 built, 0 cached" in final
        assert "steps/s" not in final
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], env=env)


def run_on_pty(args, cwd) -> tuple[int, str, str]:
    """Run scenec with stderr on a pseudo-terminal (stdout a pipe): (exit status, stderr bytes, stdout)."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "150", "LINES": "20"}
    p = subprocess.Popen([sys.executable, "-m", "scenec", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=slave,
                         env=env)
    os.close(slave)
    chunks, deadline = [], time.time() + 240
    while time.time() < deadline:
        r, _, _ = select.select([master], [], [], 0.2)
        data = b""
        if r:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                data = b""
            chunks.append(data)
        if not data and p.poll() is not None:
            break
    os.close(master)
    out = p.stdout.read().decode()
    return p.wait(), b"".join(chunks).decode("utf-8", "replace"), out


def test_progress_on_a_pty_quiet_and_json(tmp_path):
    d = project(tmp_path)
    code, err, out = run_on_pty(["build", "s.yaml", "-o", "out", "--json"], d)
    assert code == 0, err
    assert "loading model tiny" in err and "steps/s" in err and "/300" in err
    assert "built   s-1" in err and "2 built, 0 cached" in err
    assert json.loads(out)["built"] == 2  # stdout: the JSON line only
    code, err, out = run_on_pty(["build", "s.yaml", "-o", "out2", "--quiet"], d)
    assert code == 0
    assert "steps/s" not in err and "built   s-1" not in err and "2 built, 0 cached" in err
    r = subprocess.run([sys.executable, "-m", "scenec", "build", "s.yaml", "-o", "out3"], cwd=d, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "steps/s" not in r.stderr and "\x1b[" not in r.stderr  # not a terminal: plain lines
    assert "built   s-1" in r.stderr
