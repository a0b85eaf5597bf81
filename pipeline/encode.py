"""Encode uint8 frames to MP4 (H.264), WebM (VP9) or GIF with ffmpeg, atomically.

Frames are streamed to ffmpeg's stdin as raw RGB24 through ffmpeg-python (no temporary
images). The binary is chosen by :func:`pipeline.ffmpeg_bin.ffmpeg_exe`.

- **MP4**: libx264, ``yuv420p`` (plays everywhere), ``crf``/``preset`` settable,
  ``+faststart`` (the index is moved to the front so a browser can start playing at once).
- **WebM**: libvpx-vp9, ``yuv420p``, constant quality (``crf``, ``b:v 0``); ``preset`` maps
  to VP9's ``cpu-used`` speed.
- **GIF**: a per-video palette (``palettegen``/``paletteuse``), looping.

yuv420p needs even dimensions: for MP4 and WebM an odd width or height is padded by one
pixel that repeats the last row/column (nothing is cropped away).

Atomic writes: locally, ffmpeg writes to a hidden temporary name beside the final file
(``pipeline.storage.temporary_name``), which is renamed (``os.replace``) only after ffmpeg
succeeded, so a crash never leaves a truncated video under the final name (a killed process
may leave the temporary behind; any failure we see removes it). For a URI the video is
encoded to a local temporary file first (``+faststart`` needs a seekable output), then put
with ``pipeline.storage.put_atomic``: on an object store one upload under the final name
(visible only once complete; nothing else is created, not even a folder), elsewhere a hidden
temporary name and a move.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EncodeError
from .ffmpeg_bin import ffmpeg_exe
from .storage import put_atomic, temporary_name, url_to_fs

FORMATS = ("mp4", "webm", "gif")
X264_PRESETS = (
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo",
)  # fmt: skip
# VP9 speed for each x264 preset name (higher cpu-used is faster).
_VP9_CPU_USED = {p: max(0, 8 - i) for i, p in enumerate(X264_PRESETS)}


def __getattr__(name: str) -> Any:
    # ffmpeg-python is imported on first use, so that importing the renderer (which imports this
    # module for FORMATS) works where nothing is encoded, e.g. the GPU benchmark's machine.
    if name == "ffmpeg":
        import ffmpeg

        return ffmpeg
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _pad_even(frames: np.ndarray) -> np.ndarray:
    _, h, w, _ = frames.shape
    pad_h, pad_w = h % 2, w % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _validate(frames: Any, fps: float, format: str, crf: int, preset: str) -> np.ndarray:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(
            f"frames must be a uint8 array of shape (frames, height, width, 3), got {frames.dtype} "
            f"{frames.shape}"
        )
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not fps > 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    max_crf = 63 if format == "webm" else 51
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= max_crf:
        raise ValueError(f"crf must be an integer in [0, {max_crf}] for {format}, got {crf!r}")
    if preset not in X264_PRESETS:
        raise ValueError(f"preset must be one of {X264_PRESETS}, got {preset!r}")
    return frames


def _build_command(path: str, width: int, height: int, fps: float, format: str, crf: int, preset: str):
    import ffmpeg

    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
    if format == "mp4":
        out = stream.output(
            path, format="mp4", vcodec="libx264", pix_fmt="yuv420p", crf=crf, preset=preset,
            movflags="+faststart",
        )  # fmt: skip
    elif format == "webm":
        out = stream.output(
            path, format="webm", vcodec="libvpx-vp9", pix_fmt="yuv420p", crf=crf, deadline="good",
            **{"b:v": 0, "cpu-used": _VP9_CPU_USED[preset], "row-mt": 1},
        )  # fmt: skip
    else:
        split = stream.split()
        palette = split[0].filter("palettegen", stats_mode="full")
        out = ffmpeg.filter([split[1], palette], "paletteuse").output(path, format="gif", loop=0)
    return out.global_args("-hide_banner", "-loglevel", "error", "-nostats").overwrite_output()


def _frame_bytes(frames: np.ndarray) -> Iterator[bytes]:
    """Raw RGB24 bytes, one frame at a time (a seam that tests use to simulate a crash)."""
    for frame in frames:
        yield np.ascontiguousarray(frame).tobytes()


def _run_ffmpeg(frames: np.ndarray, path: str, fps: float, format: str, crf: int, preset: str) -> None:
    """Encode ``frames`` to the local file ``path``; raise EncodeError if ffmpeg fails."""
    if format in ("mp4", "webm"):
        frames = _pad_even(frames)
    _, h, w, _ = frames.shape
    exe = ffmpeg_exe()
    cmd = _build_command(path, w, h, fps, format, crf, preset)
    proc = cmd.run_async(cmd=exe, pipe_stdin=True, pipe_stderr=True)
    err_chunks: list[bytes] = []
    drain = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    drain.start()
    try:
        try:
            for chunk in _frame_bytes(frames):
                proc.stdin.write(chunk)
        except BrokenPipeError:
            pass  # ffmpeg exited early; its status and stderr say why
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        drain.join(timeout=10)
        proc.stderr.close()  # else a ResourceWarning (unclosed file) per video
    if rc != 0:
        msg = b"".join(err_chunks).decode(errors="replace").strip()[-2000:]
        raise EncodeError(f"ffmpeg ({exe}) failed with status {rc} encoding {format}: {msg}")


def _remove_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _encode_local(frames: np.ndarray, final: Path, fps: float, format: str, crf: int, preset: str) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / temporary_name(final.name)
    try:
        _run_ffmpeg(frames, str(tmp), fps, format, crf, preset)
        os.replace(tmp, final)
    except BaseException:
        _remove_quietly(tmp)
        raise


def encode_video(
    frames: np.ndarray,
    out: str | os.PathLike,
    *,
    fps: float,
    format: str = "mp4",
    crf: int = 18,
    preset: str = "medium",
    filesystem: Any = None,
) -> float:
    """Encode uint8 ``frames`` ``(F, H, W, 3)`` to ``out`` atomically; return the seconds it took.

    ``out`` is a local path, a ``file://`` path, an fsspec URI (``s3://...``, ``memory://...``)
    or, with ``filesystem`` (an fsspec filesystem), a path on that filesystem. Raises
    ``ValueError`` for bad arguments and :class:`~pipeline.errors.EncodeError` when ffmpeg or
    the upload fails.
    """
    t0 = time.perf_counter()
    frames = _validate(frames, fps, format, crf, preset)
    target = os.fspath(out)
    if filesystem is not None:
        fs, path = filesystem, target
    else:
        try:
            fs, path = url_to_fs(target)
        except ValueError as exc:
            raise EncodeError(f"cannot write video to {target!r}: {exc}") from exc
    if fs is None:
        try:
            _encode_local(frames, Path(path), fps, format, crf, preset)
        except OSError as exc:
            raise EncodeError(f"cannot write video to {target!r}: {exc}") from exc
        return time.perf_counter() - t0
    fd, local = tempfile.mkstemp(prefix="vcut-encode-", suffix=f".{format}")
    os.close(fd)
    try:
        try:
            _run_ffmpeg(frames, local, fps, format, crf, preset)
        except OSError as exc:
            raise EncodeError(f"cannot run ffmpeg for {target!r}: {exc}") from exc
        try:
            put_atomic(fs, path, local)
        except (OSError, ValueError) as exc:
            raise EncodeError(f"cannot write video to {target!r}: {exc}") from exc
    finally:
        _remove_quietly(local)
    return time.perf_counter() - t0
