"""The generation pipeline: load an SVD checkpoint, render one image to frames, encode video.

Public names are imported lazily so that ``import pipeline.encode`` (an encoder process,
``vcut --help``) does not pay for importing torch and diffusers.

Modules: ``images`` (input images), ``cache`` (embedding cache), ``loading`` (checkpoints),
``svd`` (the diffusers pipeline subclass), ``renderer`` (``Renderer``), ``encode`` (ffmpeg),
``probe`` (inspect encoded videos), ``errors``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Renderer": "renderer",
    "RenderedVideo": "renderer",
    "RenderRecord": "renderer",
    "frames_to_uint8": "renderer",
    "EmbeddingCache": "cache",
    "image_key": "cache",
    "load_image": "images",
    "fit_image": "images",
    "DEFAULT_MAX_PIXELS": "images",
    "encode_video": "encode",
    "FORMATS": "encode",
    "probe_video": "probe",
    "read_video": "probe",
    "VideoInfo": "probe",
    "ffmpeg_exe": "ffmpeg_bin",
    "ImageError": "errors",
    "ModelLoadError": "errors",
    "EncodeError": "errors",
}

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "EmbeddingCache",
    "EncodeError",
    "FORMATS",
    "ImageError",
    "ModelLoadError",
    "RenderRecord",
    "RenderedVideo",
    "Renderer",
    "VideoInfo",
    "encode_video",
    "ffmpeg_exe",
    "fit_image",
    "frames_to_uint8",
    "image_key",
    "load_image",
    "probe_video",
    "read_video",
]

if TYPE_CHECKING:
    from .cache import EmbeddingCache, image_key
    from .encode import FORMATS, encode_video
    from .errors import EncodeError, ImageError, ModelLoadError
    from .ffmpeg_bin import ffmpeg_exe
    from .images import DEFAULT_MAX_PIXELS, fit_image, load_image
    from .probe import VideoInfo, probe_video, read_video
    from .renderer import RenderedVideo, Renderer, RenderRecord, frames_to_uint8


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
