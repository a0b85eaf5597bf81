"""Stage 1, ``stock``: stock diffusers ``StableVideoDiffusionPipeline.__call__`` (no project code)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from benchmarks.gpu.model import stock_pipeline

if TYPE_CHECKING:
    from benchmarks.gpu.bench import Bench


def run(bench: Bench) -> None:
    if not bench.fits("stock", bench.est_config()):
        return
    pipe = stock_pipeline(bench.components)
    bench.runners["stock"] = bench.stock_call(pipe)
    rec = bench.measure("stock", bench.runners["stock"], steps=bench.steps, shape=bench.shape)
    rec["frames_finite"] = all(r["frames_finite"] for r in rec["raw"])
