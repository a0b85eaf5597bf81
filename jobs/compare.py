"""``vcut compare``: render the same images with the same seeds under several configurations
and measure how far each one lands from ``off`` (stock SVD), how long it took and its MACs.

A configuration names every lever in the grammar of :mod:`jobs.levers`, e.g. ``full``,
``full+cache3``, ``full+cache3+fp8+g0-0.6``. ``off`` is the reference; it is added when not
listed, and always rendered first. The distances (PSNR, SSIM, LPIPS) say how far a lever
moves the frames from stock SVD on the same weights and inputs, not whether a video looks good.

Loading: the model is loaded once (:func:`pipeline.loading.load_svd_pipeline`). Each
configuration gets its own UNet, because VCUT and the step cache patch a UNet in place and
cannot be undone: a deep copy of the module structure whose memo maps every parameter and
buffer to itself, so the copies share the weights (no second copy in memory, CPU or GPU).
VAE, image encoder and feature extractor are shared; the scheduler, which keeps per-call
state, is copied. Configurations are rendered one after the other, and each one's renderer
is dropped before the next is built.

The renderer for a configuration comes from one function, :func:`make_renderer`, and its
MACs from :func:`config_macs` (through ``jobs.macs``, as every MAC count of the project).
"""

from __future__ import annotations

import copy
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jobs.levers import LeverConfig, LeverError
from jobs.levers import parse_config as parse_lever_config
from jobs.macs import VideoShape, count_video_macs
from pipeline.params import GENERATION_PARAMS
from pipeline.storage import is_remote, local_path
from vcut import shared_weight_copy

REFERENCE = "off"


class CompareError(ValueError):
    """A bad argument of ``vcut compare`` (reported in one line, exit status 2)."""


#: A configuration of ``vcut compare``: :class:`jobs.levers.LeverConfig`.
CompareConfig = LeverConfig


def parse_config(text: str) -> LeverConfig:
    """One configuration name in the lever grammar (:func:`jobs.levers.parse_config`)."""
    try:
        return parse_lever_config(text)
    except LeverError as exc:
        raise CompareError(str(exc)) from None


def parse_configs(text: str) -> tuple[list[CompareConfig], bool]:
    """A comma-separated list -> (configurations with ``off`` first, whether ``off`` was added)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise CompareError("--configs names no configuration")
    configs = [parse_config(n) for n in names]
    keys: dict[tuple, str] = {}
    for c in configs:
        if c.key in keys:
            same = "" if keys[c.key] == c.name else f" (as {keys[c.key]!r})"
            raise CompareError(f"configuration {c.name!r} is listed twice{same}")
        keys[c.key] = c.name
        if c.quantize is not None:
            check_quantize_supported(c)
    ref = CompareConfig(REFERENCE, REFERENCE)
    added = ref.key not in keys
    return [ref] + [c for c in configs if c.key != ref.key], added


def check_quantize_supported(config: LeverConfig) -> None:
    """Refuse ``fp8`` before anything is loaded when this build's renderer has no ``quantize``
    keyword; where it has one, the renderer decides (and refuses a device without FP8)."""
    import inspect

    from pipeline.renderer import Renderer

    if "quantize" not in inspect.signature(Renderer.from_pipe).parameters:
        raise CompareError(
            f"configuration {config.name!r}: token 'fp8' needs Renderer(quantize=...), which this build "
            "does not have"
        )


def check_model(model: str, allow_pickle: bool = False) -> None:
    """Refuse a local model folder that is missing or not an SVD pipeline, before anything is
    loaded, with the loader's own folder rules (:mod:`pipeline.model_files`); hub ids pass."""
    from pipeline.errors import ModelLoadError
    from pipeline.model_files import check_svd_folder, local_model_folder

    folder = local_model_folder(model)
    if folder is not None:
        try:
            check_svd_folder(folder, allow_pickle)
        except ModelLoadError as exc:
            hint = "give a local SVD folder or a hub id (owner/name)"
            raise CompareError(f"--model {model!r}: {exc}; {hint}") from exc


def check_images(images: Sequence[str]) -> None:
    """Every local image must be a file (URIs are read when rendering)."""
    if not images:
        raise CompareError("give at least one image")
    for image in images:
        if is_remote(image):
            continue
        path = local_path(image)
        if not os.path.isfile(path):
            raise CompareError(f"image {image!r} does not exist")


def image_labels(images: Sequence[str]) -> list[str]:
    """Short, unique labels: the file stem, with ``#i`` appended where two stems collide."""
    stems = [Path(i.rstrip("/")).stem or f"image{n}" for n, i in enumerate(images)]
    return [s if stems.count(s) == 1 else f"{s}#{n}" for n, s in enumerate(stems)]


# -- one configuration -> renderer, MACs -------------------------------------------------------


def make_renderer(stock: Any, config: CompareConfig, *, model_id: str, step_cache_depth: int = 1) -> Any:
    """A :class:`pipeline.Renderer` for ``config`` on a pipeline that shares ``stock``'s weights.

    ``stock`` itself is never patched. Only the keywords of the levers the configuration uses
    are passed (:meth:`jobs.levers.LeverConfig.renderer_kwargs`; ``fp8`` as ``quantize``).
    """
    from pipeline.renderer import Renderer
    from vcut import vcut_mode

    components = dict(stock.components)
    components["unet"] = shared_weight_copy(stock.unet)
    components["scheduler"] = copy.deepcopy(stock.scheduler)
    pipe = type(stock)(**components)
    kwargs = config.renderer_kwargs()
    if config.step_cache is not None:
        kwargs["step_cache_depth"] = step_cache_depth
    renderer = Renderer.from_pipe(pipe, model_id=model_id, **kwargs)
    if vcut_mode(stock.unet) != "off":  # the copies must never touch the loaded model
        raise RuntimeError("patching a copy changed the loaded UNet")
    return renderer


def config_macs(
    unet_config: dict,
    config: CompareConfig,
    *,
    height: int,
    width: int,
    num_frames: int,
    steps: int,
    guidance: bool,
    step_cache_depth: int = 1,
    guidance_start: float = 0.0,
    guidance_stop: float = 1.0,
) -> Any:
    """:class:`vcut.MacReport` of ``config`` for one video of this shape (no weights needed);
    the guidance interval is the configuration's (``gA-B``), else the one given."""
    interval = config.generate_kwargs() or {"guidance_start": guidance_start, "guidance_stop": guidance_stop}
    shape = VideoShape(height, width, num_frames, steps, guidance, **interval)
    return count_video_macs(unet_config, shape, config.levers(step_cache_depth))


# -- the whole comparison ------------------------------------------------------------------


@dataclass
class ConfigResult:
    """What one configuration produced: timings, MACs, distance to ``off`` per image, thumbnails."""

    config: CompareConfig
    seconds: list[float] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)
    distances: list[Any] = field(default_factory=list)  # pipeline.quality.VideoDistance per image
    thumbs: list[list[np.ndarray]] = field(default_factory=list)  # per image: first, middle, last frame
    mac_report: Any = None
    vcut_report: dict | None = None
    videos: list[str] = field(default_factory=list)


def key_frames(num_frames: int) -> list[int]:
    """Indices of the first, middle and last frame."""
    return [0, (num_frames - 1) // 2, num_frames - 1]


def run_compare(
    model: str,
    images: Sequence[str],
    configs: Sequence[CompareConfig],
    *,
    seeds: Sequence[int],
    out: Any,
    generate_kwargs: dict[str, Any],
    device: str | None = None,
    dtype: str | None = None,
    variant: str | None = None,
    allow_pickle: bool = False,
    warmup: int = 0,
    step_cache_depth: int = 1,
    save_videos: bool = False,
    use_lpips: bool = True,
    thumb_height: int | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> dict[str, Any]:
    """Render every image under every configuration (``configs[0]`` must be ``off``), write
    the report files into ``out`` (a :class:`jobs.output.OutputDir`) and return the JSON dict."""
    import torch

    from jobs.compare_report import write_reports
    from pipeline.encode import encode_video
    from pipeline.loading import load_svd_pipeline
    from pipeline.quality import LpipsMetric, lpips_available, video_distance
    from vcut import clear_vcut_cache

    if not configs or configs[0].name != REFERENCE:
        raise CompareError("the first configuration must be 'off', the reference")
    if len(seeds) != len(images):
        raise CompareError(f"{len(seeds)} seeds for {len(images)} images")
    labels = image_labels(images)

    t0 = time.perf_counter()
    stock, dev, torch_dtype = load_svd_pipeline(
        model, device=device, dtype=dtype, allow_pickle=allow_pickle, variant=variant
    )
    load_seconds = time.perf_counter() - t0
    unet_config = dict(stock.unet.config)
    kw = dict(generate_kwargs)
    if kw.get("num_frames") is None:
        kw["num_frames"] = int(unet_config.get("num_frames", 25))
    log(f"loaded {model} on {dev} ({torch_dtype}) in {load_seconds:.1f}s")

    lpips_metric = None
    lpips_note = "lpips is not installed: LPIPS not computed (pip install lpips; it downloads its weights)"
    if use_lpips and lpips_available():
        lpips_metric = LpipsMetric(device=str(dev))
        lpips_note = "LPIPS: lpips package, AlexNet features"
    elif not use_lpips:
        lpips_note = "LPIPS not computed (--no-lpips)"

    if save_videos:
        out.makedirs("videos")
    reference: list[np.ndarray] = []
    results: list[ConfigResult] = []
    guidance = float(kw.get("max_guidance_scale", GENERATION_PARAMS["max_guidance_scale"].default)) > 1.0
    for config in configs:
        res = ConfigResult(config)
        renderer = make_renderer(stock, config, model_id=str(model), step_cache_depth=step_cache_depth)
        res.vcut_report = renderer.vcut_report.to_dict() if renderer.vcut_report is not None else None
        config_kw = {**kw, **config.generate_kwargs()}  # a gA-B token over --guidance-start/-stop
        for _ in range(warmup):  # not timed; then forget the caches, so each timed video starts cold
            renderer.generate(images[0], seed=seeds[0], **config_kw)
        renderer.cache.clear()
        clear_vcut_cache(renderer.pipe)
        for image, seed, label in zip(images, seeds, labels, strict=True):
            gen = renderer.generate(image, seed=seed, **config_kw)
            res.seconds.append(float(gen.timings["total"]))
            res.timings.append(dict(gen.timings))
            frames = gen.frames
            res.thumbs.append(
                [frames[i].copy() for i in key_frames(frames.shape[0])]
            )  # not views: frees the video
            if config.name == REFERENCE:
                reference.append(frames)
            res.distances.append(video_distance(reference[len(res.distances)], frames, lpips=lpips_metric))
            if save_videos:
                path = out.uri_of("videos", f"{_safe(config.name)}__{_safe(label)}_s{seed}.mp4")
                encode_video(frames, path, fps=gen.fps)
                res.videos.append(path)
            log(f"{config.name:>14} {label}: {gen.timings['total']:.2f}s")
        del renderer
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        res.mac_report = config_macs(
            unet_config,
            config,
            height=kw["height"],
            width=kw["width"],
            num_frames=kw["num_frames"],
            steps=kw["num_inference_steps"],
            guidance=guidance,
            step_cache_depth=step_cache_depth,
            guidance_start=config_kw["guidance_start"],
            guidance_stop=config_kw["guidance_stop"],
        )
        results.append(res)

    meta = {
        "model": str(model),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(torch_dtype).removeprefix("torch."),
        "images": list(images),
        "image_labels": labels,
        "seeds": [int(s) for s in seeds],
        "generate": kw,
        "key_frames": key_frames(kw["num_frames"]),
        "warmup_videos_per_config": warmup,
        "step_cache_depth": step_cache_depth,
        "guidance": guidance,
        "load_seconds": load_seconds,
        "lpips": lpips_note,
        "torch": torch.__version__,
    }
    return write_reports(out, meta, results, thumb_height=thumb_height)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)
