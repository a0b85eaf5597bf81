"""Compile once per fleet: a second worker's compile with the first one's compile cache vs cold.

Usage (from the repository root)::

    python -m benchmarks.compile_cache                 # tiny model, CPU, 2 pairs of workers
    python -m benchmarks.compile_cache --pairs 1 --vcut full

How it measures:

* A "worker" is a fresh Python process (``python -m benchmarks.compile_cache --worker``) with
  its OWN empty inductor cache folder (``TORCHINDUCTOR_CACHE_DIR``, a new temporary folder) and
  ``TORCHINDUCTOR_COMPILE_THREADS=1`` (so the C++ compiler's CPU time is counted as the
  process's children's). It builds the tiny random-weight renderer with ``compile="default"``
  and ``compile_cache=<folder>`` (:mod:`pipeline.compile_cache`) and renders one video: the
  first call of that shape, which compiles.
* Pair i: the ``cold`` worker starts with an empty compile-cache folder, compiles and saves the
  entry; the ``warm`` worker (another fresh process, its own empty inductor cache) loads that
  entry before its first call. Pairs run one after another; a shared machine is noisy, so
  the CPU seconds (process + children) are reported beside the wall seconds.
* Reported per worker: the first call's wall seconds, dynamo's compile seconds
  (``timings["compile"]``), the cache's load / save seconds and what it did, CPU seconds, and
  torch's own counters (inductor FX-graph cache and AOTAutograd cache hits and misses), with
  torch's compile-time breakdown (``calculate_time_spent``). Summary: warm / cold ratios.

On a CPU a warm worker still builds inductor's C++ kernels with the system compiler (torch's
artifacts hold the generated source, not the built libraries): the saving is the graph
capture's lowering and code generation. On CUDA inductor bundles the Triton kernels into the
artifacts (``bundle_triton_into_fx_graph_cache``), so a warm compile there skips kernel
builds too; the H200 figures in ``pipeline.compile.H200_SVD_XT`` (cold 214 s, warm 26 s) are
from issue 17's run, not from this script.

Weights are RANDOM: these are speed figures, not videos.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, header, machine_info, write_json

DEFAULT_OUT = Path(__file__).parent / "results" / "compile_cache_tiny_cpu.json"
SHAPE = dict(height=64, width=64, num_frames=4, num_inference_steps=2)


def worker(cache: str, vcut: str, threads: int) -> dict[str, Any]:
    """One worker process's measurement (run inside the fresh process)."""
    import numpy as np
    import torch
    from PIL import Image
    from torch._dynamo.utils import calculate_time_spent, counters

    from pipeline import Renderer
    from vcut.tiny import make_tiny_pipeline

    torch.set_num_threads(threads)
    renderer = Renderer.from_pipe(make_tiny_pipeline(), vcut=vcut, compile="default", compile_cache=cache)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8))
    before = os.times()
    start = time.perf_counter()
    gen = renderer.generate(image, seed=0, **SHAPE)
    wall = time.perf_counter() - start
    after = os.times()
    stats = renderer.compile_cache.stats
    return {
        "first_call_s": wall,
        "compile_s": gen.timings["compile"],
        "cache_load_s": stats.load_seconds,
        "cache_save_s": stats.save_seconds,
        "cache": {"loaded": stats.loaded, "saved": stats.saved, "ignored": stats.ignored},
        "cpu_s": (after.user - before.user) + (after.system - before.system),
        "children_cpu_s": (after.children_user - before.children_user)
        + (after.children_system - before.children_system),
        "counters": {k: dict(counters[k]) for k in ("inductor", "aot_autograd") if k in counters},
        "time_spent": {k: round(v, 3) for k, v in calculate_time_spent().items()},
    }


def run_worker(cache: str, vcut: str, threads: int) -> dict[str, Any]:
    """A fresh process with its own empty inductor cache folder."""
    with tempfile.TemporaryDirectory(prefix="inductor-") as inductor_dir:
        env = dict(
            os.environ,
            TORCHINDUCTOR_CACHE_DIR=inductor_dir,
            TORCHINDUCTOR_COMPILE_THREADS="1",
            PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        cmd = [sys.executable, "-m", "benchmarks.compile_cache", "--worker", cache, "--vcut", vcut]
        cmd += ["--threads", str(threads)]
        proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2, help="cold + warm worker pairs")
    parser.add_argument("--vcut", default="full")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", metavar="CACHE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.vcut, args.threads)))
        return 0

    data = header("compile_cache")
    data.update(model="tiny (random weights)", vcut=args.vcut, shape=SHAPE, device="cpu", pairs=[])
    for i in range(args.pairs):
        with tempfile.TemporaryDirectory(prefix="compile-cache-") as cache:
            cold = run_worker(cache, args.vcut, args.threads)
            warm = run_worker(cache, args.vcut, args.threads)
            entries = sorted(str(p.relative_to(cache)) for p in Path(cache).rglob("*.bin"))
        pair = {"cold": cold, "warm": warm, "entries": entries}
        for what in ("first_call_s", "compile_s", "cpu_s", "children_cpu_s"):
            pair[f"warm_over_cold_{what}"] = warm[what] / cold[what] if cold[what] else None
        data["pairs"].append(pair)
        print(
            f"pair {i}: compile cold {cold['compile_s']:.1f}s -> warm {warm['compile_s']:.1f}s "
            f"(+ load {warm['cache_load_s']:.2f}s); CPU cold {cold['cpu_s'] + cold['children_cpu_s']:.1f}s "
            f"-> warm {warm['cpu_s'] + warm['children_cpu_s']:.1f}s; warm counters {warm['counters']}",
            flush=True,
        )
        data["machine_at_end"] = machine_info()
        print(f"wrote {write_json(args.out, data)}", flush=True)  # after every pair: a long run keeps them
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
