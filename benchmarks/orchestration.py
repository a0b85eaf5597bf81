"""Orchestration at scale: rows per second through the ``vcut run`` driver and its peak memory.

Usage (from the repository root)::

    python -m benchmarks.orchestration                        # 10k and 50k rows
    python -m benchmarks.orchestration --rows 1000 --paths stub,resume,tiny
    # output.layout files vs webdataset, the no-op encoder writing 64 KiB per video:
    HF_HUB_OFFLINE=1 python -m benchmarks.orchestration --rows 1000 --paths stub,resume --tiny-rows 0 \
        --layouts files,webdataset,files,webdataset --video-bytes 65536 \
        --out benchmarks/results/orchestration_layouts.json

Each measurement runs in its own fresh Python process (so that its peak memory is its own),
on a local Ray instance, through ``jobs.runner.run_job``, the function behind ``vcut run``:

* ``stub``: the whole job machinery (manifest validation, windowed streaming, grouping by
  image, batching, Ray actor calls, result commits to Parquet, compaction, summary) with the
  model replaced by the no-op renderer and encoder of ``jobs.testing`` through the runner's
  ``renderer_factory`` / ``encoder`` seams: each row "renders" one 16x16 black frame instantly
  and writes no video (``--video-bytes N``: N bytes).
  This is the driver's ceiling: the rows per second it can push when rendering costs nothing.
* ``resume``: ``vcut run`` again over the finished ``stub`` output: every row is already
  ``ok``, so the driver validates and streams the manifest, drops every row as done and
  starts no worker. This is the resume path a restarted job takes.
* ``tiny``: the real tiny random-weight model at the smallest settings that render (8x8
  pixels, 2 frames, 1 step: the job config accepts 1 frame, but every such row fails in the
  renderer with a tensor size mismatch) and the real ffmpeg encoder. Its rows per second are
  bound by rendering on this machine, so it runs on ``--tiny-rows`` rows only (default 200).

``--stores local,s3`` measures each store in turn (alternate them on a loaded machine:
``--stores local,s3,local,s3``): ``s3`` is a moto S3 server in this process behind
``benchmarks.delay_proxy`` (``--delay-ms`` per request, default 20; loopback only), the job's
``--out`` an ``s3://`` folder on it; each run records the requests the proxy saw.

Reported per run: rows, wall time (Ray start excluded: it is timed apart), rows per second
over the wall time and between the first and the last committed row (steady), the driver's
peak RSS (sampled every 20 ms, and the kernel's ``VmHWM``), and the peak total RSS of the Ray
processes it started, and the driver's peak RSS in each of its steps (``PHASES``: validation,
resume, the loop, compaction, summary, report). Memory must not grow with the manifest:
compare 100k with 1M.
``--sample-s N`` adds ``driver_series``: every N s the driver's RSS against the rows committed
and what the driver holds (:class:`TimeSeries`), to see when memory grows and with what.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, RESULTS_DIR, header, machine_info, write_json
from benchmarks.e2e import ensure_tiny_model, generation_key, make_images, make_manifest

#: The smallest settings (pixels, frames, steps), as ``<section>.<key>`` of the job config.
SMALLEST = {"height": 8, "width": 8, "num_frames": 2, "num_inference_steps": 1}


# -- memory sampling ------------------------------------------------------------------------------


class MemorySampler:
    """Peak RSS of this process (every ``period`` s) and of its descendants (every 0.5 s)."""

    def __init__(self, period: float = 0.02):
        import psutil

        self.proc = psutil.Process()
        self.period = period
        self.peak = 0
        self.peak_at = 0.0  # when (monotonic) the peak was seen
        self.peak_children = 0
        self.phase = "setup"  # what the driver is doing (``_phases``)
        self.phase_peaks: dict[str, int] = {}  # peak RSS per phase
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        last_children = 0.0
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            if rss > self.peak:
                self.peak, self.peak_at = rss, time.monotonic()
            phase = self.phase
            self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), rss)
            now = time.monotonic()
            if now - last_children > 0.5:
                last_children = now
                total = 0
                for child in self.proc.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_children = max(self.peak_children, total)
            self._stop.wait(self.period)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


#: The driver's steps that the sampler names (``MemorySampler.phase``): (module, function,
#: phase while it runs, phase after it returns). The loop is between ``resume.begin`` and
#: ``results.compact``; every step after it is the end of the job.
PHASES = [
    ("jobs.manifest", "validate_manifest", "validate", "setup"),
    ("jobs.resume", "begin", "resume", "loop"),
    ("jobs.results", "compact", "compact", "end"),
    ("jobs.resume", "finish", "finish", "end"),
    ("jobs.results", "summarize", "summary", "end"),
    ("jobs.loop", "write_report", "report", "end"),
]


@contextlib.contextmanager
def _phases(mem: MemorySampler):
    """Name the driver's phases (``PHASES``) for ``mem`` while the job runs, so that the
    result says in which step the peak RSS was (``driver_peak_rss_by_phase_bytes``)."""
    import importlib

    saved = []
    for module_name, name, during, after in PHASES:
        module = importlib.import_module(module_name)
        original = getattr(module, name)

        def wrapped(*a: Any, _f: Any = original, _during: str = during, _after: str = after, **k: Any) -> Any:
            mem.phase = _during
            try:
                return _f(*a, **k)
            finally:
                mem.phase = _after

        saved.append((module, name, original))
        setattr(module, name, wrapped)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def own_peak_rss() -> int | None:
    """This process's own peak RSS: ``VmHWM`` (Linux), None elsewhere. Not ``ru_maxrss``:
    Linux keeps it across ``execve``, so a subprocess starts with its parent's peak at the
    fork (this benchmark's parent process, which built the manifest's rows in Python)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class TimeSeries:
    """Every ``period`` s: the driver's RSS against the rows committed so far, and what the
    driver holds (the pool's dicts and deques, the writer thread's queue, the ResultWriter's
    held tables, pyarrow's allocated bytes); after the job, the 12 most common object types
    (``gc.get_objects``, in the main thread only). To see *when* memory grows
    (during the loop, with what, or at the end of the job)."""

    def __init__(self, clock: _CommitClock, period: float = 2.0):
        import psutil

        self.proc = psutil.Process()
        self.clock = clock
        self.period = period
        self.runner: Any = None  # set when the job's Runner is created (see run_one)
        self.samples: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, histogram: bool = False, label: str = "") -> None:
        import gc

        import pyarrow as pa

        s: dict[str, Any] = {
            "t": round(time.monotonic() - self.t0, 2),
            "rss_mib": round(self.proc.memory_info().rss / 2**20, 1),
            "committed": self.clock.rows,
            "arrow_mib": round(pa.total_allocated_bytes() / 2**20, 1),
        }
        if label:
            s["label"] = label
        r = self.runner
        if r is not None:
            pool, committer, writer = r.pool, r.committer, getattr(r, "writer", None)
            if pool is not None:
                s["inflight"] = len(pool.inflight)
                s["retry"] = len(pool.retry)
                s["starting"] = len(pool.starting)
                s["worker_inflight"] = sum(len(w.inflight) for w in pool.workers)
            if committer is not None:
                s["commit_queue"] = committer.pending
                s["commit_done_queue"] = committer._done.qsize()
            if writer is not None:
                s["writer_recent"] = len(writer._recent)
                s["writer_recent_rows"] = writer._recent_rows
            s["skipped"] = r.counters["skipped"]
        if histogram:  # only in the main thread, after the job (see __exit__)
            from collections import Counter

            counts = Counter(type(o).__name__ for o in gc.get_objects())
            s["types"] = dict(counts.most_common(12))
        self.samples.append(s)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            # no gc.get_objects() here: from another thread it can take a reference to a tuple
            # the job is building, and CPython's tuple() then fails with a SystemError
            self.sample()

    def __enter__(self) -> TimeSeries:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample(histogram=True, label="end")


class _CommitClock:
    """A runner hook that notes when the first and the last row were committed."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float | None = None
        self.rows = 0

    def on_result(self, row: dict) -> None:
        now = time.monotonic()
        self.first = self.first if self.first is not None else now
        self.last = now
        self.rows += 1


def run_one(
    path: str,
    manifest: str,
    out_dir: str,
    model: str | None,
    layout: str = "files",
    video_bytes: int = 0,
    shard_size: int = 100,
    sample_s: float = 0.0,
) -> dict[str, Any]:
    """One measurement, in this process (called in a fresh subprocess by ``main``)."""
    import logging

    import ray

    from jobs.config import check_config, load_config
    from jobs.runner import run_job

    flags: dict[str, Any] = {"model.vcut": "full", "workers.count": 1}
    if model:
        flags["model.id"] = model
    smallest = {f"{generation_key()}.{k}": v for k, v in SMALLEST.items()}
    settings = {
        **smallest,
        "output.preset": "ultrafast",
        "progress_interval_s": 3600,
        "output.layout": layout,
        "output.shard_size": shard_size,
    }
    dotlist = [f"{k}={v}" for k, v in settings.items()]
    cfg = load_config(None, flags, dotlist)
    check_config(cfg)
    kwargs: dict[str, Any] = {}
    if path == "stub":
        from jobs.testing import fake_seams

        kwargs = fake_seams(video_bytes=video_bytes)
    clock = _CommitClock()
    series = TimeSeries(clock, period=sample_s) if sample_s else None
    if series is not None:  # note the job's Runner, to sample what it holds
        import jobs.loop

        init = jobs.loop.Runner.__init__

        def noting_init(runner: Any, *a: Any, **k: Any) -> None:
            init(runner, *a, **k)
            series.runner = runner

        jobs.loop.Runner.__init__ = noting_init  # type: ignore[method-assign]
    hwm_before = own_peak_rss()
    with MemorySampler() as mem, _phases(mem), series or contextlib.nullcontext():
        t0 = time.monotonic()
        # "local": an instance of its own, never one that `ray start` registered on the machine
        ray.init(
            address="local", include_dashboard=False, logging_level=logging.WARNING, configure_logging=False
        )
        ray_start_s = time.monotonic() - t0
        t1 = time.monotonic()
        with open(os.devnull, "w") as devnull:
            summary = run_job(cfg, manifest, out_dir, hook=clock, progress_stream=devnull, **kwargs)
        wall = time.monotonic() - t1
        ray.shutdown()
    rows = int(summary.get("manifest_rows", 0))
    steady = (
        (clock.rows - 1) / (clock.last - clock.first) if clock.rows > 1 and clock.last > clock.first else None
    )
    return {
        "path": path,
        "layout": layout,
        "video_bytes": video_bytes if path == "stub" else None,
        "shard_size": shard_size if layout == "webdataset" else None,
        "rows": rows,
        "committed_rows": clock.rows,
        "ok": summary.get("ok"),
        "failed": summary.get("failed"),
        "skipped": summary.get("skipped"),
        "ray_start_s": ray_start_s,
        "wall_s": wall,
        "rows_per_s": rows / wall if wall else None,
        "steady_rows_per_s": steady,
        "driver_peak_rss_bytes": max(mem.peak, own_peak_rss() or 0),
        "driver_peak_rss_sampled_bytes": mem.peak,
        # this process's peak before the job (imports, config): VmHWM, None where unknown
        "driver_rss_before_bytes": hwm_before,
        # seconds after the job's last committed row (negative: during the loop)
        "driver_peak_after_last_commit_s": mem.peak_at - clock.last if clock.last is not None else None,
        "driver_peak_rss_by_phase_bytes": mem.phase_peaks,
        "ray_processes_peak_rss_bytes": mem.peak_children,
        "job_summary": {k: v for k, v in summary.items() if not isinstance(v, (dict, list))},
        "driver_series": series.samples if series is not None else None,
    }


def _subprocess(
    path: str,
    manifest: Path,
    out_dir: Path,
    model: Path | None,
    tmp: Path,
    log,
    layout: str = "files",
    video_bytes: int = 0,
    shard_size: int = 100,
    store_env: dict[str, str] | None = None,
    sample_s: float = 0.0,
) -> dict[str, Any]:
    result_file = tmp / f"one-{path}-{str(out_dir).rstrip('/').rsplit('/', 1)[-1]}.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.orchestration",
        "--one",
        path,
        "--manifest",
        str(manifest),
        "--out-dir",
        str(out_dir),
        "--result",
        str(result_file),
        "--layout",
        layout,
        "--video-bytes",
        str(video_bytes),
        "--shard-size",
        str(shard_size),
        "--sample-s",
        str(sample_s),
    ]
    if model:
        cmd += ["--model", str(model)]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        **(store_env or {}),
    )
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    run = json.loads(result_file.read_text())
    run["process_wall_s"] = time.monotonic() - t0
    log(
        f"{path:6} {layout:10} {run['rows']:>6} rows: {run['wall_s']:.1f}s, {run['rows_per_s']:.1f} rows/s "
        f"(steady {run['steady_rows_per_s'] or 0:.1f}), "
        f"driver peak RSS {run['driver_peak_rss_bytes'] / 2**20:.0f} MiB, "
        f"Ray processes {run['ray_processes_peak_rss_bytes'] / 2**20:.0f} MiB; driver peak by phase: "
        + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in run.get("driver_peak_rss_by_phase_bytes", {}).items())
    )
    return run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.orchestration", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--rows", default="10000,50000", help="manifest sizes (default 10000,50000)")
    p.add_argument(
        "--paths", default="stub,resume,tiny", help="which measurements (default stub,resume,tiny)"
    )
    p.add_argument(
        "--tiny-rows", type=int, default=200, help="rows for the real tiny-model path (default 200)"
    )
    p.add_argument("--images", type=int, default=6)
    p.add_argument(
        "--layouts", default="files", help="output.layout values for stub/resume (e.g. files,webdataset)"
    )
    p.add_argument(
        "--video-bytes",
        type=int,
        default=0,
        help="bytes the no-op encoder writes per video (default 0: none)",
    )
    p.add_argument("--stores", default="local", help="local and/or s3, in turn (e.g. local,s3,local,s3)")
    p.add_argument("--delay-ms", type=float, default=20.0, help="delay per S3 request (default 20)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON file (default: benchmarks/results/orchestration.json)"
    )
    p.add_argument(
        "--sample-s",
        type=float,
        default=0.0,
        help="record the driver's RSS, rows committed and what it holds every N s (default 0: off)",
    )
    # internal: one measurement in this process
    p.add_argument("--one", choices=["stub", "resume", "tiny"], help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--layout", default="files", help=argparse.SUPPRESS)
    p.add_argument(
        "--shard-size", type=int, default=100, help="output.shard_size for webdataset (default 100)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        run = run_one(
            args.one,
            args.manifest,
            args.out_dir,
            args.model,
            args.layout,
            args.video_bytes,
            args.shard_size,
            args.sample_s,
        )
        Path(args.result).write_text(json.dumps(run, default=str))
        return 0

    def log(msg: str) -> None:
        print(f"[orchestration] {msg}", flush=True)

    sizes = [int(x) for x in args.rows.split(",") if x.strip()]
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    out = args.out or RESULTS_DIR / "orchestration.json"
    work = args.work or Path(tempfile.mkdtemp(prefix="vcut-orch-"))
    result = header("orchestration")
    result.update(sizes=sizes, paths=paths, settings=SMALLEST, workers=1, tiny_rows=args.tiny_rows)
    stores = [x.strip() for x in args.stores.split(",") if x.strip()]
    result.update(layouts=layouts, video_bytes=args.video_bytes, shard_size=args.shard_size)
    result.update(stores=stores, s3_delay_ms=args.delay_ms if "s3" in stores else None)
    runs: list[dict[str, Any]] = []
    s3 = contextlib.ExitStack()
    try:
        store_env, proxy = (_s3_store(s3, args.delay_ms / 1000.0)) if "s3" in stores else ({}, None)
        images = make_images(work / "images", args.images)
        for n in sizes:
            manifest = make_manifest(work / f"manifest-{n}.parquet", images, n)
            log(f"manifest of {n} rows: {manifest.stat().st_size / 2**10:.0f} KiB")
            for i, (layout, store) in enumerate((la, st) for st in stores for la in layouts):
                local = store == "local"
                out_dir = (
                    work / f"out-stub-{n}-{layout}-{i}" if local else f"s3://{BUCKET}/out-{n}-{layout}-{i}"
                )
                extra = {"layout": layout, "video_bytes": args.video_bytes, "shard_size": args.shard_size}
                extra["sample_s"] = args.sample_s
                extra["store_env"] = None if local else store_env
                for path in ("stub", "resume"):
                    if path not in paths or (path == "resume" and local and not out_dir.exists()):
                        continue
                    before = proxy.requests if proxy else 0
                    run = _subprocess(path, manifest, out_dir, None, work, log, **extra)
                    run["store"] = store
                    if not local:
                        run["s3_requests"] = proxy.requests - before
                    runs.append({**run, "manifest_rows": n})
                if local:
                    shutil.rmtree(out_dir, ignore_errors=True)
            result["runs"] = runs
            write_json(out, result)
        if "tiny" in paths and args.tiny_rows:
            model = ensure_tiny_model(work / "tiny-svd")
            manifest = make_manifest(work / f"manifest-{args.tiny_rows}.parquet", images, args.tiny_rows)
            runs.append(
                {
                    **_subprocess("tiny", manifest, work / "out-tiny", model, work, log),
                    "manifest_rows": args.tiny_rows,
                }
            )
        result["runs"] = runs
        result["load_average_at_end"] = machine_info()["load_average_1_5_15min"]
        write_json(out, result)
        log(f"wrote {out}")
    finally:
        s3.close()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


BUCKET = "vcut-bench"


def _s3_store(stack: contextlib.ExitStack, delay_s: float) -> tuple[dict[str, str], Any]:
    """A moto S3 server on loopback with a bucket, behind a ``DelayProxy``: the environment
    that points a job's processes at the proxy, and the proxy (it counts requests)."""
    import logging
    import urllib.request

    import boto3
    from moto.server import ThreadedMotoServer

    from benchmarks.delay_proxy import DelayProxy

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    stack.callback(server.stop)
    port = server.get_host_and_port()[1]
    urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"), timeout=10
    ).close()
    proxy = stack.enter_context(DelayProxy(("127.0.0.1", port), delay_s))
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": proxy.url,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=BUCKET)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)  # the subprocesses inherit this environment
    return env, proxy


if __name__ == "__main__":
    sys.exit(main())
