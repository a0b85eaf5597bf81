"""What the job driver tells an observer (metrics, a notebook, a test), and the one place where
an observer's errors are handled.

A hook is any object with some of the :class:`JobHook` methods. The driver wraps it in
:class:`SafeHook`, so a hook's own code needs no ``try``: a job must never stop because
something watching it failed (a Prometheus label error, an unreachable Pushgateway, a bug in
a user's hook). ``SafeHook`` logs the first failure of each method, one warning line, and
keeps calling it (a later row may well succeed); methods the hook lacks are skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

log = logging.getLogger("jobs")


class JobHook(Protocol):
    """The calls the driver makes, all on the driver process, in this order over a job."""

    def on_pending(self, n: int) -> None:
        """Rows of the manifest not yet done (rendered this run or ok before), once a loop turn."""

    def on_workers(self, alive: int, busy: int) -> None:
        """Workers alive and workers holding a batch, once a loop turn."""

    def on_result(self, row: Mapping[str, Any]) -> None:
        """One committed result row (``ok`` or ``failed``), exactly once per committed row."""

    def on_finish(self, summary: Mapping[str, Any]) -> None:
        """The job's summary (``summary.json``'s content), once, after everything is committed."""


class SafeHook:
    """A :class:`JobHook` that calls ``hook``'s methods (``None``: no hook; a missing method is
    skipped) and turns any exception into one warning per method name."""

    def __init__(self, hook: JobHook | None) -> None:
        self.hook = hook
        self.warned: set[str] = set()

    def _call(self, name: str, *args: Any) -> None:
        method = getattr(self.hook, name, None)
        if method is None:
            return
        try:
            method(*args)
        except Exception as exc:
            if name not in self.warned:
                self.warned.add(name)
                log.warning(
                    "job hook %s.%s failed (further failures of it are not logged): %s: %s",
                    type(self.hook).__name__,
                    name,
                    type(exc).__name__,
                    exc,
                )

    def on_pending(self, n: int) -> None:
        self._call("on_pending", n)

    def on_workers(self, alive: int, busy: int) -> None:
        self._call("on_workers", alive, busy)

    def on_result(self, row: Mapping[str, Any]) -> None:
        self._call("on_result", row)

    def on_finish(self, summary: Mapping[str, Any]) -> None:
        self._call("on_finish", summary)
