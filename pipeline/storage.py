"""Which filesystems are object stores: the one rule shared by video uploads and job outputs.

An object store (S3, GCS, Azure, ...) has no folders and no rename, an upload is visible only
once complete, and creating a "folder" can create the bucket itself (s3fs's ``makedirs``
does): writers there create nothing but the objects they write.
"""

from __future__ import annotations

from typing import Any

#: fsspec protocols (and pyarrow filesystem type names) of object stores.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})


def protocols(fs: Any) -> tuple[str, ...]:
    """The protocol names of an fsspec filesystem (``fs.protocol``) or a pyarrow one (``type_name``)."""
    names = getattr(fs, "protocol", None) or getattr(fs, "type_name", None) or ()
    return (names,) if isinstance(names, str) else tuple(names)


def is_object_store(fs: Any) -> bool:
    """Whether ``fs`` (fsspec or pyarrow) is an object store (see :data:`OBJECT_STORES`)."""
    return bool(OBJECT_STORES.intersection(protocols(fs)))
