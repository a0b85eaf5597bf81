"""The one place that turns a video's shape and the job's levers into :func:`vcut.count_macs`'s
arguments, and its report into a result row's MAC columns.

``vcut macs``, the worker (each row's MACs), ``vcut compare``, the dry run and
``benchmarks.levers`` all count this way, so a lever added to ``count_macs`` is passed in one
place. Torch-free until :func:`count_video_macs` is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: A result row's MAC columns, in the results schema's order (``jobs.results``).
MAC_FIELDS = ("macs", "macs_saved", "macs_saved_vcut", "macs_saved_step_cache", "macs_saved_guidance")


@dataclass(frozen=True)
class VideoShape:
    """What one video costs in UNet work: its size, frames (None: the model's own), denoising
    steps, whether classifier-free guidance doubles the UNet batch, and on which part of the
    schedule (``guidance_start`` / ``guidance_stop``, the row's generation values: 0 and 1 = every
    step)."""

    height: int
    width: int
    num_frames: int | None
    steps: int
    guidance: bool = True
    guidance_start: float = 0.0
    guidance_stop: float = 1.0


@dataclass(frozen=True)
class Levers:
    """The settings that change the UNet work per video: the VCUT mode and the step cache
    (interval None or 1: off; ``step_cache_depth`` counts only with a cache)."""

    mode: str = "full"
    step_cache: int | None = None
    step_cache_depth: int = 1

    @classmethod
    def of_model(cls, model: Any) -> Levers:
        """The levers of a job config's ``model`` section (a DictConfig or a dict)."""
        get = model.get if hasattr(model, "get") else lambda k, d=None: getattr(model, k, d)
        mode = get("vcut", "full")
        return cls(
            mode=str(getattr(mode, "value", mode)),  # omegaconf's VcutMode enum, or a plain string
            step_cache=get("step_cache"),
            step_cache_depth=int(get("step_cache_depth", 1) or 1),
        )


def count_args(shape: VideoShape, levers: Levers) -> dict[str, Any]:
    """The keyword arguments of :func:`vcut.count_macs` for ``shape`` under ``levers``."""
    return {
        "height": int(shape.height),
        "width": int(shape.width),
        "num_frames": None if shape.num_frames is None else int(shape.num_frames),
        "num_inference_steps": int(shape.steps),
        "mode": levers.mode,
        "guidance": bool(shape.guidance),
        "step_cache": levers.step_cache,
        "step_cache_depth": int(levers.step_cache_depth) if (levers.step_cache or 1) > 1 else 1,
        "guidance_start": float(shape.guidance_start),
        "guidance_stop": float(shape.guidance_stop),
    }


def count_video_macs(model: Any, shape: VideoShape, levers: Levers) -> Any:
    """:class:`vcut.MacReport` of one video: ``model`` is what ``count_macs`` takes (``"svd-xt"``,
    a local folder, a UNet config mapping). Raises ValueError for a bad shape or lever."""
    from vcut import count_macs

    return count_macs(model, **count_args(shape, levers))


def mac_fields(report: Any) -> dict[str, int]:
    """A result row's MAC columns from a :class:`vcut.MacReport` (for mode ``off`` without a
    step cache, ``macs`` is the stock figure and every saving is 0)."""
    return {
        "macs": int(report.vcut_macs),
        "macs_saved": int(report.macs_saved),
        "macs_saved_vcut": int(report.macs_saved_vcut),
        "macs_saved_step_cache": int(report.macs_saved_step_cache),
        "macs_saved_guidance": int(report.macs_saved_guidance),
    }


__all__ = ["MAC_FIELDS", "Levers", "VideoShape", "count_args", "count_video_macs", "mac_fields"]
