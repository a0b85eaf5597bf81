"""The GPU script's former single module, kept as a name: ``python -m benchmarks.gpu_bench`` runs
``python -m benchmarks.gpu`` (split into a stage per module in :mod:`benchmarks.gpu`), and the
names below are where they now live."""

from __future__ import annotations

import sys

from benchmarks.gpu.bench import STAGES, Bench
from benchmarks.gpu.cli import main, parse_args
from benchmarks.gpu.machinery import (
    RecompiledDuringTiming,
    Runner,
    StageTimeout,
    compile_shim,
    derive,
    forbid_recompiles,
    hard_limit,
)
from benchmarks.gpu.model import SHAPES, Shape, build_components
from benchmarks.gpu.peak import PEAK_TFLOPS, identify_gpu, peak_info
from benchmarks.gpu.summary import summary_markdown

__all__ = [
    "PEAK_TFLOPS",
    "SHAPES",
    "STAGES",
    "Bench",
    "RecompiledDuringTiming",
    "Runner",
    "Shape",
    "StageTimeout",
    "build_components",
    "compile_shim",
    "derive",
    "forbid_recompiles",
    "hard_limit",
    "identify_gpu",
    "main",
    "parse_args",
    "peak_info",
    "summary_markdown",
]

if __name__ == "__main__":
    sys.exit(main())
