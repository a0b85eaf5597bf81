"""``python -m jobs.main`` and the former home of the ``vcut`` entry point: both are
:func:`jobs.cli.main` (one module per command under ``jobs/cli/``)."""

from __future__ import annotations

import sys

from jobs.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
