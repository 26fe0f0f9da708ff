"""Outputs: PNG + metadata + sidecar, written atomically and deterministically."""

import json

import pytest
from PIL import Image

from scenec.runtime.outputs import execute
from scenec.runtime.testing import box, make_plan, tiny_backend

ENTS = [{"id": "fox", "prompt": "a red fox", "token": box((16, 16), 2, 2, 9, 9)}]
KEYS = {"scenec:scene", "scenec:job", "scenec:seed", "scenec:plan_hash", "scenec:job_hash", "scenec:model",
        "scenec:version"}


@pytest.fixture(scope="module")
def backend():
    return tiny_backend()


def test_png_metadata_sidecar_masks(backend, tmp_path):
    plan = make_plan(entities=ENTS, seeds=[1, 2])
    seen = []
    res = execute(plan, backend, tmp_path, masks=True, progress=lambda d, t, n: seen.append((d, t)))
    assert [r["status"] for r in res] == ["built", "built"] and seen[-1] == (8, 8)
    r = res[0]
    with Image.open(r["image"]) as im:
        assert KEYS <= set(im.text) and im.text["scenec:job"] == "test-1" and im.text["scenec:seed"] == "1"
        assert im.text["scenec:model"] == "tiny" and im.text["scenec:plan_hash"] == "planhash"
    side = json.loads((tmp_path / "test-1.json").read_text())
    assert KEYS <= set(side) and side["timings"]["total_s"] > 0 and side["masks"] == ["test-1.mask-fox.png"]
    with Image.open(tmp_path / "test-1.mask-fox.png") as m:
        assert m.size == (16, 16) and m.getpixel((3, 3)) == 255 and m.getpixel((12, 12)) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    assert (tmp_path / "test-1.png").read_bytes() != (tmp_path / "test-2.png").read_bytes()  # other seed


def test_two_runs_identical_bytes(backend, tmp_path):
    plan = make_plan(entities=ENTS, seed=4)
    a = execute(plan, backend, tmp_path / "a")[0]["image"]
    b = execute(plan, backend, tmp_path / "b")[0]["image"]
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()


def test_failed_job_does_not_stop_the_others(backend, tmp_path):
    def warp(doc, tensors):
        doc["jobs"][0]["program"] = [{"op": "warp"}]  # an op no runtime knows

    plan = make_plan(seeds=[1, 2], edit=warp)
    res = execute(plan, backend, tmp_path)
    assert res[0]["status"] == "failed" and "not supported" in res[0]["error"] and res[1]["status"] == "built"


def test_unsafe_output_name(backend, tmp_path):
    plan = make_plan(edit=lambda doc, tensors: doc["jobs"][0].update(name="../escape"))
    assert execute(plan, backend, tmp_path)[0]["status"] == "failed"


def test_a_file_scenec_did_not_write_is_never_replaced(backend, tmp_path):
    """Nothing is lost: a user's own image (or JSON) at an output path fails that job, the file untouched; an
    image scenec wrote there before is replaced as usual."""
    plan = make_plan(seeds=[1, 2])
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "test-1.png")  # the user's, no scenec metadata
    (tmp_path / "test-2.json").write_text('{"mine": true}')
    before = (tmp_path / "test-1.png").read_bytes()
    res = execute(plan, backend, tmp_path)
    assert [r["status"] for r in res] == ["failed", "failed"]
    assert "test-1.png exists and was not written by scenec" in res[0]["error"]
    assert "test-2.json exists and was not written by scenec" in res[1]["error"]
    assert (tmp_path / "test-1.png").read_bytes() == before and not (tmp_path / "test-2.png").exists()
    (tmp_path / "test-1.png").unlink()
    (tmp_path / "test-2.json").unlink()
    assert [r["status"] for r in execute(plan, backend, tmp_path)] == ["built", "built"]
    again = make_plan(seeds=[1, 2], prompt="another prompt")
    assert [r["status"] for r in execute(again, backend, tmp_path)] == ["built", "built"]  # ours: replaced


def test_an_image_edited_after_it_was_built_is_kept_beside(backend, tmp_path):
    """Nothing is lost: an image scenec built and someone changed since (its bytes no longer its sidecar's sha256;
    its scenec metadata kept, as most editors keep PNG text) is moved to `NAME.edited.png` before it is replaced,
    then `.edited-2.png`; an unchanged image is replaced in place, nothing kept."""
    from PIL.PngImagePlugin import PngInfo

    plan = make_plan(seeds=[1])
    out = tmp_path / "test-1.png"
    first = execute(plan, backend, tmp_path)[0]
    assert "kept" not in first and "kept" not in execute(plan, backend, tmp_path)[0]  # unchanged: no copy
    original = out.read_bytes()
    for k, want in ((1, "test-1.edited.png"), (2, "test-1.edited-2.png")):
        with Image.open(out) as im:
            info = PngInfo()
            for key, v in im.text.items():
                info.add_text(key, v)
            im.convert("RGB").point(lambda v, k=k: 255 - v if k == 1 else v // 2).save(out, pnginfo=info)
        edited = out.read_bytes()
        r = execute(plan, backend, tmp_path)[0]
        assert r["status"] == "built" and r["kept"] == str(tmp_path / want)
        assert (tmp_path / want).read_bytes() == edited and out.read_bytes() == original
