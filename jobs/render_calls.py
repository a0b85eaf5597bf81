"""A worker's pipeline calls, rendered through the renderer's stream (decode overlapped).

The rows of a batch form groups (``group_rows``: rows sharing their batching key,
``workers.render_batch`` at a time); a group with its loaded images is one ``GroupCall``, one
request of ``Renderer.generate_stream``, which decodes a call while the next one denoises.
``render_calls`` yields each call's ``CallOutcome`` in order: its videos, or the exception that
failed it. The renderer's stream ends at the first failing request (a generator cannot go on
after raising); ``render_calls`` then starts a new stream at the call after it, so a failing
call fails only itself: the calls before it were yielded already, those after it render in the
new stream. A call the stream had begun when the decode before it raised is rendered again
from the start (the same frames: each row's noise comes from its own seed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from jobs.planner import RowTask


def group_rows(tasks: list[RowTask], rows_per_call: int) -> list[list[int]]:
    """Task indices to render together: rows sharing their batching key (the planner's,
    ``RowTask.key``), ``rows_per_call`` (``workers.render_batch``) at a time, in task order."""
    if rows_per_call == 1:
        return [[i] for i in range(len(tasks))]
    by_key: dict[tuple, list[int]] = {}
    for i, task in enumerate(tasks):
        by_key.setdefault(task.key, []).append(i)
    return [
        rows[start : start + rows_per_call]
        for rows in by_key.values()
        for start in range(0, len(rows), rows_per_call)
    ]


@dataclass(eq=False)
class GroupCall:
    """One pipeline call: the rows (task indices) whose image loaded, with their loaded images,
    seeds and load seconds; ``kwargs``: every other ``generate_batch`` argument (shared)."""

    kwargs: dict[str, Any]
    rows: list[int] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    loaded: list[float] = field(default_factory=list)

    def add(self, row: int, image: Any, seed: int, loaded: float) -> None:
        self.rows.append(row)
        self.images.append(image)
        self.seeds.append(seed)
        self.loaded.append(loaded)

    def request(self) -> dict[str, Any]:
        """The call as a ``generate_batch`` / ``generate_stream`` request."""
        return {"images": list(self.images), "seeds": list(self.seeds), **self.kwargs}


@dataclass
class CallOutcome:
    """How a call ended: ``videos`` (one per row, in order) or ``error``; ``seconds`` from the
    stream taking the request to its outcome (overlapped: it includes the next call's denoising,
    which runs before this call's videos come back); ``peak``: its CUDA memory peak (None off CUDA)."""

    videos: list[Any] | None
    error: Exception | None
    seconds: float
    peak: int | None


class PeakMemory:
    """The CUDA memory peak of each call while it was in flight, for overlapping calls.

    torch keeps one peak per device; it is read and reset whenever a call starts or stops, and
    each read goes to every call in flight then. Overlapped, a call's peak thus includes the
    decode (or denoising) of its neighbour that ran beside it: what the device needed while
    the call ran. Off CUDA, every peak is None."""

    def __init__(self, on_cuda: bool) -> None:
        self.on_cuda = on_cuda
        self._peaks: dict[int, int] = {}

    def _read(self) -> None:
        if not self.on_cuda:
            return
        import torch

        peak = int(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        for key, value in self._peaks.items():
            self._peaks[key] = max(value, peak)

    def start(self, call: object) -> None:
        self._read()
        self._peaks[id(call)] = 0

    def stop(self, call: object) -> int | None:
        self._read()
        peak = self._peaks.pop(id(call), None)
        return peak if self.on_cuda else None


Stream = Callable[[Iterable[dict[str, Any]]], Iterator[list[Any]]]


def render_calls(
    stream: Stream,
    calls: list[GroupCall],
    peaks: PeakMemory,
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[tuple[GroupCall, CallOutcome]]:
    """Each call with its outcome, in order. ``stream(requests)`` yields one list of videos per
    request, in order, and raises at a request that fails after yielding those before it
    (``Renderer.generate_stream``'s contract); after a raise, a new stream starts at the next call."""
    sent: dict[int, float] = {}

    def requests(todo: list[GroupCall]) -> Iterator[dict[str, Any]]:
        for call in todo:  # taken by the stream when it is ready for it (overlapped: one ahead)
            sent[id(call)] = clock()
            peaks.start(call)
            yield call.request()

    def outcome(call: GroupCall, videos: list[Any] | None, error: Exception | None) -> CallOutcome:
        return CallOutcome(videos, error, clock() - sent.get(id(call), clock()), peaks.stop(call))

    first = 0
    while first < len(calls):
        done = first
        try:
            for videos in stream(requests(calls[first:])):
                call = calls[done]
                done += 1
                yield call, outcome(call, videos, None)
            return
        except Exception as exc:
            yield calls[done], outcome(calls[done], None, exc)
            first = done + 1
