"""The embedding cache on its own: LRU order, entry and byte bounds, counters, content keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import EmbeddingCache, image_key


def test_lru_entries_bound_and_counters() -> None:
    cache = EmbeddingCache(max_entries=2, max_bytes=10**6)
    a, b, c = (torch.full((1, 1, 4), float(i)) for i in range(3))
    assert cache.get("a") is None
    cache.put("a", a)
    cache.put("b", b)
    assert torch.equal(cache.get("a"), a)  # a is now most recent
    cache.put("c", c)  # evicts b
    assert "b" not in cache and "a" in cache and "c" in cache
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"], stats["bytes"]) == (1, 1, 2, 2 * 4 * 4)
    assert stats["evictions"] == 1


def test_bytes_bound_and_oversized_entries() -> None:
    cache = EmbeddingCache(max_entries=100, max_bytes=64)
    cache.put("x", torch.zeros(8))  # 32 bytes
    cache.put("y", torch.zeros(8))
    cache.put("z", torch.zeros(8))  # 96 > 64: x goes
    assert len(cache) == 2 and cache.stats()["bytes"] == 64
    cache.put("huge", torch.zeros(100))  # bigger than the whole cache: never stored
    assert "huge" not in cache and len(cache) == 2


def test_stored_value_is_a_copy() -> None:
    cache = EmbeddingCache()
    t = torch.ones(3)
    cache.put("k", t)
    t.zero_()
    assert torch.equal(cache.get("k"), torch.ones(3))


def test_disabled_cache_and_bad_bounds() -> None:
    cache = EmbeddingCache(max_entries=0)
    cache.put("k", torch.ones(1))
    assert cache.get("k") is None and cache.stats()["misses"] == 1
    with pytest.raises(ValueError):
        EmbeddingCache(max_entries=-1)


def test_image_key_is_content_not_identity() -> None:
    arr = np.random.RandomState(0).randint(0, 255, (8, 8, 3), dtype=np.uint8)
    a, b = Image.fromarray(arr), Image.fromarray(arr.copy())
    assert image_key(a) == image_key(b)
    arr[0, 0, 0] ^= 1
    assert image_key(Image.fromarray(arr)) != image_key(a)
    assert image_key(a) != image_key(a.resize((8, 4)))


def test_image_key_of_tensors_is_content_dtype_and_shape() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(1, 3, 2, 2)
    assert image_key(t) == image_key(t.clone()) != image_key(t.to(torch.float16))
    assert image_key(t) != image_key(t.reshape(1, 3, 4, 1))
    assert image_key(t.to(torch.bfloat16)) != image_key(t.to(torch.float16))  # bfloat16 hashes too
    u = t.clone()
    u[0, 0, 0, 0] = 0.5
    assert image_key(u) != image_key(t)
