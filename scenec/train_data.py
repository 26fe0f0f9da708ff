"""`scenec train-adapter`'s data folder, read and checked before anything loads.

The layout is Hugging Face ``imagefolder``'s, as diffusers' training scripts read it: ``DATA/metadata.jsonl``
holds one JSON object per line with ``file_name`` (the image), ``mask`` (the object's mask, white = the
object, the image's size) and ``text`` (the caption); paths are relative to ``DATA`` and stay inside it.
Every problem is collected (``DATA/metadata.jsonl:LINE: message``) and reported at once.
"""

from __future__ import annotations

import json
from pathlib import Path

from scenec.runtime.train_adapter import TrainExample

KEYS = ("file_name", "mask", "text")


class DataError(Exception):
    """Every problem of a data folder, one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _image(path: Path, what: str, problems: list[str], where: str):
    """The image's size, or None (a problem added)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im).size  # upright, as the trainer reads it
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        problems.append(f"{where}: {what} `{path.name}` is not a readable image ({type(e).__name__})")
        return None


def _inside(root: Path, value: str) -> Path | None:
    p = (root / value).resolve()
    return p if p == root.resolve() or root.resolve() in p.parents else None


def read_examples(data: Path) -> list[TrainExample]:
    """The examples of a data folder (module docstring), or a :class:`DataError` with every problem."""
    import numpy as np

    meta = data / "metadata.jsonl"
    if not data.is_dir():
        raise DataError([f"{data}: not a directory (a folder with metadata.jsonl and its images)"])
    if not meta.is_file():
        raise DataError([f"{meta}: missing (one JSON object per line: {', '.join(KEYS)})"])
    try:
        lines = meta.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError([f"{meta}: cannot be read ({e})"]) from None
    problems: list[str] = []
    examples: list[TrainExample] = []
    entries = 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        entries += 1
        where = f"{meta}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{where}: a JSON object with {', '.join(KEYS)} is needed, got {type(obj).__name__}")
            continue
        bad = [k for k in KEYS if not isinstance(obj.get(k), str) or not obj.get(k).strip()]
        if bad:
            problems.append(f"{where}: {', '.join(f'`{k}`' for k in bad)} missing or not a non-empty string")
            continue
        paths = {}
        for k in ("file_name", "mask"):
            p = _inside(data, obj[k])
            if p is None:
                problems.append(f"{where}: `{k}` `{obj[k]}` leaves the data folder")
            elif not p.is_file():
                problems.append(f"{where}: `{k}` `{obj[k]}` does not exist")
            else:
                paths[k] = p
        if len(paths) < 2:
            continue
        size = _image(paths["file_name"], "image", problems, where)
        msize = _image(paths["mask"], "mask", problems, where)
        if size is None or msize is None:
            continue
        if size != msize:
            problems.append(f"{where}: mask `{obj['mask']}` is {msize[0]}x{msize[1]}, the image {size[0]}x{size[1]}")
            continue
        from PIL import Image

        with Image.open(paths["mask"]) as im:
            if not (np.asarray(im.convert("L")) > 127).any():
                problems.append(f"{where}: mask `{obj['mask']}` is empty (no white pixel: white marks the object)")
                continue
        examples.append(TrainExample(paths["file_name"], paths["mask"], obj["text"], where))
    if entries < 2:
        problems.append(f"{meta}: {entries} example{'s' if entries != 1 else ''}; training needs at least 2 "
                        "(one is held out)")
    if problems:
        raise DataError(problems)
    return examples


def split(examples: list[TrainExample], fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): ``fraction`` of the examples held out (at least one, and at least one left to
    train on), chosen by the seed."""
    import numpy as np

    n = len(examples)
    k = min(n - 1, max(1, round(n * fraction)))
    order = np.random.default_rng(seed).permutation(n)
    held = set(order[:k].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]
