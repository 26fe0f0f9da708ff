"""`scenec train-adapter` (KV-mixed visual-prompt adapters, arXiv 2501.01424 §3) on the tiny models: training
lowers the loss over fixed evaluation noise while the model and the image encoder stay frozen; an
interrupted run resumed from its checkpoint ends with the uninterrupted run's weights; the written
adapter runs in a scene through `scenec build`, also after its folder moved; bad data folders are
reported at once, located, with exit status 2."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from scenec.cli import app
from scenec.runtime.testing import tiny_backend, tiny_sd_backend
from scenec.runtime.train_adapter import TrainConfig, Trainer, TrainExample

COLORS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (220, 200, 30)]


def make_data(d, n=4, size=64):
    """n images with a colored rectangle on a plain background, its mask, a caption; metadata.jsonl."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for k in range(n):
        img = np.zeros((size, size, 3), np.uint8)
        img[:] = rng.integers(150, 250, 3)
        m = np.zeros((size, size), np.uint8)
        y, x = 8 + 8 * k, 12 + 6 * k
        m[y:y + 24, x:x + 20] = 255
        img[m > 0] = COLORS[k % 4]
        Image.fromarray(img).save(d / f"{k}.png")
        Image.fromarray(m).save(d / f"{k}_mask.png")
        lines.append(json.dumps({"file_name": f"{k}.png", "mask": f"{k}_mask.png", "text": "a red fox"}))
    (d / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return [TrainExample(d / f"{k}.png", d / f"{k}_mask.png", "a red fox", f"line {k + 1}") for k in range(n)]


def trainer(examples, backend=None, **kw):
    cfg = TrainConfig(**{"model": "tiny", "steps": 4, "lr": 1e-2, "val_every": 0, "checkpoint_every": 0, **kw})
    return Trainer(cfg, examples[:3], examples[3:], backend=backend or tiny_backend())


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_training_lowers_the_loss_and_only_the_adapter_changes(tmp_path):
    t = trainer(make_data(tmp_path / "d"), steps=8, batch_size=2, lr=3e-2)
    frozen = snapshot(t.denoiser)
    encoder = snapshot(t.encoder)
    start = snapshot(t.adapter)
    before = t.evaluate(t.train)  # fixed noise and level per example
    t.fit()
    after = t.evaluate(t.train)
    assert after < before - 1e-3, (before, after)
    assert t.val_loss is not None and np.isfinite(t.val_loss)
    for k, v in snapshot(t.denoiser).items():
        assert torch.equal(v, frozen[k]), k
    for k, v in snapshot(t.encoder).items():
        assert torch.equal(v, encoder[k]), k
    moved = {k.split(".")[0] for k, v in snapshot(t.adapter).items() if not torch.equal(v, start[k])}
    assert moved == {"coarse", "fine", "to_k", "to_v"}  # all four parts learn


def test_sd_trains_through_decoupled_cross_attention(tmp_path):
    """ε-prediction on tiny-sd: the visual tokens enter every cross-attention (decoupled) and get gradients."""
    t = trainer(make_data(tmp_path / "d"), backend=tiny_sd_backend(), model="tiny-sd", steps=1)
    frozen = snapshot(t.denoiser)
    start = snapshot(t.adapter)
    assert all(".attn2" in n for n in t.layers)
    t.fit()
    assert np.isfinite(t.val_loss)
    assert all(torch.equal(v, frozen[k]) for k, v in snapshot(t.denoiser).items())
    assert {k.split(".")[0] for k, v in snapshot(t.adapter).items() if not torch.equal(v, start[k])} == \
        {"coarse", "fine", "to_k", "to_v"}


def test_an_interrupted_run_resumed_ends_as_the_uninterrupted_one(tmp_path, monkeypatch):
    import scenec.runtime.train_adapter as ta

    data = make_data(tmp_path / "d")
    drops = dict(drop_image=0.3, drop_text=0.3, drop_both=0.3)  # condition dropout draws from the checkpointed RNG
    seen = []
    real = ta.Trainer.loss
    monkeypatch.setattr(ta.Trainer, "loss", lambda self, *a: seen.append(a[4:]) or real(self, *a))
    whole = trainer(data, steps=4, checkpoint_every=2, batch_size=2, **drops)
    whole.fit(tmp_path / "a")
    assert len(set(seen)) > 1  # dropped and kept conditions both occurred
    cut = trainer(data, steps=4, checkpoint_every=2, batch_size=2, **drops)
    cut.fit(tmp_path / "b", stop_after=3)  # Ctrl-C after step 3: the checkpoint holds step 2
    assert cut.step == 3
    resumed = trainer(data, steps=4, checkpoint_every=2, batch_size=2, **drops)
    resumed.load_checkpoint(tmp_path / "b" / "last.pt")
    assert resumed.step == 2
    resumed.fit(tmp_path / "b")
    a, b = snapshot(whole.adapter), snapshot(resumed.adapter)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.val_loss == whole.val_loss
    other = trainer(data, steps=4, lr=2e-2)
    with pytest.raises(Exception, match="another run"):
        other.load_checkpoint(tmp_path / "b" / "last.pt")
    with pytest.raises(Exception, match="drop_text"):  # another dropout is another run
        trainer(data, steps=4, batch_size=2, **{**drops, "drop_text": 0.1}).load_checkpoint(tmp_path / "b" / "last.pt")


SCENE = """scenec: 1
model: tiny
canvas: {width: 64, height: 64}
sampler: {steps: 2, seed: 1}
background: {prompt: "a meadow"}
entities:
  - id: fox
    prompt: "a red fox"
    shape: {box: [0.0, 0.5, 0.5, 1.0]}
    visual: {image: fox.png, adapter: trained.safetensors}
"""


def test_cli_trains_resumes_and_the_adapter_builds_in_a_scene(tmp_path):
    make_data(tmp_path / "data")
    out = tmp_path / "adapters" / "trained.safetensors"
    args = ["train-adapter", str(tmp_path / "data"), "-o", str(out), "--steps", "2", "--val-every", "1",
            "--checkpoint-every", "1", "--val-fraction", "0.25"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "held-out loss" in r.output
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "scenec-kv-mixed/1" and meta["steps"] == "2" and meta["model"] == "tiny"
    assert np.isfinite(float(meta["val_loss"])) and meta["image_encoder"] == "trained.image_encoder"
    assert (meta["drop_image"], meta["drop_text"], meta["drop_both"]) == ("0.05", "0.05", "0.05")
    assert (out.parent / "trained.image_encoder" / "config.json").is_file()
    assert (tmp_path / "adapters" / "trained.safetensors.ckpt" / "last.pt").is_file()
    again = CliRunner().invoke(app, args)  # the same command: resumes (here: already done)
    assert again.exit_code == 0 and "resuming from" in again.output and "at step 2 of 2" in again.output
    other = CliRunner().invoke(app, args + ["--lr", "3e-4"])  # other settings: refused, saying what differs
    assert other.exit_code == 2 and "lr: 0.0001 there, 0.0003 now" in other.output
    fresh = CliRunner().invoke(app, args[:5] + ["1"] + args[6:] + ["--fresh"])
    assert fresh.exit_code == 0 and "starting over" in fresh.output
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["steps"] == "1"
    moved = tmp_path / "elsewhere"
    shutil.copytree(out.parent, moved)  # the folder moves as a whole: its image encoder is read beside it
    shutil.rmtree(out.parent)
    shutil.copy(tmp_path / "data" / "0.png", moved / "fox.png")
    (moved / "s.yaml").write_text(SCENE)
    b = CliRunner().invoke(app, ["build", str(moved / "s.yaml"), "-o", str(moved / "out")])
    assert b.exit_code == 0, b.output
    assert (moved / "out" / "s-1.png").is_file()


def test_bad_data_folders_are_reported_at_once_with_exit_2(tmp_path):
    d = tmp_path / "bad"
    make_data(d, n=2)
    (d / "broken.png").write_text("not an image")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(d / "small_mask.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(d / "empty_mask.png")
    lines = [
        json.dumps({"file_name": "0.png", "mask": "0_mask.png", "text": "ok"}),
        "{not json",
        json.dumps({"file_name": "0.png", "text": "no mask"}),
        json.dumps({"file_name": "missing.png", "mask": "0_mask.png", "text": "x"}),
        json.dumps({"file_name": "broken.png", "mask": "0_mask.png", "text": "x"}),
        json.dumps({"file_name": "1.png", "mask": "small_mask.png", "text": "x"}),
        json.dumps({"file_name": "1.png", "mask": "empty_mask.png", "text": "x"}),
        json.dumps({"file_name": "../bad/0.png", "mask": "../../x.png", "text": "x"}),
    ]
    (d / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    r = CliRunner().invoke(app, ["train-adapter", str(d), "-o", str(tmp_path / "a.safetensors"), "--lr", "0"])
    assert r.exit_code == 2, r.output
    meta = f"{d}/metadata.jsonl"
    for line, words in [(2, "not JSON"), (3, "`mask` missing"), (4, "does not exist"),
                        (5, "not a readable image"), (6, "is 32x32, the image 64x64"), (7, "is empty"),
                        (8, "leaves the data folder")]:
        assert any(ln.startswith(f"{meta}:{line}: ") and words in ln for ln in r.output.splitlines()), (line, r.output)
    assert "--lr 0.0: out of range" in r.output and "8 errors" in r.output  # the lr and lines 2-8
    assert "Traceback" not in r.output
    one = tmp_path / "one"
    make_data(one, n=1)
    r = CliRunner().invoke(app, ["train-adapter", str(one), "-o", str(tmp_path / "a.safetensors")])
    assert r.exit_code == 2 and "training needs at least 2" in r.output
    r = CliRunner().invoke(app, ["train-adapter", str(tmp_path / "nowhere"), "-o", str(tmp_path / "a.safetensors")])
    assert r.exit_code == 2 and "not a directory" in r.output
    ok = tmp_path / "ok"
    make_data(ok, n=2)
    r = CliRunner().invoke(app, ["train-adapter", str(ok), "-o", str(tmp_path / "a.safetensors"), "--dtype", "fp16",
                                 "--drop-image", "0.6", "--drop-text", "0.5"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "--dtype fp16: training in fp16 needs a gradient scaler" in r.output and "use --dtype bf16" in r.output
    assert "--drop-both = 1.15: at most 1" in r.output and "2 errors" in r.output
    assert not (tmp_path / "a.safetensors").exists()


def test_the_trained_region_is_the_one_inference_uses_and_the_crop_is_gray_outside(tmp_path):
    """The cells a training example's visual tokens reach are the tokens a scene's `shape: {mask: …}` region
    holds at inference (coverage > 0 on every grid); the crop keeps the object and grays the rest."""
    from scenec.compiler import compile_scene
    from scenec.runtime.families.flux import FluxBackend
    from scenec.runtime.families.sd import SDBackend
    from scenec.runtime.layout import region_membership
    from scenec.runtime.train_data_prep import GRAY, cells, object_crop

    make_data(tmp_path, n=2)
    for model, be in (("tiny", FluxBackend), ("tiny-sd", SDBackend)):
        (tmp_path / "s.yaml").write_text(SCENE.replace("model: tiny", f"model: {model}").replace(
            "{box: [0.0, 0.5, 0.5, 1.0]}", "{mask: 1_mask.png}").replace(
            "    visual: {image: fox.png, adapter: trained.safetensors}\n", ""))
        plan = compile_scene(tmp_path / "s.yaml")
        masks = plan.jobs[0].entities[0].masks
        mask = np.asarray(Image.open(tmp_path / "1_mask.png")) > 127
        px = {"token": 16, "latent": 8, "a16": 16, "a32": 32, "a64": 64}
        for g in be.image_grids:
            grid = plan.grid(g)
            want = region_membership([plan.mask(masks, g)], grid)[0]
            assert torch.equal(cells(mask, px[g], grid), want), (model, g)
    rgb = np.asarray(Image.open(tmp_path / "1.png").convert("RGB"))
    crop = object_crop(rgb, mask)
    assert crop.shape == (24, 24, 3)  # the 24x20 box, padded to a square
    assert (crop[:, :2] == GRAY).all() and (crop[:, -2:] == GRAY).all()
    assert (crop[:, 2:22] == COLORS[1]).all()


def test_the_trainers_crop_is_the_compiled_plans_image_of_the_same_object(tmp_path):
    """The object as a transparent cut-out (its mask's bounding box, alpha = the mask) in a scene gives the
    plan image the trainer's crop of that object is: gray outside the mask, centred in a gray square."""
    from scenec.compiler import compile_scene
    from scenec.runtime.train_data_prep import object_crop

    make_data(tmp_path, n=2)
    rgb = np.asarray(Image.open(tmp_path / "1.png").convert("RGB"))
    mask = np.asarray(Image.open(tmp_path / "1_mask.png")) > 127
    mask[20:24, 22:26] = False  # a hole: the mask is not its box
    ys, xs = np.nonzero(mask)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    cut = np.dstack([rgb[box], np.where(mask[box], 255, 0).astype(np.uint8)])
    Image.fromarray(cut, "RGBA").save(tmp_path / "fox.png")
    (tmp_path / "s.yaml").write_text(SCENE.replace("adapter: trained.safetensors", "mode: kv-mixed"))
    img = compile_scene(tmp_path / "s.yaml").tensor("visual/fox/image")
    crop = object_crop(rgb, mask)
    assert crop.shape == (24, 24, 3) and (crop[5, 7] == 128).all()  # the hole (box at 16, 18; +2 padding) is gray
    np.testing.assert_array_equal(img, crop)


def test_dropping_the_image_uses_the_runtimes_negative_tokens_and_dropping_text_an_empty_caption(tmp_path,
                                                                                                   monkeypatch):
    """Condition dropout (IP-Adapter, arXiv 2308.06721 §4.1): a dropped image is the tokens the runtime's
    negative branch uses (``_encode``), a dropped text the empty caption; kept ones are the crop's and the caption."""
    import scenec.runtime.train_adapter as ta
    from scenec.runtime.methods.visual import _encode

    data = make_data(tmp_path / "d")
    seen = []

    class Spy(ta.VisualPrompt):
        def __init__(self, vp, adapter, pos, neg, *a, **kw):
            seen.append(tuple(t.detach().clone() for t in pos))
            super().__init__(vp, adapter, pos, neg, *a, **kw)

    class RunSpy(ta.Run):
        def __init__(self, be, jobs):
            seen.append(jobs[0][0].prompts[0])
            super().__init__(be, jobs)

    monkeypatch.setattr(ta, "VisualPrompt", Spy)
    monkeypatch.setattr(ta, "Run", RunSpy)
    for drops, text in (((1.0, 0.0, 0.0), "a red fox"), ((0.0, 1.0, 0.0), ""), ((0.0, 0.0, 1.0), ""),
                        ((0.0, 0.0, 0.0), "a red fox")):
        t = trainer(data, **dict(zip(("drop_image", "drop_text", "drop_both"), drops)))
        rgb = object_crop_of(t)
        pos, neg = _encode(t.encoder, t.proc, t.adapter, rgb, "cpu")  # before the step changes the adapter
        seen.clear()
        t.train_step()
        toks, caption = seen
        assert caption == text
        want = neg if drops[0] or drops[2] else None
        if want is not None:
            assert all(torch.equal(a, b) for a, b in zip(toks, want)), drops
        else:  # the crop's (augmented) tokens: not the negative ones
            assert not torch.allclose(toks[1], neg[1]), drops


def object_crop_of(t):
    return t.prepare(t.train[0]).crop


def test_flux_adapter_starts_with_zero_values_sd_with_the_text_projections(tmp_path):
    """to_v is zero on Flux (joint attention: the tokens add nothing at step 0 beyond the softmax mass they
    take); SD's cross-attention copies the layer's text to_v where the widths match (IP-Adapter's init)."""
    data = make_data(tmp_path / "d")
    t = trainer(data)
    assert t.adapter.to_v and all(not lin.weight.any() for lin in t.adapter.to_v.values())
    assert any(lin.weight.any() for lin in t.adapter.to_k.values())
    s = trainer(data, backend=tiny_sd_backend(), model="tiny-sd")
    for name, mod in s.layers.items():
        from scenec.runtime.methods.visual import layer_key

        v = s.adapter.to_v[layer_key(name)].weight
        if v.shape == mod.to_v.weight.shape:
            assert torch.equal(v, mod.to_v.weight.float())


@pytest.mark.parametrize("model", ["tiny", "tiny-sd"])
def test_the_loss_is_the_models_own_with_the_visual_tokens_out_of_sight(tmp_path, model):
    """With the region empty the loss is diffusers' own, computed by hand: Flux's transformer at σ on the
    packed x_σ = (1−σ)x₀ + σε (FluxPipeline's packing, ids and guidance), target ε − x₀; SD's UNet at t on
    DDPM ``add_noise``, target ε."""
    from diffusers import DDPMScheduler

    from scenec.compiler.caps import model_info

    be = tiny_backend() if model == "tiny" else tiny_sd_backend()
    t = trainer(make_data(tmp_path / "d"), backend=be, model=model)
    p = t.prepare(t.train[0])
    p.visible = {n: torch.zeros_like(v) for n, v in p.visible.items()}
    noise = torch.randn(p.x0.shape, generator=torch.Generator().manual_seed(5))
    u = 0.3217
    got = float(t.loss(p, Image.fromarray(p.crop), noise, u).detach())
    i = int(u * 1000)
    x0, pipe = p.x0.float(), be.pipe
    W, H = p.plan.canvas
    with torch.no_grad():
        if model == "tiny":
            sigma = (i + 1) / 1000
            xt = (1 - sigma) * x0 + sigma * noise
            seq, pooled, txt_ids = pipe.encode_prompt(prompt="a red fox", prompt_2=None, device="cpu",
                                                      max_sequence_length=int(p.plan.model.max_sequence_length or 512))
            _, img_ids = pipe.prepare_latents(1, pipe.transformer.config.in_channels // 4, H, W, torch.float32, "cpu",
                                              torch.Generator().manual_seed(0))
            out = pipe.transformer(hidden_states=xt, timestep=torch.tensor([sigma]),
                                   guidance=torch.tensor([float(model_info(model).guidance)]),
                                   pooled_projections=pooled, encoder_hidden_states=seq, txt_ids=txt_ids,
                                   img_ids=img_ids, return_dict=False)[0]
            target = noise - x0
        else:
            ts = torch.tensor([i])
            xt = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(x0, noise, ts)
            emb = pipe.encode_prompt("a red fox", "cpu", 1, False)[0]
            out = pipe.unet(xt, ts, encoder_hidden_states=emb, return_dict=False)[0]
            target = noise
    want = float(torch.nn.functional.mse_loss(out, target))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    wrong = float(torch.nn.functional.mse_loss(out, noise if model == "tiny" else noise - x0))
    assert got != pytest.approx(wrong, rel=1e-3)  # the test tells the targets apart


def test_cli_refuses_before_training_what_would_fail_later(tmp_path):
    """A CUDA device torch cannot see and an output under a file are refused at once (exit 2), before the
    model loads; an `image_encoder/` already beside the output (h94's layout) is left alone."""
    import torch

    make_data(tmp_path / "data")
    (tmp_path / "afile").write_text("x")
    bad = ["--steps", "1"] + (["--device", "cuda"] if not torch.cuda.is_available() else [])
    data = str(tmp_path / "data")
    r = CliRunner().invoke(app, ["train-adapter", data, "-o", str(tmp_path / "afile" / "a.safetensors"), *bad])
    assert r.exit_code == 2 and "is not a directory" in r.output, r.output
    if not torch.cuda.is_available():
        assert "--device cuda needs a CUDA GPU" in r.output
    shared = tmp_path / "ip" / "image_encoder"
    shared.mkdir(parents=True)
    (shared / "config.json").write_text('{"precious": true}')
    r = CliRunner().invoke(app, ["train-adapter", data, "-o", str(tmp_path / "ip" / "mine.safetensors"), "--steps", "1",
                                 "--val-fraction", "0.25"])
    assert r.exit_code == 0, r.output
    assert (shared / "config.json").read_text() == '{"precious": true}'
    assert (tmp_path / "ip" / "mine.image_encoder" / "config.json").is_file()
