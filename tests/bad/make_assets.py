"""Regenerate the support files of the bad-input corpus (tests/bad/assets/): run from anywhere.

    python tests/bad/make_assets.py

The outputs are committed; this script documents how they were made. Nothing here is large: the
decompression bomb claims 30000x30000 pixels but is a 1-bit image of zeros, a few KB on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "assets"

BOMB_SIDE = 30000
BOMB_MAX_BYTES = 200_000


def main() -> None:
    ASSETS.mkdir(exist_ok=True)
    # a small valid image, usable as a reference, background or mask (white square on black)
    ok = Image.new("L", (32, 32), 0)
    ok.paste(255, (8, 8, 24, 24))
    ok.save(ASSETS / "ok.png")
    # an all-black mask: nothing is inside
    Image.new("L", (16, 16), 0).save(ASSETS / "black.png")
    # a text file with an image's name
    (ASSETS / "text.png").write_text("this is not a PNG file\n", encoding="utf-8")
    # a truncated PNG: a valid header, then nothing
    data = (ASSETS / "ok.png").read_bytes()
    (ASSETS / "truncated.png").write_bytes(data[:40])
    # a decompression bomb: the header claims 30000x30000 (900 MP), the file is small
    Image.new("1", (BOMB_SIDE, BOMB_SIDE), 0).save(ASSETS / "bomb.png", optimize=True)
    # 10000x10000 (100 MP): under Pillow's own bomb limit, over scenec's (64 MP)
    Image.new("1", (10000, 10000), 0).save(ASSETS / "big.png", optimize=True)
    for name in ("bomb.png", "big.png"):
        size = (ASSETS / name).stat().st_size
        assert size < BOMB_MAX_BYTES, f"{name} is {size} bytes"
    # schedule files
    schedules = {
        "sched-ok.json": [0.0, 0.0, 0.5, 1.0],
        "sched-short.json": [0.0, 0.5, 1.0],
        "sched-decreasing.json": {"values": [0.0, 0.8, 0.4, 1.0]},
        "sched-range.json": [0.0, 0.5, 1.0, 1.5],
        "sched-no-values.json": {"theta": [0.0, 0.5, 0.5, 1.0]},
        "sched-strings.json": ["0", "0.5", "1", "1"],
        "sched-number.json": 0.5,
    }
    for name, value in schedules.items():
        (ASSETS / name).write_text(json.dumps(value) + "\n", encoding="utf-8")
    (ASSETS / "sched-not-json.json").write_text("[0, 0.5, 1, 1,\n", encoding="utf-8")
    # a scene file that is not UTF-8 (Latin-1 in a comment)
    (HERE / "yaml-not-utf8.yaml").write_bytes(
        b"# caf\xe9: Latin-1, not UTF-8\nscenec: 1\ncanvas: {width: 256, height: 256}\n"
        b"# expect: 1:1: not UTF-8\n")


if __name__ == "__main__":
    main()
