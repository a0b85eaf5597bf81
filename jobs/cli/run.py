"""``vcut run MANIFEST --out DIR [KEY=VALUE ...]``: render every row of a manifest to a video.

Each way a job ends is one line and one exit status of :class:`jobs.stop.ExitStatus` (the
table ``vcut run --help`` prints)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from jobs.cli.common import fail, fail_lines
from jobs.cli.flags import add_job_flags, defaults_help, load_config
from jobs.stop import EXIT_HELP, ExitStatus


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="render every row of a manifest to a video (resumes; exit 0 all ok, 3 some failed; "
        "every exit status: vcut run --help)",
        epilog="Trailing key=value arguments override config keys, e.g. defaults.num_frames=14.\n\n"
        + defaults_help()
        + "\n\n"
        + EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        intermixed=True,
    )
    p.add_argument(
        "manifest",
        help="Parquet (or CSV / JSONL) manifest, one row per video: a path or a URI (s3://, gs://)",
    )
    p.add_argument(
        "--out", required=True, help="output folder or URI (s3://, gs://): videos/, results/, summary.json"
    )
    p.add_argument("--overwrite", action="store_true", help="render rows that are already ok again")
    p.add_argument(
        "--rerender",
        choices=["changed"],
        help="render again the ok rows whose image, generation values, model or VCUT settings changed",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the manifest and print what would run (rows, images, shapes, MACs, GPU-hours); "
        "no Ray, nothing written",
    )
    p.add_argument(
        "--timing",
        metavar="FILE",
        help="with --dry-run: seconds per video from FILE (another job's --out folder or results "
        "Parquet, or a benchmarks/gpu_bench.py JSON) when DIR has no timings of its own",
    )
    p.add_argument(
        "--verbose", action="store_true", help="also show Ray's and the workers' logs (always in DIR/logs/)"
    )
    add_job_flags(p)
    p.set_defaults(func=run)


def _left(summary: dict) -> str:
    ok = (summary.get("output_generation") or {}).get("ok", summary.get("ok"))  # an open --overwrite
    return str(max(0, int(summary["manifest_rows"]) - ok)) if isinstance(ok, int) else "an unknown number"


def stopped_line(reason: str, summary: dict | None) -> str:
    """The last line of a job stopped by a signal (``summary``: None when stopped at once)."""
    from jobs.generation import resume_note

    if summary is None:
        return (
            f"vcut: stopped by {reason}: the rows committed so far are kept (no summary was written); "
            "rerun the same command to resume"
        )
    return (
        f"vcut: stopped by {reason}: {summary.get('rendered_this_run', 0)} rows committed this run, "
        f"{_left(summary)} left; rerun the same command to resume{resume_note(summary)}"
    )


def run(args: argparse.Namespace) -> int:
    from jobs.stop import Interrupted, StopSignals, exit_for_signal

    try:  # Ctrl-C / SIGTERM: before the job's runner exists, Interrupted; then a graceful stop
        with StopSignals() as signals:
            return _run_job(args, signals)
    except Interrupted as exc:
        print(stopped_line(exc.reason, None), file=sys.stderr)
        return exit_for_signal(exc.signum)
    except KeyboardInterrupt:  # before the handlers were installed
        print(stopped_line("SIGINT", None), file=sys.stderr)
        return ExitStatus.SIGINT


def _run_job(args: argparse.Namespace, signals: Any) -> int:
    """``vcut run`` under ``signals`` (``jobs.stop.StopSignals``)."""
    from jobs.cli.logs import log_to_out, setup_logging
    from jobs.cli.ray_output import ray_output_in_logs
    from jobs.lock import OutputLockedError
    from jobs.manifest import ManifestError
    from jobs.metrics import make_metrics_hook
    from jobs.output import open_output
    from jobs.preflight import ClusterUnavailableError, PreflightError, run_preflight
    from jobs.progress import format_summary
    from jobs.results import CorruptPartError
    from jobs.runner import JobError, run_job
    from jobs.stop import OutputWriteError, exit_for_signal, exit_status, quiet_orphaned_storage_errors
    from jobs.testing import seams_from_env

    setup_logging(args.verbose)
    quiet_orphaned_storage_errors()
    try:  # a local folder or an fsspec URI (s3://, gs://, file:// ...); creates nothing yet
        out = open_output(args.out)
    except (ValueError, ImportError) as exc:
        return fail(f"--out {args.out!r}: {exc}")
    cfg = load_config(args)
    if cfg is None:
        return ExitStatus.USAGE
    signals.grace_s = float(cfg.workers.stop_grace_s)
    if args.dry_run:  # what would run: no Ray, no model, nothing written
        from jobs.dryrun import TimingError, dry_run

        try:
            return dry_run(cfg, args.manifest, out, sys.stdout, timing=args.timing)
        except ManifestError as exc:
            return fail_lines(exc)
        except (TimingError, CorruptPartError) as exc:  # a damaged results part: its name and the fix
            return fail(exc)
    if args.timing:
        return fail("--timing goes with --dry-run (a job measures its own timings)")
    try:  # manifest, output, model, ffmpeg, cluster address: before Ray starts
        info = run_preflight(cfg, args.manifest, out)
    except ClusterUnavailableError as exc:  # --address: nothing answers, not Ray, token auth
        fail(exc)
        return ExitStatus.UNAVAILABLE
    except PreflightError as exc:
        return fail(exc)
    except ManifestError as exc:  # one line per problem, each naming column and row
        return fail_lines(exc)
    log_file = log_to_out(out)
    seams = seams_from_env()  # test-only: VCUT_TEST_RENDERER (jobs.testing); {} when unset
    hook = make_metrics_hook(cfg.metrics)
    try:
        with ray_output_in_logs(out, args.verbose) as ray_log:  # restored before any line below
            if ray_log:
                logging.getLogger("jobs").info("Ray's own output: %s (--verbose: here)", ray_log)
            summary = run_job(
                cfg, args.manifest, out, hook=hook, info=info, verbose=args.verbose, signals=signals, **seams
            )
    except OutputWriteError as exc:  # disk full, read-only, object store gone: what is kept
        print(format_summary(exc.summary))
        fail(
            f"{exc}; {exc.summary.get('rendered_this_run', 0)} rows committed this run are kept, "
            f"{_left(exc.summary)} left: rerun the same command to resume"
        )
        return exit_status(exc)
    except ManifestError as exc:
        fail_lines(exc)
        return exit_status(exc)
    except CorruptPartError as exc:  # a damaged results part: its name and the fix
        return fail(exc)
    except JobError as exc:
        logs = f"; details in {out.uri_of('logs')}" if (exc.causes or log_file) else ""
        for cause in exc.causes or [""]:
            print(f"vcut: error: {exc}{': ' + cause if cause else ''}{logs}", file=sys.stderr)
        return exit_status(exc)
    except (OutputLockedError, PreflightError) as exc:  # --out held; the cluster cannot be joined
        fail(exc)
        return exit_status(exc)  # the one table (jobs.stop): 75, 69 or 2
    finally:
        hook.close()
    print(format_summary(summary))
    if summary.get("stopped"):
        print(stopped_line(summary["stopped"], summary), file=sys.stderr)
        return exit_for_signal(summary["stopped"])
    return ExitStatus.OK if summary["failed"] == 0 else ExitStatus.FAILED_ROWS
