"""A VAE replacing the model's (``model: {id, vae}``): a job equals diffusers' pipeline given that VAE, from a
diffusers directory or a single .safetensors file (LDM layout, read with the model's VAE config); the model's own
VAE is back after the plan; the backend is shared across plans with different VAEs; bad VAEs are located errors."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file

from scenec.build.keys import model_identity
from scenec.build.pool import BackendPool
from scenec.compiler import compile_scene
from scenec.runtime.families import load_backend
from scenec.runtime.sampler import run_job
from scenec.runtime.testing import sd_plan

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from ldm_layout import vae_to_ldm  # noqa: E402 - tests/ldm_layout.py, beside this file

STEPS = 2


def other_vae():
    """tiny-sd's VAE with every weight moved: another VAE of the same shape."""
    from scenec.runtime.tiny_sd import build_tiny_sd

    vae = copy.deepcopy(build_tiny_sd()["vae"])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return vae


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    vae = other_vae()
    vae.save_pretrained(d / "dir", safe_serialization=True)
    sd = {k[len("first_stage_model."):]: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}
    save_file(sd, str(d / "vae-ft.safetensors"))
    return vae, d / "dir", d / "vae-ft.safetensors"


def plan(vae=None, sha=None):
    def edit(d, t):
        if vae is not None:
            d["model"]["vae"] = str(vae)
            d["model"]["vae_sha256"] = sha
    return sd_plan(steps=STEPS, edit=edit, seed=4, width=64, height=64, prompt="a fox", negative="blurry")


def image(be, p):
    return np.asarray(run_job(be, p, p.jobs[0]).image)


def test_a_vae_directory_or_file_decodes_as_diffusers_with_that_vae(vaes):
    from diffusers import StableDiffusionPipeline

    from scenec.runtime.tiny_sd import build_tiny_sd

    vae, directory, file = vaes
    be = load_backend("tiny-sd", device="cpu", dtype="fp32")
    own = be.pipe.vae
    before = image(be, plan())
    parts = build_tiny_sd()
    parts["vae"] = vae
    pipe = StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    ref = np.asarray(pipe("a fox", negative_prompt="blurry", height=64, width=64, num_inference_steps=STEPS,
                          guidance_scale=7.5, generator=torch.Generator().manual_seed(4)).images[0])
    for where in (directory, file):
        ours = image(be, plan(where, "x" if where == file else None))
        print(f"{where.name}: pixels differing from diffusers {int((ours != ref).any(-1).sum())}")
        assert np.array_equal(ours, ref)
        assert be.pipe.vae is own  # the model's own VAE again after the run
    assert not np.array_equal(before, ref)  # the VAE acts
    assert np.array_equal(image(be, plan()), before)


def test_plans_with_different_vaes_share_one_loaded_model(vaes):
    _, directory, file = vaes
    pool = BackendPool(device="cpu", dtype="fp32")
    base = plan().json["model"]
    assert pool.get(base) is pool.get({**base, "vae": str(directory)}) is pool.get({**base, "vae": str(file)})
    extras = ({}, {"vae": str(directory)}, {"vae": str(file), "vae_sha256": "ab"},
              {"vae": str(file), "vae_sha256": "cd"})
    ids = {json_key(model_identity({**base, "repo": "x", "spec": "tiny-sd", **extra})) for extra in extras}
    assert len(ids) == 4  # the cache key follows the VAE


def json_key(d):
    import json

    return json.dumps(d, sort_keys=True)


SCENE = "scenec: 1\nmodel: {id: tiny-sd, vae: VAE}\ncanvas: {width: 64, height: 64}\nbackground: {prompt: a fox}\n"


def write(tmp_path, vae):
    f = tmp_path / "s.yaml"
    f.write_text(SCENE.replace("VAE", vae))
    return f


def validate(f):
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", str(f)], capture_output=True, text=True)
    return r.returncode, r.stderr


def test_the_plan_carries_the_vae_and_the_file_digest(tmp_path, vaes):
    import shutil

    _, directory, file = vaes
    shutil.copytree(directory, tmp_path / "vae-dir")
    shutil.copy(file, tmp_path / "vae.safetensors")
    p = compile_scene(write(tmp_path, "vae-dir"))
    assert p.json["model"]["vae"] == str((tmp_path / "vae-dir").resolve()) and "vae_sha256" not in p.json["model"]
    q = compile_scene(write(tmp_path, "vae.safetensors"))
    assert len(q.json["model"]["vae_sha256"]) == 64 and q.jobs[0].job_hash != p.jobs[0].job_hash
    assert "vae: vae.safetensors" in q.doc.scene.resolved
    (tmp_path / "s.yaml").write_text(SCENE.replace("{id: tiny-sd, vae: VAE}", "tiny-sd"))
    assert "vae" not in compile_scene(tmp_path / "s.yaml").json["model"]  # plans without one keep their hashes


def test_bad_vaes_are_located_errors(tmp_path):
    (tmp_path / "flux-vae.safetensors").write_bytes(b"")
    save_np({"decoder.conv_in.weight": np.zeros((8, 16, 3, 3), np.float32)}, str(tmp_path / "flux-vae.safetensors"))
    save_np({"lora_up.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "lora.safetensors"))
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "old.ckpt").write_bytes(b"x")
    cases = {
        "flux-vae.safetensors": "this VAE has 16 latent channels; sd models such as `tiny-sd` use 4",
        "lora.safetensors": "holds no VAE decoder",
        "empty-dir": "is not a diffusers AutoencoderKL directory (no config.json)",
        "old.ckpt": "is a pickle file",
        "missing.safetensors": "VAE `missing.safetensors` not found",
        "someone/missing-vae": "no hub id `someone/missing-vae` in the Hugging Face cache (`hf download someone/",
    }
    for vae, message in cases.items():
        rc, err = validate(write(tmp_path, vae))
        assert rc == 2 and "s.yaml:2:27: error: " in err and message in err and "Traceback" not in err, (vae, err)
    # a path out of the project: the hint says what to do about that, not what a VAE is
    from scenec.compiler.check import validate_file

    _, diags = validate_file(write(tmp_path, "../vae.safetensors"))
    (e,) = diags.errors
    assert "outside the project root" in e.message and "inside the project" in e.hint, (e.message, e.hint)
    (tmp_path / "sd" / "vae").mkdir(parents=True)  # a model directory named as the VAE: its vae/ is meant
    (tmp_path / "sd" / "vae" / "config.json").write_text("{}")
    _, diags = validate_file(write(tmp_path, "sd"))
    assert "its VAE is `sd/vae`" in diags.errors[0].message


def test_the_project_file_sets_a_vae_for_scenes_without_a_model(tmp_path, vaes):
    import shutil

    _, directory, _ = vaes
    shutil.copytree(directory, tmp_path / "vae" / "ft")
    (tmp_path / "scenes").mkdir()
    (tmp_path / "scenec.toml").write_text('[project]\ndefault_model = {id = "tiny-sd", vae = "vae/ft"}\n')
    f = tmp_path / "scenes" / "s.yaml"
    f.write_text("scenec: 1\ncanvas: {width: 64, height: 64}\nbackground: {prompt: a fox}\n")
    assert compile_scene(f).json["model"]["vae"] == str((tmp_path / "vae" / "ft").resolve())
    (tmp_path / "scenec.toml").write_text('[project]\ndefault_model = {id = "tiny-sd", vae = "vae/none"}\n')
    rc, err = validate(f)
    assert rc == 2 and "scenec.toml:2:1: error: VAE `vae/none` not found" in err, err


def test_a_hub_vae_is_compiled_again_when_the_cache_resolves_another_revision(tmp_path, vaes, monkeypatch):
    """`hf download` of a new revision moves refs/main: the build's compile memo must not replay the plan that
    names the old snapshot (its images would keep the old VAE and never count as stale)."""
    import shutil

    from scenec.build import memo
    from scenec.spec.fsio import recording_inputs

    _, directory, _ = vaes
    repo = tmp_path / "hub" / "models--someone--vae"
    shutil.copytree(directory, repo / "snapshots" / "r1")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("r1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("SCENEC_CACHE", str(tmp_path / "cache"))
    f = write(tmp_path, "someone/vae")
    with recording_inputs() as inputs:
        p = compile_scene(f)
    assert p.json["model"]["vae"] == str(repo / "snapshots" / "r1")
    memo.store(f, None, list(inputs), p.json, [])
    assert memo.load(f, None) is not None  # nothing changed: replayed
    shutil.copytree(directory, repo / "snapshots" / "r2")
    (repo / "refs" / "main").write_text("r2")
    assert memo.load(f, None) is None
    assert compile_scene(f).json["model"]["vae"] == str(repo / "snapshots" / "r2")
