"""PSNR/SSIM of each configuration's frames against stock diffusers' (:func:`compare`, called by
``Bench.measure`` right after a configuration is timed: one untimed video at ``--quality-steps``
steps, the same image and seed as stock's reference), and the stage ``quality`` that tabulates them.

What it measures: how far a lever moves the output from stock's, on random weights
(:func:`pipeline.quality.video_distance`). Not whether a video looks good: with a real
checkpoint, measure that with ``vcut compare``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from benchmarks.gpu.machinery import Runner, forbid_recompiles

if TYPE_CHECKING:
    from benchmarks.gpu.bench import Bench

#: the input image and seed of the quality videos (no configuration is timed on it)
QUALITY_INDEX = 555


def _skimage_missing() -> str | None:
    from pipeline.quality import MISSING_SKIMAGE

    try:
        import skimage.metrics  # noqa: F401
    except ImportError:
        return MISSING_SKIMAGE
    return None


def _render(bench: Bench, runner: Runner) -> Any:
    steps, shape, index = bench.args.quality_steps, bench.shape, QUALITY_INDEX
    return runner.frames(runner.run(steps, runner.inputs(index, shape), index, shape))


def compare(bench: Bench, name: str, runner: Runner, *, compiled: bool = False) -> None:
    """``name``'s distance to stock (stock's own frames are the reference): into its record."""
    from pipeline.quality import video_distance

    if runner.frames is None or _skimage_missing():
        return
    if name == "stock":
        bench.quality_reference = _render(bench, runner)
        return
    if getattr(bench, "quality_reference", None) is None:
        return
    if bench.left() - bench.reserve_after("quality") < bench.est_quality_video():
        bench.result["configs"][name]["quality_vs_stock"] = {"skipped": "time budget"}
        return
    record: dict[str, Any] = {}
    with forbid_recompiles(record) if compiled else contextlib.nullcontext():
        frames = _render(bench, runner)
    d = video_distance(bench.quality_reference, frames)
    q = {
        "steps": bench.args.quality_steps,
        "psnr_mean_db": None if d.identical else d.psnr_mean,
        "psnr_worst_db": None if d.identical else d.psnr_worst,
        "ssim_mean": d.ssim_mean,
        "max_abs_diff": d.max_abs_diff,
        "identical": d.identical,
    }
    bench.result["configs"][name]["quality_vs_stock"] = q
    psnr = "identical" if d.identical else f"PSNR {d.psnr_mean:.1f} dB"
    bench.log(f"{name}: vs stock at {q['steps']} steps: {psnr}, SSIM {d.ssim_mean:.4f}")


def run(bench: Bench) -> None:
    missing = _skimage_missing()
    if missing:
        return bench.skip("quality", missing)
    if getattr(bench, "quality_reference", None) is None:
        return bench.skip("quality", "stock diffusers was not measured: nothing to compare with")
    stage = bench.result["stages"]["quality"]
    stage.update(steps=bench.args.quality_steps, image_index=QUALITY_INDEX, reference="stock")
    stage["configs"] = {
        name: c["quality_vs_stock"] for name, c in bench.result["configs"].items() if "quality_vs_stock" in c
    }
