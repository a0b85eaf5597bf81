"""Batched rows: seconds per video with ``Renderer.generate_batch`` at batch 1, 2, 4, ... (one process).

Usage (from the repository root)::

    python -m benchmarks.batched                       # tiny model, CPU, 64x64, 8 frames, 4 steps
    python -m benchmarks.batched --height 128 --width 128 --threads 2 --rounds 5

How it measures:

* One renderer (the tiny random-weight model built in memory, VCUT ``--vcut``), the same
  ``--rows`` images and seeds for every configuration. Configuration ``b`` renders them in
  ``rows / b`` calls of ``generate_batch`` with ``b`` rows each (``b`` must divide ``rows``).
* A warm-up pass of every configuration first (it also fills the embedding cache, so every
  measured row is a cache hit in every configuration alike, and its frames are compared
  with batch 1's), then ``--rounds`` rounds of all
  configurations in rotating order (round k starts with configuration k mod n), so that a
  slow spell of a shared machine hits each alike. A measurement is the wall time of all
  ``rows`` rows, reported per row.
* Reported: per configuration the median seconds per row (spread: p25-p75, min-max), the
  speed-up over batch 1 as the median of the per-round paired ratios and as the ratio of
  medians, and the largest difference (uint8 levels) of any frame from the batch-1 frames.
  The load average before and after goes into the file: figures from a busy machine are noisy.

Weights are RANDOM: these are speed figures, not videos.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, header, machine_info, rotated, summarize, write_json


def make_renderer(vcut: str) -> Any:
    from pipeline import Renderer
    from vcut.tiny import make_tiny_pipeline

    return Renderer.from_pipe(make_tiny_pipeline(), vcut=vcut, model_id="tiny")


def images_for(rows: int) -> list[Any]:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)) for _ in range(rows)]


def render_all(renderer: Any, images: list, seeds: list[int], batch: int, kw: dict) -> tuple[float, list]:
    """Wall seconds to render every row ``batch`` at a time, and the frames per row."""
    frames = []
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        gens = renderer.generate_batch(images[i : i + batch], seeds=seeds[i : i + batch], **kw)
        frames.extend(g.frames for g in gens)
    return time.perf_counter() - start, frames


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batched", description=__doc__.split("\n\n")[0])
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batches", default="1,2,4", help="comma-separated rows per call (default: 1,2,4)")
    p.add_argument("--rows", type=int, default=4, help="rows rendered per measurement (default: 4)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--vcut", default="full", help="VCUT mode (default: full)")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/batched_tiny_cpu.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if 1 not in batches or any(b < 1 or args.rows % b for b in batches):
        raise SystemExit(f"--batches must include 1 and divide --rows={args.rows}: got {batches}")
    torch.set_num_threads(args.threads)
    out = args.out or RESULTS_DIR / "batched_tiny_cpu.json"
    result: dict[str, Any] = header("batched")
    kw = dict(
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        decode_chunk_size=None,
    )
    result.update(
        model="tiny (random weights)",
        device="cpu",
        dtype="fp32",
        vcut=args.vcut,
        shape=dict(kw, rows=args.rows),
        batches=batches,
        threads=args.threads,
    )

    def log(msg: str) -> None:
        print(f"[batched] {msg}", flush=True)

    renderer = make_renderer(args.vcut)
    images = images_for(args.rows)
    seeds = list(range(args.rows))
    names = [str(b) for b in batches]
    reference: list = []
    max_diff: dict[str, int] = {}
    for b in sorted(batches):  # warm-up (batch 1 first: its frames are the reference), cache fill
        seconds, frames = render_all(renderer, images, seeds, b, kw)
        reference = reference or frames
        diffs = [
            int(np.abs(f.astype(int) - r.astype(int)).max()) for f, r in zip(frames, reference, strict=True)
        ]
        max_diff[str(b)] = max(diffs)
        log(f"warm-up batch {b}: {seconds / args.rows:.3f} s/row, max frame diff vs batch 1: {max(diffs)}")

    rounds = []
    for k in range(args.rounds):
        row: dict[str, float] = {}
        for name in rotated(names, k):
            seconds, _ = render_all(renderer, images, seeds, int(name), kw)
            row[name] = seconds / args.rows
        rounds.append(row)
        log(f"round {k + 1}/{args.rounds}: " + ", ".join(f"batch {n} {row[n]:.3f} s/row" for n in names))

    summary = {}
    base = [r["1"] for r in rounds]
    for name in names:
        per_row = [r[name] for r in rounds]
        stats = summarize(per_row)
        summary[name] = {
            "seconds_per_row": stats,
            "rows_per_second_median": 1.0 / stats["median"],
            "speedup_vs_batch_1_paired_median": statistics.median(
                b / x for b, x in zip(base, per_row, strict=True)
            ),
            "speedup_vs_batch_1_of_medians": statistics.median(base) / stats["median"],
            "max_frame_diff_vs_batch_1_uint8": max_diff[name],
        }
    result["rounds"] = rounds
    result["summary"] = summary
    result["load_average_at_end"] = machine_info()["load_average_1_5_15min"]
    write_json(out, result)
    for name in names:
        s = summary[name]
        st = s["seconds_per_row"]
        print(
            f"batch {name}: {st['median']:.3f} s/row (p25-p75 {st['p25']:.3f}-{st['p75']:.3f}), "
            f"speed-up x{s['speedup_vs_batch_1_paired_median']:.2f} (paired), "
            f"max frame diff {s['max_frame_diff_vs_batch_1_uint8']} level(s)"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
