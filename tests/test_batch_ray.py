"""`--executor ray` on a local CPU Ray with two workers and `tiny`: same outputs, manifest and cache."""

import json

import pytest

ray = pytest.importorskip("ray")

from scenec.build.driver import build_batch  # noqa: E402
from scenec.build.manifest import Manifest  # noqa: E402
from scenec.build.options import BuildOptions  # noqa: E402
from scenec.spec.fsio import sha256_file  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_ray_executor_builds_records_and_caches(local_ray, tmp_path):
    for i in range(2):
        (tmp_path / f"r{i}.yaml").write_text(
            "scenec: 1\nmodel: tiny\ncanvas: {width: 64, height: 64}\nsampler: {steps: 2, seed: [1, 2]}\n"
            f"background: {{prompt: \"ray scene {i}\"}}\n"
            "entities:\n  - {id: fox, prompt: \"a fox\", shape: {box: [0.1, 0.5, 0.5, 0.9]}}\n"
            "output: {name: \"{scene}/{seed}\"}\n")  # names with a subfolder travel too
    s = build_batch([tmp_path], BuildOptions(executor="ray", quiet=True))
    assert (s["built"], s["failed"]) == (4, 0), s["errors"]
    assert len({o["worker"] for o in s["outputs"]}) == 2  # both actors worked
    man = Manifest.load(tmp_path / "out")
    assert set(man.outputs) == {"r0/1", "r0/2", "r1/1", "r1/2"}
    for name, e in man.outputs.items():
        assert e["sha256"] == sha256_file(tmp_path / "out" / e["image"])
        assert json.loads((tmp_path / "out" / e["sidecar"]).read_text())["scenec:job"] == name
    assert not list((tmp_path / "out").rglob("*.tmp"))
    # the sidecars made on the actors carry the build's stamps: a damaged manifest is recovered from them
    from scenec.build.manifest import recover

    assert {n: e["key"] for n, e in recover(tmp_path / "out").items()} == {n: e["key"] for n, e in man.outputs.items()}
    # the same keys as the local executor: nothing to rebuild, whichever executor asks
    assert build_batch([tmp_path], BuildOptions(quiet=True, dry_run=True))["cached"] == 4
    assert build_batch([tmp_path], BuildOptions(executor="ray", quiet=True))["cached"] == 4


def test_ray_executor_ships_compatible_jobs_as_one_batch(local_ray, tmp_path):
    for i in range(2):
        (tmp_path / f"b{i}.yaml").write_text(
            "scenec: 1\nmodel: tiny\ncanvas: {width: 64, height: 64}\nsampler: {steps: 2, seed: [1, 2]}\n"
            f"background: {{prompt: \"batched scene {i}\"}}\n")
    s = build_batch([tmp_path], BuildOptions(executor="ray", quiet=True, batch_size=2))
    assert (s["built"], s["failed"]) == (4, 0), s["errors"]
    assert len({o["worker"] for o in s["outputs"]}) == 2  # two batches of two, one per actor
    man = Manifest.load(tmp_path / "out")
    assert set(man.outputs) == {"b0-1", "b0-2", "b1-1", "b1-2"}
    for name, e in man.outputs.items():
        side = json.loads((tmp_path / "out" / e["sidecar"]).read_text())
        assert side["scenec:job"] == name and side["timings"]["batch"] == 2
        assert e["sha256"] == sha256_file(tmp_path / "out" / e["image"])
    assert build_batch([tmp_path], BuildOptions(quiet=True, dry_run=True))["cached"] == 4
