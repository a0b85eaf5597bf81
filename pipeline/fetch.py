"""Reading an input image's bytes with limits: a host that never answers, one that trickles
bytes and one that sends an endless body each fail their own image, in bounded time.

:class:`FetchLimits` holds the three limits: ``connect_timeout_s`` (the TCP/TLS connection),
``read_timeout_s`` (everything after it: waiting for the answer and reading the whole body)
and ``max_bytes`` (the encoded size). One fetch therefore ends within
:attr:`FetchLimits.budget_s` = connect + read seconds (plus one chunk's read), which is what
the job's hung-worker deadline allows for fetching (``jobs.runner``).

How the limits apply:

- ``http(s)://``: fsspec's HTTP filesystem, with aiohttp's own timeouts (``sock_connect``,
  ``sock_read``: the longest silence, ``total``: the whole request) passed as its
  ``client_kwargs``, and the file opened as one streamed GET (``block_size=0``; without it
  fsspec first asks HEAD, then a GET, for the size: up to three waits on a dead host).
- ``s3://``: botocore's ``connect_timeout`` / ``read_timeout`` (s3fs ``config_kwargs``).
- every source: the body is read in chunks and the whole read is checked against the budget
  and ``max_bytes`` after each chunk (a trickle of one byte a second never trips a socket
  timeout; an endless body is cut at ``max_bytes`` + 1).

Failures are :class:`~pipeline.errors.ImageError` with one line naming the image:
``unreachable (timeout after N s)``, ``too large (over N bytes)``, ``connection refused``,
``the server answered HTTP 403``, ``not found`` ...
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import IO, Any

from .errors import ImageError
from .storage import protocols, url_to_fs

#: Default limit on the encoded size of an input.
DEFAULT_MAX_BYTES = 256 * 2**20
#: Bytes read at a time (the budget and size checks run between chunks).
CHUNK_BYTES = 2**20


@dataclass(frozen=True)
class FetchLimits:
    """Limits of one image read (see the module docstring)."""

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_bytes: int = DEFAULT_MAX_BYTES

    @property
    def budget_s(self) -> float:
        """The longest one fetch may take: connect + read."""
        return float(self.connect_timeout_s) + float(self.read_timeout_s)

    def storage_options(self, protocol: str) -> dict[str, Any]:
        """fsspec options that put these timeouts on a filesystem of ``protocol``."""
        if protocol in ("http", "https"):
            import aiohttp

            timeout = aiohttp.ClientTimeout(
                total=self.budget_s,
                connect=self.connect_timeout_s,
                sock_connect=self.connect_timeout_s,
                sock_read=self.read_timeout_s,
            )
            return {"client_kwargs": {"timeout": timeout}}
        if protocol in ("s3", "s3a"):
            return {
                "config_kwargs": {
                    "connect_timeout": self.connect_timeout_s,
                    "read_timeout": self.read_timeout_s,
                }
            }
        return {}


def _scheme(path: str) -> str:
    return path.split("://", 1)[0].lower() if "://" in path else ""


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in seen:
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    return seen


def unreachable(exc: BaseException, elapsed: float | None = None) -> str | None:
    """Why a remote image could not be read, when it is not a plain "not found": a refused
    connection, an unknown host, a timeout, another HTTP status (fsspec's HTTP filesystem
    raises FileNotFoundError for every failure of its size probe, the real one being its
    cause). None for a 404 / 410 or a cause that says nothing more."""
    seen = _chain(exc)
    for err in seen:
        status = getattr(err, "status", None)
        if isinstance(status, int):
            if status in (404, 410):
                return None
            return f"the server answered HTTP {status} {getattr(err, 'message', '')}".rstrip()
    for err in seen:
        if isinstance(err, TimeoutError):
            after = f" after {elapsed:.1f} s" if elapsed is not None else ""
            return f"unreachable (timeout{after})"
    for err in seen:
        if isinstance(err, ConnectionRefusedError):
            return f"connection refused (nothing listens there): {err.strerror or err}"
        if isinstance(err, socket.gaierror):
            return f"host unknown (DNS: {err.strerror or err})"
    for err in seen:
        os_error = getattr(err, "os_error", None)  # aiohttp's ClientConnectorError
        if isinstance(os_error, ConnectionRefusedError):
            return f"connection refused (nothing listens there): {os_error.strerror or os_error}"
        if isinstance(os_error, socket.gaierror):
            return f"host unknown (DNS: {os_error.strerror or os_error})"
    for err in seen[1:] if isinstance(exc, FileNotFoundError) else seen:
        if isinstance(err, OSError) or type(err).__module__.startswith("aiohttp"):
            return f"unreachable ({type(err).__name__}: {err})"
    return None


def read_limited(fh: IO[bytes], name: str, limits: FetchLimits, started: float | None = None) -> bytes:
    """The whole body of ``fh``, read in chunks: at most ``limits.max_bytes`` (more raises
    "too large") and within ``limits.budget_s`` of ``started`` (else "timeout")."""
    started = time.monotonic() if started is None else started
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = fh.read(min(CHUNK_BYTES, limits.max_bytes + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limits.max_bytes:
            raise ImageError(
                f"image {name} is too large (over {limits.max_bytes} bytes; max_bytes={limits.max_bytes})"
            )
        elapsed = time.monotonic() - started
        if elapsed > limits.budget_s:
            raise ImageError(
                f"image {name} cannot be read: unreachable (timeout after {elapsed:.1f} s; "
                f"{size} bytes in, the limit is {limits.budget_s:g} s)"
            )


def read_source(path: str | os.PathLike, name: str, filesystem: Any, limits: FetchLimits) -> bytes:
    """The bytes of the image at ``path`` (a local path, a URI, or a path on ``filesystem``)
    within ``limits``; every failure is an :class:`ImageError` naming ``name``."""
    started = time.monotonic()
    path = os.fspath(path)
    try:
        if filesystem is not None:
            fs = filesystem
        else:
            scheme = _scheme(path)
            fs, path = url_to_fs(path, **limits.storage_options(scheme))
        if fs is None:
            with open(path, "rb") as fh:
                return read_limited(fh, name, limits, started)
        # one streamed GET over HTTP (see the module docstring); size: skips fsspec's size probe
        http = bool({"http", "https"}.intersection(protocols(fs)))
        opened = fs.open(path, "rb", block_size=0, size=-1) if http else fs.open(path, "rb")
        with opened as fh:
            return read_limited(fh, name, limits, started)
    except ImageError:
        raise
    except FileNotFoundError as exc:
        why = unreachable(exc, time.monotonic() - started)
        if why:
            raise ImageError(f"image {name} cannot be read: {why}") from exc
        raise ImageError(f"image {name} not found") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"image {name} is a directory, not a file") from exc
    except PermissionError as exc:
        raise ImageError(f"image {name} cannot be read: permission denied") from exc
    except Exception as exc:  # OSError, aiohttp's and botocore's errors, a bad URI (ValueError) ...
        why = unreachable(exc, time.monotonic() - started)
        raise ImageError(f"image {name} cannot be read: {why or f'{type(exc).__name__}: {exc}'}") from exc


#: Images of one batch fetched at once (threads), so a batch's fetch takes about one budget.
FETCH_THREADS = 8


def fetch_budget_s(rows: int, limits: FetchLimits) -> float:
    """The longest fetching ``rows`` images at once (``FETCH_THREADS`` at a time) may take."""
    return -(-max(0, int(rows)) // FETCH_THREADS) * limits.budget_s
