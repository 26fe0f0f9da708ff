"""Geometry: shapes → regions (occlusion, feathering) → exact area-weighted coverage masks."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import box

from scenec.compiler.caps import FLUX
from scenec.compiler.geometry import check_geometry, resolve_regions
from scenec.compiler.raster import rasterize, rasterize_grids
from scenec.compiler.shapes import shape_geometry
from scenec.spec.diagnostics import Diagnostics
from scenec.spec.load import load_scene

BAD = Path(__file__).parent / "bad"


def scene(tmp_path, entities: str, canvas=(256, 256), extra: str = ""):
    """Write a scene (entities given as YAML list items) and load it."""
    (tmp_path / "scenec.toml").write_text("")
    f = tmp_path / "s.yaml"
    f.write_text(f"scenec: 1\ncanvas: {{width: {canvas[0]}, height: {canvas[1]}}}\nentities:\n{entities}{extra}")
    return load_scene(f)


def regions(ls, ids=None):
    d = Diagnostics()
    c = (ls.scene.canvas.width, ls.scene.canvas.height)
    out = resolve_regions(ls, ids if ids is not None else [e.id for e in ls.scene.entities], c, d)
    return out, d


def errors(d):
    return [f"{x.pos.line}:{x.pos.col}: {x.message}" for x in d.sorted() if x.severity == "error"]


# --- rasterisation -------------------------------------------------------------------------------

@pytest.mark.parametrize("px", [1, 8, 16])
def test_box_on_cell_edges_is_exact(px):
    g = box(16, 32, 64, 96)
    cov = rasterize(g, 0.0, (128, 128), px)
    want = np.zeros((128 // px, 128 // px), np.float32)
    want[32 // px:96 // px, 16 // px:64 // px] = 1.0
    assert cov.dtype == np.float32 and cov.shape == want.shape
    assert np.array_equal(cov, want)


def test_half_and_quarter_cells():
    cov = rasterize(box(0, 0, 12, 8), 0.0, (32, 32), 8)
    assert cov[0, 0] == 1.0 and cov[0, 1] == 0.5 and cov[0, 2] == 0.0 and cov[1, 0] == 0.0
    cov = rasterize(box(4, 4, 8, 8), 0.0, (32, 32), 8)
    assert cov[0, 0] == 0.25 and cov.sum() == 0.25


def test_coverage_is_the_exact_area_of_each_cell():
    """Against shapely's own intersection areas, cell by cell, for shapes with holes and slants."""
    rng = np.random.default_rng(3)
    for _ in range(5):
        pts = rng.uniform(5, 123, size=(9, 2))
        hull = shapely.MultiPoint(pts).convex_hull
        g = hull.difference(shapely.Point(pts.mean(0)).buffer(12)).union(box(100.5, 3.25, 127, 20.75))
        cov = rasterize(g, 0.0, (128, 128), 16)
        xs, ys = np.meshgrid(np.arange(8) * 16.0, np.arange(8) * 16.0)
        cells = shapely.box(xs, ys, xs + 16, ys + 16)
        want = shapely.area(shapely.intersection(cells, g)) / 256.0
        assert np.allclose(cov, want, atol=1e-6)


def test_rasterize_grids_matches_rasterize():
    g = shapely.Point(70, 50).buffer(40).difference(box(60, 0, 75, 128))
    for canvas in ((128, 96), (120, 100)):  # the second is not a multiple of 16: rasterised directly
        got = rasterize_grids(g, 6.0, canvas, FLUX.grids)
        for name, px in FLUX.grids:
            assert np.allclose(got[name], rasterize(g, 6.0, canvas, px), atol=1e-6)


def test_partial_edge_cells_are_normalised_by_their_canvas_part():
    # 100 px / 16 = 6.25 cells: the last row/column is a quarter cell
    cov = rasterize(box(0, 0, 100, 100), 0.0, (100, 100), 16)
    assert cov.shape == (7, 7) and np.all(cov == 1.0)
    assert np.all(rasterize(None, 0.0, (100, 60), 16) == 1.0)
    assert rasterize(shapely.Polygon(), 0.0, (100, 60), 16).shape == (4, 7)


def test_ellipse_area(tmp_path):
    ls = scene(tmp_path, "  - {id: e, prompt: x, shape: {ellipse: {center: [0.5, 0.5], radii: [0.3, 0.1]}}}\n",
               canvas=(1024, 768))
    d = Diagnostics()
    g = shape_geometry(ls, ls.scene.entities[0].shape, ("entities", 0, "shape"), (1024, 768), d)
    want = math.pi * (0.3 * 1024) * (0.1 * 768)
    assert not d.has_errors()
    assert abs(g.area - want) / want < 0.01
    for px in (8, 16):
        cov = rasterize(g, 0.0, (1024, 768), px)
        assert abs(cov.sum() * px * px - want) / want < 0.01


def test_difference_makes_a_hole(tmp_path):
    ls = scene(tmp_path, "  - id: frame\n    prompt: x\n    shape:\n      difference:\n"
                         "        - {box: [0, 0, 1, 1]}\n        - {box: [0.25, 0.25, 0.75, 0.75]}\n", canvas=(128, 128))
    regs, d = regions(ls)
    g = regs["frame"].geom
    assert not d.has_errors() and g.area == 128 * 128 * 0.75
    assert len(g.interiors) == 1
    cov = rasterize(g, 0.0, (128, 128), 16)
    assert np.all(cov[2:6, 2:6] == 0.0) and cov[0].min() == 1.0 and cov[:, 7].min() == 1.0


def test_feathering_ramps_inward_and_never_leaks():
    g = box(32, 32, 96, 96)
    cov = rasterize(g, 16.0, (128, 128), 1)
    outside = np.ones_like(cov, bool)
    outside[32:96, 32:96] = False
    assert cov[outside].max() == 0.0
    row = cov[64, 32:64]  # from the left edge to the centre
    assert np.all(np.diff(row) >= 0) and row[0] < 0.1 and np.all(row[16:] == 1.0)
    assert abs(row[8] - 0.5) < 0.1  # linear: half way at half the feather width
    # area-weighted at cell level too: the token grid is the average of the pixels
    fine = rasterize(g, 16.0, (128, 128), 1)
    coarse = rasterize(g, 16.0, (128, 128), 16)
    assert np.allclose(coarse, fine.reshape(8, 16, 8, 16).mean(axis=(1, 3)), atol=1e-5)


def test_feathering_keeps_the_canvas_edge_solid():
    cov = rasterize(box(0, 0, 64, 128), 16.0, (128, 128), 1)
    assert np.all(cov[:, 0] == 1.0) and cov[64, 63] < 0.1 and cov[0, 40] == 1.0


def test_feather_is_a_fraction_of_the_short_side(tmp_path):
    ls = scene(tmp_path, "  - {id: a, prompt: x, shape: {box: [0, 0, 1, 1]}, feather: 0.1}\n", canvas=(512, 256))
    regs, _ = regions(ls)
    assert regs["a"].feather_px == pytest.approx(25.6)


# --- shapes ----------------------------------------------------------------------------------------

def test_px_units_and_inheritance(tmp_path):
    ls = scene(tmp_path,
               "  - {id: a, prompt: x, shape: {box: [64, 0, 128, 64], units: px}}\n"
               "  - {id: b, prompt: x, shape: {union: [{box: [0, 0, 32, 32]}, {box: [0.75, 0.75, 1, 1], units: norm}],"
               " units: px}}\n", canvas=(128, 128))
    d = Diagnostics()
    ents = ls.scene.entities
    a = shape_geometry(ls, ents[0].shape, ("entities", 0, "shape"), (128, 128), d)
    b = shape_geometry(ls, ents[1].shape, ("entities", 1, "shape"), (128, 128), d)
    assert not d.has_errors()
    assert a.equals(box(64, 0, 128, 64))
    assert b.equals(box(0, 0, 32, 32).union(box(96, 96, 128, 128)))


def test_partly_outside_is_clipped(tmp_path):
    ls = scene(tmp_path, "  - {id: a, prompt: x, shape: {ellipse: {center: [1, 0.5], radii: [0.25, 0.25]}}}\n",
               canvas=(128, 128))
    regs, d = regions(ls)
    assert not d.has_errors()
    x0, y0, x1, y1 = regs["a"].geom.bounds
    assert x1 == 128 and regs["a"].geom.area == pytest.approx(math.pi * 32 * 32 / 2, rel=0.01)


def test_mask_shape(tmp_path):
    im = Image.new("L", (40, 20), 0)
    im.paste(255, (0, 0, 20, 20))  # left half white
    im.paste(127, (30, 0, 40, 20))  # below the threshold: outside
    im.save(tmp_path / "m.png")
    rgba = Image.new("RGBA", (10, 10), (255, 255, 255, 0))
    rgba.paste((255, 255, 255, 255), (0, 0, 10, 5))  # top half opaque white; transparent = outside
    rgba.save(tmp_path / "a.png")
    ls = scene(tmp_path, "  - {id: m, prompt: x, shape: {mask: m.png}}\n"
                         "  - {id: a, prompt: x, shape: {mask: a.png}, z: -1}\n", canvas=(256, 128))
    d = Diagnostics()
    m = shape_geometry(ls, ls.scene.entities[0].shape, ("entities", 0, "shape"), (256, 128), d)
    a = shape_geometry(ls, ls.scene.entities[1].shape, ("entities", 1, "shape"), (256, 128), d)
    assert not d.has_errors()
    assert m.equals(box(0, 0, 128, 128))  # stretched to the canvas
    assert a.equals(box(0, 0, 256, 64))


def test_big_mask_is_traced_at_working_resolution(tmp_path):
    im = Image.new("L", (2000, 1000), 0)
    from PIL import ImageDraw

    ImageDraw.Draw(im).ellipse((500, 250, 1500, 750), fill=255)
    im.save(tmp_path / "big.png")
    ls = scene(tmp_path, "  - {id: m, prompt: x, shape: {mask: big.png}}\n", canvas=(1024, 512))
    d = Diagnostics()
    g = shape_geometry(ls, ls.scene.entities[0].shape, ("entities", 0, "shape"), (1024, 512), d)
    want = math.pi * 256 * 128
    assert abs(g.area - want) / want < 0.02


# --- occlusion -------------------------------------------------------------------------------------

def test_later_entity_wins_by_default(tmp_path):
    ls = scene(tmp_path, "  - {id: a, prompt: x, shape: {box: [0, 0, 0.6, 1]}}\n"
                         "  - {id: b, prompt: x, shape: {box: [0.4, 0, 1, 1]}}\n", canvas=(100, 100))
    regs, d = regions(ls)
    assert not d.has_errors()
    assert regs["a"].geom.equals(box(0, 0, 40, 100)) and regs["b"].geom.equals(box(40, 0, 100, 100))
    assert list(regs) == ["a", "b"]


def test_explicit_z_wins_and_ties_go_to_the_later(tmp_path):
    ls = scene(tmp_path, "  - {id: a, prompt: x, shape: {box: [0, 0, 0.6, 1]}, z: 5}\n"
                         "  - {id: b, prompt: x, shape: {box: [0.4, 0, 1, 1]}}\n"
                         "  - {id: c, prompt: x, shape: {box: [0.5, 0, 0.7, 1]}, z: 5}\n", canvas=(100, 100))
    regs, d = regions(ls)
    assert not d.has_errors()
    assert regs["c"].geom.equals(box(50, 0, 70, 100))  # tie with a: c is later
    assert regs["a"].geom.equals(box(0, 0, 50, 100))
    assert regs["b"].geom.equals(box(70, 0, 100, 100))
    assert regs["a"].z == 5 and regs["b"].z == 1


def test_entity_without_shape_covers_the_canvas(tmp_path):
    ls = scene(tmp_path, "  - {id: sky, prompt: x}\n  - {id: sun, prompt: x, shape: {box: [0, 0, 0.5, 0.5]}}\n",
               canvas=(64, 64))
    regs, _ = regions(ls)
    assert regs["sky"].geom.area == 64 * 64 - 32 * 32
    assert rasterize(regs["sky"].geom, 0, (64, 64), 16).sum() == 12


def test_subsets_occlude_only_what_is_present(tmp_path):
    ls = scene(tmp_path, "  - {id: a, prompt: x, shape: {box: [0, 0, 0.6, 1]}}\n"
                         "  - {id: b, prompt: x, shape: {box: [0.4, 0, 1, 1]}}\n", canvas=(100, 100))
    regs, _ = regions(ls, ["a"])
    assert list(regs) == ["a"] and regs["a"].geom.equals(box(0, 0, 60, 100))


@pytest.mark.parametrize("layout", ["pile", "crowd"])
def test_the_tiled_coverage_gives_the_regions_of_the_direct_difference(tmp_path, monkeypatch, layout):
    """Above EXACT_MAX entities occlusion runs on tiles (bench/bench_occlusion.py: 22 s → < 1 s at 2000
    entities); every region is the same point set as the direct difference, hidden ones hidden."""
    import sys

    from scenec.compiler import occlusion

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        from bench_occlusion import scene_text
    finally:
        sys.path.pop(0)
    f = tmp_path / "many.yaml"
    f.write_text(scene_text(300, layout, seed=3))
    ls = load_scene(f)
    assert len(ls.scene.entities) > occlusion.EXACT_MAX
    tiled, d_tiled = regions(ls)
    monkeypatch.setattr(occlusion, "EXACT_MAX", 10**9)
    direct, d_direct = regions(ls)
    hidden = [k for k, r in direct.items() if r.geom.is_empty]
    assert [k for k, r in tiled.items() if r.geom.is_empty] == hidden
    assert (len(hidden) > 100) == (layout == "pile")
    for k, r in direct.items():
        assert r.geom.symmetric_difference(tiled[k].geom).area < 1e-6 * max(1.0, r.geom.area), k
    # one error per hidden region, at its shape, naming what hides it
    assert [x.pos for x in d_tiled.errors] == [x.pos for x in d_direct.errors]
    assert all("is hidden entirely by `" in x.message for x in d_tiled.errors)


def test_a_region_hidden_on_the_tiled_path_names_what_hides_it(tmp_path, monkeypatch):
    from scenec.compiler import occlusion

    monkeypatch.setattr(occlusion, "EXACT_MAX", 2)
    ls = scene(tmp_path, "  - {id: a, prompt: x, shape: {box: [0.1, 0.1, 0.2, 0.2]}}\n"
                         "  - {id: b, prompt: x, shape: {box: [0.6, 0.6, 0.8, 0.8]}}\n"
                         "  - {id: c, prompt: x, shape: {box: [0, 0, 0.5, 0.5]}}\n"
                         "  - {id: d, prompt: x, shape: {box: [0.5, 0.5, 0.7, 1]}}\n"
                         "  - {id: e, prompt: x, shape: {box: [0.7, 0.5, 1, 1]}}\n", canvas=(100, 100))
    _, d = regions(ls)
    assert errors(d) == ["4:31: the region of `a` is hidden entirely by `c`",
                         "5:31: the region of `b` is hidden entirely by `d` and `e` together"]


# --- problems, at their positions ----------------------------------------------------------------

def test_problems_are_reported_where_the_shape_was_written(tmp_path):
    ls = scene(tmp_path,
               "  - {id: a, prompt: x, shape: {box: [0.5, 0.1, 0.2, 0.9]}}\n"                       # 4
               "  - {id: b, prompt: x, shape: {polygon: [[0, 0], [1, 1], [1, 0], [0, 1]]}}\n"          # 5
               "  - {id: c, prompt: x, shape: {box: [10, 10, 20, 20]}}\n"                              # 6
               "  - {id: d, prompt: x, shape: {intersection: [{box: [0, 0, 0.2, 0.2]}, {box: [0.5, 0.5, 1, 1]}]}}\n"
               "  - {id: e, prompt: x, shape: {box: [0.1, 0.1, 0.2, 0.2]}}\n"                          # 8
               "  - {id: f, prompt: x, shape: {box: [0, 0, 0.5, 0.5]}}\n"                              # 9
               "  - {id: g, prompt: x, shape: {polygon: [[0, 0], [0.5, 0.5], [1, 1]]}}\n",              # 10
               canvas=(100, 100))
    regs, d = regions(ls)
    errs = errors(d)
    assert errs[0].startswith("4:31: degenerate box [0.5, 0.1, 0.2, 0.9]")
    assert errs[1].startswith("5:31: polygon is not simple: its outline crosses itself at (0.5, 0.5)")
    assert errs[2].startswith("6:31: box lies entirely outside the canvas (100x100 px)")
    assert errs[3].startswith("7:31: intersection is empty")
    assert errs[4] == "8:31: the region of `e` is hidden entirely by `f`"
    assert errs[5].startswith("10:31: degenerate polygon")
    assert len(errs) == 6
    # every id still gets a region (empty where there was a problem), so passes can go on
    assert set(regs) == set("abcdefg") and regs["a"].geom.is_empty and regs["e"].geom.is_empty
    hint = next(x.hint for x in d if "outside" in x.message)
    assert "units: px" in hint


def test_hidden_entity_without_shape_is_reported_at_its_id(tmp_path):
    ls = scene(tmp_path, "  - {id: sky, prompt: x}\n  - {id: wall, prompt: x, shape: {box: [0, 0, 1, 1]}}\n",
               canvas=(64, 64))
    _, d = regions(ls)
    assert errors(d) == ["4:10: the region of `sky` is hidden entirely by `wall`"]


def test_empty_mask_and_missing_mask(tmp_path):
    Image.new("L", (8, 8), 10).save(tmp_path / "dark.png")
    ls = scene(tmp_path, "  - {id: a, prompt: x, shape: {mask: dark.png}}\n"
                         "  - {id: b, prompt: x, shape: {mask: nope.png}}\n", canvas=(64, 64))
    _, d = regions(ls)
    errs = errors(d)
    assert errs[0].startswith("4:31: mask `dark.png` is empty")
    assert errs[1].startswith("5:38: mask `nope.png` not found")


def test_related_shapes_are_checked(tmp_path):
    ls = scene(tmp_path, "  - id: face\n    prompt: x\n    shape: {box: [0, 0, 0.5, 0.5]}\n"
                         "    reference: {image: face.png, related: {box: [2, 2, 3, 3]}}\n", canvas=(64, 64))
    d = Diagnostics()
    check_geometry(ls, FLUX, d)
    assert errors(d) == ["7:43: box lies entirely outside the canvas (64x64 px)"]


def test_tiny_region_warns(tmp_path):
    ls = scene(tmp_path, "  - {id: speck, prompt: x, shape: {box: [10, 10, 14, 14], units: px}}\n", canvas=(256, 256))
    d = Diagnostics()
    check_geometry(ls, FLUX, d)
    assert not d.has_errors() and "less than one attention token" in d.warnings[0].message


def test_feather_wider_than_the_region_warns(tmp_path):
    ls = scene(tmp_path, "  - {id: stick, prompt: x, shape: {box: [0.1, 0.1, 0.15, 0.9]}, feather: 0.2}\n",
               canvas=(256, 256))
    d = Diagnostics()
    check_geometry(ls, FLUX, d)
    assert not d.has_errors() and "narrower than its feather" in d.warnings[0].message
    assert d.warnings[0].pos.line == 4


def test_groups_check_each_variant(tmp_path):
    ls = scene(tmp_path, "  - {id: a, prompt: x, shape: {box: [0.2, 0.2, 0.4, 0.4]}}\n"
                         "  - {id: b, prompt: x, shape: {box: [0, 0, 1, 1]}}\n",
               extra="groups:\n  - id: g\n    variants:\n      - {id: one, entities: [a]}\n"
                     "      - {id: two, entities: [b]}\n", canvas=(64, 64))
    d = Diagnostics()
    check_geometry(ls, FLUX, d)
    assert not d.has_errors()  # a and b never share an image
    ls = scene(tmp_path, "  - {id: a, prompt: x, shape: {box: [0.2, 0.2, 0.4, 0.4]}}\n"
                         "  - {id: b, prompt: x, shape: {box: [0, 0, 1, 1]}}\n",
               extra="groups:\n  - id: g\n    variants:\n      - {id: one, entities: [a]}\n"
                     "      - {id: two, entities: [a, b]}\n", canvas=(64, 64))
    d = Diagnostics()
    check_geometry(ls, FLUX, d)
    assert errors(d) == ["4:31: the region of `a` is hidden entirely by `b`"]


# --- the bad corpus (tests/bad/geom_*.yaml) --------------------------------------------------------

GEOM_BAD = sorted(BAD.glob("geom_*.yaml"))


@pytest.mark.parametrize("path", GEOM_BAD, ids=[p.stem for p in GEOM_BAD])
def test_bad_corpus_geometry(path):
    expects = re.findall(r"^# expect: (\d+):(\d+): (.*)$", path.read_text(), flags=re.M)
    assert expects
    d = Diagnostics()
    ls = load_scene(path, d)
    check_geometry(ls, FLUX, d)
    got = [(x.pos.line, x.pos.col, x.message) for x in d.sorted() if x.severity == "error"]
    assert len(got) == len(expects), got
    for line, col, text in expects:
        assert any((ln, cl) == (int(line), int(col)) and text in msg for ln, cl, msg in got), (line, col, text, got)


def test_bench_scene_meets_the_budget_shape():
    """The benchmark's scene is valid (the timing itself lives in bench/bench_compile.py)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import bench_compile
    finally:
        sys.path.pop(0)
    text = bench_compile.scene_yaml(32, 1024)
    assert text.count("- id:") == 32
