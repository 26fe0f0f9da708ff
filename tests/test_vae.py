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


def test_a_big_vae_file_is_hashed_once_per_build_process(tmp_path, vaes, monkeypatch):
    """The embedded scene lists the VAE file with its sha256 (compiler/provenance.py): hashed with sha256_file
    for every scene compiled, twice per scene with the plan's own digest — a 335 MB VAE read again for each scene
    of a build. Now remembered as the plan's digest is (fsio.sha256_big_file)."""
    import hashlib
    import shutil
    from pathlib import Path

    from scenec.spec import fsio

    _, _, file = vaes
    shutil.copy(file, tmp_path / "vae.safetensors")
    monkeypatch.setattr(fsio, "BIG_FILE", 4)
    calls = []
    monkeypatch.setattr(fsio, "sha256_file",
                        lambda p: calls.append(Path(p).name) or hashlib.sha256(Path(p).read_bytes()).hexdigest())
    for _ in range(3):
        compile_scene(write(tmp_path, "vae.safetensors"))
    assert calls.count("vae.safetensors") == 1, calls


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_under_offload_the_plans_vae_is_offloaded_as_the_models_own(vaes, offload):
    """``--offload model``: the model's VAE hook puts the UNet back on the CPU when the VAE runs
    (enable_model_cpu_offload's chain). The plan's VAE was swapped in unhooked and on the device for good: the UNet
    stayed on the device through the decode (and the next plan's text encoding); a Flux transformer beside T5
    defeats --offload. Now it is hooked after the UNet as the model's own and offloaded when the run ends; under
    ``sequential`` it streams from the CPU. Same pixels as without offload."""
    import accelerate.hooks

    _, directory, _ = vaes
    ref = image(load_backend("tiny-sd", device="cpu", dtype="fp32"), plan(directory))
    if offload == "model":
        be = load_backend("tiny-sd", device="cpu", dtype="fp32", offload=offload)
    else:  # the CPU runs no sequentially offloaded CLIP (accelerate): only the VAE's placement is under test
        be = load_backend("tiny-sd", device="cpu", dtype="fp32")
        be.memory = {**be.memory, "offload": offload}
    unet = be.pipe.unet
    moved = []
    real = accelerate.hooks.UserCpuOffloadHook.offload
    accelerate.hooks.UserCpuOffloadHook.offload = lambda self: moved.append(type(self.model).__name__) or real(self)
    try:
        ours = image(be, plan(directory))
    finally:
        accelerate.hooks.UserCpuOffloadHook.offload = real
    assert np.array_equal(ours, ref)
    vae = be.vaes[next(iter(be.vaes))]
    assert hasattr(vae, "_hf_hook") and be.pipe.unet is unet
    if offload == "model":  # hooked after the UNet (on a CPU 'device' the UNet never has to move: structure only)
        assert vae._hf_hook.prev_module_hook is be.pipe.vae._hf_hook.prev_module_hook
        assert type(vae._hf_hook.prev_module_hook.model).__name__ == "UNet2DConditionModel"
        assert moved == ["AutoencoderKL"]  # back on the CPU when the run ends
    else:
        assert {p.device.type for p in vae.parameters()} == {"meta"}


def test_a_method_whose_close_fails_leaves_the_models_own_vae(vaes, monkeypatch):
    """Run.close stopped at the first method whose close raised: a method before the VAE's (LoRA's) failing left
    the plan's VAE in the pipeline for every later plan on the backend."""
    from scenec.runtime import sampler
    from scenec.runtime.methods.base import Method
    from scenec.runtime.methods.vae import Vae

    class Failing(Method):
        name = "failing"

        @classmethod
        def wants(cls, plan, job):
            return True

        def capabilities(self):
            return ()

        def close(self):
            raise RuntimeError("close failed")

    _, directory, _ = vaes
    be = load_backend("tiny-sd", device="cpu", dtype="fp32")
    own = be.pipe.vae
    monkeypatch.setattr(sampler, "registered", lambda: [Failing, Vae])
    p = plan(directory)
    with pytest.raises(RuntimeError, match="close failed"):
        run_job(be, p, p.jobs[0])
    assert be.pipe.vae is own


def test_a_vae_directory_with_another_latent_scale_is_a_warning(tmp_path, vaes):
    """The runtime scales latents by the plan's VAE's config (diffusers' pipelines do; A1111/ComfyUI use the
    model's): a directory whose scaling_factor is not the model's (an SDXL VAE on an SD 1.x model, a config
    without the key) decoded off without a word."""
    import json
    import shutil

    from diffusers import StableDiffusionPipeline

    from scenec.compiler.check import validate_file
    from scenec.runtime.tiny_sd import build_tiny_sd

    _, directory, _ = vaes
    StableDiffusionPipeline(**build_tiny_sd()).save_pretrained(tmp_path / "model")
    shutil.copytree(directory, tmp_path / "same")
    shutil.copytree(directory, tmp_path / "other")
    cfg = json.loads((tmp_path / "other" / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(json.dumps({**cfg, "scaling_factor": 0.13025}))
    (tmp_path / "scenec.toml").write_text("")
    for vae, n in (("same", 0), ("other", 1)):
        f = tmp_path / "s.yaml"
        f.write_text(SCENE.replace("tiny-sd", "model").replace("VAE", vae))
        _, diags = validate_file(f)
        notes = [d.message for d in diags if "scaling_factor" in d.message]
        assert len(notes) == n and not [d for d in diags if d.severity == "error"], [d.message for d in diags]
    assert f"is 0.13025, the model's {cfg['scaling_factor']}" in notes[0]


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


def test_explain_names_the_vae_as_the_scene_does(tmp_path, vaes):
    import shutil

    from scenec.compiler import explain

    shutil.copytree(vaes[1], tmp_path / "vae-dir")
    text = explain(write(tmp_path, "vae-dir"), after="check")
    assert ' vae="vae-dir"\n' in text and str(tmp_path) not in text, text
