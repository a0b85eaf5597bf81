"""Commits off the driver's loop: a writer thread with a bounded queue.

The loop hands finished rows to :meth:`Committer.put` and goes on collecting results and
sending batches; one thread writes them (``jobs.results.ResultWriter``: one part per write,
merges every ``merge_every`` parts from memory). Whatever has queued up while a write was in
progress, or within ``LINGER_S`` of the previous write's start, is written as one part, so a
slow store (20 ms a request) gets fewer, larger parts instead of slowing the loop.
:meth:`Committer.committed` hands the loop the rows that are on storage (counts, progress and
hooks see committed rows only). A storage failure in the thread (``jobs.output.OutputError``)
is raised to the loop by the next ``put``, ``committed`` or ``close``; nothing after it is
written. The queue is bounded (``max_pending`` row lists): when storage cannot keep up at all,
``put`` waits, so memory stays bounded.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from typing import Any

from jobs.results import ResultWriter

_CLOSE = object()
#: Seconds a part waits for more rows after the previous write began: at most ~1/LINGER_S parts
#: a second (fewer requests on an object store, fewer fsyncs on a disk); a crash loses at most
#: that much of finished work, which renders again on the next run.
LINGER_S = 0.2


class Committer:
    """One writer thread for one job's results (a context manager: ``close`` on exit)."""

    def __init__(
        self,
        writer: ResultWriter,
        max_pending: int = 1024,
        max_rows_per_part: int = 4096,
        linger_s: float = LINGER_S,
    ):
        self.writer = writer
        self.max_rows_per_part = max_rows_per_part
        self.linger_s = linger_s
        self._last_write = -math.inf
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vcut-commit", daemon=True)
        self._thread.start()

    def put(self, rows: list[dict[str, Any]]) -> None:
        """Queue ``rows`` to be committed (waits only when ``max_pending`` lists are queued)."""
        self._raise()
        while True:
            try:
                self._queue.put(rows, timeout=0.5)
                return
            except queue.Full:
                self._raise()  # the thread died: its queue would never drain

    def committed(self) -> list[list[dict[str, Any]]]:
        """The row lists committed since the last call, in commit order."""
        done = []
        while True:
            try:
                done.append(self._done.get_nowait())
            except queue.Empty:
                break
        if not done:
            self._raise()
        return done

    def close(self) -> None:
        """Write what is queued, merge nothing more, stop the thread; raise its error if any."""
        if self._thread.is_alive():
            if self._error is None:
                self._queue.put(_CLOSE)
            self._thread.join()
        self._raise()

    def abandon(self) -> None:
        """Stop the thread without raising (the job already fails for another reason)."""
        try:
            self.close()
        except Exception:
            pass

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            closing = item is _CLOSE
            lists = [] if closing else [item]
            rows = 0 if closing else len(item)
            until = self._last_write + self.linger_s  # at most one part per linger_s
            while not closing and rows < self.max_rows_per_part:  # take what queues meanwhile
                wait = until - time.monotonic()
                try:
                    item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                closing = item is _CLOSE
                if not closing:
                    lists.append(item)
                    rows += len(item)
            self._last_write = time.monotonic()
            try:
                if rows:
                    self.writer.commit([row for b in lists for row in b])
            except BaseException as exc:
                if len(lists) > 1:  # one list at a time: what fails alone is all that is lost
                    self._commit_apart(lists)
                else:
                    self._error = exc
                if self._error is not None:  # handed to the loop; nothing more is written
                    self._drain()
                    return
            else:
                for b in lists:
                    self._done.put(b)
            if closing:
                return

    def _commit_apart(self, lists: list[list[dict[str, Any]]]) -> None:
        """Commit ``lists`` one by one after they failed together; stop at the first failure."""
        for b in lists:
            try:
                self.writer.commit(b)
            except BaseException as exc:
                self._error = exc
                return
            self._done.put(b)

    def _drain(self) -> None:
        """After a failure: empty the queue so that a waiting ``put`` returns (and raises)."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def __enter__(self) -> Committer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abandon()
