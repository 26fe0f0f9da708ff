"""`scenec train-adapter`, registered on the app by scenec/cli.py: a KV-mixed visual-prompt adapter trained
on a folder of images, object masks and captions (data: scenec/train_data.py; training:
runtime/train_adapter.py; docs/visual-prompts.md, "Training an adapter")."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from scenec.exits import EXIT_BUILD_FAILED, EXIT_INVALID, internal

EXIT_INTERRUPTED = 130  # as a shell reports SIGINT


def _say(msg: str) -> None:
    print(f"scenec: {msg}", file=sys.stderr)


def _check_args(out: Path, steps: int, lr: float, batch_size: int, tokens: Optional[int], val_fraction: float,
                val_every: int, checkpoint_every: int, resolution: int, image_encoder: Optional[Path],
                dtype: Optional[str] = None, drops: tuple[float, float, float] = (0.0, 0.0, 0.0),
                device: Optional[str] = None) -> list[str]:
    from scenec.runtime.train_adapter import FP16

    problems = []
    if out.suffix != ".safetensors":
        problems.append(f"-o {out}: the adapter is a .safetensors file (name it …/NAME.safetensors)")
    elif out.is_dir():
        problems.append(f"-o {out}: is a directory")
    for name, value, ok, want in (
            ("--steps", steps, steps >= 1, "at least 1"), ("--lr", lr, lr > 0, "above 0"),
            ("--batch-size", batch_size, batch_size >= 1, "at least 1"),
            ("--tokens", tokens, tokens is None or tokens >= 1, "at least 1"),
            ("--val-fraction", val_fraction, 0 < val_fraction < 1, "between 0 and 1"),
            ("--val-every", val_every, val_every >= 0, "0 (never) or more"),
            ("--checkpoint-every", checkpoint_every, checkpoint_every >= 0, "0 (never) or more"),
            ("--resolution", resolution, resolution >= 16, "at least 16"),
            *((f"--drop-{k}", d, 0 <= d <= 1, "in [0, 1]") for k, d in zip(("image", "text", "both"), drops))):
        if not ok:
            problems.append(f"{name} {value}: out of range (must be {want})")
    if all(0 <= d <= 1 for d in drops) and sum(drops) > 1:
        problems.append(f"--drop-image + --drop-text + --drop-both = {sum(drops):g}: at most 1 (the shares of steps "
                        "without the image, the text, both)")
    if dtype is not None and dtype.lower() in ("fp16", "float16", "half"):
        problems.append(FP16)
    if image_encoder is not None and not (image_encoder / "config.json").is_file():
        problems.append(f"--image-encoder {image_encoder}: not a local CLIPVisionModel directory (no config.json)")
    from scenec.runtime.memory import device_problem

    if device is not None and device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        problems.append(f"--device must be cuda or cpu, not `{device}`")
    elif why := device_problem(device):
        problems.append(why)
    problems += _unwritable(out)
    return problems


def _unwritable(out: Path) -> list[str]:
    """Where the adapter, its checkpoints and its encoder go must be a directory that can be written (known
    before training starts, not at the first checkpoint)."""
    d = out.resolve().parent
    while not d.exists():
        d = d.parent
    if not d.is_dir():
        return [f"-o {out}: {d} is not a directory"]
    if not os.access(d, os.W_OK | os.X_OK):
        return [f"-o {out}: {d} is not writable"]
    return []


class _Display:
    """Progress like accelerate's: a rich bar on a terminal (step, loss, held-out loss, it/s, time left),
    else a line every ``every`` steps."""

    def __init__(self, total: int, start: int, every: int):
        self.total, self.every, self.t0, self.s0 = total, max(1, every), time.perf_counter(), start
        self.smooth: float | None = None
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[rate]}"),
                                TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.task = self.bar.add_task("train", total=total, completed=start, loss="–", val="–", rate="")
            self.bar.start()

    def __call__(self, step: int, loss: float, val: float | None) -> None:
        self.smooth = loss if self.smooth is None else 0.9 * self.smooth + 0.1 * loss
        rate = (step - self.s0) / max(1e-9, time.perf_counter() - self.t0)
        vs = "–" if val is None else f"{val:.4f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{self.smooth:.4f}", val=vs, rate=f"{rate:.2f} it/s")
        elif step % self.every == 0 or step == self.total:
            _say(f"step {step}/{self.total}  loss {self.smooth:.4f}  val {vs}  {rate:.2f} it/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def train_adapter(
        data: Path = typer.Argument(..., help="folder: metadata.jsonl (file_name, mask, text per line), its images"),
        out: Path = typer.Option(..., "-o", "--out", help="the .safetensors to write; checkpoints: OUT.ckpt/"),
        model: str = typer.Option("tiny", "--model", help="model alias, id or local diffusers directory (frozen)"),
        steps: int = typer.Option(500, "--steps", help="optimizer steps in all (a resumed run continues to this)"),
        lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate"),
        batch_size: int = typer.Option(1, "--batch-size", help="examples per optimizer step (gradients accumulated)"),
        tokens: Optional[int] = typer.Option(None, "--tokens", help="visual tokens M (default: 4 on tiny models, 16)"),
        seed: int = typer.Option(0, "--seed", help="seed of the initial weights, the held-out split and every draw"),
        val_fraction: float = typer.Option(0.1, "--val-fraction", help="share of examples held out (at least one)"),
        val_every: int = typer.Option(50, "--val-every", help="held-out loss every N steps (0: only at the end)"),
        checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="checkpoint every N steps (and at end)"),
        resolution: int = typer.Option(512, "--resolution", help="longer image side at most (scaled down, never up)"),
        image_encoder: Optional[Path] = typer.Option(None, "--image-encoder",
                                                     help="local CLIPVisionModel directory (tiny models: built in)"),
        device: Optional[str] = typer.Option(None, "--device", help="cuda | cpu (default: cuda if available)"),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="the frozen model's dtype: bf16 | fp32 (CUDA "
                                            "default: bf16; fp16 is refused: no gradient scaler)"),
        drop_image: float = typer.Option(0.05, "--drop-image", help="share of examples without the visual prompt "
                                         "(the runtime's negative input; IP-Adapter's condition dropout)"),
        drop_text: float = typer.Option(0.05, "--drop-text", help="share of examples with an empty caption"),
        drop_both: float = typer.Option(0.05, "--drop-both", help="share of examples without image and caption"),
        fresh: bool = typer.Option(False, "--fresh", help="start over instead of resuming OUT.ckpt/")):
    """Train a KV-mixed visual-prompt adapter (coarse keys, fine values; arXiv 2501.01424 §3); resumable."""
    from scenec.runtime.train_adapter import TrainConfig, data_digest
    from scenec.spec.errors import NonFinite, RuntimeErrorBase
    from scenec.train_data import DataError, read_examples, split

    problems = _check_args(out, steps, lr, batch_size, tokens, val_fraction, val_every, checkpoint_every,
                           resolution, image_encoder, dtype, (drop_image, drop_text, drop_both), device)
    try:
        examples = read_examples(data)
    except DataError as e:
        problems += e.problems
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{len(problems)} error{'s' if len(problems) != 1 else ''}", file=sys.stderr)
        raise typer.Exit(EXIT_INVALID)
    train, val = split(examples, val_fraction, seed)
    cfg = TrainConfig(model=model, steps=steps, lr=lr, batch_size=batch_size, tokens=tokens, seed=seed,
                      resolution=resolution, image_encoder=str(image_encoder.resolve()) if image_encoder else None,
                      device=device, dtype=dtype, val_every=val_every, checkpoint_every=checkpoint_every,
                      data=f"{data_digest(train)}:{data_digest(val)}", drop_image=drop_image, drop_text=drop_text,
                      drop_both=drop_both)
    ckpt = Path(f"{out}.ckpt")
    trainer = None
    try:
        from scenec.runtime.train_adapter import Trainer

        trainer = Trainer(cfg, train, val)
        last = ckpt / "last.pt"
        if last.is_file() and not fresh:
            trainer.load_checkpoint(last)
            _say(f"resuming from {last} at step {trainer.step} of {steps} (--fresh starts over)")
        elif last.is_file():
            last.unlink()
            _say(f"starting over (--fresh): removed {last}")
        if trainer.step == 0:
            _say(f"{len(train)} training and {len(val)} held-out examples on {model}; held-out loss before "
                 f"training {trainer.evaluate():.4f}")
        display = _Display(steps, trainer.step, val_every or 50)
        try:
            trainer.fit(ckpt, on_step=display)
        finally:
            display.close()  # the bar leaves the terminal before any message
        encoder = _encoder_entry(trainer, out, image_encoder)
        trainer.save(out, encoder)
    except KeyboardInterrupt:
        at = "" if trainer is None else f" at step {trainer.step}"
        kept = ckpt / "last.pt"
        what = f"{kept} resumes it: run the same command again" if kept.is_file() else "no checkpoint was written yet"
        _say(f"interrupted{at}; {what}")
        raise typer.Exit(EXIT_INTERRUPTED)
    except OSError as e:
        _say(f"{e.filename or out}: {e.strerror or e}")
        raise typer.Exit(EXIT_BUILD_FAILED)
    except RuntimeErrorBase as e:  # a diverged loss fails the run; the rest is what was asked for (exit 2)
        _say(str(e))
        raise typer.Exit(EXIT_BUILD_FAILED if isinstance(e, NonFinite) else EXIT_INVALID)
    except Exception as e:  # noqa: BLE001
        internal(e)
    _say(f"wrote {out} ({trainer.step} step{'s' if trainer.step != 1 else ''}, held-out loss "
         f"{trainer.val_loss:.4f}); checkpoint {ckpt}/last.pt")


def _encoder_entry(trainer, out: Path, given: Optional[Path]) -> str:
    """The image encoder as the adapter's metadata names it: the given directory (relative to the adapter's
    folder when inside it, so the folder moves as a whole), else the built-in one saved beside the adapter."""
    folder = out.resolve().parent
    if given is None:  # named after the adapter: never another adapter's, nor h94's shared image_encoder/
        name = f"{out.stem}.image_encoder"
        trainer.save_encoder(folder / name)
        return name
    g = given.resolve()
    return os.path.relpath(g, folder) if folder in g.parents else str(g)
