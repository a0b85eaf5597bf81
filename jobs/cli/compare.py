"""``vcut compare IMAGE... --model M --out D``: the quality A/B of VCUT and the step cache on
the user's own weights (:mod:`jobs.compare` renders and measures)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jobs.cli.common import fail, int_list
from jobs.cli.flags import add_param_flags, flag_name
from jobs.levers import GRAMMAR_HELP
from jobs.stop import ExitStatus
from pipeline.params import GENERATION_PARAMS
from vcut.modes import MODES  # torch-free

#: ``vcut compare``'s generation flags: every parameter but the seed (``--seed``/``--seeds``).
COMPARE_PARAMS = tuple(n for n in GENERATION_PARAMS if n != "seed")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="render images under several VCUT / step-cache configurations and measure each against 'off'",
        description="Render every IMAGE under every configuration with the same seeds, and write per "
        "configuration: seconds per video, MACs, and the distance to 'off' (PSNR and SSIM per frame; "
        "LPIPS when the lpips package is installed) as compare.json, compare.md, contact_sheet.png and "
        "psnr_per_frame.png in --out.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="input images (paths or URIs)")
    p.add_argument("--model", help="local SVD folder or hub id (required)")
    p.add_argument(
        "--configs",
        default=",".join(MODES),
        help=f"comma-separated configurations, each {GRAMMAR_HELP}; e.g. off,full,full+cache3+g0-0.6; "
        f"'off' is the reference, added when missing (default: {','.join(MODES)})",
    )
    p.add_argument("--out", help="output folder (or URI) for the report files (required)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seed", type=int, default=0, help="image i is rendered with seed SEED + i (default 0)"
    )
    seeds.add_argument("--seeds", type=int_list, help="comma-separated seeds, one per image")
    # Every generation parameter but the seed, from its one declaration (pipeline.params).
    add_param_flags(p, COMPARE_PARAMS, aliases={"num_inference_steps": "--steps"})
    p.add_argument("--fit", choices=["crop", "letterbox"], default="crop")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--variant", help="weights variant, e.g. fp16")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle weights (runs their code)")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed videos per configuration before the timed ones (default 1)",
    )
    p.add_argument("--step-cache-depth", type=int, default=1, help="outer levels the step cache always runs")
    p.add_argument("--save-videos", action="store_true", help="also write every video to OUT/videos/")
    p.add_argument(
        "--no-lpips", action="store_true", help="skip LPIPS even when the lpips package is installed"
    )
    p.add_argument(
        "--sheet-height",
        type=int,
        default=288,
        help="frame height on the contact sheet (0: full size; default 288)",
    )
    p.set_defaults(func=run)


def _checked(args: argparse.Namespace) -> tuple[list, bool, list[int], dict[str, Any], Any]:
    """Everything that can be checked before a model is loaded: (configurations, whether
    ``off`` was added, seeds, generation keywords, the output folder). Raises CompareError."""
    import importlib.util

    from jobs.compare import CompareError, check_images, check_model, parse_configs
    from jobs.output import open_output
    from pipeline.params import check_generation, check_value

    if not args.model:
        raise CompareError("--model is required (a local SVD folder or a hub id)")
    if not args.out:
        raise CompareError("--out is required (the folder for compare.json, compare.md and the PNGs)")
    configs, added_off = parse_configs(args.configs)
    check_model(args.model, args.allow_pickle)
    check_images(args.images)
    if args.warmup < 0 or args.step_cache_depth < 1 or args.sheet_height < 0:
        raise CompareError("--step-cache-depth must be >= 1, --warmup and --sheet-height >= 0")
    if args.seeds is not None:
        if len(args.seeds) != len(args.images):
            raise CompareError(f"--seeds gives {len(args.seeds)} seeds for {len(args.images)} images")
        seeds = list(args.seeds)
    else:
        seeds = [args.seed + i for i in range(len(args.images))]
    try:  # the renderer's own check of the generation values, before anything is loaded
        generate_kwargs = check_generation({n: getattr(args, n) for n in COMPARE_PARAMS}, label=flag_name)
        for seed in seeds:
            check_value("seed", seed)
    except ValueError as exc:
        raise CompareError(str(exc)) from exc
    for module, package in (("skimage", "scikit-image"), ("matplotlib", "matplotlib")):
        if importlib.util.find_spec(module) is None:
            raise CompareError(f"vcut compare needs {package}: pip install 'vcut-render[compare]'")
    try:
        out = open_output(args.out)
    except (ValueError, ImportError) as exc:
        raise CompareError(f"--out {args.out!r}: {exc}") from exc
    return configs, added_off, seeds, generate_kwargs, out


def run(args: argparse.Namespace) -> int:
    from jobs.compare import CompareError

    try:
        configs, added_off, seeds, generate_kwargs, out = _checked(args)
    except CompareError as exc:
        return fail(exc)

    from jobs.compare import run_compare
    from jobs.compare_report import build_markdown
    from jobs.text import message_line
    from pipeline.errors import ImageError, ModelLoadError

    if added_off:
        print("vcut: 'off' added to --configs: it is the reference of every distance", file=sys.stderr)
    generate_kwargs["fit"] = args.fit
    try:
        data = run_compare(
            args.model,
            args.images,
            configs,
            seeds=seeds,
            out=out,
            generate_kwargs=generate_kwargs,
            device=args.device,
            dtype=args.dtype,
            variant=args.variant,
            allow_pickle=args.allow_pickle,
            warmup=args.warmup,
            step_cache_depth=args.step_cache_depth,
            save_videos=args.save_videos,
            use_lpips=not args.no_lpips,
            thumb_height=args.sheet_height or None,
        )
    except (CompareError, ModelLoadError, ImageError, ValueError) as exc:
        return fail(message_line(exc))
    print(build_markdown(data))
    print(
        f"wrote compare.json, compare.md, contact_sheet.png, psnr_per_frame.png to {out.uri}", file=sys.stderr
    )
    return ExitStatus.OK
