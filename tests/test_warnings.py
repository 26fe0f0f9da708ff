"""Warnings that matter: negatives that cannot act, prompts cut short, a background image nothing
changes (and `background.strength`, img2img), a selection that matches nothing, skipped scene-like files."""

import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def scenec(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "scenec", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


def write(d: Path, name: str, body: str) -> Path:
    (d / "scenec.toml").write_text("[project]\n")
    p = d / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(body)
    return p


HEAD = "scenec: 1\nmodel: {model}\ncanvas: {{width: 64, height: 64}}\nsampler: {{steps: 4, seed: 3{sampler}}}\n"


def scene(model="tiny", sampler="", rest="background: {prompt: \"a meadow\"}\n") -> str:
    return HEAD.format(model=model, sampler=sampler) + rest


NEG = ("background: {prompt: \"a meadow\", negative: \"blurry\"}\n"
       "entities:\n  - {id: fox, prompt: \"a fox\", negative: \"cartoon\", shape: {box: [0, 0, 0.5, 0.5]}}\n")


def test_negatives_that_cannot_act_warn_once_at_the_first(tmp_path):
    f = write(tmp_path, "s.yaml", scene(rest=NEG))
    r = scenec("validate", f)
    assert r.returncode == 0
    assert "s.yaml:5:44: warning: negative prompts have no effect (and 1 more: line 7)" in r.stderr
    assert "sampler.true_cfg: 1" in r.stderr and r.stderr.count("warning:") == 1
    assert "warning" not in scenec("validate", f, "--set", "sampler.true_cfg=4").stderr
    sd = write(tmp_path, "sd.yaml", scene("tiny-sd", ", guidance: 1", NEG))
    assert "classifier-free guidance is off at `sampler.guidance: 1`" in scenec("validate", sd).stderr
    assert "warning" not in scenec("validate", sd, "--guidance", "5").stderr


def test_a_prompt_over_the_token_limit_warns_with_count_and_cut_and_the_build_is_quiet(tmp_path):
    words = " ".join(f"w{i}" for i in range(200))
    f = write(tmp_path, "long.yaml", scene(rest=f"background: {{prompt: \"{words}\"}}\n"))
    r = scenec("validate", f)
    assert r.returncode == 0
    # tiny reads 128 T5 tokens (one is EOS): at least 201 tokens, cut from the 128th word on
    cut = words.index("w127") + 1
    assert f"long.yaml:5:22: warning: this prompt is at least 201 tokens; T5 (max_sequence_length 128) reads 128: " \
           f"the text from character {cut} on (after `…" in r.stderr
    sd = write(tmp_path, "sd.yaml", scene("tiny-sd", rest=f"background: {{prompt: \"{words}\"}}\n"))
    assert "at least 202 tokens; CLIP (77 tokens) reads 77" in scenec("validate", sd).stderr
    r = scenec("build", f, sd, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "truncated" not in r.stderr and "Token indices" not in r.stderr  # no library flood
    assert len(r.stderr) < 2000


def test_background_image_without_entities_and_strength(tmp_path):
    from PIL import Image

    (tmp_path / "init.png").write_bytes((ROOT / "scenes" / "refs" / "meadow.png").read_bytes())
    img = "background:\n  prompt: \"a meadow\"\n  image: init.png\n"
    f = write(tmp_path, "keep.yaml", scene(rest=img))
    r = scenec("validate", f)
    assert "keep.yaml:7:10: warning: with no entities nothing changes: every image is this one" in r.stderr
    assert "background.strength" in r.stderr
    bad = write(tmp_path, "bad/bad.yaml", scene(rest="background: {prompt: x, strength: 0.5}\n"
                                                  "groups: [{id: g, variants: [{id: a, prompt: y}]}]\n"))
    r = scenec("validate", bad)
    assert r.returncode == 2
    assert "`background.strength` needs `background.image`" in r.stderr
    assert "bad.yaml:6:1: error: `groups` cannot be combined with `background.strength`" in r.stderr
    for s in (0, 0.5, 1):
        write(tmp_path, f"s{s}.yaml", scene(rest=img + f"  strength: {s}\noutput: {{name: s{s}}}\n"))
    write(tmp_path, "plain.yaml", scene(rest="background: {prompt: \"a meadow\"}\noutput: {name: plain}\n"))
    files = [tmp_path / f"{n}.yaml" for n in ("keep", "s0", "s0.5", "s1", "plain")]
    r = scenec("build", *files, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    px = {p.stem: np.asarray(Image.open(p), dtype=np.float64) for p in (tmp_path / "out").glob("*.png")}
    assert np.array_equal(px["s0"], px["keep-3"])  # strength 0: the image itself (through the VAE)
    assert np.array_equal(px["s1"], px["plain"])  # strength 1 on a flow model: from pure noise
    mid = px["s0.5"]
    assert 0 < np.abs(mid - px["s0"]).mean() and 0 < np.abs(mid - px["plain"]).mean()


def test_a_selection_that_matches_nothing_exits_2_listing_what_it_could(tmp_path):
    write(tmp_path, "a.yaml", scene(rest="background: {prompt: x}\ngroups:\n  - id: animals\n    variants: "
                                         "[{id: fox, prompt: a fox}, {id: owl, prompt: an owl}]\n"))
    for cmd in ("build", "status"):
        r = scenec(cmd, tmp_path, "-o", tmp_path / "out", "--select", "nosuch")
        assert r.returncode == 2, r.stderr
        assert "--select `nosuch` matched nothing; scenes: a; groups: animals; variants: animals/fox, " \
               "animals/owl; seeds: 3" in r.stderr
    r = scenec("build", tmp_path, "-o", tmp_path / "out", "--select", "owl", "--dry-run")  # a bare variant id
    assert r.returncode == 0 and "a-animals-owl-3.png" in r.stdout and "fox" not in r.stdout
    r = scenec("build", tmp_path, "-o", tmp_path / "out", "--select", "owl")
    r = scenec("build", tmp_path, "-o", tmp_path / "out", "--select", "owl", "--dry-run")
    assert r.stdout.strip() == "nothing to build: 1 up to date"


def test_scene_like_files_skipped_in_a_directory_say_why(tmp_path):
    write(tmp_path, "ok.yaml", scene())
    write(tmp_path, "noversion.yaml", "canvas: {width: 64, height: 64}\nbackground: {prompt: x}\n")
    write(tmp_path, "nocanvas.yaml", "scenec: 1\nbackground: {prompt: x}\n")
    write(tmp_path, "lib/defs.yaml", "scenec: 1\ndefs: {entities: {fox: {prompt: a fox}}}\n")
    write(tmp_path, ".github/ci.yaml", "on: push\njobs: {}\n")
    r = scenec("status", tmp_path, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "noversion.yaml:1:1: warning: skipped: has scene keys but no top-level `scenec: 1`" in r.stderr
    assert "nocanvas.yaml:1:1: warning: skipped: has `scenec:` but no top-level `canvas:`" in r.stderr
    assert "defs.yaml" not in r.stderr and "ci.yaml" not in r.stderr
    assert "1 scene, 1 output" in r.stdout


def test_the_complete_example_runs_its_negatives():
    r = scenec("validate", ROOT / "scenes" / "meadow-flux.yaml")
    assert r.returncode == 0 and "negative" not in r.stderr, r.stderr
    assert "warning" not in r.stderr, r.stderr  # every entity is in an image (`face` in the dancer's)
