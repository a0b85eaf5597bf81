"""Which ffmpeg binary the project runs.

Precedence (first match wins):

1. ``VCUT_FFMPEG``: an explicit path (or name on ``PATH``) set by the operator. It must
   exist; a wrong value is an error rather than a silent fallback.
2. ``ffmpeg`` on ``PATH``: a system ffmpeg that the deployment configured.
3. The static binary shipped by ``imageio-ffmpeg`` (``imageio_ffmpeg.get_ffmpeg_exe()``,
   which itself honours ``IMAGEIO_FFMPEG_EXE``). It has libx264, libvpx-vp9 and GIF.

imageio-ffmpeg ships no ``ffprobe``, so the project never needs one: see
:mod:`pipeline.probe`.
"""

from __future__ import annotations

import os
import shutil

from .errors import EncodeError


def ffmpeg_exe() -> str:
    """The path of the ffmpeg binary to run (see the module docstring for the precedence)."""
    configured = os.environ.get("VCUT_FFMPEG", "").strip()
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise EncodeError(f"VCUT_FFMPEG={configured!r} is not an executable ffmpeg")
        return found
    system = shutil.which("ffmpeg")
    if system is not None:
        return system
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()
