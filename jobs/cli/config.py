"""``vcut config``: print the resolved job config (the same flags and overrides as ``run``)."""

from __future__ import annotations

import argparse

from jobs.cli.flags import add_job_flags, load_config
from jobs.stop import ExitStatus


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved job config (same flags as run)", intermixed=True)
    add_job_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jobs.config import to_yaml

    cfg = load_config(args)
    if cfg is None:
        return ExitStatus.USAGE
    print(to_yaml(cfg), end="")
    return ExitStatus.OK
