"""Stage 4, ``compile_step_cache``: ``full`` + compile + step cache N, on the compiled UNet of
stage ``compile`` (its shallow-step variant compiles now)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from benchmarks.gpu.stages.compile import time_compiled

if TYPE_CHECKING:
    from benchmarks.gpu.bench import Bench


def run(bench: Bench) -> None:
    n = bench.args.step_cache
    if not n:
        return bench.skip("compile_step_cache", "--step-cache 0")
    if "compile" not in bench.result["stages_done"] or "plain" not in bench.compiled:
        return bench.skip("compile_step_cache", "the compile stage did not finish")
    # no dynamo reset: the same compiled UNet, whose shallow-step variant compiles now
    time_compiled(bench, f"full+compile+cache{n}", (n, 3 * n), "compile_step_cache", interval=n)
