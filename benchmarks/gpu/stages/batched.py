"""Stage ``batched``: rows in one ``generate_batch`` call versus one row per call."""

from __future__ import annotations

from typing import TYPE_CHECKING

from benchmarks.gpu.machinery import reset_dynamo

if TYPE_CHECKING:
    from benchmarks.gpu.bench import Bench


def run(bench: Bench) -> None:
    # compiled models are done: free their graphs before new shapes run eagerly
    for name in list(bench.runners):
        if "compile" in name:
            del bench.runners[name]
    bench.compiled.clear()
    reset_dynamo()
    bench.free_memory()
    base = bench.fastest(eager_only=True)
    if base is None:
        return bench.skip("batched", "no eager configuration was measured")
    stage = bench.result["stages"]["batched"]
    stage["renderer_config"] = base
    mode, kw = ("full", {"step_cache": bench.args.step_cache}) if "cache" in base else (base, {})
    if not bench.fits("batched", bench.est_batched()):
        return
    renderer, _ = bench.make_renderer(mode, **kw)
    shape = bench.batch_shape
    bench.measure(f"batch1:{base}", bench.renderer_call(renderer), steps=bench.steps, shape=shape)
    b = bench.args.batch_size
    rec = bench.measure(
        f"batch{b}:{base}", bench.batch_call(renderer, b), steps=bench.steps, shape=shape, batch=b
    )
    one = bench.result["configs"][f"batch1:{base}"]
    if rec.get("videos_per_s") and one.get("videos_per_s"):
        rec["speedup_vs_batch1"] = rec["videos_per_s"] / one["videos_per_s"]
