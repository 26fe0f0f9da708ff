"""Every test process keeps scenec's caches (inversions, compile memos) in a temp dir, never in ~/.cache.

Under pytest-xdist each worker computes on one thread: workers already fill the cores, and several
OpenMP threads per worker on a small machine oversubscribe it (spin-waiting threads made single
tests 60 times slower). Subprocesses the tests start inherit the setting."""

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    old = os.environ.get("SCENEC_CACHE")
    os.environ["SCENEC_CACHE"] = str(tmp_path_factory.mktemp("scenec-cache"))
    yield
    if old is None:
        os.environ.pop("SCENEC_CACHE", None)
    else:
        os.environ["SCENEC_CACHE"] = old
