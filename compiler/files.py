"""Files that scenes name (images, masks, schedules): resolved inside the root, opened safely."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from scenec.spec.diagnostics import Diagnostics, Pos
from scenec.spec.load import LoadedScene
from scenec.spec.paths import PathProblem, not_found_hint

MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 64 MP; larger is refused before decoding (decompression bombs)
MAX_SCHEDULE_BYTES = 1 << 20


def resolve_file(ls: LoadedScene, path: tuple, value: str, diags: Diagnostics, what: str = "file") -> Path | None:
    """Resolve a path-valued field; report problems at the value's position."""
    pos = ls.pos(path)
    try:
        p = ls.resolve(path, value)
    except PathProblem as e:
        diags.error(pos, e.message, e.hint)
        return None
    if not p.exists():
        diags.error(pos, f"{what} `{value}` not found", hint=not_found_hint(p, value, ls.base_dir(path), ls.root))
        return None
    if not p.is_file():
        diags.error(pos, f"{what} `{value}` is not a regular file")
        return None
    return p


def open_image(ls: LoadedScene, path: tuple, value: str, diags: Diagnostics, what: str = "image") -> Image.Image | None:
    """Open an image named by a scene, refusing non-images and decompression bombs; fully loaded."""
    p = resolve_file(ls, path, value, diags, what)
    if p is None:
        return None
    pos = ls.pos(path)
    try:
        with warnings.catch_warnings():
            # our own pixel limit below is lower than Pillow's warning threshold; no stray warnings
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(p)
        with im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                diags.error(pos, f"{what} `{value}` is {w}x{h} pixels, over the limit of {MAX_IMAGE_PIXELS} "
                                 "(decompression bomb?)")
                return None
            im.load()
            return upright(im)
    except Image.DecompressionBombError:
        diags.error(pos, f"{what} `{value}` is too large to decode (decompression bomb?)")
    except (OSError, SyntaxError, ValueError) as e:
        diags.error(pos, f"{what} `{value}` is not a readable image ({type(e).__name__}: {e})".rstrip())
    return None


def upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF Orientation tag says (a phone photo is stored sideways with a tag that viewers
    apply), a copy: every image a scene names is read as the user sees it, as diffusers' ``load_image`` does."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB. 16-bit grayscale (Pillow's ``I;16*`` and ``I`` modes, e.g. a depth map saved as a
    16-bit PNG) is scaled to 8 bits (v / 257, rounded); Pillow's own ``convert("RGB")`` clips it at 255, so
    nearly every pixel of such an image became white. Other modes convert as Pillow does (alpha dropped).
    Upright first (:func:`upright`)."""
    im = upright(im)
    if im.mode.startswith("I"):
        a = np.clip(np.asarray(im, dtype=np.float64), 0, 65535) / 257.0
        im = Image.fromarray(np.rint(a).astype(np.uint8), "L")
    return im.convert("RGB")


def read_json(ls: LoadedScene, path: tuple, value: str, diags: Diagnostics, what: str = "file") -> Any:
    p = resolve_file(ls, path, value, diags, what)
    if p is None:
        return None
    pos = ls.pos(path)
    if p.stat().st_size > MAX_SCHEDULE_BYTES:
        diags.error(pos, f"{what} `{value}` is larger than {MAX_SCHEDULE_BYTES} bytes")
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        diags.error(pos, f"{what} `{value}` is not valid JSON: {e}")
        return None


def pos_in_string(ls: LoadedScene, path: tuple, value: str, offset: int) -> Pos:
    """Position of character ``offset`` of a one-line string value, when the source shows it verbatim."""
    pos = ls.pos(path)
    f = ls.files.get(pos.file)
    if f is None or "\n" in value:
        return pos
    try:
        lines = f.read_text(encoding="utf-8").splitlines()
        line = lines[pos.line - 1]
    except (OSError, UnicodeDecodeError, IndexError):
        return pos
    start = pos.col - 1
    quote = 1 if line[start:start + 1] in ("'", '"') else 0
    if line[start + quote:start + quote + len(value)] != value:
        return pos  # escapes or folding: the source differs from the value
    return Pos(pos.file, pos.line, pos.col + quote + offset)
