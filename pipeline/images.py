"""Input images as users really have them: read from anywhere, checked, turned into RGB.

``load_image`` accepts a local path, a URI readable through fsspec (``s3://``, ``gs://``,
``memory://``, ``file://`` ...; ``pipeline.storage`` decides which) or a path on a given
fsspec filesystem, raw bytes, a binary file object, or a PIL image. It then

- refuses empty, unreadable, non-image, truncated and oversized inputs with
  :class:`~pipeline.errors.ImageError` (one type; the message names the input and the
  problem). "Oversized" is checked twice: on the encoded size (``max_bytes``) and, before
  any pixel is decoded, on the pixel count from the header (``max_pixels``), which is the
  defence against decompression bombs;
- applies the EXIF orientation;
- converts every mode to 8-bit RGB: grayscale and bilevel are replicated, palette images
  are expanded, images with alpha (RGBA, LA, PA, palette with transparency) are
  composited on ``background`` (white by default), CMYK is converted with Pillow's
  profile-less formula, and 16-bit (``I;16*``, ``I``) and float (``F``) grayscale are
  scaled to 8 bits (16-bit: value / 257; float: clipped to 0..255).

``fit_image`` then brings it to the render size: ``"crop"`` (default) scales to cover and
center-crops; ``"letterbox"`` scales to fit and pads with a colour (black by default).
"""

from __future__ import annotations

import io
import os
import warnings
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError
from .fetch import DEFAULT_MAX_BYTES, FETCH_THREADS, FetchLimits, read_limited, read_source

#: Default pixel-count limit (about 50 megapixels: larger than any real photo, far below
#: what would exhaust a worker's memory once decoded).
DEFAULT_MAX_PIXELS = 50_000_000
FIT_MODES = ("crop", "letterbox")

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | IO[bytes]


def describe_source(source: Any) -> str:
    """A short human-readable name of an image source, for error messages."""
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.width}x{source.height}>"
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    if isinstance(source, str | os.PathLike):
        return repr(os.fspath(source))
    name = getattr(source, "name", None)
    return repr(name) if isinstance(name, str) else f"<{type(source).__name__}>"


def _read_bytes(source: Any, name: str, filesystem: Any, limits: FetchLimits) -> bytes:
    """Read the encoded bytes of ``source`` (``pipeline.fetch``: timeouts and size limit);
    every failure becomes an ImageError."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if len(data) > limits.max_bytes:
            raise ImageError(f"image {name} is too large: {len(data)} bytes > max_bytes={limits.max_bytes}")
        return data
    if hasattr(source, "read"):
        try:
            return read_limited(source, name, limits)
        except ImageError:
            raise
        except (OSError, ValueError) as exc:
            raise ImageError(f"image {name} cannot be read: {exc}") from exc
    return read_source(source, name, filesystem, limits)


def _check_pixels(img: Image.Image, name: str, max_pixels: int) -> None:
    pixels = img.width * img.height
    if pixels > max_pixels:
        raise ImageError(
            f"image {name} is too large: {img.width}x{img.height} = {pixels} pixels "
            f"> max_pixels={max_pixels} (decompression-bomb guard)"
        )
    if img.width < 1 or img.height < 1:
        raise ImageError(f"image {name} has no pixels ({img.width}x{img.height})")


def _decode(data: bytes, name: str, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError(f"image {name} is empty (0 bytes)")
    with warnings.catch_warnings():
        # We apply our own (lower) pixel limit; Pillow's own warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            raise ImageError(f"image {name} is not a recognised image format ({len(data)} bytes)") from exc
        except Image.DecompressionBombError as exc:
            raise ImageError(f"image {name} is too large (decompression-bomb guard): {exc}") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"image {name} is corrupt: {exc}") from exc
        _check_pixels(img, name, max_pixels)
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(f"image {name} is truncated or corrupt: {exc}") from exc
    return img


def _scale_to_uint8(arr: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.rint(arr.astype(np.float64) / scale), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)
        return Image.fromarray(_scale_to_uint8(arr, 257.0), mode="L").convert("RGB")
    if mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(img), 1.0), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    filesystem: Any = None,
    background: tuple[int, int, int] = (255, 255, 255),
    limits: FetchLimits | None = None,
) -> Image.Image:
    """Read ``source`` and return an 8-bit RGB PIL image with its EXIF orientation applied.

    ``filesystem`` (an fsspec filesystem) is used to open a path source when given; without
    it, a URI goes through its fsspec filesystem (``pipeline.storage.url_to_fs``). ``limits``
    (``pipeline.fetch.FetchLimits``: connect and read timeouts, size) bound the read; without
    it, the defaults with ``max_bytes``.
    Raises :class:`ImageError` for any input that cannot be used.
    """
    name = describe_source(source)
    if isinstance(source, Image.Image):
        img = source
        _check_pixels(img, name, max_pixels)
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(f"image {name} is truncated or corrupt: {exc}") from exc
    elif isinstance(source, str | os.PathLike | bytes | bytearray | memoryview) or hasattr(source, "read"):
        limits = limits or FetchLimits(max_bytes=max_bytes)
        img = _decode(_read_bytes(source, name, filesystem, limits), name, max_pixels)
    else:
        raise ImageError(f"image {name} has an unsupported source type {type(source).__name__}")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # a broken EXIF block is a bad input, not a crash
        raise ImageError(f"image {name} has unreadable EXIF orientation data: {exc}") from exc
    try:
        return to_rgb(img, background)
    except (OSError, ValueError) as exc:
        raise ImageError(f"image {name} (mode {img.mode}) cannot be converted to RGB: {exc}") from exc


def fit_image(
    img: Image.Image,
    width: int,
    height: int,
    mode: str = "crop",
    *,
    background: tuple[int, int, int] = (0, 0, 0),
) -> Image.Image:
    """Resize ``img`` to exactly ``width`` x ``height``.

    ``"crop"``: scale (Lanczos) so that the image covers the target, then center-crop.
    ``"letterbox"``: scale so that the whole image fits, then pad with ``background``.
    """
    if mode not in FIT_MODES:
        raise ValueError(f"fit mode must be one of {FIT_MODES}, got {mode!r}")
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    if img.size == (width, height):
        return img
    if mode == "crop":
        return ImageOps.fit(img, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    return ImageOps.pad(img, (width, height), method=Image.Resampling.LANCZOS, color=background)


def prefetch_images(
    sources: list[Any], limits: FetchLimits, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[Image.Image | ImageError]:
    """Load every source (``load_image`` within ``limits``) at once on up to
    ``pipeline.fetch.FETCH_THREADS`` threads: per source, its RGB image or the ImageError that
    fails its row alone. Each read ends within ``limits.budget_s`` (``pipeline.fetch``), so the
    whole call ends within ``fetch_budget_s(len(sources), limits)`` plus decoding."""
    from concurrent.futures import ThreadPoolExecutor

    def one(source: Any) -> Image.Image | ImageError:
        try:
            return load_image(source, max_pixels=max_pixels, limits=limits)
        except ImageError as exc:
            return exc

    if len(sources) <= 1:
        return [one(s) for s in sources]
    with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(sources)), thread_name_prefix="fetch") as pool:
        return list(pool.map(one, sources))
