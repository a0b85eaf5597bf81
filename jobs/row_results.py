"""A rendered row's result fields, from its generation: timings, frames, cache hit, its call's
GPU memory peak, and its MACs (counted once per video shape for the worker's levers).

What ``seconds`` means (a row's image load plus its share of its call's phases) is described
in ``jobs.worker``; MAC counting never fails a row: without a UNet config (a test double) or
for a shape ``vcut.count_macs`` refuses, the MAC fields are None and a warning is logged once.
"""

from __future__ import annotations

import logging
from typing import Any

from jobs.macs import MAC_FIELDS, Levers, VideoShape, count_video_macs, mac_fields

log = logging.getLogger(__name__)


class RowResults:
    """Fills result rows for a worker whose ``renderer`` renders with ``levers``."""

    def __init__(self, renderer: Any, levers: Levers) -> None:
        self.renderer = renderer
        self.levers = levers
        self._macs: dict[VideoShape, dict[str, int | None]] = {}
        self._warned = False

    def count_macs(self, shape: VideoShape) -> dict[str, int | None]:
        """The MAC fields of a video of ``shape``: ``macs``, ``macs_saved`` and the latter per
        lever (None if unknown)."""
        if shape not in self._macs:
            try:
                unet_config = getattr(self.renderer, "unet_config", None)
                if unet_config is None:  # no import of vcut for nothing
                    raise ValueError("the renderer has no unet_config")
                self._macs[shape] = mac_fields(count_video_macs(unet_config, shape, self.levers))
            except Exception as exc:  # MAC counting must never fail a video
                if not self._warned:
                    log.warning("MAC counting unavailable: %s: %s", type(exc).__name__, exc)
                    self._warned = True
                self._macs[shape] = dict.fromkeys(MAC_FIELDS)
        return self._macs[shape]

    def fill(
        self,
        result: dict[str, Any],
        gen: Any,
        params: dict[str, Any],
        added: float,
        wall: float,
        peak: int | None,
    ) -> Any:
        """Record a generation in ``result`` and return its frames: ``seconds`` is its ``total`` +
        ``added`` (the row's own image load, when loaded apart), or ``wall`` for a generation
        without timings; ``peak``: the CUDA memory peak of its pipeline call (None off CUDA)."""
        frames = gen.frames
        timings = dict(getattr(gen, "timings", {}) or {})
        steps = int(getattr(gen, "num_inference_steps", params["num_inference_steps"]))
        result.update(
            seconds=float(timings["total"]) + added if "total" in timings else wall,
            denoise_seconds=timings.get("denoise"),
            compile_seconds=timings.get("compile"),  # torch.compile's part of this row (None: off)
            frames=int(frames.shape[0]),
            num_inference_steps=steps,
            cache_hit=bool(getattr(gen, "cache_hit", False)),
            fps=int(getattr(gen, "fps", params["fps"]) or params["fps"]),
        )
        if peak is not None:
            result["gpu_memory_bytes"] = peak
        shape = VideoShape(
            height=int(frames.shape[1]),
            width=int(frames.shape[2]),
            num_frames=int(frames.shape[0]),
            steps=steps,
            guidance=float(params["max_guidance_scale"]) > 1.0,
            guidance_start=float(params["guidance_start"]),
            guidance_stop=float(params["guidance_stop"]),
        )
        result.update(self.count_macs(shape))
        return frames
