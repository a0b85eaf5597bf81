"""Storage: what is a URI, its filesystem, and how a file appears complete under its final name.

The one home of these rules for every read and write (input images, videos, manifests, job
outputs), so that a path means the same thing everywhere:

- :func:`is_remote`: ``scheme://...`` with a scheme other than ``file`` is a URI read and written
  through fsspec; everything else (a relative or absolute path, ``file://``, ``C:\\x``) is a
  local path. :func:`url_to_fs` gives the fsspec filesystem of a URI and ``None`` for a local
  path (also for a URI whose filesystem is fsspec's local one), so callers have one test.
- :func:`put_atomic`: a file is never seen half-written under its final name. **Local**: a
  hidden temporary in the same folder, fsynced, then ``os.replace``. **Object stores** (see
  :data:`OBJECT_STORES`): one upload under the final name; an object PUT, single or multipart,
  becomes visible only once complete (s3fs aborts a failed multipart upload; one cut short by
  a killed process stays invisible until the bucket's lifecycle rule for incomplete multipart
  uploads removes it), so a "rename" there (a copy plus a delete: a second full write and a
  window with two copies) adds nothing.
  Object stores have no folders, and creating one can create the bucket (s3fs's ``makedirs``
  does): nothing but the object itself is created there. **Other fsspec filesystems** (SFTP,
  HDFS, memory ...): hidden temporary name, then ``fs.mv``. A failure removes its temporary;
  a killed process may leave one behind, named by :func:`temporary_name`, which
  :func:`is_temporary` recognises so that a later run can delete it.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import uuid
from typing import Any

#: fsspec protocols of object stores.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})

# ``scheme://`` at the start; fsspec chains (``simplecache::s3://``) name their first protocol
# before ``::``. A one-letter scheme is a Windows drive (``C://x``), as fsspec decides too.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)(?:::[^/\\]*)?://")
#: Hidden temporaries (``.<name>.tmp`` or ``.<name>.tmp-<12 hex>``), and the upload names
#: ``<name>.tmp-<12 hex>`` that ``pipeline.encode`` wrote on URIs before it used put_atomic.
_TEMPORARY = re.compile(r"^\..+\.tmp(-[0-9a-f]{12})?$|\.tmp-[0-9a-f]{12}$")


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URI read through fsspec (``s3://``, ``gs://``, ``memory://``,
    ``simplecache::s3://`` ...) rather than a local path (``file://`` is local)."""
    m = _SCHEME.match(os.fspath(path))
    return bool(m) and m.group(1).lower() != "file"


def local_path(path: str | os.PathLike) -> str:
    """The OS path of a local path or ``file://`` URI (the scheme removed, nothing else)."""
    path = os.fspath(path)
    return path[len("file://") :] if path[: len("file://")].lower() == "file://" else path


def url_to_fs(path: str | os.PathLike, **storage_options: Any) -> tuple[Any, str]:
    """``(fs, path on fs)`` for a URI (fsspec's ``url_to_fs``, given ``storage_options``);
    ``(None, OS path)`` for a local path, ``file://`` or any URI fsspec serves from the local
    disk. Raises ValueError for a protocol fsspec does not know, ImportError when its package
    (s3fs, gcsfs ...) is missing."""
    if not is_remote(path):
        return None, local_path(path)
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, fs_path = fsspec.core.url_to_fs(os.fspath(path), **storage_options)
    return (None, fs_path) if isinstance(fs, LocalFileSystem) else (fs, fs_path)


def protocols(fs: Any) -> tuple[str, ...]:
    """The protocol names of an fsspec filesystem (``fs.protocol``)."""
    names = getattr(fs, "protocol", None) or ()
    return (names,) if isinstance(names, str) else tuple(names)


def is_object_store(fs: Any) -> bool:
    """Whether the fsspec filesystem ``fs`` is an object store (see :data:`OBJECT_STORES`)."""
    return fs is not None and bool(OBJECT_STORES.intersection(protocols(fs)))


def temporary_name(name: str) -> str:
    """The hidden temporary that ``name`` is written under before it appears (readers skip
    names starting with ``.``)."""
    return f".{name}.tmp-{uuid.uuid4().hex[:12]}"


def is_temporary(name: str) -> bool:
    """Whether a file name is a temporary left by an interrupted write (see
    :func:`temporary_name`). A video or part name (``<id>.<ext>``) never matches."""
    return bool(_TEMPORARY.search(name))


def put_atomic(fs: Any, path: str, source: bytes | bytearray | memoryview | str | os.PathLike) -> None:
    """Write ``source`` (bytes, or the path of a local file to copy) to ``path`` on ``fs`` (None:
    the local disk) so that ``path`` is never seen half-written (see the module docstring).
    Parent folders are created, except on object stores."""
    data = bytes(source) if isinstance(source, bytes | bytearray | memoryview) else None
    if fs is None:
        folder, name = os.path.split(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, temporary_name(name))
        try:
            with open(tmp, "wb") as f:
                if data is None:
                    with open(source, "rb") as src:
                        shutil.copyfileobj(src, f, 4 * 2**20)
                else:
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _quietly(os.remove, tmp)
            raise
        return
    if is_object_store(fs):  # one upload: visible only once complete
        fs.pipe_file(path, data) if data is not None else fs.put_file(os.fspath(source), path)
        return
    folder, name = posixpath.split(path)
    if folder:
        _quietly(fs.makedirs, folder, exist_ok=True)
    tmp = posixpath.join(folder, temporary_name(name))
    try:
        fs.pipe_file(tmp, data) if data is not None else fs.put_file(os.fspath(source), tmp)
        fs.mv(tmp, path)
    except BaseException:
        _quietly(fs.rm_file, tmp)
        raise


def _quietly(fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except (OSError, NotImplementedError):
        pass
