"""The contact sheet's pictures for ``jobs.report``: the first frame of a video as a small
JPEG (ffmpeg), from a file, a URI, or a WebDataset sample inside its shard's tar, and the
page's link to the video."""

from __future__ import annotations

import os
import posixpath
import subprocess
import tarfile
import tempfile
from typing import Any

from jobs.output import OutputDir
from pipeline.storage import is_remote, local_path

THUMB_HEIGHT = 128  # pixels


def thumbnail(
    path: str, fs: Any = None, height: int = THUMB_HEIGHT, *, sample: str | None = None
) -> bytes | None:
    """The first frame of a video as JPEG bytes ``height`` pixels high, or None when it cannot
    be read (missing, not a video). ``fs``: the fsspec filesystem of a URI (the video is copied
    to a temporary file first: ffmpeg needs a seekable mp4). ``sample``: ``path`` is a
    WebDataset shard and the video is that sample's (its key, ``jobs.shards.sample_key``)."""
    from pipeline.ffmpeg_bin import ffmpeg_exe

    tmp = None
    try:
        if sample is not None or fs is not None:
            # a shard is read header by header up to the sample (tarfile seeks past the other
            # members): small blocks, so that a seek on an object store fetches little
            block = 2**16 if sample is not None else None
            opened = fs.open(path, "rb", block_size=block) if fs is not None else open(path, "rb")
            with opened as src:
                tmp = _spool(src, path, sample)
            if tmp is None:
                return None
            path = tmp
        elif not os.path.isfile(path):
            return None
        cmd = [ffmpeg_exe(), "-v", "error", "-i", path, "-frames:v", "1", "-vf", f"scale=-2:{height}",
               "-q:v", "4", "-f", "image2pipe", "-c:v", "mjpeg", "pipe:1"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, timeout=60)
        return proc.stdout if proc.returncode == 0 and proc.stdout else None
    except Exception:
        return None
    finally:
        if tmp is not None:
            os.unlink(tmp)


def _spool(src: Any, path: str, sample: str | None) -> str | None:
    """Copy a video to a temporary file: ``src`` itself, or (``sample``) the member of the
    tar ``src`` named ``<sample>.<ext>`` that is not its metadata; None when there is none."""
    if sample is not None:
        with tarfile.open(fileobj=src, mode="r:") as tar:
            member = next(
                (m for m in tar if m.isfile() and m.name.rpartition(".")[0] == sample
                 and not m.name.endswith((".json", ".txt"))),
                None,
            )  # fmt: skip
            if member is None:
                return None
            return _to_temp(tar.extractfile(member), posixpath.splitext(member.name)[1])
    return _to_temp(src, os.path.splitext(posixpath.basename(path))[1])


def _to_temp(src: Any, suffix: str) -> str:
    fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="vcut-thumb-")
    with os.fdopen(fd, "wb") as f:
        f.write(src.read())
    return tmp


def link(out: OutputDir, output: str | None) -> str | None:
    """A link to a video from DIR/report.html: relative when it lies under DIR."""
    if not output:
        return None
    root = out.uri.rstrip("/") + "/" if not out.local else os.path.join(out.root, "")
    if output.startswith(root):
        return output[len(root) :].replace(os.sep, "/")
    return output if is_remote(output) else "file://" + local_path(output)
