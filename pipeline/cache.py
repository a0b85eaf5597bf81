"""A bounded LRU cache of CLIP image embeddings, one per renderer.

Rows of a manifest often share an image (several seeds, motion buckets or fps per image).
SVD conditions on the CLIP embedding of the image, which depends only on the pixels the
image encoder sees and the model, so the renderer keys it by a content hash of those pixels
(the encoder's input, after diffusers' own resizing and normalisation) and skips the image
encoder on a hit (see :mod:`pipeline.svd`).

What is cached is the encoder's raw ``image_embeds`` row ``(1, D)``, before diffusers adds
the token axis and the classifier-free-guidance zeros. The VCUT constants derived from it
(``to_out(to_v(e))`` of every spatial cross-attention, the "one-time linear") are cached
*inside* vcut's attention processors, keyed by the embedding's content; since a hit returns
the very same embedding values, a hit also reuses those constants, and gives exactly the
frames a miss gives.

The cache is bounded both by entries and by bytes; the least recently used entries are
evicted first. Counters ``hits``/``misses`` are cumulative for the jobs layer to export.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable

import torch
from PIL import Image


def image_key(img: Image.Image | torch.Tensor) -> str:
    """SHA-256 of an image's content, not its source: a PIL image's mode, size and pixel bytes,
    or a tensor's dtype, shape and values (copied to the host first; any dtype, bfloat16 too)."""
    h = hashlib.sha256()
    if isinstance(img, torch.Tensor):
        t = img.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
    h.update(f"{img.mode}:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


class EmbeddingCache:
    """LRU cache of tensors bounded by ``max_entries`` and ``max_bytes`` (thread-safe).

    ``max_entries=0`` or ``max_bytes=0`` disables caching (every lookup is a miss).
    A tensor larger than ``max_bytes`` is never stored.
    """

    def __init__(self, max_entries: int = 64, max_bytes: int = 256 * 2**20) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError(f"cache bounds must be >= 0, got entries={max_entries} bytes={max_bytes}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._data: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._lock = threading.Lock()

    @staticmethod
    def _nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def get(self, key: Hashable) -> torch.Tensor | None:
        """The cached tensor for ``key`` (counted as a hit), or None (counted as a miss)."""
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        """Store a detached copy of ``value`` and evict LRU entries beyond the bounds."""
        size = self._nbytes(value)
        if self.max_entries == 0 or size > self.max_bytes:
            return
        value = value.detach().clone()
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= self._nbytes(old)
            self._data[key] = value
            self._bytes += size
            while len(self._data) > self.max_entries or self._bytes > self.max_bytes:
                _, evicted = self._data.popitem(last=False)
                self._bytes -= self._nbytes(evicted)
                self.evictions += 1

    def clear(self) -> None:
        """Drop every entry (the counters are kept)."""
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def stats(self) -> dict[str, int]:
        """``hits``, ``misses``, ``entries``, ``bytes`` (plus ``evictions`` and the bounds)."""
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "entries": len(self._data),
                "bytes": self._bytes,
                "evictions": self.evictions,
                "max_entries": self.max_entries,
                "max_bytes": self.max_bytes,
            }
