"""``pipeline.oom.halve_on_oom`` with a fake CUDA out-of-memory error (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from pipeline.oom import halve_on_oom


def _fits(limit: int, tried: list[int]):
    """An attempt that runs out of memory above ``limit`` rows; returns one item per row."""

    def attempt(n: int) -> list[int]:
        tried.append(n)
        if n > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated, {n} > {limit})")
        return list(range(n))

    return attempt


@pytest.mark.parametrize(
    "size, limit, tried",
    [(8, 8, [8]), (8, 3, [8, 4, 2]), (7, 3, [7, 4, 2]), (3, 1, [3, 2, 1]), (14, 5, [14, 7, 4])],
)
def test_halves_rounding_up_until_it_fits(size, limit, tried):
    seen: list[int] = []
    halved: list[tuple[int, int]] = []
    result, used = halve_on_oom(_fits(limit, seen), size, lambda a, b: halved.append((a, b)))
    assert seen == tried and used == tried[-1] and result == list(range(used))
    assert halved == list(zip(tried, tried[1:], strict=False))  # (size that failed, next) per retry


def test_out_of_memory_at_size_one_is_raised():
    seen: list[int] = []
    with pytest.raises(torch.OutOfMemoryError, match="simulated, 1 > 0"):
        halve_on_oom(_fits(0, seen), 4)
    assert seen == [4, 2, 1]


def test_other_errors_are_not_retried():
    calls: list[int] = []

    def attempt(n: int) -> None:
        calls.append(n)
        raise RuntimeError("not memory")

    with pytest.raises(RuntimeError, match="not memory"):
        halve_on_oom(attempt, 8)
    assert calls == [8]
