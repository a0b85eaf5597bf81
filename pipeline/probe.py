"""Inspect encoded videos with the ffmpeg binary alone (imageio-ffmpeg ships no ffprobe).

``probe_video`` parses the stream line that ``ffmpeg -i`` prints and decodes the video
back through a pipe to count its frames exactly; ``read_video`` returns the decoded
frames. Used by the tests and available to the jobs layer for verification.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import numpy as np

from .errors import EncodeError
from .ffmpeg_bin import ffmpeg_exe

_STREAM = re.compile(r"Stream #\d+:\d+.*?: Video: (?P<codec>\w+)(?P<rest>.*)")
_SIZE = re.compile(r", (?P<w>\d+)x(?P<h>\d+)[ ,\[]")
_FPS = re.compile(r", (?P<fps>[\d.]+(?:k)?) (?:fps|tbr)")
_PIXFMT = re.compile(r"^[^,]*, (?P<pix>[a-z0-9_]+)")


@dataclass(frozen=True)
class VideoInfo:
    codec: str
    pix_fmt: str
    width: int
    height: int
    fps: float
    frames: int
    format_line: str


def _stream_line(path: str) -> tuple[str, str]:
    proc = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", path], capture_output=True, text=True)
    for line in proc.stderr.splitlines():
        if _STREAM.search(line):
            fmt = next((ln.strip() for ln in proc.stderr.splitlines() if ln.startswith("Input #")), "")
            return line.strip(), fmt
    raise EncodeError(f"no video stream found in {path!r}: {proc.stderr.strip()[-500:]}")


def read_video(path: str | os.PathLike, width: int, height: int) -> np.ndarray:
    """Decode every frame of a local video to uint8 RGB ``(F, height, width, 3)``."""
    cmd = [ffmpeg_exe(), "-v", "error", "-i", os.fspath(path), "-fps_mode", "passthrough",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise EncodeError(f"cannot decode {os.fspath(path)!r}: {proc.stderr.decode(errors='replace')[-500:]}")
    frame_size = width * height * 3
    if len(proc.stdout) % frame_size:
        raise EncodeError(f"decoded {len(proc.stdout)} bytes, not a whole number of {width}x{height} frames")
    return np.frombuffer(proc.stdout, dtype=np.uint8).reshape(-1, height, width, 3)


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Codec, pixel format, size, frame rate and exact frame count of a local video."""
    line, fmt = _stream_line(os.fspath(path))
    m = _STREAM.search(line)
    assert m is not None
    rest = m.group("rest")
    size = _SIZE.search(rest)
    fps = _FPS.search(rest)
    pix = _PIXFMT.search(rest)
    if size is None:
        raise EncodeError(f"cannot parse the video size of {os.fspath(path)!r} from: {line}")
    w, h = int(size.group("w")), int(size.group("h"))
    rate = fps.group("fps") if fps else "0"
    rate_value = float(rate[:-1]) * 1000 if rate.endswith("k") else float(rate)
    frames = read_video(path, w, h).shape[0]
    return VideoInfo(
        codec=m.group("codec"),
        pix_fmt=pix.group("pix") if pix else "",
        width=w,
        height=h,
        fps=rate_value,
        frames=frames,
        format_line=fmt,
    )
