"""Outputs: PNG + metadata + sidecar, written atomically and deterministically; scenec.build."""

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
    plan = make_plan(seeds=[1, 2])
    plan.jobs[0]["program"] = [{"op": "warp"}]  # an op no runtime knows
    res = execute(plan, backend, tmp_path)
    assert res[0]["status"] == "failed" and "not supported" in res[0]["error"] and res[1]["status"] == "built"


def test_unsafe_output_name(backend, tmp_path):
    plan = make_plan()
    plan.jobs[0]["name"] = "../escape"
    assert execute(plan, backend, tmp_path)[0]["status"] == "failed"


def test_build_compiles_once_and_counts(monkeypatch, tmp_path):
    import scenec.build as b
    import scenec.runtime.flux as flux

    calls = []
    monkeypatch.setattr(b, "_compile", lambda p, model: calls.append(p) or make_plan(seeds=[1, 2]))
    loads = []
    monkeypatch.setattr(flux, "load_backend", lambda m, **kw: loads.append(m) or tiny_backend())
    s = b.build([tmp_path / "a.yaml", tmp_path / "b.yaml"], out=tmp_path / "out", quiet=True)
    assert s["built"] == 4 and s["failed"] == 0 and s["cached"] == 0 and len(s["outputs"]) == 4
    assert len(loads) == 1 and len(calls) == 2  # the model loads once for both scenes
    assert (tmp_path / "out" / "test-1.png").is_file()


def test_build_reports_missing_model(monkeypatch, tmp_path):
    import scenec.build as b
    import scenec.runtime.flux as flux
    from scenec.runtime.errors import ModelUnavailable

    def unavailable(m, **kw):
        raise ModelUnavailable("weights of 'x/y' are not available here")

    monkeypatch.setattr(b, "_compile", lambda p, model: make_plan(seeds=[1, 2]))
    monkeypatch.setattr(flux, "load_backend", unavailable)
    s = b.build([tmp_path / "a.yaml"], out=tmp_path / "out", quiet=True)
    assert s["built"] == 0 and s["failed"] == 2 and "not available" in s["errors"][0]


def test_build_reports_every_invalid_scene_before_loading(monkeypatch, tmp_path):
    import scenec.build as b
    import scenec.runtime.flux as flux
    from scenec.spec.diagnostics import Diagnostic, Pos, SceneError

    def bad(p, model):
        raise SceneError([Diagnostic(Pos(str(p), 3, 5), "bad shape")])

    monkeypatch.setattr(b, "_compile", bad)
    monkeypatch.setattr(flux, "load_backend", lambda *a, **k: pytest.fail("loaded a model for invalid input"))
    with pytest.raises(SceneError) as e:
        b.build([tmp_path / "a.yaml", tmp_path / "b.yaml"], quiet=True)
    assert len(e.value.diagnostics.items) == 2
