"""``vcut tiny-model DIR``: a tiny random-weight SVD pipeline for tests and demos."""

from __future__ import annotations

import argparse
import sys

from jobs.stop import ExitStatus


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny-model", help="write a tiny RANDOM-WEIGHT SVD pipeline for tests and demos")
    p.add_argument("dir", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.notices import quiet_notices
    from vcut.tiny import RANDOM_WEIGHTS_WARNING, save_tiny_pipeline

    quiet_notices()  # its CLIP image processor's torchvision notice
    print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    path = save_tiny_pipeline(args.dir, seed=args.seed)
    print(f"wrote tiny random-weight SVD pipeline to {path}")
    print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    return ExitStatus.OK
