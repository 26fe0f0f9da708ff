"""Every test process keeps scenec's caches (inversions, compile memos) in a temp dir, never in ~/.cache."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    old = os.environ.get("SCENEC_CACHE")
    os.environ["SCENEC_CACHE"] = str(tmp_path_factory.mktemp("scenec-cache"))
    yield
    if old is None:
        os.environ.pop("SCENEC_CACHE", None)
    else:
        os.environ["SCENEC_CACHE"] = old
