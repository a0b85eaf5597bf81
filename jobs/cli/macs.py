"""``vcut macs``: UNet MACs and parameters, stock versus VCUT, from the config alone."""

from __future__ import annotations

import argparse
import json
import sys

from jobs.cli.flags import add_param_flags
from jobs.stop import ExitStatus
from vcut.modes import MODES  # torch-free


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("macs", help="count UNet MACs and parameters, stock vs VCUT (no weights needed)")
    p.add_argument(
        "--model", default="svd-xt", help="'svd', 'svd-xt' or a local model folder (default: svd-xt)"
    )
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument(
        "--num-frames", type=int, default=None, help="default: the model's own (25 for svd-xt, 14 for svd)"
    )
    p.add_argument("--steps", type=int, default=25, help="denoising steps per video")
    p.add_argument("--mode", choices=MODES, default="full", help="VCUT mode to compare (default: full)")
    p.add_argument(
        "--step-cache",
        type=int,
        default=None,
        metavar="N",
        help="step caching: the whole UNet every N-th step, the shallow path between (default: off)",
    )
    p.add_argument(
        "--step-cache-depth",
        type=int,
        default=1,
        metavar="D",
        help="outer down/up levels that always run with --step-cache (default: 1)",
    )
    p.add_argument(
        "--no-guidance",
        action="store_true",
        help="count without classifier-free guidance (UNet batch 1 instead of the CFG batch of 2)",
    )
    add_param_flags(p, ("guidance_start", "guidance_stop"))  # guidance on part of the schedule
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jobs.macs import Levers, VideoShape, count_video_macs

    shape = VideoShape(
        args.height,
        args.width,
        args.num_frames,
        args.steps,
        guidance=not args.no_guidance,
        guidance_start=args.guidance_start,
        guidance_stop=args.guidance_stop,
    )
    levers = Levers(args.mode, args.step_cache, args.step_cache_depth)
    try:
        report = count_video_macs(args.model, shape, levers)
    except ValueError as exc:  # a bad shape, steps, step-cache or guidance setting: say which
        print(f"vcut macs: error: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_table())
    return ExitStatus.OK
