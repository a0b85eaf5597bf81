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

import logging
import os
import time
from collections.abc import Sequence
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
        """
        if vcut not in VCUT_MODES:
            raise ValueError(f"vcut must be one of {VCUT_MODES}, got {vcut!r}")
        mode = compile_mode(compile)
        # Validated before anything is patched (the depth bound is the UNet's number of levels).
        unet_levels = len(getattr(getattr(pipe, "unet", None), "up_blocks", ())) or None
        interval, _ = check_step_cache_args(step_cache, step_cache_depth, unet_levels)
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
        # Order: VCUT, then the step cache, then compile.
        cache_report = apply_step_cache(render_pipe, interval, step_cache_depth)
        mode, cache = plan_compile(
            mode,
            cache_uri=compile_cache,
            rows_per_worker_per_shape=compile_rows,
            device=render_pipe.unet.device,
            backend=compile_backend,
            vae=compile_vae,
            model_id=model_id,
            vcut_mode=vcut,
            step_cache=interval if interval > 1 else None,
            step_cache_depth=step_cache_depth,
            dtype=torch_dtype,
        )
        compile_report = None
        if mode != "off":
            compile_report = compile_pipeline(render_pipe, mode, vae=compile_vae, backend=compile_backend)
        renderer = cls(
            render_pipe,
            model_id=model_id,
            vcut_mode=vcut,
            device=render_pipe.unet.device,
            dtype=torch_dtype,
            unet_config=unet_config,
            vcut_report=report,
            max_pixels=max_pixels,
            step_cache=interval if interval > 1 else None,
            step_cache_depth=step_cache_depth,
            step_cache_report=cache_report,
            compile_report=compile_report,
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
        seeds = list(seeds)
        if isinstance(images, str | bytes | os.PathLike) or not isinstance(images, Sequence):
            raise ValueError(f"images must be a sequence of images, got {type(images).__name__}")
        if len(images) != len(seeds):
            raise ValueError(f"seeds must have one seed per image: {len(images)} images, {len(seeds)} seeds")
        seeds = [check_value("seed", seed) for seed in seeds]  # [0, 2**63 - 1]: int64 in the results
        if num_frames is None:
            num_frames = int(self.unet_config.get("num_frames", 25))
        # The declared ranges (pipeline.params), multiples of 8 and min <= max guidance.
        given = locals()  # the keywords, whose names the declaration lists (tests/test_params.py)
        call = check_generation(**{name: given[name] for name in GENERATION_PARAMS if name != "seed"})
        if fit not in FIT_MODES:
            raise ValueError(f"fit must be one of {FIT_MODES}, got {fit!r}")
        if not images:
            return []

        fitted, load_seconds = [], []
        for image in images:
            t0 = time.perf_counter()
            fitted.append(
                self.prepare_image(
                    image, width=call["width"], height=call["height"], fit=fit, filesystem=filesystem
                )
            )
            load_seconds.append(time.perf_counter() - t0)
        return self._render(fitted, seeds, load_seconds, call)

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
            return self._render_call(
                images[start : start + n], seeds[start : start + n], load_seconds[start : start + n], call
            )

        def halved(n: int, smaller: int) -> None:
            logger.warning("a batch of %d rows ran out of memory; going on %d rows at a time", n, smaller)

        while start < len(images):
            rendered, size = halve_on_oom(call_rows, size, halved)
            generations += rendered
            start += len(rendered)
        return generations

    def _render_call(
        self, images: list[Image.Image], seeds: list[int], load_seconds: list[float], call: dict[str, Any]
    ) -> list[RenderedVideo]:
        pipe = self.pipe
        pipe.marks = {}
        pipe.last_decode_chunk_size = None
        pipe.last_decode_retries = 0
        n = len(images)
        shape = (
            n,
            call["height"],
            call["width"],
            call["num_frames"],
            call["decode_chunk_size"],
            *unet_batches(call),  # the UNet batch variants (CFG, conditional half only)
        )
        if self.compile_cache is not None:
            self.compile_cache.before_call(shape)  # the shape's artifacts, before its first call
        t_start = time.perf_counter()
        self._begin_video()  # one pipeline call: its rows start their step cache together
        watch = CompileWatch(what="a render") if self.compile_mode != "off" else None
        if watch is not None:
            watch.__enter__()
        try:
            out = pipe(
                image=list(images),
                generator=[torch.Generator().manual_seed(seed) for seed in seeds],
                output_type="np",
                **call,
            )
        finally:
            if watch is not None:
                watch.__exit__(None, None, None)
        videos = [frames_to_uint8(np.asarray(video)) for video in out.frames]
        t_end = time.perf_counter()
        if watch is not None:
            self._note_compile(shape, watch)
            if self.compile_cache is not None:
                self.compile_cache.after_call(shape, compiled=watch.compiles > 0)

        m = pipe.marks
        shared = {
            "conditioning": (m["conditioning_end"] - t_start) / n,
            "denoise": (m["decode_start"] - m["conditioning_end"]) / n,
            "decode": (m["decode_end"] - m["decode_start"]) / n,
            "postprocess": (t_end - m["decode_end"]) / n,
        }
        hits = pipe.last_cache_hits
        generations = []
        for i, (frames, seed) in enumerate(zip(videos, seeds, strict=True)):
            timings = {"image_load": load_seconds[i], **shared}
            timings["total"] = sum(timings.values())
            if watch is not None:
                timings["compile"] = watch.seconds / n
            generations.append(
                RenderedVideo(
                    frames=frames,
                    timings=timings,
                    cache_hit=bool(hits[i]),
                    num_inference_steps=call["num_inference_steps"],
                    fps=call["fps"],
                    seed=seed,
                    decode_chunk_size=pipe.last_decode_chunk_size,
                    decode_retries=pipe.last_decode_retries,
                    batch_size=n,
                )
            )
        return generations

    def _note_compile(self, shape: tuple, watch: CompileWatch) -> None:
        """Log compile time apart; warn when a shape that was already rendered compiled again."""
        self.compile_seconds += watch.seconds
        warm = shape in self._warm_shapes
        self._warm_shapes.add(shape)
        if watch.compiles and warm:
            logger.warning(
                "torch.compile recompiled %d frame(s) (%.1fs) while rendering shape %s a second time: "
                'a render-to-render recompile; run with TORCH_LOGS="recompiles" to see why',
                watch.compiles,
                watch.seconds,
                shape,
            )
        elif watch.compiles:
            logger.info(
                "torch.compile (%s): compiled %d frame(s) in %.1fs for shape %s",
                self.compile_mode,
                watch.compiles,
                watch.seconds,
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
