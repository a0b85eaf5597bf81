"""Where the driver's log lines go: the terminal (the job's own lines and warnings) and, for a
local ``--out``, ``DIR/logs/vcut.log`` (everything)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (so captured output in tests sees it too)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbose: bool) -> None:
    """The terminal shows the job's own lines (logger ``jobs``) and warnings; ``--verbose``
    shows every library's INFO lines too. Called once per command (replaces its handler)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_vcut", False)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler._vcut = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(_FORMAT))
    if not verbose:
        handler.addFilter(
            lambda r: r.levelno >= logging.WARNING or r.name == "jobs" or r.name.startswith("jobs.")
        )
    root.addHandler(handler)
    root.setLevel(logging.INFO)


class _QuietFileHandler(logging.FileHandler):
    """``DIR/logs/vcut.log``. A disk that fills up (or turns read-only) mid-job fails the log
    file too: one warning on the terminal and the file is given up, instead of logging's
    traceback for every record (the job's own error line says what failed)."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        error = sys.exc_info()[1]
        logging.getLogger().removeHandler(self)
        print(f"vcut: warning: {self.baseFilename} no longer written: {error}", file=sys.stderr)


def log_to_out(out: Any) -> str | None:
    """Everything the driver logs also goes to ``DIR/logs/vcut.log`` (local DIR only); its
    path, or None (an object store, or a folder that cannot be written)."""
    if not out.local:
        return None
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_vcut_file", False)]:
        root.removeHandler(handler)
        handler.close()
    try:
        os.makedirs(out.path("logs"), exist_ok=True)
        handler = _QuietFileHandler(out.path("logs", "vcut.log"))
    except OSError:
        return None
    handler._vcut_file = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(handler)
    return out.path("logs", "vcut.log")
