"""Images a scene names are read upright: a phone photo is stored sideways with an EXIF Orientation tag that
viewers (and diffusers' ``load_image``) apply. A scene naming the tagged file compiles to the same plan tensors
as one naming the upright pixels: background image, mask shape, control image, reference, visual prompt."""

import numpy as np
import pytest
from PIL import Image, ImageOps

from scenec.compiler import compile_scene

SCENE_A = """scenec: 1
model: tiny
canvas: {width: 64, height: 128}
sampler: {steps: 2}
background: {prompt: "a street", image: bg.png}
control: [{image: ctl.png}]
entities:
  - {id: car, prompt: "a car", shape: {mask: mask.png}}
"""
SCENE_B = """scenec: 1
model: tiny
canvas: {width: 64, height: 128}
sampler: {steps: 4}
background: {prompt: "a street"}
entities:
  - id: cat
    prompt: "a cat"
    shape: {box: [0.1, 0.1, 0.9, 0.6]}
    reference: {image: ref.png, cycles: 1}
  - id: dog
    prompt: "a dog"
    shape: {box: [0.1, 0.6, 0.9, 0.95]}
    visual: {image: vis.png}
"""


def picture(seed: int) -> Image.Image:
    """An asymmetric tall picture (every rotation or flip of it differs from it)."""
    rng = np.random.default_rng(seed)
    a = (rng.random((96, 48, 3)) * 255).astype(np.uint8)
    a[:30, :10] = 255
    return Image.fromarray(a)


def write(d, name: str, im: Image.Image, tagged: bool) -> None:
    if not tagged:
        im.save(d / name)
        return
    stored = im.transpose(Image.Transpose.ROTATE_90)  # as a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to view
    stored.save(d / name, exif=exif)
    with Image.open(d / name) as check:  # the test's premise: a viewer shows exactly the upright picture
        assert check.size == (96, 48) and np.array_equal(np.asarray(ImageOps.exif_transpose(check)), np.asarray(im))


@pytest.mark.parametrize("scene,files", [(SCENE_A, ("bg.png", "ctl.png", "mask.png")),
                                         (SCENE_B, ("ref.png", "vis.png"))])
def test_tagged_images_compile_as_the_upright_pictures(tmp_path, scene, files):
    plans = []
    for tagged in (False, True):
        d = tmp_path / ("tagged" if tagged else "upright")
        d.mkdir()
        for i, f in enumerate(files):
            im = picture(i)
            if f == "mask.png":
                im = Image.fromarray(np.where(np.asarray(im.convert("L")) > 128, 255, 0).astype(np.uint8))
            write(d, f, im, tagged)
        (d / "s.yaml").write_text(scene)
        plans.append(compile_scene(d / "s.yaml"))
    upright, tagged = plans
    names = sorted(upright.tensors)
    assert names == sorted(tagged.tensors) and len(names) >= len(files)
    for n in names:
        assert np.array_equal(np.asarray(upright.tensor(n)), np.asarray(tagged.tensor(n))), n


def test_a_16_bit_visual_prompt_image_is_scaled_not_clipped():
    from scenec.compiler.visual import on_gray

    ramp = np.linspace(0, 65535, 64 * 8).reshape(8, 64).astype(np.uint16)
    rgb = on_gray(Image.fromarray(ramp))  # mode I;16, as a 16-bit grayscale PNG opens
    # Pillow's own convert gives 255 nearly everywhere
    assert rgb.shape == (8, 64, 3) and (rgb[..., 0] == np.rint(ramp / 257.0)).all()
