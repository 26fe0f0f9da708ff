"""Layout previews and mask PNGs."""

from pathlib import Path

import numpy as np
from PIL import Image

from scenec.compiler.geometry import resolve_regions
from scenec.compiler.preview import TILE, render_preview, write_mask_pngs
from scenec.compiler.shapes import shape_geometry
from scenec.spec.diagnostics import Diagnostics
from scenec.spec.load import load_scene

SCENE = """\
scenec: 1
canvas: {width: 256, height: 128}
background: {prompt: "a room", image: bg.png}
entities:
  - {id: lamp, prompt: "a lamp", shape: {box: [0, 0, 0.5, 1]}, z: 3}
  - id: cat
    prompt: "a cat"
    shape: {ellipse: {center: [0.6, 0.5], radii: [0.2, 0.3]}}
    feather: 0.05
    reference: {image: ref.png, fit: cover, related: {box: [0.8, 0.5, 1, 1]}}
  - {id: rug, prompt: "a rug", shape: {box: [0.5, 0.75, 1, 1], units: norm}, z: -1}
"""


def _scene(tmp_path):
    (tmp_path / "scenec.toml").write_text("")
    Image.new("RGB", (64, 32), (40, 120, 200)).save(tmp_path / "bg.png")
    ref = Image.new("RGB", (20, 40), (200, 30, 30))
    ref.paste((250, 250, 250), (0, 0, 10, 40))
    ref.save(tmp_path / "ref.png")
    (tmp_path / "s.yaml").write_text(SCENE)
    return load_scene(tmp_path / "s.yaml")


def _jobs(ls, tmp_path, groups=None):
    canvas = (256, 128)
    d = Diagnostics()
    ids = [e.id for e in ls.scene.entities]
    sets = groups or [(None, "all", ids)]
    jobs = []
    for group, title, present in sets:
        regs = resolve_regions(ls, present, canvas, d)
        rel = shape_geometry(ls, ls.scene.entities[1].reference.related, ("entities", 1, "reference", "related"),
                             canvas, d)
        jobs.append({"title": title, "group": group, "regions": list(regs.items()),
                     "references": [("cat", tmp_path / "ref.png", "cover", regs["cat"])] if "cat" in regs else [],
                     "related": [("cat", rel)] if "cat" in regs else []})
    assert not d.has_errors()
    return jobs


def test_preview_is_a_png_of_the_expected_size(tmp_path):
    ls = _scene(tmp_path)
    out = tmp_path / "out" / "preview.png"
    render_preview(ls, _jobs(ls, tmp_path), out, background=tmp_path / "bg.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        im.load()
        w, h = im.size
        assert TILE <= w <= TILE + 64 and TILE // 2 <= h <= TILE // 2 + 96  # one 2:1 tile and a title
        px = np.asarray(im.convert("RGB"))
    assert len({tuple(p) for p in px.reshape(-1, 3)[::97]}) > 10  # something was drawn
    assert [p.name for p in out.parent.iterdir()] == ["preview.png"]  # no temp files left
    assert (out.stat().st_mode & 0o777) != 0o600


def test_group_is_a_contact_sheet(tmp_path):
    ls = _scene(tmp_path)
    jobs = _jobs(ls, tmp_path, groups=[("g", "g / a", ["lamp"]), ("g", "g / b", ["cat", "rug"]),
                                       ("g", "g / c", ["rug"])])
    jobs[2]["whole_canvas"] = ["c"]
    single = tmp_path / "one.png"
    sheet = tmp_path / "sheet.png"
    render_preview(ls, [{**jobs[0], "group": None}], single)
    render_preview(ls, jobs, sheet)
    with Image.open(single) as a, Image.open(sheet) as b:
        assert b.size[0] >= 3 * TILE and b.size[1] > a.size[1]  # three tiles side by side, a header


def test_mask_pngs(tmp_path):
    ls = _scene(tmp_path)
    regs = resolve_regions(ls, ["lamp", "cat", "rug"], (256, 128), Diagnostics())
    out = tmp_path / "masks"
    write_mask_pngs(regs, (256, 128), out)
    assert sorted(p.name for p in out.iterdir()) == ["cat.png", "lamp.png", "rug.png"]
    with Image.open(out / "lamp.png") as im:
        assert im.mode == "L" and im.size == (256, 128)
        lamp = np.asarray(im)
    assert np.all(lamp[:, :128] == 255) and np.all(lamp[:, 128:] == 0)
    with Image.open(out / "cat.png") as im:
        cat = np.asarray(im)
    grey = (cat > 0) & (cat < 255)
    assert grey.any() and (cat == 255).any()  # feathered: a grey rim around a white core
    assert np.all(cat[:, :128] == 0)  # the lamp (higher z) hides the cat's left part


def test_mask_png_half_pixel_is_grey(tmp_path):
    (tmp_path / "scenec.toml").write_text("")
    (tmp_path / "s.yaml").write_text("scenec: 1\ncanvas: {width: 32, height: 32}\nentities:\n"
                                     "  - {id: bar, prompt: x, shape: {box: [0, 0, 10.5, 32], units: px}}\n")
    ls = load_scene(tmp_path / "s.yaml")
    regs = resolve_regions(ls, ["bar"], (32, 32), Diagnostics())
    write_mask_pngs([("bar", regs["bar"])], (32, 32), tmp_path / "m")
    with Image.open(tmp_path / "m" / "bar.png") as im:
        a = np.asarray(im)
    assert np.all(a[:, :10] == 255) and np.all(a[:, 10] == 128) and np.all(a[:, 11:] == 0)


def test_preview_cli_writes_the_file(tmp_path, monkeypatch):
    """`scenec preview` end to end on the repository's test scenes."""
    import subprocess
    import sys

    here = Path(__file__).parent / "scenes"
    for name in ("regional", "coupled", "reference"):
        out = tmp_path / f"{name}.png"
        r = subprocess.run([sys.executable, "-m", "scenec", "preview", str(here / f"{name}.yaml"), "-o", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        with Image.open(out) as im:
            assert im.format == "PNG" and max(im.size) >= TILE


def test_preview_to_another_image_type_is_refused(tmp_path):
    """`-o layout.jpg` wrote PNG bytes under a .jpg name (a viewer or an upload trusting the suffix fails)."""
    import subprocess
    import sys

    here = Path(__file__).parent / "scenes"
    r = subprocess.run([sys.executable, "-m", "scenec", "preview", str(here / "regional.yaml"), "-o",
                        str(tmp_path / "layout.jpg")], capture_output=True, text=True)
    assert r.returncode == 2 and "layout.jpg: preview writes a PNG: name it .png" in r.stderr, r.stderr
    assert not (tmp_path / "layout.jpg").exists()
