"""The ``vcut`` command line: one small entry point, one module per command.

Each command module (``jobs.cli.run``, ``jobs.cli.compare`` ...) has ``add_parser(sub)``,
which declares its flags and help, and ``run(args) -> int``, the command itself; the heavy
imports (torch, ray) happen inside ``run`` so that ``vcut --help`` is instant. Every exit
status comes from the one table, :class:`jobs.stop.ExitStatus`.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from jobs.cli import common
from jobs.stop import ExitStatus


def _commands() -> list[ModuleType]:
    """The command modules, in the order ``vcut --help`` lists them."""
    from jobs.cli import compare, config, doctor, macs, manifest, report, run, tiny_model

    return [macs, compare, tiny_model, run, report, doctor, config, manifest]


def build_parser() -> argparse.ArgumentParser:
    """The ``vcut`` parser with every command's sub-parser."""
    parser = common.Parser(
        prog="vcut",
        description="Batch image-to-video rendering with Stable Video Diffusion and VCUT.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in _commands():
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``vcut`` command; its exit status (:class:`jobs.stop.ExitStatus`)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse printed the message
        return int(exc.code or 0)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C in any command: a line, not a traceback
        print(f"vcut: interrupted ({args.command})", file=sys.stderr)
        return ExitStatus.SIGINT


__all__ = ["build_parser", "main"]
