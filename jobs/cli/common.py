"""What every ``vcut`` command shares: the parser class (one-line usage errors), the error
line, comma-separated integer lists."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jobs.stop import ExitStatus
from jobs.text import one_line


def fail(message: object) -> int:
    """One line on stderr, ``vcut: error: ...``; returns :attr:`ExitStatus.USAGE` (bad usage,
    config or input: nothing ran)."""
    print(f"vcut: error: {one_line(message)}", file=sys.stderr)
    return ExitStatus.USAGE


def fail_lines(message: object, prefix: str = "vcut: error: ") -> int:
    """Like :func:`fail` for a message of several lines that must stay lines (a manifest's
    problems: one per line, each naming column and row)."""
    print(f"{prefix}{message}", file=sys.stderr)
    return ExitStatus.USAGE


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (``vcut: error: ...``, exit status
    :attr:`ExitStatus.USAGE`). A parser made with ``intermixed=True`` takes its positionals
    among its flags in any order (``vcut run M --out D a=b``: the ``key=value`` overrides are a
    positional list after the manifest), through argparse's own intermixed parsing."""

    def __init__(self, *args: Any, intermixed: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.intermixed = intermixed
        self._in_intermixed = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        # argparse calls this for a sub-command's own arguments; the intermixed parser calls
        # it again from inside (hence the guard).
        if not self.intermixed or self._in_intermixed:
            return super().parse_known_args(args, namespace)
        self._in_intermixed = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._in_intermixed = False

    def error(self, message: str):  # type: ignore[override]
        fail(f"{message} (see `{self.prog} --help`)")
        raise SystemExit(ExitStatus.USAGE)


def int_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (an argparse type)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
