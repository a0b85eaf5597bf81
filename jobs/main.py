"""The ``vcut`` command line: the only module of the project that faces the user.

Each sub-command lives in its own small function; the heavy imports (torch, ray) happen
inside them so that ``vcut --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_macs(args: argparse.Namespace) -> int:
    from vcut import count_macs

    report = count_macs(
        args.model,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        num_inference_steps=args.steps,
        mode=args.mode,
        guidance=not args.no_guidance,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_table())
    return 0


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from vcut.tiny import RANDOM_WEIGHTS_WARNING, save_tiny_pipeline

    print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    path = save_tiny_pipeline(args.dir, seed=args.seed)
    print(f"wrote tiny random-weight SVD pipeline to {path}")
    print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vcut",
        description="Batch image-to-video rendering with Stable Video Diffusion and VCUT.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("macs", help="count UNet MACs and parameters, stock vs VCUT (no weights needed)")
    p.add_argument("--model", default="svd-xt", help="'svd', 'svd-xt' or a local model folder (default: svd-xt)")
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--num-frames", type=int, default=None, help="default: the model's own (25 for svd-xt, 14 for svd)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps per video")
    p.add_argument("--mode", choices=["exact", "full"], default="full", help="VCUT mode to compare (default: full)")
    p.add_argument("--no-guidance", action="store_true", help="count without classifier-free guidance (batch 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_macs)

    p = sub.add_parser("tiny-model", help="write a tiny RANDOM-WEIGHT SVD pipeline for tests and demos")
    p.add_argument("dir", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tiny_model)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
