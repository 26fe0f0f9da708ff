"""The backends' text-encoding cache: least recently used entries go first.

A batch build runs many scenes on one loaded model; scenes of one project share prompts (a
background, a style, a negative), so encodings are kept across scenes, bounded in count.
"""

from __future__ import annotations

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
