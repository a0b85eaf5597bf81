"""``Renderer``: one loaded SVD model (patched with VCUT) that turns images into frames or video files.

Determinism: every call seeds a fresh CPU ``torch.Generator`` with ``seed`` (as
``generator=torch.Generator().manual_seed(seed)`` in stock diffusers), so the video does
not depend on what the renderer rendered before, nor on which worker or GPU index renders
it (the noise is drawn on the CPU and then moved). The embedding cache and VCUT's constant
cache only ever return values equal to what they replace. Step caching (``step_cache=N``, off
by default) does change the frames, but deterministically: it is reset at the start of every
generation, so a video never depends on the one rendered before.

Batches: :meth:`Renderer.generate_batch` renders rows that share every parameter but the
image and the seed in one pipeline call, with one such generator per row, so each row's
noise is exactly the noise it gets alone; its frames then differ from a lone render only
by float rounding of the batched UNet/VAE-encoder arithmetic (<= 1 uint8 level, tested on
CPU fp32). :meth:`Renderer.generate` is the batch of one.

Parameters: the generation keywords are the ones declared in :mod:`pipeline.params` and are
checked with its :func:`~pipeline.params.check_generation`, the same check as the job config's
(the manifest's uses the same ranges), so a value the job accepts never fails here on range.
The keywords stay explicit in the signatures (IDE help, type hints); ``tests/test_params.py``
keeps them equal to the declaration.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from vcut.guidance import guided_steps
from vcut.modes import MODES as VCUT_MODES
from vcut.step_cache import check_step_cache_args

from .cache import EmbeddingCache
from .compile import CompileWatch, compile_mode, compile_pipeline
from .compile_cache import plan_compile
from .encode import FORMATS, encode_video
from .images import DEFAULT_MAX_PIXELS, FIT_MODES, ImageSource, fit_image, load_image
from .loading import load_svd_pipeline
from .oom import halve_on_oom
from .params import GENERATION_PARAMS, check_generation, check_value
from .quantize import QuantizeReport, check_quantize, fp8_refusal, quantize_unet
from .svd import RenderPipeline

logger = logging.getLogger(__name__)


@dataclass
class RenderedVideo:
    """One rendered video (what :meth:`Renderer.generate` returns, before encoding): ``frames``
    is uint8 ``(F, H, W, 3)``; ``timings`` are seconds.

    ``timings`` keys: ``image_load`` (read + decode + convert + fit), ``conditioning``
    (CLIP embedding, VAE encode of the image, time ids, initial noise), ``denoise`` (the
    UNet loop), ``decode`` (VAE decode), ``postprocess`` (to uint8), ``total`` (their sum);
    with ``compile`` on also ``compile``: the part of ``denoise`` + ``decode`` that
    ``torch.compile`` spent compiling (0.0 once a shape is warm; not an extra stage).

    A row rendered in a batch (:meth:`Renderer.generate_batch`): ``image_load`` is the
    row's own; ``conditioning``, ``denoise``, ``decode``, ``postprocess`` and ``compile`` are
    the batch's times *divided* by ``batch_size`` (the row's share, so that the ``total`` of
    the rows of a call add up to the call's wall time). ``batch_size`` is the number of
    rows of the pipeline call that rendered this row (1 alone, smaller than asked after an
    out-of-memory split); ``cache_hit`` is this row's own embedding-cache hit.
    """

    frames: np.ndarray
    timings: dict[str, float]
    cache_hit: bool
    num_inference_steps: int
    fps: int
    seed: int
    decode_chunk_size: int | None = None
    decode_retries: int = 0
    batch_size: int = 1


@dataclass
class RenderRecord:
    """What ``render_to_file`` did.

    ``seconds`` is the wall-clock time of the whole call (generation + encoding);
    ``duration_s`` is the length of the video (``frames / fps``).
    """

    path: str
    frames: int
    seconds: float
    encode_seconds: float
    timings: dict[str, float]
    cache_hit: bool
    fps: int = 0
    width: int = 0
    height: int = 0
    format: str = "mp4"
    duration_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def unet_batches(call: dict[str, Any]) -> tuple[bool, bool]:
    """Which UNet batch variants a call's steps use: (a CFG batch on some step, the conditional
    half only on some step) (:mod:`vcut.guidance`); each is one compiled graph variant."""
    if not call["max_guidance_scale"] > 1.0:
        return False, True
    plan = guided_steps(call["num_inference_steps"], call["guidance_start"], call["guidance_stop"])
    return any(plan), not all(plan)


def frames_to_uint8(frames: np.ndarray) -> np.ndarray:
    """diffusers' float frames in [0, 1] to uint8, rounded as diffusers' ``numpy_to_pil`` does."""
    return np.clip(np.round(frames * 255.0), 0, 255).astype(np.uint8)


def frames_to_uint8_torch(frames: torch.Tensor) -> torch.Tensor:
    """:func:`frames_to_uint8` on the frames' own device: float32 ``x * 255``, rounded half to
    even, clipped, as uint8. The same IEEE float32 operations as numpy's, so the same bytes;
    only the uint8 frames (a quarter of float32's bytes) then cross to the CPU."""
    return (frames.float() * 255.0).round().clamp(0, 255).to(torch.uint8)


@dataclass
class _Denoised:
    """One pipeline call up to its latents (:meth:`Renderer._denoise`), waiting for its decode."""

    latents: torch.Tensor  # the real rows only (padding dropped)
    seeds: list[int]
    load_seconds: list[float]
    call: dict[str, Any]
    hits: list[bool]
    rows: int  # rows of the pipeline call, padding included
    shape: tuple  # the call's compiled shape (rows, size, frames, decode chunk, UNet batch variants)
    t_start: float
    conditioning_end: float
    denoise_end: float
    compile_seconds: float
    compiles: int
    ready: Any = None  # a CUDA event recorded after the denoising (overlapped decode only)


class Renderer:
    """A loaded SVD model with VCUT, an embedding cache and video output. One per worker/GPU."""

    def __init__(
        self,
        pipe: RenderPipeline,
        *,
        model_id: str,
        vcut_mode: str,
        device: torch.device,
        dtype: torch.dtype,
        unet_config: dict[str, Any],
        vcut_report: Any = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        step_cache: int | None = None,
        step_cache_depth: int = 1,
        step_cache_report: Any = None,
        compile_report: Any = None,
        quantize_report: QuantizeReport | None = None,
        render_batch: int = 1,
    ) -> None:
        self.pipe = pipe
        self.model_id = model_id
        self.vcut_mode = vcut_mode
        self.device = device
        self.dtype = dtype
        self.unet_config = unet_config
        self.vcut_report = vcut_report
        self.max_pixels = max_pixels
        #: Step-caching interval (None: off) and depth, as passed to :func:`vcut.apply_step_cache`.
        self.step_cache = step_cache
        self.step_cache_depth = step_cache_depth
        self.step_cache_report = step_cache_report
        self.compile_report = compile_report
        self.compile_mode = compile_report.mode if compile_report is not None else "off"
        #: seconds spent in torch.compile by this renderer's renders so far
        self.compile_seconds = 0.0
        self._warm_shapes: set[tuple] = set()
        #: torch's compile artifacts shared with other workers (pipeline.compile_cache); None: none
        self.compile_cache: Any = None
        #: ``"off"`` or ``"fp8"`` (:mod:`pipeline.quantize`), and what quantize_unet did
        self.quantize_report = quantize_report
        self.quantize = quantize_report.mode if quantize_report is not None else "off"
        #: Rows per pipeline call the caller sends (``workers.render_batch``): under compile a
        #: shorter call is padded to it, so that a short last batch compiles no new graph.
        self.render_batch = _check_render_batch(render_batch)
        # The conditioning casts the VAE to fp32 and back (fp16 with force_upcast): a decode
        # must not run meanwhile (generate_stream decodes on another thread).
        self._vae_lock = threading.Lock()
        self._decoder: ThreadPoolExecutor | None = None
        self._decode_stream: Any = None

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        *,
        vcut: str = "full",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        allow_pickle: bool = False,
        compile: bool | str = False,
        compile_vae: bool | None = None,
        compile_backend: str = "inductor",
        variant: str | None = None,
        cache_entries: int = 64,
        cache_bytes: int = 256 * 2**20,
        local_files_only: bool | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        step_cache: int | None = None,
        step_cache_depth: int = 1,
        compile_cache: str | None = None,
        compile_rows: float | None = None,
        quantize: str = "off",
        render_batch: int = 1,
    ) -> Renderer:
        """Load ``model`` (hub id or local diffusers folder) and patch it with VCUT mode ``vcut``.

        See :mod:`pipeline.loading` for the safetensors, dtype, variant and offline rules and
        :meth:`from_pipe` for ``compile`` and ``step_cache``. Raises ``ValueError`` for a bad
        argument and :class:`~pipeline.errors.ModelLoadError` for a model that cannot be loaded.
        """
        if vcut not in VCUT_MODES:
            raise ValueError(f"vcut must be one of {VCUT_MODES}, got {vcut!r}")
        check_step_cache_args(step_cache, step_cache_depth)
        compile_mode(compile)  # a bad value fails before the model is loaded
        _check_render_batch(render_batch)
        if check_quantize(quantize) == "fp8":  # refused before minutes of loading
            from .loading import resolve_device

            refusal = fp8_refusal(resolve_device(device))
            if refusal:
                raise ValueError(refusal)
        stock, _, _ = load_svd_pipeline(
            model,
            device=device,
            dtype=dtype,
            allow_pickle=allow_pickle,
            variant=variant,
            local_files_only=local_files_only,
        )
        return cls.from_pipe(
            stock,
            vcut=vcut,
            compile=compile,
            compile_vae=compile_vae,
            compile_backend=compile_backend,
            cache_entries=cache_entries,
            cache_bytes=cache_bytes,
            max_pixels=max_pixels,
            model_id=os.fspath(model),
            step_cache=step_cache,
            step_cache_depth=step_cache_depth,
            compile_cache=compile_cache,
            compile_rows=compile_rows,
            quantize=quantize,
            render_batch=render_batch,
        )

    @classmethod
    def from_pipe(
        cls,
        pipe: Any,
        *,
        vcut: str = "full",
        compile: bool | str = False,
        compile_vae: bool | None = None,
        compile_backend: str = "inductor",
        cache_entries: int = 64,
        cache_bytes: int = 256 * 2**20,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        model_id: str | None = None,
        step_cache: int | None = None,
        step_cache_depth: int = 1,
        compile_cache: str | None = None,
        compile_rows: float | None = None,
        quantize: str = "off",
        render_batch: int = 1,
    ) -> Renderer:
        """A renderer around an already loaded ``StableVideoDiffusionPipeline`` (as diffusers' ``from_pipe``).

        The pipeline's components are shared, not copied, and its UNet is patched with VCUT
        in place: patch a pipeline once (see :func:`vcut.apply_vcut`). Device and dtype are
        the UNet's. ``model_id`` names the model in the embedding-cache key (default: the
        pipeline's ``name_or_path``).

        ``step_cache=N`` (off by default; None or 1: off) runs the whole UNet at every N-th
        denoising step only and the shallow path in between, reusing the deep features
        (:func:`vcut.apply_step_cache`, with ``step_cache_depth`` outer levels always run): it
        saves MACs and CHANGES the frames.

        ``compile``: ``False``/``"off"`` (eager), ``True``/``"default"``, ``"max-autotune"``
        or ``"reduce-overhead"`` (CUDA graphs): the ``torch.compile`` mode of the UNet's
        forward, compiled in place after VCUT and the step cache, with its own recompile
        budget (see :mod:`pipeline.compile`). ``compile_vae`` also compiles the VAE decoder
        (``None``: on CUDA only); ``compile_backend`` is torch.compile's ``backend``
        (``"eager"`` or ``"aot_eager"`` to debug). Compiling is lazy: the first render of each
        shape pays it, reported as ``timings["compile"]`` and summed in
        ``renderer.compile_seconds``; a later compile of a shape already rendered is logged
        as a warning. ``compile="auto"`` compiles on CUDA when ``compile_rows`` (videos this
        renderer will render per shape; None: unknown, counted as enough) pay the compile back
        (:func:`pipeline.compile.compile_pays`). ``compile_cache`` (a folder or URI) shares
        torch's compile artifacts with other processes (:mod:`pipeline.compile_cache`).
        as a warning.

        ``quantize="fp8"`` (off by default) runs the UNet's Linear layers in FP8 with dynamic
        activation scaling (:mod:`pipeline.quantize`; applied after VCUT, before the step cache
        and compile): it CHANGES the frames, and is refused with a one-line ``ValueError`` on
        a CPU or a GPU of compute capability below 8.9.

        ``render_batch``: the rows per call the caller sends to :meth:`generate_batch`. Under
        compile a call with fewer rows is padded to it (copies of its last row, whose outputs
        are dropped before the VAE decode), so a short last batch runs the graph already
        compiled instead of compiling a new one; eager, nothing is padded.
        """
        if vcut not in VCUT_MODES:
            raise ValueError(f"vcut must be one of {VCUT_MODES}, got {vcut!r}")
        mode = compile_mode(compile)
        # Validated before anything is patched (the depth bound is the UNet's number of levels).
        unet_levels = len(getattr(getattr(pipe, "unet", None), "up_blocks", ())) or None
        interval, _ = check_step_cache_args(step_cache, step_cache_depth, unet_levels)
        _check_render_batch(render_batch)
        if check_quantize(quantize) == "fp8":
            refusal = fp8_refusal(getattr(getattr(pipe, "unet", None), "device", None))
            if refusal:
                raise ValueError(refusal)
        from vcut import apply_step_cache, apply_vcut

        render_pipe = RenderPipeline(**pipe.components)
        render_pipe.set_progress_bar_config(disable=True)
        render_pipe.embedding_cache = EmbeddingCache(max_entries=cache_entries, max_bytes=cache_bytes)
        if model_id is None:
            model_id = str(pipe.config.get("_name_or_path") or "pipe")
        torch_dtype = render_pipe.unet.dtype
        render_pipe.cache_namespace = f"{model_id}|{torch_dtype}"
        unet_config = dict(render_pipe.unet.config)
        # The removed weights are freed (nothing will call remove_vcut on a renderer's UNet).
        report = apply_vcut(render_pipe, vcut, keep_removed=False)
        # Order: VCUT, then FP8, then the step cache, then compile.
        quantize_report = quantize_unet(render_pipe.unet, quantize)
        cache_report = apply_step_cache(render_pipe, interval, step_cache_depth)
        # The renderer's model and levers, once: what keys its compile artifacts and what it records.
        levers = dict(
            model_id=model_id,
            vcut_mode=vcut,
            device=render_pipe.unet.device,
            dtype=torch_dtype,
            step_cache=interval if interval > 1 else None,
            step_cache_depth=step_cache_depth,
        )
        mode, cache = plan_compile(
            mode,
            cache_uri=compile_cache,
            rows_per_worker_per_shape=compile_rows,
            backend=compile_backend,
            vae=compile_vae,
            quantize=quantize_report.mode if quantize_report is not None else "off",
            **levers,
        )
        compile_report = None
        if mode != "off":
            compile_report = compile_pipeline(render_pipe, mode, vae=compile_vae, backend=compile_backend)
        renderer = cls(
            render_pipe,
            unet_config=unet_config,
            vcut_report=report,
            max_pixels=max_pixels,
            step_cache_report=cache_report,
            compile_report=compile_report,
            quantize_report=quantize_report,
            render_batch=render_batch,
            **levers,
        )
        renderer.compile_cache = cache
        return renderer

    def _begin_video(self) -> None:
        """Call before each pipeline call: the step cache starts a new video (a full step)."""
        if self.step_cache is not None:
            from vcut import reset_step_cache

            reset_step_cache(self.pipe)

    # -- cache ------------------------------------------------------------------------------
    @property
    def cache(self) -> EmbeddingCache:
        return self.pipe.embedding_cache

    def cache_stats(self) -> dict[str, int]:
        """Embedding-cache counters: ``hits``, ``misses``, ``entries``, ``bytes`` (and bounds)."""
        return self.cache.stats()

    # -- generation -------------------------------------------------------------------------
    def generate(
        self,
        image: ImageSource,
        *,
        seed: int,
        num_frames: int | None = None,
        num_inference_steps: int = 25,
        height: int = 576,
        width: int = 1024,
        fps: int = 7,
        motion_bucket_id: int = 127,
        noise_aug_strength: float = 0.02,
        min_guidance_scale: float = 1.0,
        max_guidance_scale: float = 3.0,
        guidance_start: float = 0.0,
        guidance_stop: float = 1.0,
        decode_chunk_size: int | None = None,
        fit: str = "crop",
        filesystem: Any = None,
    ) -> RenderedVideo:
        """Render ``image`` (path, URI, bytes, file object or PIL image) to uint8 frames.

        The image is loaded with :func:`~pipeline.images.load_image` and brought to
        ``width`` x ``height`` with :func:`~pipeline.images.fit_image` (``fit``), then handed
        to diffusers' ``StableVideoDiffusionPipeline.__call__`` with a generator seeded by
        ``seed``. ``num_frames=None`` uses the UNet's configured frame count,
        ``decode_chunk_size=None`` decodes all frames at once (halved on CUDA OOM).
        ``guidance_start``/``guidance_stop`` (fractions of the schedule, defaults 0 and 1 =
        stock) limit classifier-free guidance to the steps in that interval; the others run the
        conditional half of the UNet batch only (half their work; :mod:`vcut.guidance`).
        Raises ``ValueError`` naming the bad parameter (a range of :mod:`pipeline.params`, a size
        that is no multiple of 8, ``min_guidance_scale`` above ``max_guidance_scale``,
        ``guidance_start`` not below ``guidance_stop``), or ``ImageError`` for a bad image.
        This is :meth:`generate_batch` with one row.
        """
        # every keyword but the row's own image and seed, passed on as it came
        shared = {k: v for k, v in locals().items() if k not in ("self", "image", "seed")}
        return self.generate_batch([image], seeds=[seed], **shared)[0]

    def generate_batch(
        self,
        images: Sequence[ImageSource],
        *,
        seeds: Sequence[int],
        num_frames: int | None = None,
        num_inference_steps: int = 25,
        height: int = 576,
        width: int = 1024,
        fps: int = 7,
        motion_bucket_id: int = 127,
        noise_aug_strength: float = 0.02,
        min_guidance_scale: float = 1.0,
        max_guidance_scale: float = 3.0,
        guidance_start: float = 0.0,
        guidance_stop: float = 1.0,
        decode_chunk_size: int | None = None,
        fit: str = "crop",
        filesystem: Any = None,
    ) -> list[RenderedVideo]:
        """Render several images that share every parameter but the seed, in one pipeline call.

        ``images[i]`` is rendered with ``seeds[i]`` (one CPU generator per row), so each
        returned :class:`RenderedVideo` (in order) has the frames :meth:`generate` gives for
        that image and seed, up to float rounding of the batched arithmetic (<= 1 uint8
        level on CPU fp32). The keyword arguments are :meth:`generate`'s. Every image is
        loaded and fitted before anything renders: a bad one raises ``ImageError`` for the
        whole call (load rows one by one with :meth:`prepare_image` to isolate them). A batch
        that runs out of CUDA memory goes on with half as many rows per call (down to single
        rows, which then raise), each row with its own seed, so the frames do not change.
        """
        given = locals()  # the keywords, whose names the declaration lists (tests/test_params.py)
        generation = {name: given[name] for name in GENERATION_PARAMS if name != "seed"}
        prepared = self._prepare(images, seeds, generation, fit=fit, filesystem=filesystem)
        return self._render(*prepared) if prepared[0] else []

    def _prepare(
        self,
        images: Sequence[ImageSource],
        seeds: Sequence[int],
        generation: dict[str, Any],
        *,
        fit: str,
        filesystem: Any,
    ) -> tuple[list[Image.Image], list[int], list[float], dict[str, Any]]:
        """:meth:`generate_batch`'s checks and image loading: (fitted images, seeds, load seconds, call)."""
        seeds = list(seeds)
        if isinstance(images, str | bytes | os.PathLike) or not isinstance(images, Sequence):
            raise ValueError(f"images must be a sequence of images, got {type(images).__name__}")
        if len(images) != len(seeds):
            raise ValueError(f"seeds must have one seed per image: {len(images)} images, {len(seeds)} seeds")
        seeds = [check_value("seed", seed) for seed in seeds]  # [0, 2**63 - 1]: int64 in the results
        generation = dict(generation)
        if generation.get("num_frames") is None:
            generation["num_frames"] = int(self.unet_config.get("num_frames", 25))
        # The declared ranges (pipeline.params), multiples of 8 and min <= max guidance.
        call = check_generation(**generation)
        if fit not in FIT_MODES:
            raise ValueError(f"fit must be one of {FIT_MODES}, got {fit!r}")
        fitted, load_seconds = [], []
        for image in images:
            t0 = time.perf_counter()
            fitted.append(
                self.prepare_image(
                    image, width=call["width"], height=call["height"], fit=fit, filesystem=filesystem
                )
            )
            load_seconds.append(time.perf_counter() - t0)
        return fitted, seeds, load_seconds, call

    def generate_stream(
        self, requests: Iterable[dict[str, Any]], *, overlap: bool = True
    ) -> Iterator[list[RenderedVideo]]:
        """Render a sequence of :meth:`generate_batch` calls, yielding each one's videos in order.

        Each request is a dict of :meth:`generate_batch`'s arguments (``images``, ``seeds`` and
        any keywords). With ``overlap`` (the default), the VAE decode, the conversion to uint8
        and the copy to the CPU of one call run on a background thread (on CUDA on a stream of
        its own) while the next call's conditioning and denoising run: each video's frames are
        exactly those of ``overlap=False``, which is :meth:`generate_batch` call after call.
        The decode waits for the next call's conditioning (which casts the VAE to fp32 and
        back) and then overlaps its denoising. Memory: a decode and a denoising at once; a call
        that runs out of CUDA memory while overlapped waits for the decode before it and is
        rendered again on its own (with :meth:`generate_batch`'s halving). Timings of
        overlapped rows are each phase's own (their ``total`` adds up to more than the wall
        time). A bad request raises when it is reached, after the videos before it.
        """
        import inspect

        signature = inspect.signature(self.generate_batch)
        pending: _Denoised | None = None
        running: Future | None = None
        try:
            for request in requests:
                bound = signature.bind(**request)
                bound.apply_defaults()
                args = dict(bound.arguments)
                images, seeds = args.pop("images"), args.pop("seeds")
                fit, filesystem = args.pop("fit"), args.pop("filesystem")
                try:
                    fitted, seeds, load_seconds, call = self._prepare(
                        images, seeds, args, fit=fit, filesystem=filesystem
                    )
                except Exception:
                    if pending is not None:  # the videos before it first
                        finished, pending = self._finish(pending, False), None
                        yield finished
                    raise
                if not fitted or not overlap:
                    if pending is not None:  # in order: the call before it first
                        finished, pending = self._finish(pending, False), None
                        yield finished
                if not fitted:
                    yield []
                    continue
                if not overlap:
                    yield self._render(fitted, seeds, load_seconds, call)
                    continue
                if self._decoder is None:
                    self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vae-decode")
                # The lock is taken before the previous call's decode is handed over, so that decode
                # starts once this call's conditioning is done (after_conditioning releases it).
                self._vae_lock.acquire()
                if pending is not None:
                    running, pending = self._decoder.submit(self._finish, pending, True), None
                try:
                    pad_to = max(len(fitted), self.render_batch)
                    denoised = self._denoise(fitted, seeds, load_seconds, call, pad_to, locked=True)
                except torch.OutOfMemoryError:
                    denoised = None
                except Exception:
                    if running is not None:  # the videos before it first
                        finished, running = running.result(), None
                        yield finished
                    raise
                if running is not None:
                    yield running.result()
                    running = None
                if denoised is None:  # out of memory next to a decode: again, alone
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    yield self._render(fitted, seeds, load_seconds, call)
                    continue
                pending = denoised
            if pending is not None:
                yield self._finish(pending, False)
                pending = None
        finally:
            if running is not None:
                running.result()

    def prepare_image(
        self,
        image: ImageSource,
        *,
        width: int,
        height: int,
        fit: str = "crop",
        filesystem: Any = None,
    ) -> Image.Image:
        """``image`` loaded (:func:`~pipeline.images.load_image`, this renderer's
        ``max_pixels``) and fitted to ``width`` x ``height``: what :meth:`generate` renders.
        Raises ``ImageError`` for a bad image."""
        img = load_image(image, max_pixels=self.max_pixels, filesystem=filesystem)
        return fit_image(img, width, height, fit)

    def _render(
        self, images: list[Image.Image], seeds: list[int], load_seconds: list[float], call: dict[str, Any]
    ) -> list[RenderedVideo]:
        """Pipeline calls of all ``images`` at once; after a CUDA OOM, half as many rows per call
        (for the rest of this batch: a size that ran out once is not tried again)."""
        generations: list[RenderedVideo] = []
        size, start = len(images), 0

        def call_rows(n: int) -> list[RenderedVideo]:
            # padded (under compile) to the render batch, or after an OOM to the new size
            pad_to = n if n < len(images) else max(n, self.render_batch)
            rows = slice(start, start + n)
            return self._render_call(images[rows], seeds[rows], load_seconds[rows], call, pad_to)

        def halved(n: int, smaller: int) -> None:
            logger.warning("a batch of %d rows ran out of memory; going on %d rows at a time", n, smaller)

        while start < len(images):
            rendered, size = halve_on_oom(call_rows, size, halved)
            generations += rendered
            start += len(rendered)
        return generations

    def _render_call(
        self,
        images: list[Image.Image],
        seeds: list[int],
        load_seconds: list[float],
        call: dict[str, Any],
        pad_to: int = 1,
    ) -> list[RenderedVideo]:
        """One pipeline call: denoise, then decode (not overlapped)."""
        return self._finish(self._denoise(images, seeds, load_seconds, call, pad_to), False)

    def _padding(self, rows: int, pad_to: int) -> int:
        """Rows of padding for a call of ``rows`` rows: up to ``pad_to`` under compile, else none."""
        return max(0, pad_to - rows) if self.compile_mode != "off" else 0

    def _denoise(
        self,
        images: list[Image.Image],
        seeds: list[int],
        load_seconds: list[float],
        call: dict[str, Any],
        pad_to: int = 1,
        locked: bool = False,
    ) -> _Denoised:
        """Conditioning and denoising of one pipeline call, to its latents (on the device).

        ``locked``: the caller holds the VAE lock, released here once the conditioning is done.
        """
        pipe = self.pipe
        pipe.marks = {}
        n = len(images)
        pad = self._padding(n, pad_to)
        if pad:  # copies of the last row (its cache entry, its seed): outputs dropped below
            images, seeds_in = [*images, *[images[-1]] * pad], [*seeds, *[seeds[-1]] * pad]
        else:
            seeds_in = seeds
        shape = (
            n + pad,
            call["height"],
            call["width"],
            call["num_frames"],
            call["decode_chunk_size"],
            *unet_batches(call),  # the UNet batch variants (CFG, conditional half only)
        )
        if self.compile_cache is not None:
            self.compile_cache.before_call(shape)  # the shape's artifacts, before its first call
        released = threading.Event()

        def release() -> None:
            if locked and not released.is_set():
                released.set()
                self._vae_lock.release()

        t_start = time.perf_counter()
        self._begin_video()  # one pipeline call: its rows start their step cache together
        watch = CompileWatch(what="a render") if self.compile_mode != "off" else None
        pipe.after_conditioning = release
        try:
            with watch if watch is not None else contextlib.nullcontext():
                latents = pipe(
                    image=list(images),
                    generator=[torch.Generator().manual_seed(seed) for seed in seeds_in],
                    output_type="latent",
                    **call,
                ).frames
            latents = latents[:n]
            ready = None
            if latents.device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record()
                torch.cuda.current_stream(latents.device).synchronize()
        finally:
            pipe.after_conditioning = None
            release()
        return _Denoised(
            latents=latents,
            seeds=list(seeds),
            load_seconds=list(load_seconds),
            call=call,
            hits=[bool(h) for h in pipe.last_cache_hits[:n]],
            rows=n + pad,
            shape=shape,
            t_start=t_start,
            conditioning_end=pipe.marks["conditioning_end"],
            denoise_end=time.perf_counter(),
            compile_seconds=watch.seconds if watch is not None else 0.0,
            compiles=watch.compiles if watch is not None else 0,
            ready=ready,
        )

    def _finish(self, d: _Denoised, overlapped: bool) -> list[RenderedVideo]:
        """VAE decode, uint8 on the device, copy to the CPU: the videos of a :meth:`_denoise`.

        ``overlapped``: on a background thread (and, on CUDA, a stream of its own that waits
        for the denoising's event)."""
        pipe, call, n = self.pipe, d.call, len(d.seeds)
        stream = None
        if overlapped and d.latents.device.type == "cuda":
            if self._decode_stream is None:
                self._decode_stream = torch.cuda.Stream(d.latents.device)
            stream = self._decode_stream
        watch = CompileWatch(what="a render") if self.compile_mode != "off" and not overlapped else None
        with contextlib.ExitStack() as stack:
            if stream is not None:
                stack.enter_context(torch.cuda.stream(stream))
                stream.wait_event(d.ready)
                d.latents.record_stream(stream)
            if watch is not None:
                stack.enter_context(watch)
            with self._vae_lock:
                t_decode = time.perf_counter()
                pipe.last_decode_chunk_size = None
                pipe.last_decode_retries = 0
                chunk = call["decode_chunk_size"] or call["num_frames"]
                with torch.no_grad():
                    frames = pipe.decode_latents(d.latents, call["num_frames"], chunk)
                if frames.device.type == "cuda":
                    torch.cuda.current_stream(frames.device).synchronize()
                t_decoded = time.perf_counter()
                chunk_used, retries = pipe.last_decode_chunk_size, pipe.last_decode_retries
            with torch.no_grad():
                video = pipe.video_processor.postprocess_video(video=frames, output_type="pt")
                # (B, F, C, H, W) in [0, 1] -> uint8 (B, F, H, W, C) on the device, then the CPU
                videos = frames_to_uint8_torch(video).permute(0, 1, 3, 4, 2).contiguous().cpu().numpy()
        t_end = time.perf_counter()
        compile_s = d.compile_seconds + (watch.seconds if watch is not None else 0.0)
        compiles = d.compiles + (watch.compiles if watch is not None else 0)
        if self.compile_mode != "off":
            self._note_compile(d.shape, compile_s, compiles)
            if self.compile_cache is not None:
                self.compile_cache.after_call(d.shape, compiled=compiles > 0)
        shared = {
            "conditioning": (d.conditioning_end - d.t_start) / n,
            "denoise": (d.denoise_end - d.conditioning_end) / n,
            "decode": (t_decoded - t_decode) / n,
            "postprocess": (t_end - t_decoded) / n,
        }
        generations = []
        for i, seed in enumerate(d.seeds):
            timings = {"image_load": d.load_seconds[i], **shared}
            timings["total"] = sum(timings.values())
            if self.compile_mode != "off":
                timings["compile"] = compile_s / n
            generations.append(
                RenderedVideo(
                    frames=videos[i],
                    timings=timings,
                    cache_hit=d.hits[i],
                    num_inference_steps=call["num_inference_steps"],
                    fps=call["fps"],
                    seed=seed,
                    decode_chunk_size=chunk_used,
                    decode_retries=retries,
                    batch_size=n,
                )
            )
        return generations

    def _note_compile(self, shape: tuple, seconds: float, compiles: int) -> None:
        """Log compile time apart; warn when a shape that was already rendered compiled again."""
        self.compile_seconds += seconds
        warm = shape in self._warm_shapes
        self._warm_shapes.add(shape)
        if compiles and warm:
            logger.warning(
                "torch.compile recompiled %d frame(s) (%.1fs) while rendering shape %s a second time: "
                'a render-to-render recompile; run with TORCH_LOGS="recompiles" to see why',
                compiles,
                seconds,
                shape,
            )
        elif compiles:
            logger.info(
                "torch.compile (%s): compiled %d frame(s) in %.1fs for shape %s",
                self.compile_mode,
                compiles,
                seconds,
                shape,
            )

    def render_to_file(
        self,
        image: ImageSource,
        out: str | os.PathLike,
        *,
        seed: int,
        format: str = "mp4",
        crf: int = 18,
        preset: str = "medium",
        filesystem: Any = None,
        **generate_kwargs: Any,
    ) -> RenderRecord:
        """Generate a video for ``image`` and write it atomically to ``out`` (path or URI).

        ``filesystem`` (an fsspec filesystem) is used for the output only; pass an input
        filesystem through ``generate_kwargs`` as ``input_filesystem``.
        """
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        t0 = time.perf_counter()
        input_fs = generate_kwargs.pop("input_filesystem", None)
        gen = self.generate(image, seed=seed, filesystem=input_fs, **generate_kwargs)
        encode_seconds = encode_video(
            gen.frames, out, fps=gen.fps, format=format, crf=crf, preset=preset, filesystem=filesystem
        )
        seconds = time.perf_counter() - t0
        timings = dict(gen.timings, encode=encode_seconds)
        f, h, w, _ = gen.frames.shape
        return RenderRecord(
            path=os.fspath(out),
            frames=f,
            seconds=seconds,
            encode_seconds=encode_seconds,
            timings=timings,
            cache_hit=gen.cache_hit,
            fps=gen.fps,
            width=w,
            height=h,
            format=format,
            duration_s=f / gen.fps,
            extra={"seed": gen.seed, "decode_chunk_size": gen.decode_chunk_size},
        )


def _check_render_batch(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"render_batch must be an integer >= 1 (rows per pipeline call), got {value!r}")
    return value
