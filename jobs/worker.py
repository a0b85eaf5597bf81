"""The worker: one long-lived process holding one ``Renderer``; renders batches of rows.

Rows of a batch render one after another under a lock while a background thread encodes the
previous video, so encoding overlaps rendering; with the actor's two concurrency slots the
next batch starts rendering while this batch's last video is still encoding. Any error in a
row becomes a ``failed`` result and the worker stays alive; only the death of the process
loses a batch, which the driver then retries on another worker.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

GENERATE_KEYS = (
    "seed",
    "num_frames",
    "num_inference_steps",
    "height",
    "width",
    "fps",
    "motion_bucket_id",
    "noise_aug_strength",
    "min_guidance_scale",
    "max_guidance_scale",
)

#: MAC fields of a result row (see ``count_macs``).
MAC_FIELDS = ("macs", "macs_saved", "macs_saved_vcut", "macs_saved_step_cache")


def load_renderer(model: dict[str, Any], cache: dict[str, Any]) -> Any:
    """The real ``pipeline.Renderer`` for a ``model`` config section."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from jobs.config import model_compile_mode
    from pipeline import Renderer

    # A worker process is ours: per-component loading bars would only clutter the job's log.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    return Renderer.from_pretrained(
        model["id"],
        vcut=str(model["vcut"]),
        device=model.get("device"),
        dtype=model.get("dtype"),
        allow_pickle=bool(model.get("allow_pickle")),
        compile=model_compile_mode(model.get("compile")),
        variant=model.get("variant"),
        cache_entries=int(cache["entries"]),
        cache_bytes=int(cache["bytes"]),
        local_files_only=model.get("local_files_only"),
        step_cache=model.get("step_cache"),
        step_cache_depth=int(model.get("step_cache_depth") or 1),
    )


def default_encoder() -> Callable[..., float]:
    from pipeline.encode import encode_video

    return encode_video


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class RenderWorker:
    """Plain class (Ray wraps it as an actor in ``jobs.runner``).

    ``cfg`` is the job config as a plain dict; ``renderer_factory(model, cache)`` and
    ``encoder`` are seams for tests (default: the real pipeline).
    """

    def __init__(
        self,
        cfg: dict[str, Any],
        label: str,
        renderer_factory: Callable[[dict, dict], Any] | None = None,
        encoder: Callable[..., float] | None = None,
        torch_threads: int | None = None,
    ):
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.label = label
        self.node = socket.gethostname()
        self.output = cfg["output"]
        self.renderer = (renderer_factory or load_renderer)(cfg["model"], cfg["cache"])
        self.vcut_mode = str(getattr(self.renderer, "vcut_mode", cfg["model"]["vcut"]))
        self.step_cache = getattr(self.renderer, "step_cache", cfg["model"].get("step_cache"))
        self.step_cache_depth = int(
            getattr(self.renderer, "step_cache_depth", cfg["model"].get("step_cache_depth")) or 1
        )
        self.encode = encoder or default_encoder()
        self.decode_chunk_size = cfg["defaults"].get("decode_chunk_size")
        self._render_lock = threading.Lock()
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
        self._macs: dict[tuple, dict[str, int | None]] = {}
        self._macs_warned = False

    def info(self) -> dict[str, Any]:
        return {"worker": self.label, "node": self.node, "pid": os.getpid(), "device": str(self._device())}

    def _device(self) -> Any:
        return getattr(self.renderer, "device", "cpu")

    def _on_cuda(self) -> bool:
        return str(self._device()).startswith("cuda")

    def count_macs(self, height: int, width: int, frames: int, steps: int, guidance: bool) -> dict:
        """The row's MAC fields: ``macs``, ``macs_saved`` and the latter per lever (None if unknown)."""
        key = (height, width, frames, steps, self.vcut_mode, guidance, self.step_cache, self.step_cache_depth)
        if key not in self._macs:
            try:
                from vcut import count_macs

                report = count_macs(
                    self.renderer.unet_config,
                    height=height,
                    width=width,
                    num_frames=frames,
                    num_inference_steps=steps,
                    mode=self.vcut_mode,
                    guidance=guidance,
                    step_cache=self.step_cache,
                    step_cache_depth=self.step_cache_depth,
                )
                # For mode "off" without step caching, vcut_macs is the baseline and macs_saved is 0.
                self._macs[key] = {
                    "macs": int(report.vcut_macs),
                    "macs_saved": int(report.macs_saved),
                    "macs_saved_vcut": int(report.macs_saved_vcut),
                    "macs_saved_step_cache": int(report.macs_saved_step_cache),
                }
            except Exception as exc:  # MAC counting must never fail a video
                if not self._macs_warned:
                    log.warning("MAC counting unavailable: %s", _error(exc))
                    self._macs_warned = True
                self._macs[key] = dict.fromkeys(MAC_FIELDS)
        return self._macs[key]

    def _render(self, task: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        params = task["params"]
        result: dict[str, Any] = {
            "worker": self.label,
            "node": self.node,
            "worker_pid": os.getpid(),
            "vcut_mode": self.vcut_mode,
            "status": "failed",
        }
        start = time.perf_counter()
        try:
            if self._on_cuda():
                import torch

                torch.cuda.reset_peak_memory_stats()
            kwargs = {k: params[k] for k in GENERATE_KEYS}
            gen = self.renderer.generate(task["image"], decode_chunk_size=self.decode_chunk_size, **kwargs)
            frames = gen.frames
            timings = dict(getattr(gen, "timings", {}) or {})
            steps = int(getattr(gen, "num_inference_steps", params["num_inference_steps"]))
            result.update(
                seconds=float(timings.get("total", time.perf_counter() - start)),
                denoise_seconds=timings.get("denoise"),
                frames=int(frames.shape[0]),
                num_inference_steps=steps,
                cache_hit=bool(getattr(gen, "cache_hit", False)),
                fps=int(getattr(gen, "fps", params["fps"]) or params["fps"]),
            )
            if self._on_cuda():
                import torch

                result["gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
            guidance = float(params["max_guidance_scale"]) > 1.0
            result.update(
                self.count_macs(
                    int(frames.shape[1]), int(frames.shape[2]), int(frames.shape[0]), steps, guidance
                )
            )
            return result, frames
        except Exception as exc:
            result.update(error=_error(exc), seconds=time.perf_counter() - start)
            return result, None

    def _encode(self, frames: Any, out: str, fps: int) -> float:
        start = time.perf_counter()
        seconds = self.encode(
            frames,
            out,
            fps=fps,
            format=self.output["format"],
            crf=int(self.output["crf"]),
            preset=self.output["preset"],
        )
        return float(seconds) if seconds is not None else time.perf_counter() - start

    def render_batch(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Render and encode every task; one result dict per task, in order.

        A task is ``{"id", "image", "output", "params"}``; a result holds the worker-side
        fields (status, error, timings, frames, MACs, cache hit, worker, node).
        """
        pending: list[tuple[dict[str, Any], Future | None]] = []
        with self._render_lock:
            for task in tasks:
                result, frames = self._render(task)
                future = None
                if frames is not None:
                    future = self._encoder.submit(self._encode, frames, task["output"], result["fps"])
                pending.append((result, future))
        out = []
        for (result, future), task in zip(pending, tasks, strict=True):
            if future is not None:
                try:
                    result["encode_seconds"] = future.result()
                    result.update(status="ok", output=task["output"])
                except Exception as exc:
                    result.update(status="failed", error=f"encode: {_error(exc)}")
            out.append(result)
        return out
