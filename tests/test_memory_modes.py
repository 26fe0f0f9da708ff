"""Memory modes (``--offload``, ``--quantize``; runtime/memory.py): a mode that cannot run here is one line and
exit 2 before anything loads; sidecars record the mode and the peak memory; large canvases decode tiled.
On a GPU the modes themselves run through diffusers (measured there, docs/models.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scenec.runtime import memory

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "tests" / "scenes" / "regional.yaml"


def scenec(*args):
    return subprocess.run([sys.executable, "-m", "scenec", *map(str, args)], check=False, capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("args, says", [
    (["--offload", "model", "--device", "cpu"], "--offload model needs a CUDA device, not --device cpu"),
    (["--offload", "sideways"], "--offload must be none, model or sequential, not `sideways`"),
    (["--quantize", "int4"], "--quantize must be none, nf4, int8 or fp8, not `int4`"),
])
def test_a_mode_that_cannot_run_is_one_line_exit_2(args, says, tmp_path):
    r = scenec("build", SCENE, "-o", tmp_path, *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[0] == f"scenec: {says}" and len(lines) == 2 and lines[1].startswith("scenec: 0 built"), r.stderr
    assert not list(tmp_path.iterdir())


def test_problem_without_cuda_or_extra(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert memory.problem("none", "none", None) is None
    assert memory.problem("sequential", "none", None) == ("--offload sequential needs a CUDA GPU, and torch sees "
                                                          "none here")
    assert "--quantize nf4 needs a CUDA GPU" in memory.problem("none", "nf4", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memory.importlib.util, "find_spec", lambda name: None)
    assert memory.problem("none", "int8", "cuda") == ("--quantize int8 needs bitsandbytes, which is not installed: "
                                                      "pip install 'scenec[quant]' (in a clone: pip install -e "
                                                      "'.[quant]')")


def test_a_cuda_device_torch_cannot_see(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert memory.device_problem("cuda").startswith("--device cuda needs a CUDA GPU, and torch ")
    assert memory.device_problem("cpu") is None and memory.device_problem(None) is None
    # a contradiction is one even in a dry run (which loads nothing)
    assert memory.problem("sequential", "none", "cpu", values_only=True) == ("--offload sequential needs a CUDA "
                                                                            "device, not --device cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert memory.device_problem("cuda:0") is None and "sees 1 CUDA device" in memory.device_problem("cuda:1")
    monkeypatch.undo()
    if torch.cuda.is_available():
        return  # the command line below needs a machine without CUDA
    for args in (["build", SCENE, "-o", tmp_path], ["tune", ROOT / "scenes" / "forest-tuned.yaml"]):
        r = scenec(*args, "--device", "cuda")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.splitlines()[0].startswith("scenec: --device cuda needs a CUDA GPU"), r.stderr
    assert not list(tmp_path.iterdir())


def test_quantization_configs():
    pytest.importorskip("bitsandbytes")  # the quant extra; transformers' config needs it installed
    import diffusers
    import torch
    import transformers

    cfg = memory.quantization_config("nf4", "flux", torch.bfloat16)
    assert set(cfg.quant_mapping) == {"transformer", "text_encoder_2"}
    assert isinstance(cfg.quant_mapping["transformer"], diffusers.BitsAndBytesConfig)
    assert isinstance(cfg.quant_mapping["text_encoder_2"], transformers.BitsAndBytesConfig)
    assert cfg.quant_mapping["transformer"].bnb_4bit_quant_type == "nf4"
    assert cfg.quant_mapping["transformer"].bnb_4bit_compute_dtype == torch.bfloat16
    assert set(memory.quantization_config("int8", "sdxl", torch.float16).quant_mapping) == {"unet"}
    assert memory.quantization_config("none", "flux", torch.float16) is None


def test_vae_tiles_above_1024_squared():
    from scenec.runtime.testing import tiny_backend

    vae = tiny_backend().pipe.vae
    try:
        memory.vae_tiling(tiny_backend().pipe, 1024, 1024)
        assert not vae.use_tiling
        memory.vae_tiling(tiny_backend().pipe, 1280, 1024)
        assert vae.use_tiling
    finally:
        vae.disable_tiling()


def test_sidecar_records_mode_and_peak(tmp_path):
    r = scenec("build", SCENE, "-o", tmp_path, "--offload", "none", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    side = json.loads(next(tmp_path.glob("*.json")).read_text()) if not (tmp_path / "scenec-manifest.json").exists() \
        else json.loads(next(p for p in tmp_path.glob("*.json") if p.name != "scenec-manifest.json").read_text())
    assert side["memory"]["offload"] == "none" and side["memory"]["quantize"] == "none"
    assert side["memory"]["peak"]["kind"] == "process-rss" and side["memory"]["peak"]["bytes"] > 10 ** 7


def test_missing_weights_one_message_per_model(tmp_path):
    """A model whose weights are not here: its message once, then one short line per image."""
    model = tmp_path / "flux-without-weights"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                        "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    r = scenec("build", SCENE, "-o", tmp_path / "out", "--model", model)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    model_lines = [line for line in lines if "not available here" in line or "could not" in line.lower()]
    assert sum("flux-without-weights" in line for line in lines) == 1, r.stderr
    assert len([line for line in lines if line.endswith("its model could not be loaded (above)")]) >= 1
    assert "Traceback" not in r.stderr and "Couldn't connect" not in r.stderr and "FutureWarning" not in r.stderr
    assert "Loading pipeline components" not in r.stderr
    assert model_lines
