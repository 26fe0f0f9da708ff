"""Draw the reference images, backgrounds and masks the example scenes use.

Deterministic: flat shapes and vertical gradients only (no randomness, no fonts), so running it
again rewrites byte-identical files for the same Pillow version. Run from anywhere:

    python scenes/refs/make_refs.py

Each file stays well under 50 KB.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent


def _save(im: Image.Image, name: str) -> Path:
    p = HERE / name
    im.save(p, format="PNG", optimize=True)
    return p


def _vgradient(size: tuple[int, int], top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    w, h = size
    im = Image.new("RGB", size)
    d = ImageDraw.Draw(im)
    for y in range(h):
        a = y / max(1, h - 1)
        d.line([(0, y), (w, y)], fill=tuple(round(t + (b - t) * a) for t, b in zip(top, bottom)))
    return im


def face() -> Image.Image:
    """A friendly face, 128x128: the portrait reference."""
    im = _vgradient((128, 128), (214, 226, 240), (176, 196, 222))
    d = ImageDraw.Draw(im)
    d.ellipse([22, 10, 106, 92], fill=(92, 58, 38))  # hair
    d.rectangle([48, 84, 80, 112], fill=(232, 190, 160))  # neck
    d.pieslice([14, 100, 114, 170], 180, 360, fill=(58, 96, 150))  # shoulders
    d.ellipse([32, 24, 96, 100], fill=(240, 200, 170))  # face
    d.chord([30, 16, 98, 58], 180, 360, fill=(92, 58, 38))  # fringe
    for x in (50, 78):
        d.ellipse([x - 7, 52, x + 7, 62], fill=(255, 255, 255))
        d.ellipse([x - 4, 53, x + 4, 61], fill=(70, 110, 60))
        d.ellipse([x - 2, 55, x + 1, 58], fill=(20, 20, 20))
        d.arc([x - 9, 43, x + 9, 53], 200, 340, fill=(92, 58, 38), width=2)  # brows
    d.line([(64, 62), (61, 74), (66, 75)], fill=(200, 150, 125), width=2)  # nose
    d.chord([50, 74, 78, 90], 0, 180, fill=(190, 70, 80))  # smile
    d.line([(52, 81), (76, 81)], fill=(250, 245, 240), width=2)  # teeth
    d.ellipse([38, 70, 48, 78], fill=(245, 175, 160))  # cheeks
    d.ellipse([80, 70, 90, 78], fill=(245, 175, 160))
    return im


def bottle() -> Image.Image:
    """A perfume bottle on white, 128x176 (portrait aspect): the product reference."""
    im = Image.new("RGB", (128, 176), (250, 250, 248))
    d = ImageDraw.Draw(im)
    d.ellipse([22, 156, 106, 170], fill=(226, 226, 222))  # shadow
    d.rounded_rectangle([24, 62, 104, 164], radius=16, fill=(236, 186, 196), outline=(170, 110, 125), width=3)
    d.rounded_rectangle([34, 72, 52, 150], radius=8, fill=(248, 222, 228))  # highlight
    d.rectangle([52, 40, 76, 64], fill=(200, 170, 110), outline=(140, 110, 60), width=2)  # collar
    d.rounded_rectangle([44, 8, 84, 42], radius=6, fill=(40, 40, 48))  # cap
    d.line([(50, 14), (50, 36)], fill=(110, 110, 120), width=3)
    d.rectangle([44, 98, 96, 128], fill=(250, 246, 236), outline=(160, 130, 80), width=2)  # label
    d.line([(52, 108), (88, 108)], fill=(160, 130, 80), width=2)
    d.line([(58, 118), (82, 118)], fill=(160, 130, 80), width=2)
    return im


def fox() -> Image.Image:
    """A sitting red fox, flat shapes, 160x128 (landscape aspect)."""
    im = Image.new("RGB", (160, 128), (236, 240, 226))
    d = ImageDraw.Draw(im)
    orange, dark, white = (214, 102, 38), (60, 36, 24), (250, 246, 238)
    d.pieslice([84, 60, 156, 124], 180, 360, fill=orange)  # tail
    d.polygon([(150, 92), (158, 82), (156, 96)], fill=white)  # tail tip
    d.ellipse([50, 52, 118, 122], fill=orange)  # body
    d.ellipse([62, 78, 92, 122], fill=white)  # chest
    d.polygon([(20, 40), (44, 8), (54, 36)], fill=orange)  # left ear
    d.polygon([(70, 36), (82, 8), (96, 40)], fill=orange)  # right ear
    d.polygon([(28, 36), (43, 16), (49, 36)], fill=dark)
    d.polygon([(75, 36), (82, 16), (89, 38)], fill=dark)
    d.polygon([(16, 38), (100, 38), (58, 92)], fill=orange)  # head
    d.polygon([(34, 62), (82, 62), (58, 92)], fill=white)  # muzzle
    d.ellipse([53, 84, 63, 93], fill=dark)  # nose
    d.ellipse([36, 48, 46, 56], fill=dark)  # eyes
    d.ellipse([70, 48, 80, 56], fill=dark)
    d.rectangle([62, 112, 72, 124], fill=dark)  # paws
    d.rectangle([84, 112, 94, 124], fill=dark)
    return im


def meadow() -> Image.Image:
    """A sunny meadow, 256x256: the background image the inpainting scene edits."""
    im = _vgradient((256, 256), (110, 170, 235), (200, 226, 248))
    d = ImageDraw.Draw(im)
    d.ellipse([188, 22, 232, 66], fill=(255, 236, 150))  # sun
    for cx, cy in ((56, 48), (124, 70)):
        for dx, dy, r in ((-16, 4, 12), (0, 0, 16), (16, 4, 12)):
            d.ellipse([cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r], fill=(250, 252, 255))
    d.ellipse([-80, 120, 200, 260], fill=(120, 178, 90))  # far hills
    d.ellipse([90, 110, 360, 270], fill=(104, 164, 78))
    d.rectangle([0, 176, 256, 256], fill=(96, 160, 64))  # field
    d.polygon([(0, 256), (0, 214), (256, 196), (256, 256)], fill=(84, 146, 54))
    # flowers on a fixed lattice (offset every other row), no randomness
    colours = [(250, 250, 250), (246, 208, 70), (226, 96, 130), (180, 130, 220)]
    k = 0
    for row, y in enumerate(range(188, 256, 12)):
        for x in range((row % 2) * 11, 256, 22):
            c = colours[k % len(colours)]
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=c)
            k += 3 if row % 2 else 1
    return im


def pond_mask() -> Image.Image:
    """White = inside: an irregular pond in the lower left of the meadow, 256x256."""
    im = Image.new("L", (256, 256), 0)
    d = ImageDraw.Draw(im)
    d.ellipse([24, 190, 150, 240], fill=255)
    d.ellipse([70, 178, 170, 226], fill=255)
    d.ellipse([14, 206, 70, 246], fill=255)
    return im.filter(ImageFilter.GaussianBlur(2)).point(lambda v: 255 if v >= 128 else 0)


def branch_mask() -> Image.Image:
    """White = inside: a branch reaching in from the right, 128x96 (scaled to any canvas)."""
    im = Image.new("L", (128, 96), 0)
    d = ImageDraw.Draw(im)
    d.polygon([(128, 30), (128, 44), (70, 52), (40, 50), (40, 44), (72, 40)], fill=255)
    d.polygon([(86, 44), (96, 42), (84, 24), (78, 26)], fill=255)  # twig
    d.ellipse([54, 26, 82, 46], fill=255)  # room for the animal on the branch
    return im


MAKERS = {
    "face.png": face,
    "bottle.png": bottle,
    "fox.png": fox,
    "meadow.png": meadow,
    "pond-mask.png": pond_mask,
    "branch-mask.png": branch_mask,
}


def main() -> None:
    for name, make in MAKERS.items():
        p = _save(make(), name)
        size = p.stat().st_size
        assert size < 50_000, f"{name} is {size} bytes"
        print(f"{p.name}: {size} bytes")


if __name__ == "__main__":
    main()
