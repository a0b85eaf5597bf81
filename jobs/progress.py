"""A person's view of a long job: a bar on a terminal, periodic log lines otherwise, a summary."""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

log = logging.getLogger("jobs")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Rows done / total, videos per second, ETA and failures.

    On a terminal it redraws one line at most every ``redraw_s``; otherwise it writes a log
    line every ``interval_s``.
    """

    def __init__(
        self, total: int, *, interval_s: float = 10.0, stream: IO[str] | None = None, redraw_s: float = 0.2
    ):
        self.total = total
        self.rendered = 0
        self.failed = 0
        self.skipped = 0  # already ok from an earlier run
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s if not self.tty else redraw_s
        self.start = time.monotonic()
        self._last = 0.0

    @property
    def done(self) -> int:
        return self.rendered + self.skipped

    def update(self, ok: int = 0, failed: int = 0, force: bool = False) -> None:
        self.rendered += ok + failed
        self.failed += failed
        now = time.monotonic()
        if force or now - self._last >= self.interval_s:
            self._last = now
            self._show(now)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.start
        rate = self.rendered / elapsed if elapsed > 0 else 0.0
        eta = _duration((self.total - self.done) / rate) if rate > 0 else "--:--"
        return (
            f"{self.done}/{self.total} rows, {rate:.2f} videos/s, "
            f"elapsed {_duration(elapsed)}, ETA {eta}, {self.failed} failed"
            + (f", {self.skipped} already ok" if self.skipped else "")
        )

    def _show(self, now: float) -> None:
        text = self.line(now)
        if self.tty:
            width = 30
            filled = int(width * self.done / self.total) if self.total else width
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K")
            self.stream.flush()
        else:
            log.info("progress: %s", text)

    def close(self) -> None:
        self._show(time.monotonic())
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


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
        ("results", summary.get("results")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
