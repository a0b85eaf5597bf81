"""Command line of the GPU script: ``python -m benchmarks.gpu`` (through ``benchmarks/gpu.sh``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.gpu.bench import STAGES
from benchmarks.gpu.model import DTYPES, STEPS_PER_VIDEO

DESCRIPTION = (
    "Whole SVD-XT videos on one GPU (random weights): seconds per video for each lever, memory, MFU."
)

# -- command line ------------------------------------------------------------------------------


def _steps(text: str) -> list[int]:
    steps = [int(s) for s in text.split(",")]
    if len(steps) < 2 or len(set(steps)) < 2 or min(steps) < 1:
        raise argparse.ArgumentTypeError("--steps needs two or more different step counts >= 1, e.g. 2,6")
    return steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=DESCRIPTION)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="the tiny test model instead of SVD-XT's architecture")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument(
        "--steps", type=_steps, default=[2, 6], help="step counts of the timed videos (default 2,6)"
    )
    p.add_argument("--steps-per-video", type=int, default=STEPS_PER_VIDEO, help="a whole video (default 25)")
    p.add_argument("--reps", type=int, default=1, help="timed videos per step count (default 1)")
    p.add_argument("--step-cache", type=int, default=3, help="step-cache interval N (0: none; default 3)")
    p.add_argument("--batch-size", type=int, default=4, help="rows of the batched call (default 4)")
    p.add_argument(
        "--stages",
        default=None,
        help="comma-separated stages to run (build always runs; default: all): " + ", ".join(STAGES[1:]),
    )
    p.add_argument("--no-compile", action="store_true", help="skip the compile stages (fp8, guidance: eager)")
    p.add_argument(
        "--guidance-start", type=float, default=0.0, help="stage guidance: guidance_start (default 0)"
    )
    p.add_argument(
        "--guidance-stop", type=float, default=0.6, help="stage guidance: guidance_stop (default 0.6)"
    )
    p.add_argument(
        "--quality-steps",
        type=int,
        default=6,
        help="stage quality: denoising steps of the videos compared with stock (default 6)",
    )
    p.add_argument(
        "--fp8-on-cpu",
        action="store_true",
        help="run the fp8 stage on a CPU through torch's CPU _scaled_mm (bypasses the renderer's "
        "refusal; to test this script, not a supported way to render)",
    )
    p.add_argument("--compile-mode", default="default", help="Renderer compile= value (default: default)")
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default: inductor on cuda; on cpu 'eager', dynamo without inductor, "
        "so the CPU path takes seconds)",
    )
    p.add_argument(
        "--compile-vae",
        choices=("default", "on", "off"),
        default="default",
        help="Renderer compile_vae= (default: the Renderer's own default, on CUDA: on)",
    )
    p.add_argument(
        "--min-compile-s",
        type=float,
        default=90.0,
        help="do not start a compile stage with less time than this for it (default 90)",
    )
    p.add_argument(
        "--budget-s", type=float, default=430.0, help="time budget in seconds from the start (default 430)"
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="dense peak for MFU (default: by GPU)")
    p.add_argument("--no-macs", action="store_true", help="skip the MAC count (and MFU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file (default: benchmarks/results/gpu_bench_<model>_<device>.json; .md beside it)",
    )
    p.add_argument(
        "--copy-to", default="", help="also copy the JSON and Markdown files here after each stage"
    )
    args = p.parse_args(argv)
    if args.compile_backend is None:
        args.compile_backend = "inductor" if args.device.startswith("cuda") else "eager"
    if args.steps_per_video < 1 or args.reps < 1 or args.batch_size < 1 or args.step_cache < 0:
        p.error("--steps-per-video, --reps and --batch-size must be >= 1, --step-cache >= 0")
    if args.quality_steps < 1 or not 0 <= args.guidance_start < args.guidance_stop <= 1:
        p.error("--quality-steps must be >= 1 and 0 <= --guidance-start < --guidance-stop <= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--macs-job"]:
        from benchmarks.gpu.stages.macs import macs_job

        return macs_job(argv[1], argv[2])
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_bench: CUDA is not available; use --device cpu --tiny for the CPU path", file=sys.stderr)
        return 2
    from benchmarks.gpu.bench import Bench

    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
