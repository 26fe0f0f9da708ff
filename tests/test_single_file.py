"""Single-file checkpoints (A1111's and ComfyUI's `.safetensors` in the original LDM layout) on SD and SDXL: a tiny
pipeline saved as a diffusers directory and as one LDM-layout file (tests/ldm_layout.py) builds the same pixels
either way, with LoRAs, embeddings and clip_skip too; the family is told from the header as diffusers'
``infer_diffusers_model_type`` tells it; bad files and configs are located errors; the cache key follows the
file's bytes and the configs."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scenec.compiler.single_file import inspect

sys.path.insert(0, str(Path(__file__).parent))
from ldm_layout import pipeline_to_ldm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCENE = """scenec: 1
model: {model}
canvas: {{width: 64, height: 64}}
sampler: {{steps: 2, seed: 3}}
background: {{prompt: "a <bad> meadow", negative: "blurry"}}
entities:
  - {{id: fox, prompt: "a fox", shape: {{box: [0, 0, 0.5, 0.5]}}}}
output: {{dir: out-{name}}}
"""
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def tiny_sdxl_pipeline():
    """tiny-sdxl with a wider second text encoder (48, the first 32), as SDXL's (1280, 768): diffusers'
    single-file loader tells the two encoders' tensors apart by their widths."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from scenec.runtime.tiny import CLIP_MAX_LENGTH
    from scenec.runtime.tiny_sdxl import TIME_DIM, build_tiny_sdxl

    c = build_tiny_sdxl()
    tok = c["tokenizer"]
    torch.manual_seed(1)
    c["unet"] = UNet2DConditionModel(**{**c["unet"].config, "cross_attention_dim": 80,
                                        "projection_class_embeddings_input_dim": 6 * TIME_DIM + 48})
    c["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=48, hidden_act="gelu", bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    for m in (c["unet"], c["text_encoder_2"]):
        m.eval().requires_grad_(False)
    return StableDiffusionXLPipeline(**c)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """sd/ and xl/ (save_pretrained), sd.safetensors and xl.safetensors (LDM layout), a LoRA and an embedding for
    SD, xl-configs/ (xl/ without weights), and a Hugging Face cache holding tiny-sd's configs (no weights) as
    stable-diffusion-v1-5's."""
    from diffusers import StableDiffusionPipeline
    from safetensors.numpy import save_file as save_np
    from safetensors.torch import save_file

    from scenec.runtime.testing import lora_layers
    from scenec.runtime.tiny_sd import build_tiny_sd

    root = tmp_path_factory.mktemp("single-file")
    sd = StableDiffusionPipeline(**build_tiny_sd())
    for name, pipe in (("sd", sd), ("xl", tiny_sdxl_pipeline())):
        pipe.save_pretrained(root / name)
        save_file(pipeline_to_ldm(pipe), str(root / f"{name}.safetensors"))
    snap = root / "hub" / f"models--{SD15.replace('/', '--')}" / "snapshots" / "abc"
    for src, dst in ((root / "sd", snap), (root / "xl", root / "xl-configs")):  # configs and tokenizers, no weights
        for f in src.rglob("*"):
            if f.is_file() and f.suffix != ".safetensors":
                (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                (dst / f.relative_to(src)).write_bytes(f.read_bytes())
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc")
    # a kohya LoRA on UNet and text-encoder layers, an embedding `<bad>`
    unet_mods = [n for n, m in sd.unet.named_modules() if n.startswith("down_blocks.1.attentions.0.")
                 and type(m).__name__ == "Linear"][:6]
    te_mods = [n for n, m in sd.text_encoder.named_modules() if "layers.0." in n and type(m).__name__ == "Linear"]
    lora = {}
    for prefix, pairs in (("lora_unet", lora_layers(sd.unet, unet_mods, seed=1)),
                          ("lora_te", lora_layers(sd.text_encoder, te_mods, seed=2, std=0.4))):
        for m, (a, b) in pairs.items():
            k = f"{prefix}_" + m.replace(".", "_")
            lora[k + ".lora_down.weight"], lora[k + ".lora_up.weight"] = a, b
            lora[k + ".alpha"] = np.asarray(a.shape[0], np.float32)
    save_np(lora, str(root / "lora.safetensors"))
    save_np({"emb_params": np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)},
            str(root / "bad.safetensors"))
    return root


def env(root: Path) -> dict:
    return {**os.environ, "HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1"}


def scenec(root: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scenec", *map(str, args)], capture_output=True, text=True,
                          cwd=root, env=env(root), timeout=600)


def pixels(root: Path, name: str) -> np.ndarray:
    (png,) = (root / f"out-{name}").glob("*.png")
    return np.asarray(Image.open(png))


def hub_cache(monkeypatch, path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(path))


def test_a_checkpoint_file_builds_the_pixels_of_its_diffusers_directory(project, monkeypatch):
    """SD and SDXL, with an entity (regional attention); SD also with a LoRA (UNet and text encoder), an
    embedding and clip_skip, and with diffusers' default configs read from the Hugging Face cache. The cache's
    configs and xl-configs/ hold no weights: those images' weights are the file's."""
    opts = "lora: [{file: lora.safetensors, scale: 0.8}], embeddings: [{file: bad.safetensors, token: '<bad>'}], " \
           "clip_skip: 1"
    scenes = {
        "sd-dir": "sd", "sd-file": "{id: sd.safetensors, config: sd}", "sd-default": "sd.safetensors",
        "sd-dir-opts": f"{{id: sd, {opts}}}", "sd-file-opts": f"{{id: sd.safetensors, config: sd, {opts}}}",
        "xl-dir": "xl", "xl-file": "{id: xl.safetensors, config: xl-configs}",
    }
    for name, model in scenes.items():
        (project / f"{name}.yaml").write_text(SCENE.format(model=model, name=name))
    r = scenec(project, "build", *(f"{n}.yaml" for n in scenes), "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    # built once: a second build has nothing to do (each output's manifest entry holds the checkpoint's identity,
    # its configs' included)
    r = scenec(project, "build", *(f"{n}.yaml" for n in scenes), "--device", "cpu")
    assert r.returncode == 0 and f"0 built, {len(scenes)} cached" in r.stderr + r.stdout, r.stdout + r.stderr
    assert "damaged" not in r.stderr + r.stdout, r.stderr
    got = {n: pixels(project, n) for n in scenes}
    pairs = (("sd-dir", "sd-file"), ("sd-dir", "sd-default"), ("sd-dir-opts", "sd-file-opts"), ("xl-dir", "xl-file"))
    for a, b in pairs:
        assert np.array_equal(got[a], got[b]), (a, b)
    assert not np.array_equal(got["sd-dir"], got["sd-dir-opts"])  # the options act
    assert got["sd-dir"].std() > 1 and got["xl-dir"].std() > 1
    side = json.loads(next((project / "out-sd-file").glob("sd-file*.json")).read_text())
    assert side["scenec:model"] == "sd.safetensors"
    # the embedded scene names the file and its configs (relative to the root): it compiles to the image's job,
    # which `build --from` checks before it rebuilds
    hub_cache(monkeypatch, project / "hub")
    for name, config in (("sd-file", str(project / "sd")), ("sd-default", SD15)):
        (png,) = (project / f"out-{name}").glob("*.png")
        meta = Image.open(png).text
        assert "config: " in meta["scenec:scene.yaml"] and str(project) not in meta["scenec:scene.yaml"]
        (project / "embedded.yaml").write_text(meta["scenec:scene.yaml"])
        plan = compile_plan(project)
        assert plan.json["model"]["config"] == config and [j.job_hash for j in plan.jobs] == [meta["scenec:job_hash"]]


def compile_plan(cwd: Path, path: str = "embedded.yaml"):
    from scenec.compiler import compile_scene

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return compile_scene(cwd / path)
    finally:
        os.chdir(old)


def compiled_model(path: Path, cwd: Path) -> dict:
    return compile_plan(cwd, path.name).json["model"]


def test_the_cache_key_follows_the_files_bytes_and_the_configs(project, tmp_path, monkeypatch):
    import shutil

    from scenec.build.keys import model_identity

    hub_cache(monkeypatch, project / "hub")
    shutil.copytree(project / "sd", tmp_path / "sd")
    shutil.copy(project / "sd.safetensors", tmp_path / "m.safetensors")
    s = tmp_path / "s.yaml"
    s.write_text(SCENE.format(model="{id: m.safetensors, config: sd}", name="x").replace("<bad> ", ""))
    m1 = compiled_model(s, tmp_path)
    assert m1["sha256"] and m1["config"] == str((tmp_path / "sd").resolve()) and m1["repo"].endswith("m.safetensors")
    id1 = model_identity(m1)
    data = bytearray((tmp_path / "m.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    (tmp_path / "m.safetensors").write_bytes(bytes(data))
    m2 = compiled_model(s, tmp_path)
    assert m2["sha256"] != m1["sha256"] and model_identity(m2) != id1
    s.write_text(SCENE.format(model="m.safetensors", name="x").replace("<bad> ", ""))  # diffusers' default configs
    m3 = compiled_model(s, tmp_path)
    assert m3["config"] == SD15 and model_identity(m3) != model_identity(m2)
    assert model_identity(m3)["config"] == {"id": SD15, "revision": "abc"}
    # a plan without a checkpoint file keeps its keys: no config or sha256 in it
    s.write_text(SCENE.format(model="sd", name="x").replace("<bad> ", ""))
    assert not {"config", "sha256"} & set(compiled_model(s, tmp_path))


def header(path: Path, shapes: dict) -> Path:
    """A safetensors file with only a header (every tensor empty at offset 0): enough for the compiler."""
    doc = json.dumps({k: {"dtype": "F16", "shape": list(v), "data_offsets": [0, 0]} for k, v in shapes.items()})
    path.write_bytes(struct.pack("<Q", len(doc)) + doc.encode())
    return path


U = "model.diffusion_model."
SD15_KEYS = {U + "input_blocks.0.0.weight": (320, 4, 3, 3),
             U + "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
             U + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
             "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
             "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3)}
HEADERS = {
    "sd15": (SD15_KEYS, "v1", "sd"),
    "sd21": ({U + "input_blocks.0.0.weight": (320, 4, 3, 3),
              U + "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
              U + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
              "cond_stage_model.model.token_embedding.weight": (49408, 1024)}, "v2", "sd"),
    "sdxl": ({U + "input_blocks.0.0.weight": (320, 4, 3, 3), U + "label_emb.0.0.weight": (1280, 2816),
              "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
              "conditioner.embedders.1.model.positional_embedding": (77, 1280),
              "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)}, "xl_base", "sdxl"),
    "refiner": ({U + "input_blocks.0.0.weight": (384, 4, 3, 3),
                 "conditioner.embedders.0.model.text_projection": (1280, 1280),
                 "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)}, "xl_refiner", None),
    "flux": ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (3072, 64),
              "guidance_in.in_layer.bias": (3072,)}, "flux", None),
    "inpaint": ({**SD15_KEYS, U + "input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting", None),
    "sdxl-inpaint": ({U + "input_blocks.0.0.weight": (320, 9, 3, 3),
                      "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)}, "xl_inpaint",
                     None),
    "sd3": ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,),
             "model.diffusion_model.pos_embed": (1, 36864, 1536)}, "sd3", None),
}


@pytest.mark.parametrize("name", HEADERS)
def test_the_family_is_told_from_the_header_as_diffusers_tells_it(tmp_path, name):
    shapes, kind, family = HEADERS[name]
    got = inspect(header(tmp_path / f"{name}.safetensors", shapes))
    assert got.model_type == kind and got.family == family, got
    if family is None:
        assert "scenec runs single-file SD 1.x, SD 2.x and SDXL base" in got.problem


def test_our_rules_agree_with_diffusers_own(tmp_path):
    """diffusers' infer_diffusers_model_type on the same keys and shapes (meta tensors: no memory)."""
    import torch
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    for name, (shapes, kind, _) in HEADERS.items():
        theirs = infer_diffusers_model_type({k: torch.empty(v, device="meta") for k, v in shapes.items()})
        assert theirs == kind or (kind == "flux" and theirs == "flux-dev"), (name, theirs)  # Flux: one for all


def validate(root: Path, model: str, **extra):
    from scenec.compiler.check import validate_file

    p = root / "s.yaml"
    p.write_text(SCENE.format(model=model, name="x").replace("<bad> ", ""))
    _, diags = validate_file(p)
    return [(d.pos.line, d.pos.col, d.message) for d in diags if d.severity == "error"]


def test_bad_files_and_configs_are_located_errors(project, tmp_path, monkeypatch):
    hub_cache(monkeypatch, tmp_path / "empty-hub")
    (tmp_path / "m.ckpt").write_bytes(b"PK\x03\x04 a pickle")
    (tmp_path / "notes.safetensors").write_text("not a checkpoint at all\n")
    header(tmp_path / "sd15.safetensors", SD15_KEYS)
    header(tmp_path / "flux.safetensors", HEADERS["flux"][0])
    header(tmp_path / "lora.safetensors", {"lora_unet_x.lora_down.weight": (4, 32)})
    header(tmp_path / "vae.safetensors", {"decoder.conv_in.weight": (512, 4, 3, 3)})
    (tmp_path / "cut.safetensors").write_bytes((project / "sd.safetensors").read_bytes()[:-100])
    (tmp_path / "sd").symlink_to(project / "sd")
    (tmp_path / "xl").symlink_to(project / "xl")
    cases = [
        ("m.ckpt", 2, 8, "is a pickle checkpoint"),
        ("notes.safetensors", 2, 8, "is not a safetensors file"),
        ("cut.safetensors", 2, 8, "is cut short"),
        ("gone.safetensors", 2, 8, "does not exist"),
        ("lora.safetensors", 2, 8, "holds no Stable Diffusion UNet"),
        ("vae.safetensors", 2, 8, "is a VAE: name it as `model: {id: MODEL, vae: FILE}`"),  # A1111's models/VAE/
        ("flux.safetensors", 2, 8, "is a Flux transformer"),
        ("sd15.safetensors", 2, 8, f"hf download {SD15} --include"),  # diffusers' default configs are not here
        ("{id: sd15.safetensors, config: ./nope}", 2, None, "no diffusers model directory"),
        ("{id: sd15.safetensors, config: org/absent}", 2, None, "hf download org/absent --include"),
        ("{id: sd15.safetensors, config: xl}", 2, None, "is a StableDiffusionXLPipeline model"),
        ("{id: sd15.safetensors, config: tiny-sd}", 2, None, "built in code"),
        ("{id: tiny-sd, config: sd}", 2, None, "applies to a single-file checkpoint"),
    ]
    for model, line, col, frag in cases:
        col = col or 8 + model.index("config: ") + len("config: ")  # at the config's value
        errs = validate(tmp_path, model)
        assert len(errs) == 1 and errs[0][:2] == (line, col) and frag in errs[0][2], (model, errs)
    assert validate(tmp_path, "{id: sd15.safetensors, config: sd}") == []
    validate(tmp_path, "m.ckpt")
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", "s.yaml"], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty-hub")})
    assert r.returncode == 2 and "Traceback" not in r.stderr and "s.yaml:2:8" in r.stdout + r.stderr


def test_a_checkpoint_without_its_vae_is_a_located_error_and_a_model_error_at_load(project, tmp_path):
    """A "no-VAE" release (no ``first_stage_model.`` tensors, common for SD 1.x and SDXL fine-tunes): diffusers'
    from_single_file raises SingleFileComponentError, which was no ModelUnavailable: `scenec build` stopped with
    "internal error" and built none of the other scenes either. Now `validate` says so at the model key, and the
    loader turns the error into the model's."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    from scenec.runtime.backend import from_single_file
    from scenec.spec.errors import ModelUnavailable

    full = load_file(str(project / "sd.safetensors"))
    save_file({k: v for k, v in full.items() if not k.startswith("first_stage_model.")},
              str(tmp_path / "novae.safetensors"))
    (tmp_path / "sd").symlink_to(project / "sd")
    errs = validate(tmp_path, "{id: novae.safetensors, config: sd}")
    assert len(errs) == 1 and errs[0][:2] == (2, 8) and "holds no VAE" in errs[0][2], errs
    with pytest.raises(ModelUnavailable, match="does not load as a single-file checkpoint: .*AutoencoderKL"):
        from_single_file(StableDiffusionPipeline, str(tmp_path / "novae.safetensors"), str(project / "sd"),
                         torch.float32, safety_checker=None, requires_safety_checker=False)


def test_configs_of_another_architecture_fail_the_load_in_one_sentence(project, tmp_path):
    """A shape the configs do not expect, and a tensor the file lacks (diffusers would leave it on the meta
    device, unloaded: tiny-sdxl's two encoders are both 32 wide, so its loader takes the first for the second)."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors.torch import save_file

    from scenec.runtime.backend import from_single_file
    from scenec.runtime.tiny_sd import build_tiny_sd
    from scenec.runtime.tiny_sdxl import build_tiny_sdxl
    from scenec.spec.errors import ModelUnavailable

    c = build_tiny_sd()
    c["unet"] = UNet2DConditionModel(**{**c["unet"].config, "layers_per_block": 2})
    StableDiffusionPipeline(**c).save_pretrained(tmp_path / "other")
    with pytest.raises(ModelUnavailable, match="does not load as a single-file checkpoint with the configs of .*"
                                               "ValueError: .*expected shape"):
        from_single_file(StableDiffusionPipeline, str(project / "sd.safetensors"), str(tmp_path / "other"),
                         torch.float32, safety_checker=None, requires_safety_checker=False)
    xl = StableDiffusionXLPipeline(**build_tiny_sdxl())
    xl.save_pretrained(tmp_path / "xl")
    save_file(pipeline_to_ldm(xl), str(tmp_path / "xl.safetensors"))
    with pytest.raises(ModelUnavailable, match=r"1 of the model's tensors are not in the file \(the first: "
                                               r"text_encoder_2.text_projection.weight\)"):
        from_single_file(StableDiffusionXLPipeline, str(tmp_path / "xl.safetensors"), str(tmp_path / "xl"),
                         torch.float32)


def test_a_big_file_is_hashed_once_per_size_and_mtime(tmp_path, monkeypatch):
    """A checkpoint's digest is read at compile and by each scene's compile memo: remembered per (path, size,
    mtime, inode) in the process for files of BIG_FILE bytes or more; a rewritten file is hashed again."""
    import hashlib

    from scenec.spec import fsio

    monkeypatch.setattr(fsio, "BIG_FILE", 4)
    calls = []
    monkeypatch.setattr(fsio, "sha256_file",
                        lambda p: calls.append(p) or hashlib.sha256(Path(p).read_bytes()).hexdigest())
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"12345678")
    a = fsio.sha256_big_file(f)
    assert fsio.sha256_big_file(f) == a and len(calls) == 1
    f.write_bytes(b"87654321")
    os.utime(f, ns=(1, 1))
    assert fsio.sha256_big_file(f) == hashlib.sha256(b"87654321").hexdigest() and len(calls) == 2
    (tmp_path / "small").write_bytes(b"123")
    fsio.sha256_big_file(tmp_path / "small")
    fsio.sha256_big_file(tmp_path / "small")
    assert len(calls) == 4  # below BIG_FILE: every time


def test_scenec_toml_default_model_takes_a_checkpoint_and_its_config(project, tmp_path):
    from scenec.compiler.check import validate_file

    (tmp_path / "sd.safetensors").symlink_to(project / "sd.safetensors")
    (tmp_path / "sd").symlink_to(project / "sd")
    (tmp_path / "scenes").mkdir()
    for p in (tmp_path / "s.yaml", tmp_path / "scenes" / "s.yaml"):  # paths from the root, wherever the scene is
        p.write_text(SCENE.format(model="null", name="x").replace("model: null\n", "").replace("<bad> ", ""))
    for config, errors, p in (("sd", [], tmp_path / "s.yaml"), ("sd", [], tmp_path / "scenes" / "s.yaml"),
                              ("nope", [(2, "`config: nope` is no diffusers model directory")], tmp_path / "s.yaml")):
        toml = f'[project]\ndefault_model = {{id = "sd.safetensors", config = "{config}"}}\n'
        (tmp_path / "scenec.toml").write_text(toml)
        _, diags = validate_file(p)
        got = [(d.pos.line, d.message) for d in diags if d.severity == "error"]
        assert [line for line, _ in got] == [line for line, _ in errors] and \
            all(frag in m for (_, m), (_, frag) in zip(got, errors)) and \
            all(d.pos.file.endswith("scenec.toml") for d in diags if d.severity == "error"), got


def test_the_job_hash_is_where_the_files_lie_not(project, tmp_path, monkeypatch):
    """A scene in a subdirectory naming a checkpoint, its configs and a VAE directory by `../`: its embedded scene
    (paths from the root) compiled in a copy of the project gives the image's job_hash, so `build --from` rebuilds
    it there; the checkpoint's digest and the VAE's files, not their paths, are what the hash and the key hold."""
    import shutil

    hub_cache(monkeypatch, project / "hub")
    root = tmp_path / "proj"
    (root / "scenes").mkdir(parents=True)
    (root / "scenec.toml").write_text("[project]\n")
    shutil.copy(project / "sd.safetensors", root / "m.safetensors")
    shutil.copytree(project / "sd", root / "sd")
    s = root / "scenes" / "s.yaml"
    s.write_text(SCENE.format(model="{id: ../m.safetensors, config: ../sd, vae: ../sd/vae}", name="x")
                 .replace("<bad> ", ""))
    plan = compile_plan(root / "scenes", "s.yaml")
    resolved = plan.json["scene"]["resolved"]
    assert "id: m.safetensors" in resolved and "vae: sd/vae" in resolved, resolved
    shutil.copytree(root, tmp_path / "copy", ignore=shutil.ignore_patterns("scenes"))
    (tmp_path / "copy" / "embedded.yaml").write_text(resolved)
    again = compile_plan(tmp_path / "copy")
    assert [j.job_hash for j in again.jobs] == [j.job_hash for j in plan.jobs]
    # the same files in another place: the same hash; other bytes: another hash
    data = bytearray((tmp_path / "copy" / "m.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "copy" / "m.safetensors").write_bytes(bytes(data))
    assert compile_plan(tmp_path / "copy").jobs[0].job_hash != plan.jobs[0].job_hash


def test_a_model_path_on_the_command_line_is_from_the_current_directory(project):
    """`--model sd.safetensors` (or a directory) names a file beside the shell, as `--lora` does, not one beside
    the scene: validated from the project's root for a scene in a subdirectory."""
    (project / "sub").mkdir(exist_ok=True)
    (project / "sub" / "m.yaml").write_text(SCENE.format(model="tiny-sd", name="m").replace("<bad> ", ""))
    for model in ("sd.safetensors", "sd"):
        r = scenec(project, "validate", "sub/m.yaml", "--model", model)
        assert r.returncode == 0, r.stderr
    # made absolute for the compile, the embedded scene still names it from the root (a copy of the project
    # rebuilds from its own files)
    from scenec.compiler import compile_scene

    (project / "m.yaml").write_text((project / "sub" / "m.yaml").read_text())
    resolved = compile_scene(project / "m.yaml", model=str(project / "sd")).json["scene"]["resolved"]
    assert "\nmodel: sd\n" in resolved and str(project) not in resolved, resolved


def test_one_checkpoint_named_from_two_directories_loads_once(project, monkeypatch):
    """`sd.safetensors` from the root and `../sd.safetensors` from sub/ are one model: a build loads it once (the
    pool's key was the plan's model with its `spec` as written)."""
    from scenec.build import pool

    (project / "sub").mkdir(exist_ok=True)
    (project / "a.yaml").write_text(SCENE.format(model="{id: sd.safetensors, config: sd}", name="a")
                                    .replace("<bad> ", ""))
    (project / "sub" / "b.yaml").write_text(SCENE.format(model="{id: ../sd.safetensors, config: ../sd}",
                                                         name="b").replace("<bad> ", ""))
    models = [compiled_model(project / "a.yaml", project), compiled_model(project / "sub" / "b.yaml", project / "sub")]
    assert models[0]["spec"] != models[1]["spec"]
    loads = []
    monkeypatch.setattr(pool, "load_model", lambda model, **kw: loads.append(model) or object())
    backends = pool.BackendPool()
    assert backends.get(models[0]) is backends.get(models[1]) and len(loads) == 1


def test_a_checkpoint_on_the_command_line_without_its_configs_says_what_works(project, tmp_path):
    """`--model sd.safetensors` with no SD 1.5 configs cached: the hint named `model: {id: FILE, config: DIR}`,
    which --model replaces; it says to name the checkpoint (and its configs) in the scene or scenec.toml instead."""
    (project / "m2.yaml").write_text(SCENE.format(model="tiny-sd", name="m2").replace("<bad> ", ""))
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", "m2.yaml", "--model", "sd.safetensors"],
                       capture_output=True, text=True, cwd=project,
                       env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty-hub"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "sd.safetensors` loads with the configs of" in r.stderr, r.stderr
    assert "hint: --model takes no `config`: name the checkpoint with its configs in the scene (`model: {id: FILE, " \
           "config: DIR}`) or in scenec.toml's `default_model`, and leave --model out" in r.stderr, r.stderr
