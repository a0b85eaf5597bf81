"""``vcut report DIR``: write ``DIR/report.html`` about a finished or running job."""

from __future__ import annotations

import argparse

from jobs.cli.common import fail
from jobs.stop import ExitStatus


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write DIR/report.html: summary, throughput, render times, failures, thumbnails",
        description="Write DIR/report.html, one self-contained page (no network) about a finished or "
        "running job: counts, wall time, videos per hour, MACs spent and saved, throughput over time "
        "and per worker, a render-time histogram, the failures grouped by error, and the first frames "
        "of a sample of videos. `vcut run` writes it at the end of every job (output.report=false: not).",
    )
    p.add_argument("dir", metavar="DIR", help="the --out folder (or URI) of a vcut run")
    p.add_argument("--sample", type=int, default=24, help="videos on the contact sheet (default 24)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jobs.output import open_output
    from jobs.report import write_report
    from jobs.results import CorruptPartError

    try:
        out = open_output(args.dir)
    except (ValueError, ImportError) as exc:
        return fail(f"{args.dir!r}: {exc}")
    if not out.listdir("results") and "summary.json" not in out.listdir():
        return fail(f"{out.uri} has no results yet (not the --out of a vcut run?)")
    if args.sample < 0:
        return fail("--sample must be >= 0")
    try:
        print(f"wrote {write_report(out, sample=args.sample)}")
    except CorruptPartError as exc:  # a damaged results part: its name and the fix
        return fail(exc)
    return ExitStatus.OK
