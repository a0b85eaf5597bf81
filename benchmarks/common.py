"""Shared helpers for the benchmark scripts: machine and version facts, statistics, JSON output.

Every result file written by a benchmark carries ``machine`` (CPU model, cores, memory,
GPU if any, load average), ``versions`` (python, torch, diffusers, ...), ``date`` (UTC,
ISO 8601), ``git`` (commit and whether the tree had local changes) and ``command``, next
to the raw measurements, so that a figure can always be traced back to where it came from.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

_VERSION_PACKAGES = ("torch", "diffusers", "transformers", "numpy", "ray", "pyarrow", "matplotlib", "psutil")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gpu_info() -> dict[str, Any] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "count": torch.cuda.device_count(),
        "memory_bytes": int(props.total_memory),
        "multiprocessors": int(props.multi_processor_count),
        "capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
    }


def machine_info() -> dict[str, Any]:
    """What the measurement ran on. ``load_average`` is read now: call it at the end of a run too."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        threads = None
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": affinity,
        "torch_threads": threads,
        "memory_bytes": _memory_bytes(),
        "platform": platform.platform(),
        "gpu": _gpu_info(),
        "load_average_1_5_15min": load,
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _VERSION_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_info() -> dict[str, Any]:
    def run(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = run("status", "--porcelain")
    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def header(benchmark: str) -> dict[str, Any]:
    """The common head of every result file."""
    return {
        "benchmark": benchmark,
        "date": now_iso(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "versions": versions(),
        "git": git_info(),
    }


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without numpy."""
    if not values:
        raise ValueError("quantile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Iterable[float]) -> dict[str, float | int]:
    """Median and spread of repeated measurements."""
    xs = [float(v) for v in values]
    return {
        "n": len(xs),
        "median": statistics.median(xs),
        "p25": quantile(xs, 0.25),
        "p75": quantile(xs, 0.75),
        "min": min(xs),
        "max": max(xs),
        "mean": statistics.fmean(xs),
    }


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` atomically (a reader never sees half a file)."""
    from pipeline.storage import put_atomic

    path = Path(path)
    put_atomic(None, str(path), (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode())
    return path


def rotated(items: Sequence[str], k: int) -> list[str]:
    """``items`` rotated left by ``k``: round k of an alternating A/B/C schedule."""
    k %= len(items)
    return [*items[k:], *items[:k]]
