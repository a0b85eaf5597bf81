"""Where a job writes: ``--out`` resolved once, and every read and write under it.

``DIR`` is a local folder or an fsspec URI (``s3://``, ``gs://``, ``file://`` ...; ``memory://`` is
refused: the workers are other processes), resolved once by :func:`open_output` on the driver;
every read and write of the results, the summary, the report and the shards goes through that
filesystem, with ``pipeline.storage``'s atomic put (local: hidden temporary, fsync, rename;
object store: one upload under the final name; other fsspec: hidden temporary, ``mv``).
Workers are given URI strings (:meth:`OutputDir.uri_of`), never a filesystem object.

The output folder is the job's one storage boundary: every :class:`OutputDir` method that
touches storage turns the storage's own failures (an ``OSError`` such as ENOSPC or EROFS, an
object-store client's connection or HTTP error: ``jobs.stop.output_failure``) into
:class:`OutputError`, so callers know an output failure by its type (exit 74 in
``jobs.stop.EXIT_FOR_ERROR``) and a bug stays itself.

Output names: :func:`safe_name` turns a row id into a file name that stays inside its folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.stop import output_failure
from pipeline.storage import is_object_store, is_temporary, protocols, put_atomic, url_to_fs

MAX_NAME = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(row_id: str) -> str:
    """A file name for an id that stays inside its folder: only ``[A-Za-z0-9._-]``, no leading
    dot, at most MAX_NAME characters. When the id had to change, a hash of the original id is
    appended so that two ids never share a file."""
    name = _UNSAFE.sub("_", row_id).lstrip(".")
    if name == row_id and 0 < len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{name[: MAX_NAME - 13]}-{digest}" if name else digest


class OutputError(OSError):
    """The output's storage failed (disk full, read-only, object store gone). ``uri``: the
    output folder; ``cause``: the storage's error in one line (with its errno name);
    ``advice``: what to do. An ``OSError`` carrying the cause's errno."""

    def __init__(self, uri: str, cause: str, advice: str, errnum: int | None = None):
        super().__init__(errnum if errnum is not None else errno.EIO, f"cannot write to {uri}: {cause}")
        self.uri, self.cause, self.advice = uri, cause, advice


@contextlib.contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Turn a storage failure inside the block into :class:`OutputError` (a missing file and
    anything that is not storage, such as a bug, pass through as themselves)."""
    try:
        yield
    except (OutputError, FileNotFoundError):
        raise
    except Exception as exc:
        failure = output_failure(exc)
        if failure is None:
            raise
        raise OutputError(uri, *failure, getattr(exc, "errno", None)) from exc


@dataclass(frozen=True)
class OutputDir:
    """Where a job writes, resolved once: a local folder (``fs`` is None, ``root`` an absolute
    path) or a folder on an fsspec filesystem (``root`` the path on ``fs``, ``uri`` the same
    folder as a URI: what other processes, such as Ray workers, are given)."""

    uri: str
    root: str
    fs: Any = None

    @property
    def local(self) -> bool:
        return self.fs is None

    @property
    def object_store(self) -> bool:
        return not self.local and is_object_store(self.fs)

    def path(self, *names: str) -> str:
        """A path under the root, on ``fs`` (local: an OS path)."""
        if self.local:
            return os.path.join(self.root, *names)
        return posixpath.join(self.root.rstrip("/"), *names)

    def uri_of(self, *names: str) -> str:
        """A URI under the root (local: an OS path), to hand to another process."""
        if self.local:
            return self.path(*names)
        return posixpath.join(self.uri.rstrip("/"), *names)

    def listdir(self, *sub: str) -> list[str]:
        """The names in a sub-folder ([] when it does not exist), never from a stale cache."""
        folder = self.path(*sub)
        if self.local:
            with storage_errors(self.uri):
                return os.listdir(folder) if os.path.isdir(folder) else []
        self.fs.invalidate_cache(folder)  # other processes (the workers) write here too
        try:
            with storage_errors(self.uri):
                found = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        return [posixpath.basename(p.rstrip("/")) for p in found if p.rstrip("/") != folder.rstrip("/")]

    def makedirs(self, *sub: str) -> None:
        """Create a sub-folder; nothing on object stores (no directories; s3fs would even
        create a missing bucket)."""
        if self.local:
            with storage_errors(self.uri):
                os.makedirs(self.path(*sub), exist_ok=True)
        elif not self.object_store:
            try:
                self.fs.makedirs(self.path(*sub), exist_ok=True)
            except (OSError, NotImplementedError):
                pass

    def remove(self, path: str) -> None:
        with storage_errors(self.uri):
            if self.local:
                os.remove(path)
            else:
                self.fs.rm_file(path)

    def remove_many(self, paths: list[str]) -> None:
        """Remove files; on an object store in as few requests as the store allows (s3fs: one
        DeleteObjects per 1,000 keys)."""
        if not paths:
            return
        if self.local or not self.object_store:
            for path in paths:
                self.remove(path)
            return
        with storage_errors(self.uri):
            self.fs.rm(list(paths))

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with storage_errors(self.uri):
            return pq.read_table(path, columns=columns, filesystem=self.fs)

    def read_schema(self, path: str) -> pa.Schema:
        with storage_errors(self.uri):
            return pq.read_schema(path, filesystem=self.fs)

    def write_table(self, table: pa.Table, path: str) -> None:
        """Write a Parquet file that is never seen half-written under ``path``."""
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        self.write_bytes(path, buf.getvalue().to_pybytes())

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically (``pipeline.storage.put_atomic``)."""
        with storage_errors(self.uri):
            put_atomic(self.fs, path, data)


def open_output(out: str | os.PathLike | OutputDir) -> OutputDir:
    """Resolve ``--out`` once: a local path (made absolute), ``file://`` (local too), or an
    fsspec URI. Raises ValueError for a protocol fsspec does not know or that is private to
    one process (``memory://``), ImportError when its package (s3fs, gcsfs ...) is missing.
    Creates nothing."""
    if isinstance(out, OutputDir):
        return out
    fs, root = url_to_fs(out)
    if fs is None:
        path = os.path.abspath(root)
        return OutputDir(uri=path, root=path)
    if "memory" in protocols(fs):
        raise ValueError(f"{out!r}: memory:// is private to one process; Ray workers cannot write there")
    root = root.rstrip("/")
    if not root:
        raise ValueError(f"{out!r} names no folder")
    return OutputDir(uri=fs.unstrip_protocol(root), root=root, fs=fs)


def video_path(out_dir: str | OutputDir, row_id: str, ext: str) -> str:
    """Where a row's video goes: ``DIR/videos/<safe name>.<ext>``, a local path or a URI."""
    out = open_output(out_dir)
    path = out.uri_of("videos", f"{safe_name(row_id)}.{ext}")
    parent = os.path.dirname(path) if out.local else posixpath.dirname(path)
    assert parent == out.uri_of("videos")
    return path


def clean_temporaries(out_dir: str | OutputDir) -> int:
    """Remove the temporaries an interrupted write left in ``results/``, ``videos/`` and
    ``shards/`` (``pipeline.storage.is_temporary``). Returns the count. Only the driver that
    holds the output lock calls it, so another driver's writes in progress are never removed."""
    out = open_output(out_dir)
    removed = 0
    for sub in ("results", "videos", "shards"):
        for name in out.listdir(sub):
            if is_temporary(name):
                out.remove(out.path(sub, name))
                removed += 1
    return removed
