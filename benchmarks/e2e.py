"""End-to-end job: ``vcut run`` on an N-row manifest, tiny model, local Ray; 1 versus 2 workers.

Usage (from the repository root)::

    python -m benchmarks.e2e                       # 24 rows, workers 1 and 2, twice each
    python -m benchmarks.e2e --rows 48 --workers 1,2 --repeats 1

What runs: exactly what ``vcut run MANIFEST --out DIR --model TINY --workers W key=value...``
runs (``jobs.config.load_config`` + ``check_config``, then ``jobs.runner.run_job`` on a local
Ray instance that it starts and stops), with the real tiny random-weight ``pipeline.Renderer``
and the real ffmpeg encoder, each wrapped through the runner's ``renderer_factory`` /
``encoder`` seams by a thin timer that appends one line per call to a JSONL file per worker
process (``VCUT_BENCH_TIMINGS``). Nothing else changes.

From those timelines, per worker, over its busy span (first render start to last encode end):

* ``model_s``: time inside ``Renderer.generate`` less its image loading (CLIP embedding,
  VAE encode, the UNet loop, VAE decode, postprocess);
* ``image_load_s``: ``Generation.timings["image_load"]`` (read, decode, convert, fit);
* ``encode_s``: video encoding and writing (ffmpeg) while the worker was not rendering:
  encoding runs in a background thread and overlaps the next render, so only the part that
  does not overlap is charged (the full encoding time is reported as ``encode_total_s``);
* ``other_s``: the rest of the span: waiting for the next batch (scheduling), Ray calls,
  result commits.

Outside the workers' spans: ``startup_s`` (Ray start, worker start, model load) and
``tail_s`` (last commit, compaction, shutdown). ``videos_per_s`` is rows over the job's whole
wall time; ``steady_videos_per_s`` is rows over the union of the workers' spans.

Runs alternate worker counts ([1, 2, 2, 1, ...]) so that a slow spell of a shared machine
does not land on one of them only. The tiny model has RANDOM weights (it renders noise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, RESULTS_DIR, header, machine_info, summarize, write_json
from vcut.modes import MODES

TIMINGS_ENV = "VCUT_BENCH_TIMINGS"
_lock = threading.Lock()


def _log_event(event: dict[str, Any]) -> None:
    folder = os.environ.get(TIMINGS_ENV)
    if not folder:
        return
    line = json.dumps(event, default=float) + "\n"
    with _lock, open(os.path.join(folder, f"timings-{os.getpid()}.jsonl"), "a") as f:
        f.write(line)


class TimedRenderer:
    """Delegates to the real renderer; logs each ``generate`` call's wall interval and timings."""

    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def generate(self, image: Any, **kwargs: Any) -> Any:
        start = time.time()
        gen = self._inner.generate(image, **kwargs)
        end = time.time()
        timings = {k: float(v) for k, v in (getattr(gen, "timings", {}) or {}).items()}
        _log_event(
            {
                "kind": "render",
                "start": start,
                "end": end,
                "timings": timings,
                "cache_hit": bool(getattr(gen, "cache_hit", False)),
            }
        )
        return gen


def timed_renderer(model: dict, cache: dict) -> TimedRenderer:
    """``renderer_factory`` for the runner: the real ``jobs.worker.load_renderer``, timed."""
    from jobs.worker import load_renderer

    start = time.time()
    renderer = load_renderer(model, cache)
    _log_event({"kind": "load", "start": start, "end": time.time()})
    return TimedRenderer(renderer)


def timed_encode(frames: Any, out: str, **kwargs: Any) -> float:
    """``encoder`` for the runner: the real ``pipeline.encode.encode_video``, timed."""
    from pipeline.encode import encode_video

    start = time.time()
    seconds = encode_video(frames, out, **kwargs)
    end = time.time()
    _log_event({"kind": "encode", "start": start, "end": end})
    return seconds if seconds is not None else end - start


# -- timeline arithmetic ---------------------------------------------------------------------


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def worker_breakdown(events: list[dict[str, Any]]) -> dict[str, Any]:
    """One worker's busy span split into model / image load / encode (not overlapped) / other."""
    renders = [e for e in events if e["kind"] == "render"]
    encodes = [e for e in events if e["kind"] == "encode"]
    if not renders:
        return {}
    r_iv = [(e["start"], e["end"]) for e in renders]
    e_iv = [(e["start"], e["end"]) for e in encodes]
    span_start = min(s for s, _ in r_iv)
    span_end = max(e for _, e in r_iv + e_iv)
    span = span_end - span_start
    render_s = union_length(r_iv)
    busy_s = union_length(r_iv + e_iv)
    image_load = sum(e["timings"].get("image_load", 0.0) for e in renders)
    parts = {
        "model_s": render_s - image_load,
        "image_load_s": image_load,
        "encode_s": busy_s - render_s,
        "other_s": span - busy_s,
    }
    stages: dict[str, float] = {}
    for e in renders:
        for k, v in e["timings"].items():
            stages[k] = stages.get(k, 0.0) + v
    loads = [e["end"] - e["start"] for e in events if e["kind"] == "load"]
    return {
        "rows": len(renders),
        "span_s": span,
        "span_start": span_start,
        "span_end": span_end,
        **parts,
        "encode_total_s": sum(e["end"] - e["start"] for e in encodes),
        "model_load_s": loads[0] if loads else None,
        "renderer_timings_sum_s": stages,
        "fraction_of_span": {k: v / span if span else 0.0 for k, v in parts.items()},
        "cache_hits": sum(e["cache_hit"] for e in renders),
    }


def read_timelines(folder: Path) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for path in sorted(folder.glob("timings-*.jsonl")):
        out[path.stem.split("-", 1)[1]] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return out


# -- inputs ----------------------------------------------------------------------------------


def make_images(folder: Path, n: int = 6, size: int = 96) -> list[Path]:
    """A handful of distinct small PNGs (gradients in different colours)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    for i in range(n):
        rgb = np.zeros((size, size, 3), dtype=np.float32)
        rgb[..., i % 3] = ramp[None, :]
        rgb[..., (i + 1) % 3] = ramp[:, None]
        rgb[..., (i + 2) % 3] = 40.0 * i
        path = folder / f"img{i:02d}.png"
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def make_manifest(path: Path, images: list[Path], rows: int) -> Path:
    """``rows`` rows cycling through ``images`` (relative paths), each with its own seed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = [os.path.relpath(p, path.parent) for p in images]
    table = pa.table(
        {
            "id": [f"row-{i:06d}" for i in range(rows)],
            "image": [names[i % len(names)] for i in range(rows)],
            "seed": list(range(rows)),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def generation_key() -> str:
    """The job config's section of generation defaults (``defaults``; ``generation`` in older trees)."""
    import dataclasses

    from jobs.config import JobConfig

    names = {f.name for f in dataclasses.fields(JobConfig)}
    return "defaults" if "defaults" in names else "generation"


def ensure_tiny_model(folder: Path) -> Path:
    if not (folder / "model_index.json").is_file():
        from vcut.tiny import save_tiny_pipeline

        save_tiny_pipeline(folder)
    return folder


# -- one job ---------------------------------------------------------------------------------


def run_once(
    manifest: Path,
    out_dir: Path,
    model: Path,
    workers: int,
    vcut: str,
    settings: dict[str, Any],
    timings_dir: Path,
    log,
) -> dict[str, Any]:
    # Ray pickles functions of ``__main__`` by value (this module under ``python -m``); the
    # imported module's functions go by reference, which Ray's workers import.
    from benchmarks import e2e as seams
    from jobs.config import check_config, load_config
    from jobs.results import read_results
    from jobs.runner import run_job

    flags = {"model.id": str(model), "model.vcut": vcut, "workers.count": workers}
    dotlist = [f"{k}={v}" for k, v in settings.items()]
    cfg = load_config(None, flags, dotlist)
    check_config(cfg)
    if timings_dir.exists():
        shutil.rmtree(timings_dir)
    timings_dir.mkdir(parents=True)
    os.environ[TIMINGS_ENV] = str(timings_dir)
    t0 = time.time()
    with open(os.devnull, "w") as devnull:
        summary = run_job(
            cfg,
            str(manifest),
            str(out_dir),
            renderer_factory=seams.timed_renderer,
            encoder=seams.timed_encode,
            progress_stream=devnull,
        )
    t1 = time.time()
    wall = t1 - t0
    timelines = read_timelines(timings_dir)
    per_worker = {pid: worker_breakdown(ev) for pid, ev in timelines.items()}
    per_worker = {pid: b for pid, b in per_worker.items() if b}
    table = read_results(str(out_dir), columns=["status", "seconds", "encode_seconds", "denoise_seconds"])
    statuses = table.column("status").to_pylist()
    totals = {
        k: sum(b[k] for b in per_worker.values()) for k in ("model_s", "image_load_s", "encode_s", "other_s")
    }
    span_total = sum(b["span_s"] for b in per_worker.values())
    spans = [(b["span_start"], b["span_end"]) for b in per_worker.values()]
    busy = union_length(spans)
    run = {
        "workers": workers,
        "vcut": vcut,
        "rows": len(statuses),
        "ok": statuses.count("ok"),
        "failed": len(statuses) - statuses.count("ok"),
        "wall_s": wall,
        "videos_per_s": len(statuses) / wall if wall else None,
        "steady_videos_per_s": len(statuses) / busy if busy else None,
        "startup_s": (min(s for s, _ in spans) - t0) if spans else None,
        "tail_s": (t1 - max(e for _, e in spans)) if spans else None,
        "job_summary": {k: v for k, v in summary.items() if not isinstance(v, (dict, list))},
        "per_worker": per_worker,
        "breakdown": {
            "seconds": totals,
            "fraction_of_worker_wall": {k: v / span_total if span_total else 0.0 for k, v in totals.items()},
        },
        "results_parquet": {
            "seconds": summarize(table.column("seconds").drop_null().to_pylist() or [0.0]),
            "encode_seconds": summarize(table.column("encode_seconds").drop_null().to_pylist() or [0.0]),
            "denoise_seconds": summarize(table.column("denoise_seconds").drop_null().to_pylist() or [0.0]),
        },
    }
    log(
        f"{workers} worker(s): {len(statuses)} rows ({run['failed']} failed) in {wall:.1f}s = "
        f"{run['videos_per_s']:.3f} videos/s (steady {run['steady_videos_per_s'] or 0:.3f}); "
        + ", ".join(
            f"{k[:-2]} {100 * v:.0f}%" for k, v in run["breakdown"]["fraction_of_worker_wall"].items()
        )
    )
    return run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    p.add_argument("--repeats", type=int, default=2, help="runs per worker count, alternating (default 2)")
    p.add_argument("--vcut", choices=MODES, default="full")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--images", type=int, default=6, help="distinct images in the manifest")
    p.add_argument("--model", type=Path, default=None, help="model folder (default: write the tiny model)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON file (default: benchmarks/results/e2e_tiny.json)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(x) for x in args.workers.split(",") if x.strip()]
    schedule = []
    for r in range(args.repeats):
        schedule += counts if r % 2 == 0 else counts[::-1]
    out = args.out or RESULTS_DIR / "e2e_tiny.json"
    work = args.work or Path(tempfile.mkdtemp(prefix="vcut-e2e-"))
    # Ray workers must import this module (the seams) and the project, like the driver does.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    gen = generation_key()
    settings = {
        f"{gen}.height": args.height,
        f"{gen}.width": args.width,
        f"{gen}.num_frames": args.frames,
        f"{gen}.num_inference_steps": args.steps,
        "output.preset": "ultrafast",
        "progress_interval_s": 3600,
    }

    def log(msg: str) -> None:
        print(f"[e2e] {msg}", flush=True)

    result = header("e2e")
    result.update(
        rows=args.rows,
        images=args.images,
        schedule=schedule,
        vcut=args.vcut,
        settings={
            **settings,
            "label": f"{args.width}x{args.height}, {args.frames} frames, "
            f"{args.steps} steps, vcut {args.vcut}",
        },
    )
    try:
        model = args.model or ensure_tiny_model(work / "tiny-svd")
        images = make_images(work / "images", args.images)
        manifest = make_manifest(work / "manifest.parquet", images, args.rows)
        runs = []
        for i, workers in enumerate(schedule):
            out_dir = work / f"run{i}-w{workers}"
            runs.append(
                run_once(manifest, out_dir, model, workers, args.vcut, settings, work / f"timings{i}", log)
            )
            shutil.rmtree(out_dir, ignore_errors=True)
        result["runs"] = runs
        by_workers = {}
        for w in counts:
            mine = [r for r in runs if r["workers"] == w]
            by_workers[str(w)] = {
                "videos_per_s": summarize([r["videos_per_s"] for r in mine]),
                "steady_videos_per_s": summarize([r["steady_videos_per_s"] or 0.0 for r in mine]),
                "fraction_of_worker_wall_median": {
                    k: summarize([r["breakdown"]["fraction_of_worker_wall"][k] for r in mine])["median"]
                    for k in ("model_s", "image_load_s", "encode_s", "other_s")
                },
            }
        result["by_workers"] = by_workers
        result["load_average_at_end"] = machine_info()["load_average_1_5_15min"]
        write_json(out, result)
        log(f"wrote {out}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
