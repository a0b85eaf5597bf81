"""Ray's own output on the driver to ``DIR/logs/ray.log`` instead of the terminal (unless
``--verbose``), with ``vcut run``'s own lines kept on the terminal. What reaches the terminal
is described in docs/operations.md ("Ray's own output"); here, how, channel by channel:

* file descriptor 2 (the C++ core worker's ERROR lines) is pointed at the log file, and
  ``sys.stderr`` (vcut's log lines, progress bar and error lines) at a copy of the terminal's
  descriptor;
* Ray's error listener thread prints what the GCS pushes to drivers (``(raylet) ...``) with
  ``ray._private.worker.print_to_stdstream`` on ``sys.stdout``: that printer is swapped for
  one that writes the log file (Ray has no setting for it; ``tests/test_quiet.py`` sees a
  Ray that changes this);
* the ``ray`` logger's own handler (on ``sys.stderr``) is swapped for one on the log file.

Everything is put back when the block ends, so a traceback of vcut's own crash reaches the
terminal. For an object-store DIR the file is written locally and put under DIR at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import IO, Any

#: The file under ``DIR/logs/`` that holds Ray's output on the driver.
RAY_LOG = "ray.log"


def _on_fd2(stream: Any) -> bool:
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # a test's captured stream: not the terminal
        fd = None
    return fd == 2


@contextlib.contextmanager
def ray_output_in_logs(out: Any, verbose: bool) -> Iterator[str | None]:
    """Within the block, Ray's output on this driver goes to ``DIR/logs/ray.log`` (``out``: a
    ``jobs.output.OutputDir``); yields that file's URI, or None with ``verbose`` (Ray's output
    stays on the terminal, as Ray prints it) or when no log file can be opened."""
    if verbose:
        yield None
        return
    try:
        if out.local:
            os.makedirs(out.path("logs"), exist_ok=True)
            path = out.path("logs", RAY_LOG)
        else:  # object storage: written here, put under DIR/logs/ at the end
            fd, path = tempfile.mkstemp(prefix="vcut-ray-", suffix=".log")
            os.close(fd)
        log = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    except OSError:
        yield None
        return
    undo = _route_python_output(log)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal_fd = os.dup(2)
    old_stderr = sys.stderr
    if _on_fd2(sys.stderr):  # vcut's own lines: to the terminal, through a copy of its descriptor
        sys.stderr = os.fdopen(
            os.dup(terminal_fd), "w", buffering=1, encoding=old_stderr.encoding, errors="backslashreplace"
        )
    os.dup2(log.fileno(), 2)
    try:
        yield out.uri_of("logs", RAY_LOG)
    finally:
        undo()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(terminal_fd, 2)
        os.close(terminal_fd)
        if sys.stderr is not old_stderr:
            with contextlib.suppress(Exception):
                sys.stderr.close()
            sys.stderr = old_stderr
        log.close()
        if not out.local:
            _put(out, path)


def _route_python_output(log: IO[str]) -> Any:
    """Point Ray's error listener's printer and the ``ray`` loggers at ``log``; returns the undo."""
    import ray._private.worker as ray_worker

    def to_log(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        with contextlib.suppress(OSError, ValueError):  # a full disk: the lines are lost, not the job
            log.writelines(f"({data.get('pid')}) {line}\n" for line in data.get("lines", []))

    printer = getattr(ray_worker, "print_to_stdstream", None)  # Ray 2.60's; tests/test_quiet.py
    if printer is not None:
        ray_worker.print_to_stdstream = to_log
    ray_logger = logging.getLogger("ray")
    handlers = list(ray_logger.handlers)
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ray_logger.handlers = [handler]

    def undo() -> None:
        if printer is not None:
            ray_worker.print_to_stdstream = printer
        ray_logger.handlers = handlers

    return undo


def _put(out: Any, path: str) -> None:
    """The local copy of an object-store job's ``ray.log`` to ``DIR/logs/`` (when not empty)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data:
            out.makedirs("logs")
            out.write_bytes(out.path("logs", RAY_LOG), data)
        os.unlink(path)
    except Exception as exc:  # the job's result stands; say where the lines are
        target = out.uri_of("logs", RAY_LOG)
        print(f"vcut: warning: Ray's output not copied to {target} ({exc}); it is in {path}", file=sys.stderr)
