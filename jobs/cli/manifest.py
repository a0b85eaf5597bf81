"""``vcut manifest SOURCE -o FILE``: a manifest from a folder or glob of images."""

from __future__ import annotations

import argparse
import sys

from jobs.cli.common import int_list
from jobs.stop import ExitStatus


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("manifest", help="build a manifest from a folder or glob of images")
    p.add_argument("source", help="a folder, or a glob such as 'imgs/**/*.png'")
    p.add_argument("-o", "--output", required=True, help="manifest file to write (.parquet)")
    p.add_argument("--seeds", type=int_list, help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--motion-bucket-ids", type=int_list, help="comma-separated motion bucket ids")
    p.add_argument("--fps", type=int_list, help="comma-separated frame rates")
    p.add_argument("--num-frames", type=int_list, help="comma-separated frame counts")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jobs.manifest import ManifestError, build_manifest

    try:
        n = build_manifest(
            args.source,
            args.output,
            seeds=args.seeds,
            motion_bucket_ids=args.motion_bucket_ids,
            fps=args.fps,
            num_frames=args.num_frames,
        )
    except ManifestError as exc:
        print(f"vcut: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    print(f"wrote {n} rows to {args.output}")
    return ExitStatus.OK
