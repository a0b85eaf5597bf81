"""Going on with less after a CUDA out-of-memory error: rows per pipeline call in
``pipeline.renderer``, frames per VAE decode chunk in ``pipeline.svd``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def halve_on_oom(
    attempt: Callable[[int], T], size: int, on_halve: Callable[[int, int], None] | None = None
) -> tuple[T, int]:
    """``attempt(size)``; while it raises ``torch.OutOfMemoryError``, ``attempt`` again with
    half the size (rounded up), down to 1, where the error is raised to the caller. Returns the
    result and the size that worked (for the caller to keep: a size that ran out once is not
    tried again). ``on_halve(size, smaller)`` is called before each retry (to log it)."""
    while True:
        try:
            return attempt(size), size
        except torch.OutOfMemoryError:
            if size <= 1:
                raise
        # Outside the except block, so the failed attempt's tensors are already released.
        smaller = (size + 1) // 2
        if on_halve is not None:
            on_halve(size, smaller)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        size = smaller
