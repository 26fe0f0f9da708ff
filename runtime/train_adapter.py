"""Training a KV-mixed visual-prompt adapter (Parmar et al., "Object-level Visual Prompts for
Compositional Image Generation", arXiv 2501.01424, §3) on images with object masks and captions.

The diffusion model and the image encoder stay frozen; the adapter (runtime/methods/visual.py:
``KVMixedAdapter``: the coarse ``ImageProjection`` giving keys, the fine Perceiver resampler giving
values, and each attention layer's ``to_k``/``to_v``) is what learns. For one example:

1. the **visual prompt** is the object cut from the same image (the paper's training data, §3): the
   mask's bounding box, gray (128) outside the mask, padded to a gray square, with augmentation (a
   random horizontal flip and the object scaled by 0.8–1 at a random place in the square) so the
   adapter learns the object's look rather than a pasted copy of its pixels;
2. its tokens join the attention of the **mask region's** image tokens only, through the same path
   inference uses (``ExtraKV`` modifiers, ``runtime/attention.attend``; joint on Flux, decoupled
   cross-attention on SD/SDXL), in one model call made by the family itself
   (:func:`runtime.sampler.model_output`: its text assembly, latents and forward, unguided, on the
   caption as the global prompt);
3. the **loss** is the model's own: flow matching on Flux (x_σ = (1−σ)x₀ + σε, target ε − x₀, σ drawn
   uniformly from the scheduler's 1000 training levels, as diffusers' Flux training scripts with
   ``weighting_scheme=none``), ε-prediction on SD/SDXL (DDPM ``add_noise`` at t ~ U{0..999}, target ε,
   or v for v-prediction models, as ``train_text_to_image.py``);
4. **condition dropout** (IP-Adapter, Ye et al., arXiv 2308.06721 §4.1): with probability ``drop_image``
   the visual prompt is replaced by the runtime's negative-branch input (zero pixel values:
   ``methods.visual.negative_pixels``), with ``drop_text`` the caption by an empty one, with
   ``drop_both`` both (0.05 each by default, as IP-Adapter), so the inputs CFG's negative branch gives
   mean "no condition" to the adapter.

The crop, its augmentation, the region and the one-job plan are ``runtime/train_data_prep.py``.

Each example is its own forward (its region differs), so ``batch_size`` examples are accumulated per
optimizer step. Every random draw comes from one CPU generator whose state is checkpointed with the
weights and the optimizer, so an interrupted run resumed from its checkpoint computes what an
uninterrupted one does. The held-out loss uses fixed noise and σ per example (comparable across
evaluations) and no augmentation.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from scenec.spec.errors import NonFinite, PlanError

from .attention import ExtraKV
from .cache import TextCache
from .methods.visual import KVMixedAdapter, VisualPrompt, attention_layers, layer_key, negative_pixels, save_adapter
from .sampler import Run, model_output
from .solvers import DDIM, FlowEuler
from .train_data_prep import Prepared, augment, cells, object_crop, training_plan

CKPT_FORMAT = "scenec-train-ckpt/1"
FP16 = ("--dtype fp16: training in fp16 needs a gradient scaler, which scenec does not have; use --dtype bf16 "
        "(CUDA) or fp32")
TINY = ("tiny", "tiny-sd", "tiny-sdxl")
PREPARED = 512  # examples kept prepared (latent, crop, region) at once


@dataclass
class TrainExample:
    """One example: image and mask files (white = the object, same size) and its caption; ``where`` names
    it in messages (``DATA/metadata.jsonl:LINE``)."""

    image: Path
    mask: Path
    text: str
    where: str = ""


@dataclass
class TrainConfig:
    """What a run is (``identity`` of it must match to resume) and how it is reported."""

    model: str = "tiny"
    steps: int = 500
    lr: float = 1e-4
    batch_size: int = 1
    tokens: int | None = None  # M; default 4 on the tiny models, 16 (IP-Adapter Plus) otherwise
    seed: int = 0
    resolution: int = 512  # the longer side at most (images are scaled down, never up)
    image_encoder: str | None = None  # a local CLIPVisionModel directory (tiny models: built in)
    device: str | None = None
    dtype: str | None = None
    val_every: int = 50
    checkpoint_every: int = 100
    data: str = ""  # a digest of the examples (files and captions)
    drop_image: float = 0.05  # condition dropout (IP-Adapter, arXiv 2308.06721 §4.1): the image alone,
    drop_text: float = 0.05  # the caption alone,
    drop_both: float = 0.05  # both at once
    extra: dict = field(default_factory=dict)

    def identity(self) -> dict:
        keep = ("model", "lr", "batch_size", "tokens", "seed", "resolution", "image_encoder", "data",
                "drop_image", "drop_text", "drop_both")
        return {k: v for k, v in asdict(self).items() if k in keep}


# --- the trainer ----------------------------------------------------------------------------------

class Trainer:
    """Trains an adapter for a loaded backend (module docstring). ``train``/``val``: the examples."""

    def __init__(self, cfg: TrainConfig, train: list[TrainExample], val: list[TrainExample], backend=None):
        from scenec.compiler.caps import model_info

        from .families import as_model, load_backend

        if not train or not val:
            raise PlanError("training needs at least one training and one held-out example")
        drops = (cfg.drop_image, cfg.drop_text, cfg.drop_both)
        if not all(0 <= d <= 1 for d in drops) or sum(drops) > 1:
            raise PlanError(f"condition dropout {drops}: each in [0, 1], together at most 1")
        self.cfg, self.train, self.val = cfg, train, val
        self.model = as_model(cfg.model)
        self.info = model_info(cfg.model)
        dtype = cfg.dtype
        if dtype is None and str(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
            dtype = "bf16"  # not the SD families' fp16 default: no gradient scaler here
        self.be = backend or load_backend(self.model, device=cfg.device, dtype=dtype)
        if next(self.be.denoiser.parameters()).dtype == torch.float16:
            raise PlanError(FP16)
        self.tiny = self.be.model_id in TINY
        self.denoiser = self.be.denoiser
        self.denoiser.requires_grad_(False)  # frozen: only the adapter learns (and nothing else holds grads)
        self.joint = {s.name for s in self.be.sites if s.text and s.image_keys}
        self.cross = {s.name for s in self.be.sites if s.text and not s.image_keys}
        self.layers = attention_layers(self.denoiser, self.joint | self.cross)
        self.names = {id(m): layer_key(n) for n, m in self.layers.items()}
        self.encoder, self.proc = self._encoder()
        self.adapter = self._adapter()
        self.params = list(self.adapter.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=1e-2)  # IP-Adapter's optimiser
        self.gen = torch.Generator("cpu").manual_seed(int(cfg.seed))
        self.step = 0
        self.val_loss: float | None = None
        self._prepared = TextCache(PREPARED)  # an LRU (runtime/cache.py)
        if self.be.family != "flux":
            from diffusers import DDPMScheduler

            self.sched = DDPMScheduler.from_config(self.be.pipe.scheduler.config)  # the training noise (q(x_t|x_0))

    # -- setup ---------------------------------------------------------------------------------------
    def _encoder(self):
        from .methods.visual import image_encoder
        from .tiny import tiny_clip_vision

        if self.cfg.image_encoder:
            enc, proc = image_encoder(self.cfg.image_encoder)
        elif self.tiny:
            enc, proc = tiny_clip_vision()
        else:
            raise PlanError(f"{self.cfg.model}: give the image encoder (--image-encoder DIR, a local "
                            "CLIPVisionModel directory); only the tiny models have one built in")
        return enc.to(self.be.device, torch.float32).requires_grad_(False), proc

    @staticmethod
    def _text_kv(mod) -> tuple:
        """The layer's own key/value projections of text (SD ``attn2.to_k/to_v``; Flux ``add_k/v_proj``
        on dual-stream blocks, ``to_k/to_v`` on single-stream ones)."""
        if getattr(mod, "add_k_proj", None) is not None:
            return mod.add_k_proj, mod.add_v_proj
        return mod.to_k, mod.to_v

    def _adapter(self) -> KVMixedAdapter:
        """A fresh adapter (seeded); each layer's to_k/to_v starts as that layer's text projections where
        the widths match (IP-Adapter's initialisation of to_k_ip/to_v_ip, arXiv 2308.06721, §3.2). ``to_v``
        starts at zero where it is not copied, and always on joint-attention sites (Flux): the extra tokens'
        values are then zero and they add nothing to any output but take some softmax mass (their keys are
        not zero), so at step 0 the model's output with the tokens is the one without them scaled by the
        share of attention left to the image and text (exactly equal would need e.g. a large negative key
        bias, which would also starve to_k of gradient: not done). On Flux the widths differ anyway
        (3072-wide text projections, 768-wide tokens); on SD/SDXL cross-attention the copy stays."""
        widths = {self._text_kv(m)[0].in_features for m in self.layers.values()}
        w = widths.pop() if len(widths) == 1 else 768
        dim = w if w <= 2048 else 768
        tiny = self.tiny
        c = dict(tokens=self.cfg.tokens or (4 if tiny else 16), dim=dim,
                 embed_dim=self.encoder.config.hidden_size, hidden_dim=dim, depth=1 if tiny else 4,
                 heads=2 if tiny else max(1, dim // 64), dim_head=8 if tiny else 64,
                 layers={n: m.to_k.out_features for n, m in self.layers.items()})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.cfg.seed))
            ad = KVMixedAdapter(c)
        with torch.no_grad():
            for n, m in self.layers.items():
                tk, tv = self._text_kv(m)
                for src, dst in ((tk, ad.to_k[layer_key(n)]), (tv, ad.to_v[layer_key(n)])):
                    if src.weight.shape == dst.weight.shape and not (dst is ad.to_v[layer_key(n)] and
                                                                     m.processor.site.name in self.joint):
                        dst.weight.copy_(src.weight.float())
                    elif dst is ad.to_v[layer_key(n)]:
                        dst.weight.zero_()
        return ad.to(self.be.device, torch.float32).train()

    def prepare(self, ex: TrainExample) -> Prepared:
        """Load an example: scaled to the resolution (sides a multiple of the family's), encoded with the
        VAE (deterministic), its crop and its region on each attention grid."""
        from PIL import Image, ImageOps

        fam = self.info.family
        with Image.open(ex.image) as im:  # upright, as viewers show a phone photo (its EXIF Orientation)
            rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        with Image.open(ex.mask) as im:
            mask = np.asarray(ImageOps.exif_transpose(im).convert("L")) > 127
        h, w = mask.shape
        f = min(1.0, self.cfg.resolution / max(h, w))
        m = fam.multiple
        W, H = max(m, int(w * f) // m * m), max(m, int(h * f) // m * m)
        img = np.asarray(Image.fromarray(rgb).resize((W, H), Image.LANCZOS))
        small = np.asarray(Image.fromarray(mask).resize((W, H), Image.NEAREST))
        if not small.any():
            raise PlanError(f"{ex.where}: the mask vanishes at {W}x{H} (raise --resolution)")
        guidance = float(self.info.guidance) if fam.name == "flux" else 1.0  # SD: the conditional branch only
        plan = training_plan(self.model, fam, W, H, ex.text, guidance)
        blank = training_plan(self.model, fam, W, H, "", guidance)
        x0 = self.be.encode_image(img).to("cpu", copy=True)  # a copy: out of inference mode
        px = dict(fam.grids)
        visible = {}
        for g in self.be.image_grids:
            gh, gw = plan.grid(g)
            visible[gh * gw] = cells(small, px[g], (gh, gw))
        return Prepared(plan, blank, x0, object_crop(rgb, mask, 256), visible)

    def _get(self, examples: list[TrainExample], i: int) -> Prepared:
        key = id(examples[i])
        if key not in self._prepared:  # bounded: a large data set is prepared again when it comes round
            self._prepared[key] = self.prepare(examples[i])
        return self._prepared[key]

    # -- the loss ------------------------------------------------------------------------------------
    def loss(self, p: Prepared, image, noise: torch.Tensor, u: float, drop_image: bool = False,
             drop_text: bool = False) -> torch.Tensor:
        """The model's own diffusion loss on one example with the visual prompt ``image`` (PIL) in its
        region, at noise ``noise`` and level ``u`` ∈ [0, 1) (module docstring); ``drop_image``: the
        runtime's "no image" input instead (its negative branch's, ``negative_pixels``), ``drop_text``: an
        empty caption (condition dropout, module docstring)."""
        dev = self.be.device
        pix = self.proc(images=image, return_tensors="pt").pixel_values.to(dev, torch.float32)
        if drop_image:
            pix = negative_pixels(self.adapter, self.proc, pix, np.asarray(image)).to(dev, torch.float32)
        with torch.no_grad():
            h = self.encoder(pixel_values=pix, output_hidden_states=True)
        toks = self.adapter(h.pooler_output, h.hidden_states[-2])
        visible = {n: v.to(dev) for n, v in p.visible.items()}
        vp = VisualPrompt(None, self.adapter, toks, toks, visible, self.names)
        mods = [ExtraKV(None, None, visible, 1.0, frozenset(sites), project=partial(vp.project, (False,)),
                        decoupled=decoupled)
                for sites, decoupled in ((self.joint, False), (self.cross, True)) if sites]
        x0 = p.x0.to(dev, torch.float32)
        eps = noise.to(dev)
        i = min(999, int(u * 1000))
        if self.be.family == "flux":
            sigma = (i + 1) / 1000  # FlowMatchEulerDiscreteScheduler's training sigmas (no shift)
            xt = (1 - sigma) * x0 + sigma * eps
            solver, target = FlowEuler(torch.tensor([sigma, 0.0])), eps - x0
        else:
            t = torch.tensor([i], device=dev)
            xt = self.sched.add_noise(x0, eps, t)
            solver = DDIM(self.sched, t)
            pred = self.sched.config.prediction_type
            target = self.sched.get_velocity(x0, eps, t) if pred == "v_prediction" else eps
        plan = p.blank if drop_text else p.plan
        run = Run(self.be, [(plan, plan.jobs[0])])  # per call: its assembled text is not kept
        out = model_output(run, xt.to(p.x0.dtype), solver, mods)
        return torch.nn.functional.mse_loss(out.float(), target.float())

    def train_step(self) -> float:
        """One optimizer step over ``batch_size`` examples (gradients accumulated); the mean loss."""
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        B = self.cfg.batch_size
        for _ in range(B):
            i = int(torch.randint(len(self.train), (1,), generator=self.gen))
            p = self._get(self.train, i)
            image = augment(p.crop, self.gen)
            noise = torch.randn(p.x0.shape, generator=self.gen, dtype=torch.float32)
            u = float(torch.rand(1, generator=self.gen))
            r = float(torch.rand(1, generator=self.gen))  # condition dropout: image, text, both, or neither
            c = self.cfg
            image_off = r < c.drop_image or c.drop_image + c.drop_text <= r < c.drop_image + c.drop_text + c.drop_both
            text_off = c.drop_image <= r < c.drop_image + c.drop_text + c.drop_both
            loss = self.loss(p, image, noise, u, image_off, text_off) / B
            loss.backward()
            total += float(loss.detach())
        self.opt.step()
        self.step += 1
        return total

    @torch.no_grad()
    def evaluate(self, examples: list[TrainExample] | None = None) -> float:
        """The mean loss over ``examples`` (default: the held-out ones) with fixed noise and level per
        example (drawn from the seed and its index: comparable across evaluations), no augmentation."""
        from PIL import Image

        examples = self.val if examples is None else examples
        self.adapter.eval()
        try:
            losses = []
            for i in range(len(examples)):
                p = self._get(examples, i)
                g = torch.Generator("cpu").manual_seed(int(self.cfg.seed) * 100003 + 7919 * i + 1)
                noise = torch.randn(p.x0.shape, generator=g, dtype=torch.float32)
                u = float(torch.rand(1, generator=g))
                losses.append(float(self.loss(p, Image.fromarray(p.crop), noise, u)))
        finally:
            self.adapter.train()
        return float(np.mean(losses))

    # -- checkpoints ---------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"format": CKPT_FORMAT, "identity": json.dumps(self.cfg.identity(), sort_keys=True),
                "step": self.step, "val_loss": self.val_loss,
                "adapter": {k: v.detach().cpu() for k, v in self.adapter.state_dict().items()},
                "optimizer": self.opt.state_dict(), "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state()}

    def save_checkpoint(self, directory: Path) -> Path:
        """The whole training state in one file, written atomically (``last.pt``): a Ctrl-C at any moment
        leaves the previous checkpoint or this one, never a torn file."""
        from scenec.spec.fsio import atomic_write

        buf = io.BytesIO()
        torch.save(self.state(), buf)
        path = Path(directory) / "last.pt"
        atomic_write(path, buf.getvalue())
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Resume from a checkpoint of the same run (the same ``identity``), else a PlanError saying what differs."""
        try:
            st = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 — a torn or foreign file: say so, do not guess
            raise PlanError(f"{path}: not a readable checkpoint ({type(e).__name__}); use --fresh to start "
                            "over") from None
        if not isinstance(st, dict) or st.get("format") != CKPT_FORMAT:
            raise PlanError(f"{path}: not a {CKPT_FORMAT} checkpoint; use --fresh to start over")
        mine, theirs = self.cfg.identity(), json.loads(st["identity"])
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            said = ", ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in diff)
            raise PlanError(f"{path} is from another run ({said}); rerun with the same settings, or --fresh")
        self.adapter.load_state_dict({k: v.to(self.be.device) for k, v in st["adapter"].items()})
        self.opt.load_state_dict(st["optimizer"])
        self.gen.set_state(st["gen"])
        torch.set_rng_state(st["torch_rng"])
        self.step, self.val_loss = int(st["step"]), st["val_loss"]

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self, ckpt_dir: Path | None = None, stop_after: int | None = None,
            on_step: Callable[[int, float, float | None], None] | None = None) -> None:
        """Train until ``cfg.steps`` (or ``stop_after`` more steps: an interruption, for tests); a checkpoint
        every ``checkpoint_every`` steps and at the end, the held-out loss every ``val_every`` and at the end."""
        cfg = self.cfg
        done = 0
        while self.step < cfg.steps:
            if stop_after is not None and done >= stop_after:
                return
            loss = self.train_step()
            done += 1
            if not math.isfinite(loss):
                raise NonFinite(f"the training loss is {loss} at step {self.step} (lower --lr)")
            if cfg.val_every and self.step % cfg.val_every == 0:
                self.val_loss = self.evaluate()
            if ckpt_dir is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint(ckpt_dir)
            if on_step is not None:
                on_step(self.step, loss, self.val_loss)
        self.val_loss = self.evaluate()
        if ckpt_dir is not None:
            self.save_checkpoint(ckpt_dir)

    def save(self, path: Path, image_encoder: str) -> None:
        """The adapter as a ``scenec-kv-mixed/1`` file, atomically, with ``val_loss``, ``steps`` and ``model``
        in its metadata; ``image_encoder``: its directory (relative: to the file's directory)."""
        import tempfile

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        extra = {"val_loss": "" if self.val_loss is None else repr(float(self.val_loss)), "steps": str(self.step),
                 "model": self.cfg.model, "train_examples": str(len(self.train)), "val_examples": str(len(self.val)),
                 "drop_image": repr(self.cfg.drop_image), "drop_text": repr(self.cfg.drop_text),
                 "drop_both": repr(self.cfg.drop_both)}
        try:
            save_adapter(self.adapter.cpu(), tmp, image_encoder, extra)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600: the output gets the mode any new file gets
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        finally:
            self.adapter.to(self.be.device)

    def save_encoder(self, directory: Path) -> None:
        """The image encoder and its processor as a local directory (the tiny models' built-in one, so the
        adapter is usable on its own), written to a temporary directory and renamed into place."""
        import shutil
        import tempfile

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        from transformers.utils import logging as tl

        bars = tl.is_progress_bar_enabled()
        tl.disable_progress_bar()  # "Writing model shards": this command has its own display
        try:
            self.encoder.save_pretrained(tmp, safe_serialization=True)
            self.proc.save_pretrained(tmp)
            for f in [tmp, *tmp.iterdir()]:
                os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~_umask())
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if bars:
                tl.enable_progress_bar()


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def data_digest(examples: list[TrainExample]) -> str:
    """What the examples are (files' bytes and captions): a checkpoint resumes only on the same data."""
    import hashlib

    from scenec.spec.fsio import sha256_file

    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([sha256_file(ex.image), sha256_file(ex.mask), ex.text]).encode())
    return h.hexdigest()[:16]
