"""End to end: a scene compiled by scenec.compiler runs on the tiny backend (the plan contract, both sides)."""

from pathlib import Path

import pytest

from scenec.runtime.outputs import execute
from scenec.runtime.testing import tiny_backend

SCENES = Path(__file__).parent / "scenes"


def test_compiled_regional_scene_builds(tmp_path):
    from scenec.compiler import compile_scene

    try:
        plan = compile_scene(SCENES / "regional.yaml")
    except ModuleNotFoundError as e:  # the compiler is landing in parallel; run once it has
        pytest.skip(f"compiler incomplete: {e}")
    res = execute(plan, tiny_backend(), tmp_path, masks=True)
    assert res and all(r["status"] == "built" for r in res), res
    assert all(len(r["masks"]) == len(plan.json["jobs"][0]["entities"]) for r in res)
