"""The exception types of the pipeline package.

They are plain ``Exception`` subclasses so that the jobs layer can turn them into failed
result rows with ``str(exc)`` as the reason: every message names the input or model and
says what is wrong.
"""

from __future__ import annotations


class ImageError(Exception):
    """An input image that cannot be used: missing, unreadable, empty, truncated, not an
    image, or too large. The one error type for bad inputs."""


class ModelLoadError(Exception):
    """A checkpoint that cannot be loaded: missing folder, unknown or unreachable hub id,
    pickle weights without ``allow_pickle=True``, or an incomplete pipeline."""


class EncodeError(Exception):
    """ffmpeg failed to encode a video (the final file is never left half-written)."""
