"""Stage ``whole_video``: one whole 25-step video of the fastest configuration measured."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from benchmarks.gpu.machinery import forbid_recompiles, hard_limit

if TYPE_CHECKING:
    from benchmarks.gpu.bench import Bench


def run(bench: Bench) -> None:
    best = bench.fastest()
    if best is None:
        return bench.skip("whole_video", "no configuration was measured")
    est = bench.result["configs"][best]
    if not bench.fits("whole_video", est["video_s"]):
        return
    rec: dict[str, Any] = {"config": best, "steps": bench.target, "extrapolated_s": est["video_s"]}
    bench.result["whole_video"] = rec
    bench.reset_peak()
    guard = forbid_recompiles(rec) if "compile" in best else contextlib.nullcontext()
    with hard_limit(max(5.0, bench.left() - bench.reserve_after("whole_video"))), guard:
        rec["seconds"], info = bench.timed(bench.runners[best], bench.target, 999, bench.shape)
    rec.update(info)
    rec["measured_over_extrapolated"] = rec["seconds"] / est["video_s"]
    rec["peak_memory_bytes"] = bench.peak()
    bench.log(
        f"whole {bench.target}-step video, {best}: {rec['seconds']:.2f}s (extrapolated {est['video_s']:.2f}s)"
    )
