"""A person's view of a long job: a tqdm bar on a terminal, periodic log lines otherwise, a summary.

On a terminal the bar is tqdm's (what users know), with the job's counts after it::

    vcut:  60%|██████    | 6/10 rows [00:08<00:08,  0.50 videos/s, 3 ok, 1 failed, 2 already ok]

The rate and the ETA count only the rows rendered by this run (rows ``ok`` from an earlier
run, found as the manifest streams by, move the bar but not the rate). While the bar is up,
the job's own log lines are written above it (``tqdm.contrib.logging``), not through it.
Elsewhere (a log file, CI, ``nohup``) there is no bar: one ``progress:`` log line every
``interval_s`` (the config's ``progress_interval_s``) and one at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any

log = logging.getLogger("jobs")

#: The bar's layout: tqdm's own fields (the rate never inverted to s/video), then the counts.
BAR_FORMAT = (
    "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} rows "
    "[{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _sized(stream: IO[str]) -> bool:
    """Whether the terminal reports its size (the bar then follows it as it is resized). One
    nobody sized reports 0 x 0 (``script``, some CI runners), and tqdm then draws nothing."""
    try:
        return min(os.get_terminal_size(stream.fileno())) > 0
    except (AttributeError, OSError, ValueError):  # not a real file (a test's stream)
        return False


class Progress:
    """Rows done / total, videos per second, ETA, and the ok / failed / already-ok counts.

    The driver calls ``update(ok=, failed=)`` per committed batch and ``update()`` once a loop
    turn (so the elapsed time and the log lines move between commits), sets ``skipped`` as it
    finds rows already ok, and calls ``close()`` at the end. On a terminal the bar redraws at
    most every ``redraw_s``; otherwise a log line is written every ``interval_s``, the first at
    the first ``update``. ``clock`` is the monotonic clock (a test's fake one).
    """

    def __init__(
        self,
        total: int,
        *,
        interval_s: float = 10.0,
        stream: IO[str] | None = None,
        redraw_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total = total
        self.rendered = 0  # rows committed by this run, ok or failed
        self.failed = 0
        self.skipped = 0  # already ok from an earlier run
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s if not self.tty else redraw_s
        self.clock = clock
        self.start = clock()
        # None: nothing shown yet. Not 0.0: monotonic time starts near 0 at boot, and on a
        # machine up for less than ``interval_s`` the first update would not be shown.
        self._last: float | None = None
        self._logging = contextlib.ExitStack()
        self.bar: Any = None
        if self.tty:
            self._open_bar()

    def _open_bar(self) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        sized = _sized(self.stream)
        self.bar = tqdm(
            total=self.total,
            desc="vcut",
            unit=" videos",
            file=self.stream,
            bar_format=BAR_FORMAT,
            smoothing=0,  # rate = rows rendered this run / elapsed, as in the log lines and summary
            mininterval=0,  # redraws are throttled here (redraw_s), also between commits
            ncols=None if sized else 100,
            nrows=None if sized else 20,
            dynamic_ncols=sized,
            disable=False,  # tqdm's default (None) would decide about the terminal itself
        )
        if self.stream in (sys.stderr, sys.stdout):
            # log records (e.g. a worker that died) go above the bar instead of through it
            self._logging.enter_context(logging_redirect_tqdm())

    @property
    def done(self) -> int:
        return self.rendered + self.skipped

    def update(self, ok: int = 0, failed: int = 0, force: bool = False) -> None:
        self.rendered += ok + failed
        self.failed += failed
        now = self.clock()
        if force or self._last is None or now - self._last >= self.interval_s:
            self._last = now
            self._show(now)

    def line(self, now: float | None = None) -> str:
        """The log line: ``6/10 rows, 0.65 videos/s, elapsed 00:09, ETA 00:06, 1 failed, 2 already ok``."""
        elapsed = (self.clock() if now is None else now) - self.start
        rate = self.rendered / elapsed if elapsed > 0 else 0.0
        eta = _duration((self.total - self.done) / rate) if rate > 0 else "--:--"
        return (
            f"{self.done}/{self.total} rows, {rate:.2f} videos/s, "
            f"elapsed {_duration(elapsed)}, ETA {eta}, {self.failed} failed"
            + (f", {self.skipped} already ok" if self.skipped else "")
        )

    def counts(self) -> str:
        """The bar's postfix: ``3 ok, 1 failed, 2 already ok``."""
        return f"{self.rendered - self.failed} ok, {self.failed} failed" + (
            f", {self.skipped} already ok" if self.skipped else ""
        )

    def _show(self, now: float) -> None:
        if self.bar is None:
            log.info("progress: %s", self.line(now))
            return
        self._sync_bar()
        self.bar.refresh()

    def _sync_bar(self) -> None:
        # n counts every done row; initial counts the already-ok ones, which tqdm (smoothing=0)
        # leaves out of the rate: rate = (n - initial) / elapsed, ETA = (total - n) / rate.
        self.bar.n, self.bar.initial = self.done, self.skipped
        self.bar.set_postfix_str(self.counts(), refresh=False)

    def close(self) -> None:
        """The final state: a log line, or the bar drawn once more and left on the terminal."""
        if self.bar is None:
            log.info("progress: %s", self.line())
            return
        self._sync_bar()
        self.bar.close()
        self.bar = None
        self._logging.close()


def format_summary(summary: dict[str, Any]) -> str:
    """The final summary as a two-column table."""
    rows = [
        ("manifest rows", summary.get("manifest_rows")),
        ("ok", summary.get("ok")),
        ("failed", summary.get("failed")),
        ("rendered this run", summary.get("rendered_this_run")),
        ("skipped (already ok)", summary.get("skipped_already_ok")),
        ("wall time", _duration(summary.get("wall_seconds", 0.0))),
        ("videos per second", f"{summary.get('videos_per_second', 0.0):.3f}"),
        ("total MACs", f"{summary.get('total_macs', 0):.4g}"),
        ("total MACs saved", f"{summary.get('total_macs_saved', 0):.4g}"),
        ("  by VCUT", f"{summary.get('total_macs_saved_vcut', 0):.4g}"),
        ("  by step caching", f"{summary.get('total_macs_saved_step_cache', 0):.4g}"),
        ("results", summary.get("results") or "not written"),
    ]
    for w in summary.get("workers_not_started") or []:  # each with its node and cause
        rows.append(("not started", f"{w['worker']} on {w.get('node') or 'no node'}: {w.get('error')}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
