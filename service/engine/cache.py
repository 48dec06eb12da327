"""An LRU cache of pooled embeddings, bounded by memory.

Keyed by model and the exact token ids the model would read (so text, prompt, truncation side and
limit are all part of the key, and two texts that tokenize alike share an entry). It holds the pooled
vector before normalization and `dimensions`, so every request option is served from one entry.
Only the event loop touches it: no lock.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

# Rough per-entry overhead of the dict slot, key tuple and array header, so the bound is honest.
_ENTRY_OVERHEAD = 200


class EmbeddingCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._data: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._data)

    @staticmethod
    def key(model_id: str, ids: np.ndarray | bytes, prompt_length: int) -> tuple:
        return (model_id, prompt_length, ids if isinstance(ids, bytes) else ids.tobytes())

    def get(self, key: tuple) -> np.ndarray | None:
        vec = self._data.get(key)
        if vec is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return vec

    def put(self, key: tuple, vec: np.ndarray) -> None:
        if not self.enabled or key in self._data:
            return
        size = vec.nbytes + len(key[2]) + _ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        self._data[key] = vec
        self.bytes += size
        while self.bytes > self.max_bytes:
            old_key, old = self._data.popitem(last=False)
            self.bytes -= old.nbytes + len(old_key[2]) + _ENTRY_OVERHEAD

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
