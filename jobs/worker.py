"""The worker: one long-lived process holding one ``Renderer``; renders batches of rows.

The rows of a batch render under a lock as pipeline calls (``jobs.render_calls``): rows that
share every generation value but the seed render ``workers.render_batch`` = N at a time in
one call (N = 1: a call per row). The calls go through ``Renderer.generate_stream``, which
decodes a call while the next one denoises (``workers.overlap_decode``: by default on a GPU;
the same frames either way), and a background thread encodes each video meanwhile; with the
actor's two concurrency slots the next batch's images load while this batch renders. Images
are loaded row by row first, so a bad image fails only its row; a call of several rows that
fails is retried row by row, so an error fails only the rows that fail alone; a failing call
fails neither the calls before it nor after it. Any error in a row becomes a ``failed`` result
and the worker stays alive; only the death of the process loses a batch, which the driver
then retries on another worker. Results, MACs and encoding stay per row: a row's ``seconds``
is its image load plus its share (1/rows of its call) of its call's conditioning, denoising,
decode and postprocess, each phase timed on its own; overlapped, the rows' ``seconds`` of a
batch thus add up to more than the batch's wall time (by the decode that ran beside the next
call's denoising).

A worker that Ray gave a GPU on which torch sees no CUDA refuses to start (``cuda_refusal``:
one line with CUDA_VISIBLE_DEVICES and the cause) unless ``workers.allow_cpu_fallback``: a GPU
job silently rendering on CPUs would run for days. Results carry the Ray node id and IP.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from jobs.macs import Levers
from jobs.placement import _assigned_gpus, _log_to_file, _ray_placement, cuda_refusal
from jobs.planner import RowTask
from jobs.render_calls import CallOutcome, GroupCall, PeakMemory, group_rows, render_calls
from jobs.row_results import RowResults
from jobs.text import error_line
from pipeline.fetch import FetchLimits
from pipeline.notices import quiet_notices
from pipeline.params import BATCH_PARAMS, JOB_PARAMS, ROW_PARAMS

log = logging.getLogger(__name__)


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
        compile_cache=model.get("compile_cache"),  # set by the driver (jobs.config.compile_cache_uri)
        compile_rows=model.get("compile_rows"),  # rows per worker and shape, set by the driver
        quantize=str(model.get("quantize") or "off"),
    )


def default_encoder() -> Callable[..., float]:
    from pipeline.encode import encode_video

    return encode_video


def _now_us() -> int:
    """Now, in µs since the epoch (a row's ``finished_at``: when its own work ended)."""
    return time.time_ns() // 1000


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
        log_dir: str | None = None,
        shards: Any = None,
    ):
        started = time.perf_counter()
        self.label = label
        self.node = socket.gethostname()
        self.node_id, self.node_ip = _ray_placement()
        self.log_file = _log_to_file(log_dir, label) if log_dir else None
        quiet_notices()  # before pipeline.svd imports diffusers' SVD module (pipeline.notices says why)
        self.output = cfg["output"]
        self.shards: Any = None  # layout webdataset: this worker's shards
        if shards is not None:
            from jobs.shard_writer import WorkerShards  # (pyarrow) only a webdataset job's workers

            self.shards = WorkerShards(shards, label)
        self.renderer: Any = None
        # A start-up failure (the model does not load, CUDA out of memory ...) is kept, not
        # raised: ``info()`` hands it to the driver, which reports one line per cause and keeps
        # the traceback in DIR/logs/ (a raised error would reach the terminal as Ray's banner).
        self.startup_error: dict[str, str] | None = None
        try:
            if torch_threads:
                import torch

                torch.set_num_threads(torch_threads)
            gpus = _assigned_gpus()
            refusal = cuda_refusal(gpus)
            if refusal and not cfg["workers"].get("allow_cpu_fallback"):
                raise RuntimeError(refusal)
            if refusal:
                log.warning("%s renders on the CPU (workers.allow_cpu_fallback): %s", label, refusal)
            self.renderer = (renderer_factory or load_renderer)(cfg["model"], cfg["cache"])
        except Exception as exc:
            self.startup_error = {"error": error_line(exc), "traceback": traceback.format_exc()}
            log.error("%s could not start: %s", label, self.startup_error["traceback"])
        self.startup_seconds = time.perf_counter() - started  # this object made to its model loaded
        self.vcut_mode = str(getattr(self.renderer, "vcut_mode", cfg["model"]["vcut"]))
        self.step_cache = getattr(self.renderer, "step_cache", cfg["model"].get("step_cache"))
        self.step_cache_depth = int(
            getattr(self.renderer, "step_cache_depth", cfg["model"].get("step_cache_depth")) or 1
        )
        self.encode = encoder or default_encoder()
        self.job_params = {k: cfg["defaults"].get(k) for k in JOB_PARAMS}  # the same for every row
        self.rows_per_call = max(1, int(cfg["workers"].get("render_batch") or 1))
        if hasattr(self.renderer, "render_batch"):  # under compile, a short call is padded to it
            self.renderer.render_batch = self.rows_per_call
        from jobs.config import overlap_decode

        # Decode one pipeline call while the next one denoises (Renderer.generate_stream).
        self.overlap_decode = overlap_decode(cfg["workers"].get("overlap_decode", "auto"), self._on_cuda())
        self.fetch_limits = FetchLimits(**(cfg.get("images") or {}))  # jobs.config.ImagesConfig
        self._render_lock = threading.Lock()
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
        self.row_results = RowResults(
            self.renderer, Levers(self.vcut_mode, self.step_cache, self.step_cache_depth)
        )

    def info(self) -> dict[str, Any]:
        """Where this worker runs; with ``error`` and ``traceback`` when it could not start."""
        info = {
            "worker": self.label,
            "node": self.node,
            "node_id": self.node_id,
            "node_ip": self.node_ip,
            "pid": os.getpid(),
            "device": str(self._device()),
            "startup_seconds": round(self.startup_seconds, 3),
            "compile": getattr(self.renderer, "compile_mode", None),  # compile=auto resolved
        }
        if self.log_file:
            info["log"] = self.log_file
        if self.startup_error:
            info.update(self.startup_error)
        return info

    def _device(self) -> Any:
        return getattr(self.renderer, "device", "cpu")

    def _on_cuda(self) -> bool:
        return str(self._device()).startswith("cuda")

    def _new_result(self) -> dict[str, Any]:
        return {
            "worker": self.label,
            "node": self.node,
            "node_id": self.node_id,
            "node_ip": self.node_ip,
            "worker_pid": os.getpid(),
            "vcut_mode": self.vcut_mode,
            "status": "failed",
        }

    def _render(self, task: RowTask) -> tuple[dict[str, Any], Any]:
        """One row alone: its result and its frames (None when it failed)."""
        result = self._new_result()
        return result, self._render_row(task, result)

    def _render_row(
        self, task: RowTask, result: dict[str, Any], loaded: float = 0.0, image: Any = None
    ) -> Any:
        """Render one row with ``generate``; its frames, or None when it failed (``result`` says why).
        ``image``: the row's image already loaded (``loaded`` seconds), else ``task.image`` is."""
        params = task.params
        start = time.perf_counter()
        peaks = PeakMemory(self._on_cuda())
        try:
            peaks.start(task)
            kwargs = {k: params[k] for k in ROW_PARAMS}
            gen = self.renderer.generate(task.image if image is None else image, **self.job_params, **kwargs)
            wall = loaded + time.perf_counter() - start
            return self.row_results.fill(result, gen, params, loaded, wall, peaks.stop(task))
        except Exception as exc:
            result.update(error=_error(exc), seconds=loaded + time.perf_counter() - start)
            return None

    def _calls(
        self, tasks: list[RowTask], results: list[dict[str, Any]], fetched: list[bool]
    ) -> list[GroupCall]:
        """The pipeline calls of a batch: its groups (``group_rows``) with their images loaded
        and fitted row by row (a bad one fails its row only, ``finished_at`` included)."""
        calls = []
        # (a test double without prepare_image renders the fetched image as it is)
        prepare = getattr(self.renderer, "prepare_image", lambda image, **size: image)
        for group in group_rows(tasks, self.rows_per_call):
            params = tasks[group[0]].params
            call = GroupCall({**self.job_params, **{k: params[k] for k in BATCH_PARAMS}})
            for i in group:
                if not fetched[i]:
                    continue
                start = time.perf_counter()
                try:
                    image = prepare(tasks[i].image, width=params["width"], height=params["height"])
                except Exception as exc:
                    seconds = time.perf_counter() - start
                    results[i].update(error=_error(exc), seconds=seconds, finished_at=_now_us())
                    continue
                call.add(i, image, tasks[i].params["seed"], time.perf_counter() - start)
            if call.rows:
                calls.append(call)
        return calls

    def _stream(self, requests: Iterable[dict[str, Any]]) -> Iterator[list[Any]]:
        """The renderer's ``generate_stream`` over ``requests`` (overlapped unless
        ``workers.overlap_decode`` is false). A renderer without one (a test double) renders
        them call after call (``generate_stream(overlap=False)``): with ``generate`` for a single
        row, else ``generate_batch``."""
        stream = getattr(self.renderer, "generate_stream", None)
        if stream is not None:
            return stream(requests, overlap=self.overlap_decode)

        def one_call(images: list[Any], seeds: list[int], **kwargs: Any) -> list[Any]:
            if len(images) == 1:
                return [self.renderer.generate(images[0], seed=seeds[0], **kwargs)]
            return self.renderer.generate_batch(images, seeds=seeds, **kwargs)

        return (one_call(**request) for request in requests)

    def _record(
        self, call: GroupCall, tasks: list[RowTask], results: list[dict[str, Any]], outcome: CallOutcome
    ) -> list[Any]:
        """Fill the results of a call's rows from its outcome; their frames (None: failed). A
        call of several rows that failed is rendered again row by row (an error then fails
        only the rows that fail alone)."""
        if outcome.error is None:
            share = outcome.seconds / len(call.rows)  # for generations without timings
            try:
                pairs = zip(call.rows, outcome.videos, call.loaded, strict=True)
                return [
                    self.row_results.fill(
                        results[i], gen, tasks[i].params, loaded, loaded + share, outcome.peak
                    )
                    for i, gen, loaded in pairs
                ]
            except Exception as exc:  # a result that cannot be recorded fails the call
                for i in call.rows:
                    results[i].clear()  # a row may have been filled before the failure
                    results[i].update(self._new_result())
                outcome = dataclasses.replace(outcome, error=exc)
        if len(call.rows) == 1:
            seconds = call.loaded[0] + outcome.seconds
            results[call.rows[0]].update(error=_error(outcome.error), seconds=seconds)
            return [None]
        log.warning(
            "a batch of %d rows failed (%s); rendering them one by one", len(call.rows), _error(outcome.error)
        )
        pairs = zip(call.rows, call.images, call.loaded, strict=True)
        return [self._render_row(tasks[i], results[i], loaded, image) for i, image, loaded in pairs]

    def _encode(self, frames: Any, out: str | None, fps: int) -> tuple[float, str | None, int]:
        """Encode to ``out``; with no ``out`` (layout webdataset), to a local temporary file
        whose path is returned, for this worker's open shard (``jobs.shard_writer.WorkerShards``).
        Returns (seconds, that path or None, when the encode ended: the row's ``finished_at``,
        µs since the epoch)."""
        if out is not None:
            return self._encode_to(frames, out, fps), None, _now_us()
        fd, tmp = tempfile.mkstemp(prefix="vcut-video-", suffix=f".{self.output['format']}")
        os.close(fd)
        try:
            return self._encode_to(frames, tmp, fps), tmp, _now_us()
        except BaseException:
            os.remove(tmp)
            raise

    def _encode_to(self, frames: Any, out: str, fps: int) -> float:
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

    def publish_shard(self, numbers: list[int]) -> list[dict[str, Any]]:
        """Layout webdataset, end of the job: publish the open shard; the reports."""
        return self.shards.reports(numbers, flush=True) if self.shards is not None else []

    def _fetch(self, tasks: list[RowTask], results: list[dict[str, Any]]) -> tuple[list[RowTask], list[bool]]:
        """Every task's image loaded at once (``pipeline.images.prefetch_images``): the tasks
        with their loaded images, and per task whether it has one (else its result says why)."""
        from pipeline.images import DEFAULT_MAX_PIXELS, prefetch_images

        start = time.perf_counter()
        max_pixels = getattr(self.renderer, "max_pixels", DEFAULT_MAX_PIXELS)  # the renderer's own guard
        loaded = prefetch_images([t.image for t in tasks], self.fetch_limits, max_pixels=max_pixels)
        seconds = time.perf_counter() - start
        fetched = [not isinstance(image, Exception) for image in loaded]
        for result, image, ok in zip(results, loaded, fetched, strict=True):
            if not ok:
                result.update(error=_error(image), seconds=seconds, finished_at=_now_us())
        pairs = zip(tasks, loaded, fetched, strict=True)
        return [dataclasses.replace(task, image=image) if ok else task for task, image, ok in pairs], fetched

    def render_batch(
        self, tasks: list[RowTask], shard_numbers: list[int] | None = None
    ) -> list[dict[str, Any]]:
        """Render and encode every task; one result dict per task, in order.

        A task is the planner's record (``jobs.planner.RowTask``); a result holds the worker-side
        fields (status, error, timings, frames, MACs, cache hit, worker, node), never a video:
        a task whose ``output`` is None (layout webdataset) goes into this worker's open shard
        (``jobs.shard_writer.WorkerShards``; ``shard_numbers``: the numbers the driver reserved
        for it), and the first result carries the reports of the shards published. Rows render
        ``workers.render_batch`` at a time where their generation values allow it.
        """
        if self.startup_error:  # the driver never sends work to a worker that did not start
            raise RuntimeError(f"{self.label} did not start: {self.startup_error['error']}")
        results = [self._new_result() for _ in tasks]
        futures: list[Future | None] = [None] * len(tasks)
        # Images first, outside the render lock: the other slot's batch renders meanwhile, and a
        # slow or dead host fails its own row within the fetch limits (pipeline.fetch).
        tasks, fetched = self._fetch(tasks, results)
        calls = self._calls(tasks, results, fetched)
        with self._render_lock:
            peaks = PeakMemory(self._on_cuda())
            for call, outcome in render_calls(self._stream, calls, peaks):
                rendered = self._record(call, tasks, results, outcome)
                for i, frames in zip(call.rows, rendered, strict=True):
                    if frames is not None:
                        out, fps = tasks[i].output, results[i]["fps"]
                        futures[i] = self._encoder.submit(self._encode, frames, out, fps)
                    else:
                        results[i].setdefault("finished_at", _now_us())
        for result, future, task in zip(results, futures, tasks, strict=True):
            if future is not None:
                try:
                    result["encode_seconds"], video, result["finished_at"] = future.result()
                    result.update(status="ok", output=task.output)
                except Exception as exc:
                    result.update(status="failed", error=f"encode: {_error(exc)}", finished_at=_now_us())
                    video = None
                if video is not None:  # layout webdataset: this worker's open shard
                    try:
                        self.shards.add(task.sample_row(result, self.vcut_mode), video)
                    except Exception as exc:
                        result.update(status="failed", error=f"shard: {_error(exc)}", output=None)
        if self.shards is not None:  # shards that are full are published; reports ride back
            self.shards.attach(results, shard_numbers or [])
        return results
