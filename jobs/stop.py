"""How ``vcut run`` ends: its exit statuses (the one table), the signals that stop a job
early, and what counts as "the output cannot be written".

Why a module of its own: a job can end in many places (pre-flight, joining the cluster, the
runner's loop, a commit, a signal), and each way must end the same: one line naming the
cause and what to do, what was committed so far, and a documented exit status. ``jobs.cli.run``
maps errors to :class:`ExitStatus`; ``vcut run --help`` prints :data:`EXIT_HELP`.

Signals (:class:`StopSignals`): SIGINT (Ctrl-C) and SIGTERM (``kill``, Kubernetes) during
a job ask the runner to stop: nothing new is submitted, the batches in flight may finish
for ``workers.stop_grace_s`` seconds and are committed, ``summary.json`` records the stop, and
the job exits 130 / 143 (128 + the signal's number, as a shell reports a process killed by
it). A second signal ends the grace period at once (in-flight batches are dropped, not
committed; they render on the next run); a third raises :class:`Interrupted` wherever the
driver is (an escape from a hung write), which ``jobs.cli.run`` turns into the same line.
Before the runner exists (pre-flight, joining the cluster) there is nothing to commit, so the
first signal raises :class:`Interrupted` at once.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from enum import IntEnum
from typing import Any

from jobs.text import error_line


class ExitStatus(IntEnum):
    """Every exit status of ``vcut run``. The sysexits(3) numbers are the conventional ones for
    "service unavailable" (69), "I/O error" (74) and "try again later" (75)."""

    OK = 0  # every row ok
    NO_WORKER = 1  # no worker could start, or every worker died (restart budget spent)
    USAGE = 2  # bad usage, config, manifest or pre-flight check (nothing ran)
    FAILED_ROWS = 3  # the job finished; some rows are failed (see results/ and report.html)
    UNAVAILABLE = 69  # EX_UNAVAILABLE: the Ray cluster at --address cannot be joined
    IO_ERROR = 74  # EX_IOERR: --out cannot be written mid-job (disk full, read-only, store gone)
    LOCKED = 75  # EX_TEMPFAIL: another driver holds --out; retry when it is done
    SIGINT = 130  # stopped by SIGINT (Ctrl-C) after committing what finished; rerun to resume
    SIGTERM = 143  # stopped by SIGTERM, likewise


#: What each status means, for ``vcut run --help`` (and the README's table).
EXIT_MEANINGS = {
    ExitStatus.OK: "every row is ok",
    ExitStatus.NO_WORKER: "no worker could start, or every worker died",
    ExitStatus.USAGE: "bad usage, config, manifest or pre-flight check: nothing ran",
    ExitStatus.FAILED_ROWS: "the job finished and some rows failed",
    ExitStatus.UNAVAILABLE: "the Ray cluster at --address cannot be joined (down, wrong port, token auth)",
    ExitStatus.IO_ERROR: "--out cannot be written (disk full, read-only, object store gone); rerun to resume",
    ExitStatus.LOCKED: "--out is in use by another driver; run again when it is done",
    ExitStatus.SIGINT: "stopped by SIGINT (Ctrl-C); what finished is committed; rerun to resume",
    ExitStatus.SIGTERM: "stopped by SIGTERM, likewise",
}
EXIT_HELP = "exit status:\n" + "\n".join(f"  {int(s):>3}  {text}" for s, text in EXIT_MEANINGS.items())

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _error_table() -> tuple[tuple[type[BaseException], ExitStatus], ...]:
    """Exception type -> exit status, most specific first (imported here: those modules import
    this one)."""
    from jobs.lock import OutputLockedError
    from jobs.manifest import ManifestError
    from jobs.output import OutputError
    from jobs.pool import JobError
    from jobs.preflight import ClusterUnavailableError, PreflightError

    return (
        (OutputWriteError, ExitStatus.IO_ERROR),  # --out failed mid-job (with the summary so far)
        (OutputError, ExitStatus.IO_ERROR),  # --out failed (the storage boundary's typed error)
        (OutputLockedError, ExitStatus.LOCKED),
        (ClusterUnavailableError, ExitStatus.UNAVAILABLE),  # before PreflightError: a subclass
        (PreflightError, ExitStatus.USAGE),
        (ManifestError, ExitStatus.USAGE),
        (JobError, ExitStatus.NO_WORKER),
    )


def exit_status(exc: BaseException) -> ExitStatus | None:
    """The exit status of an error that ends ``vcut run`` (the one table: :func:`_error_table`,
    and the signal statuses for :class:`Interrupted`); None for an error not in it (a bug)."""
    if isinstance(exc, Interrupted):
        return ExitStatus(exit_for_signal(exc.signum))
    for cls, status in _error_table():
        if isinstance(exc, cls):
            return status
    return None


def exit_for_signal(reason: str | int) -> int:
    """130 for SIGINT, 143 for SIGTERM (``reason``: a signal name or number)."""
    signum = reason if isinstance(reason, int) else getattr(signal.Signals, str(reason), signal.SIGINT)
    return ExitStatus.SIGTERM if int(signum) == signal.SIGTERM else ExitStatus.SIGINT


class Interrupted(KeyboardInterrupt):
    """Raised where the driver is when it must stop now: a signal before the job's runner
    exists, or a third signal. A KeyboardInterrupt, so library code does not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.reason = signal.Signals(signum).name


class StopSignals:
    """SIGINT and SIGTERM handlers for a job's duration (a context manager; the handlers that
    were there before are restored on exit). ``target(reason, grace_s)``, once set (the
    runner's ``request_stop``), is asked to stop; without one a signal raises
    :class:`Interrupted`. ``install()`` again after ``ray.init``, which sets its own SIGTERM
    handler. In a thread other than the main one, signals cannot be handled: a no-op."""

    def __init__(self, grace_s: float = 30.0):
        self.grace_s = float(grace_s)
        self.target: Callable[[str, float], None] | None = None
        self.received: list[str] = []  # signal names, in order
        self._saved: dict[int, Any] = {}

    @property
    def reason(self) -> str | None:
        return self.received[0] if self.received else None

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            old = signal.signal(sig, self._handle)
            if sig not in self._saved:
                self._saved[sig] = old

    def restore(self) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._saved.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        # Runs in the main thread between two bytecodes, maybe inside a logging call: flags
        # and one direct write to stderr only (logging's lock may be held by what it interrupted).
        # Two signals that come before the driver's loop gets to run (it waits up to a second
        # on Ray) are one to Python.
        name = signal.Signals(signum).name
        self.received.append(name)
        if self.target is None or len(self.received) >= 3:
            raise Interrupted(signum)
        again = "Ctrl-C" if signum == signal.SIGINT else name
        if len(self.received) == 1:
            note = (
                f"vcut: {name} received: no new work; the batches in flight may finish within "
                f"{self.grace_s:g} s and are committed ({again} again: stop now)"
            )
        else:
            note = f"vcut: {name} received again: stopping now; the rows in flight render on the next run"
        try:  # sys.stderr's descriptor: during a job, 2 holds Ray's output (jobs.cli.ray_output)
            os.write(_stderr_fd(), (note + "\n").encode())
        except OSError:
            pass
        self.target(self.received[0], self.grace_s if len(self.received) == 1 else 0.0)


def _stderr_fd() -> int:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream without one
        return 2


# -- the output cannot be written -------------------------------------------------------------

#: Modules whose exceptions are a remote filesystem failing (connection, timeout, HTTP errors).
_STORAGE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google.", "adlfs", "azure.")
_ADVICE = {
    errno.ENOSPC: "free some space or choose another --out",
    errno.EDQUOT: "raise the quota, free some space, or choose another --out",
    errno.EFBIG: "a file size limit is set (ulimit -f): raise it",
    errno.EROFS: "the filesystem is mounted read-only: remount it writable or choose another --out",
    errno.EACCES: "fix the folder's permissions or choose another --out",
    errno.EPERM: "fix the folder's permissions or choose another --out",
}


class OutputWriteError(RuntimeError):
    """``--out`` could not be written mid-job. ``cause``: the error, one line; ``advice``: what
    to do; ``summary``: what is committed (``jobs.results.summarize`` fields; ``ok``/``failed``
    are "unknown" when the results cannot be read either), for the job's last lines."""

    def __init__(self, uri: str, cause: str, advice: str, summary: dict[str, Any]):
        super().__init__(f"cannot write to {uri}: {cause}: {advice}")
        self.uri, self.cause, self.advice, self.summary = uri, cause, advice, summary


def output_failure(exc: BaseException) -> tuple[str, str] | None:
    """``(cause, advice)`` when ``exc`` is the output's storage failing (an OSError, or an
    exception of an object-store client: connection refused, timeouts, HTTP 5xx), else None
    (a bug, which must surface as itself)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        cause = f"{exc.strerror or type(exc).__name__} ({name})"
        return cause, _ADVICE.get(exc.errno, "check the output filesystem")
    modules = [c.__module__ for c in type(exc).__mro__]
    if isinstance(exc, OSError | ConnectionError | TimeoutError) or any(
        m.startswith(_STORAGE_MODULES) for m in modules
    ):
        return error_line(exc), "check that the object store answers (endpoint, network, credentials)"
    return None


class _OrphanedStorageErrors(logging.Filter):
    """asyncio logs "Task exception was never retrieved" with a traceback when an object-store
    connection breaks in the middle of a request (aiohttp's body-writing task inside s3fs or
    gcsfs). The request fails as well, and that failure is what the job reports (exit 74): the
    orphan's record is lowered to DEBUG, so it stays in ``DIR/logs/vcut.log`` and leaves the
    terminal (which shows warnings and up) to the job's own line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and any(c.__module__.startswith(_STORAGE_MODULES) for c in type(exc).__mro__):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def quiet_orphaned_storage_errors() -> None:
    """Install :class:`_OrphanedStorageErrors` on asyncio's logger (idempotent)."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _OrphanedStorageErrors) for f in logger.filters):
        logger.addFilter(_OrphanedStorageErrors())
