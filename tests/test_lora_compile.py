"""LoRAs at compile time (no model, no torch): the scene's, scenec.toml's, ``--lora``'s and each entity's;
their digests and scales in the cache key; bad input located at FILE:LINE:COL with exit 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from scenec.compiler import compile_scene
from scenec.compiler.lora import diffsynth_targets, parse_cli_lora
from scenec.spec.diagnostics import SceneError

ROOT = Path(__file__).resolve().parents[1]
rng = np.random.default_rng(0)


def scenec(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "scenec", *map(str, args)], check=False, capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=300)


def flux_lora(path: Path, scale_b: float = 1.0, rank: int = 2, modules=("transformer_blocks.0.attn.to_q",),
              b_rank: int | None = None) -> Path:
    sd = {}
    for m in modules:
        sd[f"transformer.{m}.lora_A.weight"] = rng.standard_normal((rank, 64)).astype(np.float32)
        sd[f"transformer.{m}.lora_B.weight"] = (rng.standard_normal((64, b_rank or rank)) * scale_b).astype(np.float32)
    save_file(sd, str(path))
    return path


def scene(tmp_path: Path, model: str, entities: str = "", groups: str = "") -> Path:
    (tmp_path / "scenec.toml").write_text("[project]\n")
    p = tmp_path / "s.yaml"
    p.write_text(f"""scenec: 1
model: {model}
canvas: {{width: 256, height: 256}}
sampler: {{steps: 2, seed: 1}}
background: {{prompt: "a meadow"}}
entities:
  - id: fox
    prompt: "a red fox"
    shape: {{box: [0.0, 0.5, 0.5, 1.0]}}
{entities}  - id: cat
    prompt: "a cat"
    shape: {{box: [0.5, 0.5, 1.0, 1.0]}}
{groups}""")
    return p


def hashes(p: Path, **kw) -> dict[str, str]:
    plan = compile_scene(p, **kw)
    return {j["name"]: j["job_hash"] for j in plan.json["jobs"]}


def test_model_lora_in_plan_and_job_hash(tmp_path):
    flux_lora(tmp_path / "style.safetensors")
    p = scene(tmp_path, "{id: tiny, lora: [{file: style.safetensors, scale: 0.5}]}")
    plan = compile_scene(p)
    (lo,) = plan.json["model"]["lora"]
    assert lo["scale"] == 0.5 and lo["format"] == "diffusers" and len(lo["sha256"]) == 64
    assert lo["path"] == str((tmp_path / "style.safetensors").resolve())
    h = hashes(p)
    p.write_text(p.read_text().replace("scale: 0.5", "scale: 0.75"))
    h2 = hashes(p)
    assert h2.keys() == h.keys() and all(h[k] != h2[k] for k in h)
    # where the file is does not matter, what it holds does
    (tmp_path / "style.safetensors").rename(tmp_path / "moved.safetensors")
    p.write_text(p.read_text().replace("style.safetensors", "moved.safetensors"))
    assert hashes(p) == h2
    flux_lora(tmp_path / "moved.safetensors")
    assert hashes(p) != h2
    # no LoRA: the plan as before this feature (no key at all in the hash material)
    p.write_text(p.read_text().replace("{id: tiny, lora: [{file: moved.safetensors, scale: 0.75}]}", "tiny"))
    assert compile_scene(p).json["model"]["lora"] == []


def test_entity_lora_changes_exactly_its_variants(tmp_path):
    flux_lora(tmp_path / "fox.safetensors")
    groups = """groups:
  - id: g
    schedule: {shape: step, center: 0.5}
    variants:
      - {id: fox, entities: [fox]}
      - {id: cat, entities: [cat]}
"""
    ent = "    lora: [{file: fox.safetensors, scale: 1.0}]\n"
    p = scene(tmp_path, "tiny", entities=ent, groups=groups)
    plan = compile_scene(p)
    by_variant = {j["variant"]: j for j in plan.json["jobs"]}
    assert [e["lora"][0]["scale"] for e in by_variant["fox"]["entities"]] == [1.0]
    assert by_variant["cat"]["entities"][0]["lora"] == []
    h = {j["variant"]: j["job_hash"] for j in plan.json["jobs"]}
    p.write_text(p.read_text().replace("scale: 1.0", "scale: 0.25"))
    h2 = {j["variant"]: j["job_hash"] for j in compile_scene(p).json["jobs"]}
    assert h2["fox"] != h["fox"] and h2["cat"] == h["cat"]


def test_cli_lora_and_toml_default_model_table(tmp_path):
    _a, b = flux_lora(tmp_path / "a.safetensors"), flux_lora(tmp_path / "b.safetensors")
    p = scene(tmp_path, "{id: tiny, lora: [{file: a.safetensors}]}")
    plan = compile_scene(p, lora=[f"{b}:0.3"])
    assert [(lo["name"], lo["scale"]) for lo in plan.json["model"]["lora"]] == [("a.safetensors", 1.0),
                                                                                  (str(b), 0.3)]
    # --model replaces the scene's model, and with it the scene's LoRAs; --lora still applies
    plan = compile_scene(p, model="tiny", lora=[str(b)])
    assert [lo["scale"] for lo in plan.json["model"]["lora"]] == [1.0] and "b.safetensors" in \
        plan.json["model"]["lora"][0]["path"]
    assert any("--model replaces the scene's model, and with it its 1 LoRA" in w.message for w in plan.warnings)
    # scenec.toml: default_model as a table
    (tmp_path / "scenec.toml").write_text('[project]\ndefault_model = {id = "tiny", lora = [{file = "a.safetensors", '
                                          'scale = 0.6}]}\n')
    p.write_text(p.read_text().replace("model: {id: tiny, lora: [{file: a.safetensors}]}\n", ""))
    plan = compile_scene(p)
    assert plan.json["model"]["spec"] == "tiny" and [lo["scale"] for lo in plan.json["model"]["lora"]] == [0.6]
    # the command line: compile writes it into the plan
    r = scenec("compile", p, "-o", tmp_path / "plan", "--lora", f"{b}:-0.5")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert [lo["scale"] for lo in doc["model"]["lora"]] == [0.6, -0.5]


def test_parse_cli_lora():
    assert parse_cli_lora("x.safetensors") == ("x.safetensors", 1.0)
    assert parse_cli_lora("x.safetensors:0.5") == ("x.safetensors", 0.5)
    assert parse_cli_lora("C:/loras/x.safetensors") == ("C:/loras/x.safetensors", 1.0)
    with pytest.raises(ValueError, match="must be a number"):
        parse_cli_lora("x.safetensors:big")
    with pytest.raises(ValueError, match=r"\[-16, 16\]"):
        parse_cli_lora("x.safetensors:40")


def _errors(p: Path, **kw) -> list[str]:
    with pytest.raises(SceneError) as e:
        compile_scene(p, **kw)
    return [d.format() for d in e.value.diagnostics if d.severity == "error"]


def test_bad_loras_are_located(tmp_path):
    (tmp_path / "not.safetensors").write_bytes(b"\x00garbage, not a safetensors header")
    (tmp_path / "w.bin").write_bytes(b"x")
    save_file({"transformer.no_such_block.lora_A.weight": np.zeros((2, 4), np.float32),
               "transformer.no_such_block.lora_B.weight": np.zeros((4, 2), np.float32)},
              str(tmp_path / "keys.safetensors"))
    flux_lora(tmp_path / "rank.safetensors", rank=2, b_rank=3)
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": np.zeros((2, 4), np.float32),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": np.zeros((4, 2), np.float32)},
              str(tmp_path / "unet.safetensors"))
    lines = ["missing.safetensors", "not.safetensors", "w.bin", "keys.safetensors", "rank.safetensors",
             "unet.safetensors"]
    lora = "".join(f"\n    - {{file: {f}}}" for f in lines)
    p = scene(tmp_path, "\n  id: tiny\n  lora:" + lora)
    errs = _errors(p)
    text = p.read_text().splitlines()
    where = {f: next(i + 1 for i, line in enumerate(text) if f in line) for f in lines}
    expect = {"missing.safetensors": "not found", "not.safetensors": "is not a safetensors file",
              "w.bin": "not a .safetensors file", "keys.safetensors": "names no layer",
              "rank.safetensors": "ranks that disagree", "unet.safetensors": "adapts UNet (SD, SDXL) layers"}
    for f, msg in expect.items():
        col = text[where[f] - 1].index(f) + 1
        assert any(e.startswith(f"{p}:{where[f]}:{col}: error: ") and msg in e for e in errs), (f, errs)
    # the command line: the same, exit 2, no traceback
    r = scenec("validate", p)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("error:") == len(lines)


def test_bad_cli_lora_exit_2(tmp_path):
    """A bad --lora is one line before any scene, however many scenes the command has (not one per scene)."""
    p = scene(tmp_path, "tiny")
    shutil.copyfile(p, tmp_path / "t.yaml")
    nope = tmp_path / "nope.safetensors"
    for cmd in ("validate", "build"):
        r = scenec(cmd, p, tmp_path / "t.yaml", "--lora", nope, *(["-o", tmp_path / "o"] if cmd == "build" else []))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.splitlines()[0] == f"scenec: --lora {nope}: not found (looked for {nope.resolve()})"
        assert r.stderr.count("not found") == 1
    r = scenec("validate", p, "--lora", f"{flux_lora(tmp_path / 'a.safetensors')}:lots")
    assert r.returncode == 2 and "must be a number" in r.stderr
    (tmp_path / "b.ckpt").write_bytes(b"x")
    r = scenec("compile", p, "-o", tmp_path / "plan", "--lora", tmp_path / "b.ckpt")
    assert r.returncode == 2 and "not a .safetensors file" in r.stderr and not (tmp_path / "plan").exists()


def test_lora_entry_needs_file_or_repo(tmp_path):
    p = scene(tmp_path, "{id: tiny, lora: [{scale: 0.5}]}")
    assert any("exactly one of `file` and `repo`" in e for e in _errors(p))
    p = scene(tmp_path, "{id: tiny, lora: [{repo: someone/not-downloaded, weight_name: x.safetensors}]}")
    assert any("is not downloaded" in e for e in _errors(p))


def test_diffsynth_lora_defaults_entity_padding_to_512(tmp_path):
    sd = {"blocks.0.attn.a_to_qkv.lora_A.default.weight": np.zeros((2, 64), np.float32),
          "blocks.0.attn.a_to_qkv.lora_B.default.weight": np.zeros((192, 2), np.float32)}
    save_file(sd, str(tmp_path / "eligen.safetensors"))
    p = scene(tmp_path, "{id: tiny, lora: [{file: eligen.safetensors}]}")
    plan = compile_scene(p)
    assert plan.json["model"]["lora"][0]["format"] == "diffsynth"
    assert plan.json["attention"]["pad_prompts"] == 512
    p.write_text(p.read_text() + "attention: {pad_prompts: 64}\n")
    assert compile_scene(p).json["attention"]["pad_prompts"] == 64  # the scene's own setting wins


def test_diffsynth_names():
    assert diffsynth_targets("blocks.3.attn.a_to_qkv") == (("transformer_blocks.3.attn.to_q", (0, 1, 3)),
                                                           ("transformer_blocks.3.attn.to_k", (1, 2, 3)),
                                                           ("transformer_blocks.3.attn.to_v", (2, 3, 3)))
    assert diffsynth_targets("single_blocks.0.to_qkv_mlp")[-1] == ("single_transformer_blocks.0.proj_mlp", (3, 7, 7))
    assert diffsynth_targets("final_norm_out.linear") == (("norm_out.linear", "swap"),)
    assert diffsynth_targets("pipe.dit.blocks.1.ff_b.2") == (("transformer_blocks.1.ff_context.net.2", None),)
    assert diffsynth_targets("blocks.1.unknown") is None


def test_build_rebuilds_exactly_what_a_lora_changes(tmp_path):
    """A LoRA's digest and scale are in the cache key: a changed entity LoRA rebuilds its variants only;
    ``--lora`` rebuilds everything; moving a file rebuilds nothing. (End to end on tiny, with the
    example's LoRA file: the entity LoRA runs.)"""
    import shutil

    shutil.copy(ROOT / "scenes" / "loras" / "fox-style.safetensors", tmp_path / "fox.safetensors")
    groups = """groups:
  - id: g
    schedule: {shape: step, center: 0.5}
    variants:
      - {id: fox, entities: [fox]}
      - {id: cat, entities: [cat]}
"""
    p = scene(tmp_path, "tiny", entities="    lora: [{file: fox.safetensors, scale: 1.0}]\n", groups=groups)
    out = tmp_path / "out"
    r = scenec("build", p, "-o", out, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1])["built"] == 2

    def would_build(*extra):
        r = scenec("build", p, "-o", out, "--dry-run", "--json", *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        return sorted(o["name"] for o in json.loads(r.stdout.splitlines()[-1])["outputs"]
                      if o["status"] == "would-build")

    assert would_build() == []
    p.write_text(p.read_text().replace("scale: 1.0", "scale: 0.5"))
    assert would_build() == ["s-g-fox-1"]
    shutil.move(tmp_path / "fox.safetensors", tmp_path / "renamed.safetensors")
    p.write_text(p.read_text().replace("scale: 0.5", "scale: 1.0").replace("fox.safetensors", "renamed.safetensors"))
    assert would_build() == []
    assert would_build("--lora", f"{tmp_path / 'renamed.safetensors'}:0.1") == ["s-g-cat-1", "s-g-fox-1"]


def test_plans_without_loras_hash_as_before():
    """No LoRA, no ``lora`` key in the hash material: existing outputs stay up to date after an upgrade."""
    from scenec.compiler.lora import identity

    assert identity({"spec": "tiny", "lora": []}) == {"spec": "tiny"}
    lo = {"name": "a", "path": "/x/a.safetensors", "sha256": "f" * 64, "scale": 0.5, "format": "kohya"}
    assert identity({"id": "fox", "lora": [lo]}) == {"id": "fox", "lora": [{"sha256": "f" * 64, "scale": 0.5,
                                                                            "format": "kohya"}]}


def test_repo_lora_from_the_local_hub_cache(tmp_path):
    """``repo`` + ``weight_name`` reads the file from the local Hugging Face cache, never the network."""
    import os

    cache = tmp_path / "hub"
    snap = cache / "models--someone--style-lora" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (cache / "models--someone--style-lora" / "refs").mkdir()
    (cache / "models--someone--style-lora" / "refs" / "main").write_text("abc123")
    flux_lora(snap / "style.safetensors")
    proj = tmp_path / "proj"
    proj.mkdir()
    p = scene(proj, "{id: tiny, lora: [{repo: someone/style-lora, weight_name: style.safetensors, scale: 0.4}]}")
    r = subprocess.run([sys.executable, "-m", "scenec", "compile", str(p), "-o", str(tmp_path / "plan")],
                       check=False, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    (lo,) = json.loads((tmp_path / "plan" / "plan.json").read_text())["model"]["lora"]
    assert lo["name"] == "someone/style-lora/style.safetensors" and lo["scale"] == 0.4
    assert lo["path"].endswith("snapshots/abc123/style.safetensors")


def test_bad_default_model_lora_in_scenec_toml_names_its_line(tmp_path):
    p = scene(tmp_path, "tiny")
    p.write_text(p.read_text().replace("model: tiny\n", ""))
    (tmp_path / "scenec.toml").write_text('[project]\n\ndefault_model = {id = "tiny", lora = [{file = "a.safetensors", '
                                          'scale = "abc"}]}\n')
    with pytest.raises(SceneError) as e:
        compile_scene(p)
    [d] = [d for d in e.value.diagnostics.sorted() if d.severity == "error"]
    assert (d.pos.file.endswith("scenec.toml"), d.pos.line) == (True, 3)
    assert d.message.startswith("`default_model.lora.0.scale`: input should be a valid number") and "`abc`" in d.message


def test_explain_shows_the_loras(tmp_path):
    """`scenec explain`'s IR model line names each LoRA and its scale (the whole image's, then each entity's);
    without LoRAs the line is as before."""
    flux_lora(tmp_path / "my style.safetensors")
    flux_lora(tmp_path / "fur.safetensors")
    p = scene(tmp_path, "{id: tiny, lora: [{file: my style.safetensors, scale: 0.5}]}",
              entities="    lora: [{file: fur.safetensors, scale: 0.9}]\n")
    r = scenec("explain", p, "--after", "check", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    model_line = next(x for x in r.stdout.splitlines() if x.startswith("model "))
    assert model_line.endswith(' lora="my style.safetensors":0.5 lora.fox="fur.safetensors":0.9'), model_line
    p.write_text(p.read_text().replace("{id: tiny, lora: [{file: my style.safetensors, scale: 0.5}]}", "tiny")
                 .replace("    lora: [{file: fur.safetensors, scale: 0.9}]\n", ""))
    r = scenec("explain", p, "--after", "check", cwd=tmp_path)
    assert "lora" not in r.stdout, r.stdout
