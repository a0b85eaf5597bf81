"""``vcut doctor``: one table of what a job needs on this machine (and a cluster)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="check this machine (and a cluster) for a job: OK / WARN / FAIL rows (exit 0: a job would run)",
        description="One table of what a job needs: Python, torch and its CUDA build, GPUs seen by torch "
        "and by Ray, ffmpeg and its encoders, the Ray cluster (reachable, auth mode), the model (config "
        "only, no weights loaded), the Hugging Face cache and token, the output folder. Exit status 0 "
        "when no row is FAIL, else 1.",
    )
    p.add_argument("--model", help="hub id or local model folder to check (nothing is downloaded)")
    p.add_argument("--address", help="Ray cluster to check (default: RAY_ADDRESS, else none)")
    p.add_argument("--out", help="output folder or URI to check with a probe file (removed again)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jobs.cli.logs import setup_logging
    from jobs.doctor import main as doctor_main

    setup_logging(False)
    return doctor_main(args)
