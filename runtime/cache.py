"""The backends' text-encoding cache: least recently used entries go first.

A batch build runs many scenes on one loaded model; scenes of one project share prompts (a
background, a style, a negative), so encodings are kept across scenes, bounded in count.
"""

from __future__ import annotations

import os
from collections import OrderedDict

TEXT_CACHE_ENTRIES = 128  # Flux: a 512-token T5 sequence in bf16 is 4 MiB, so at most ~0.5 GiB


class TextCache(OrderedDict):
    """An OrderedDict that moves read entries to the end and drops the oldest beyond ``limit``."""

    def __init__(self, limit: int = TEXT_CACHE_ENTRIES):
        super().__init__()
        self.limit = limit
        self.hits = 0
        self.misses = 0

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def __contains__(self, key) -> bool:
        found = super().__contains__(key)
        if found:
            self.hits += 1
        else:
            self.misses += 1
        return found

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


def file_stamp(path: str | None) -> tuple | None:
    """A file's (mtime, size), or None: what tells a loaded adapter or model from a file changed since."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def dir_stamp(path: str | None) -> tuple | None:
    """A directory's files' (name, mtime, size), or None (no directory): image encoders, ControlNets."""
    if path is None or not os.path.isdir(path):
        return None
    files = sorted((e for e in os.scandir(path) if e.is_file()), key=lambda e: e.name)
    return tuple((e.name, *(file_stamp(e.path) or ())) for e in files)
