"""``output.layout: webdataset``: videos in WebDataset tar shards, assembled on the driver.

``DIR/shards/`` holds, per shard ``N``: ``NNNNN.tar`` (per sample ``<key>.<format>``,
``<key>.json`` and, with ``output.caption_column``, ``<key>.txt``), ``NNNNN.parquet`` (the
same rows, with their ``key``) and ``NNNNN_stats.json`` (counts, bytes, seconds).

Workers encode each video to a local temporary file and return its bytes with the row's
result; the driver appends the sample to the open shard's spool file (bounded memory: a
sample is on disk as soon as it arrives) and publishes the shard once it holds
``output.shard_size`` samples, or at the end of the job. Publishing, in this order:

1. the tar under its final name, atomically (local: the spool is a hidden temporary in
   ``DIR/shards/``, fsynced, renamed; elsewhere the spool is a local temporary file, put with
   ``pipeline.storage.put_atomic``: one upload under the final name on an object store);
2. the shard's Parquet and stats files (each atomic, as results parts are);
3. the shard's rows as one results part, with ``shard`` = N: **this is the commit point**.

Rules (applied by :func:`scan` at the start of every job and after it):

- a shard is *published* when its tar exists and a committed row (the latest of its id, ``ok``)
  names it; any other file in ``DIR/shards/`` (a crash between 1 and 3, a shard whose rows
  were all rendered again, a tar deleted by hand: its Parquet and stats) is removed, so each
  ``ok`` id is in exactly one published shard after every job;
- an id is done when its latest row is ``ok`` and its shard is published; every other row is
  rendered again, into a new shard (numbers are never reused);
- failed rows are committed at once (``shard`` null): they are in no shard.

A crash therefore loses at most the open shard and the batches in flight, and never leaves a
partial shard under a final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import results
from jobs.manifest import ManifestError, hash_ids
from jobs.output import MAX_NAME, OutputDir, open_output, safe_name
from pipeline.storage import is_temporary, put_atomic, temporary_name

log = logging.getLogger("jobs")

SUBDIR = "shards"
#: ``00012.tar``, ``00012.parquet``, ``00012_stats.json``.
_SHARD_FILE = re.compile(r"^(\d{5,})(\.tar|\.parquet|_stats\.json)$")


def shard_file(number: int, suffix: str) -> str:
    return f"{number:05d}{suffix}"


def sample_key(row_id: str) -> str:
    """A WebDataset key for an id: its safe file name (``output.safe_name``) without dots
    (a loader splits a member name at the first dot); a hash of the id is appended when a dot
    had to go, so two ids never share a key."""
    name = safe_name(row_id)
    if "." not in name:
        return name
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{name.replace('.', '_')[: MAX_NAME - 13]}-{digest}"


def check_layout(cfg: Any, info: Any) -> None:
    """``output.caption_column`` must name a column of the manifest (ManifestError: exit 2)."""
    column = cfg.output.caption_column
    if column and column not in info.columns:
        raise ManifestError(
            [f"output.caption_column {column!r} is not a column of the manifest ({', '.join(info.columns)})"]
        )


@dataclass
class ShardState:
    published: set[int]  # shards whose tar exists and that a committed ok row names
    done: np.ndarray  # sorted hashes of the ids in a published shard (latest row ok)
    next_number: int  # the first number no file or row has used
    removed: list[str]  # files removed (clean=True) or that would be (clean=False)


def _latest_ok_shards(out: OutputDir) -> tuple[list[str], list[int | None], set[int]]:
    """(ids, shard) of the latest committed rows that are ok, and every shard number any
    committed row names."""
    parts = results._parts(out)
    masks, tables = results._latest_mask(out, parts)
    ids: list[str] = []
    shards: list[int | None] = []
    named: set[int] = set()
    for path, mask, table in zip(parts, masks, tables, strict=True):
        if "shard" not in out.read_schema(path).names:
            continue
        shard = out.read_table(path, columns=["shard"]).column("shard")
        named.update(v for v in pc.unique(shard).to_pylist() if v is not None)
        keep = pa.array(mask & pc.equal(table.column("status"), "ok").to_numpy(zero_copy_only=False))
        ids.extend(pc.filter(table.column("id"), keep).to_pylist())
        shards.extend(pc.filter(shard, keep).to_pylist())
    return ids, shards, named


def scan(out: OutputDir, *, clean: bool) -> ShardState:
    """The resume state of a webdataset job; with ``clean``, remove temporaries and every
    shard file that is not part of a published shard (see the module docstring)."""
    out = open_output(out)
    names = out.listdir(SUBDIR)
    ids, shards, named = _latest_ok_shards(out)
    referenced = {s for s in shards if s is not None}
    files: dict[int, list[str]] = {}
    removed: list[str] = []
    for name in names:
        m = _SHARD_FILE.match(name)
        if m:
            files.setdefault(int(m.group(1)), []).append(name)
        elif is_temporary(name):
            removed.append(name)
    tars = {n for n, group in files.items() if shard_file(n, ".tar") in group}
    published = tars & referenced
    removed += [name for n, group in files.items() if n not in published for name in group]
    if clean:
        for name in removed:
            out.remove(out.path(SUBDIR, name))
        if removed:
            log.info("removed %d unpublished shard file(s) from %s", len(removed), out.uri_of(SUBDIR))
    done_ids = [i for i, s in zip(ids, shards, strict=True) if s in published]
    done = np.sort(hash_ids(done_ids)) if done_ids else np.zeros(0, dtype=np.uint64)
    next_number = max([*files, *named, -1]) + 1
    return ShardState(published, done, next_number, removed)


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


class ShardWriter:
    """Assembles shards on the driver from the samples workers return (see module docstring).

    ``commit(rows)`` is called with a shard's rows once its files are published: it commits
    them as a results part (the commit point)."""

    def __init__(
        self,
        out: OutputDir,
        *,
        first_number: int,
        shard_size: int,
        fmt: str,
        schema: pa.Schema,
        commit: Callable[[list[dict[str, Any]]], None],
        caption_column: str | None = None,
    ):
        self.out = out
        self.number = first_number
        self.shard_size = int(shard_size)
        self.fmt = fmt
        self.schema = pa.schema([*schema, pa.field("key", pa.string())])
        self.commit = commit
        self.caption_column = caption_column
        self.rows: list[dict[str, Any]] = []
        self.published = 0
        self._tar: tarfile.TarFile | None = None
        self._file: Any = None
        self._spool: str | None = None
        self._bytes = 0
        self._opened_at = 0.0
        out.makedirs(SUBDIR)

    # -- one shard --------------------------------------------------------------------------

    def _open(self) -> None:
        name = shard_file(self.number, ".tar")
        if self.out.local:  # beside its final name: the rename is atomic
            self._spool = self.out.path(SUBDIR, temporary_name(name))
        else:  # object stores: one upload from a local file at publish time
            fd, self._spool = tempfile.mkstemp(prefix=f"vcut-shard-{self.number:05d}-", suffix=".tar")
            os.close(fd)
        self._file = open(self._spool, "wb")  # noqa: SIM115 (closed in publish/abort)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._opened_at = time.time()
        self._bytes = 0

    def _member(self, name: str, data: bytes, mtime: float) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = int(mtime)
        info.mode = 0o444
        info.uname = info.gname = "vcut"
        self._tar.addfile(info, io.BytesIO(data))  # type: ignore[union-attr]
        self._bytes += len(data)

    def add(self, row: dict[str, Any], video: bytes) -> None:
        """Append one rendered row (its results row, and its encoded video) to the open shard;
        publishes the shard when it is full."""
        if self._tar is None:
            self._open()
        key = sample_key(row["id"])
        row["shard"] = self.number
        row["output"] = self.out.uri_of(SUBDIR, shard_file(self.number, ".tar"))
        row["key"] = key
        now = time.time()
        meta = {k: v for k, v in row.items() if k not in ("committed_at",)}
        self._member(f"{key}.{self.fmt}", video, now)
        self._member(f"{key}.json", json.dumps(meta, default=_json_default).encode(), now)
        caption = row.get(self.caption_column) if self.caption_column else None
        if caption is not None:
            self._member(f"{key}.txt", str(caption).encode(), now)
        self.rows.append(row)
        if len(self.rows) >= self.shard_size:
            self.publish()

    def publish(self) -> None:
        """Publish the open shard (tar, Parquet, stats), then commit its rows."""
        if self._tar is None or not self.rows:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        tar_bytes = os.path.getsize(self._spool)
        final = self.out.path(SUBDIR, shard_file(self.number, ".tar"))
        if self.out.local:
            os.replace(self._spool, final)
        else:
            try:
                put_atomic(self.out.fs, final, self._spool)
            finally:
                os.remove(self._spool)
        self._tar = self._file = self._spool = None
        published_at = time.time()
        for row in self.rows:
            row["committed_at"] = int(published_at * 1e6)
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        self.out.write_table(table, self.out.path(SUBDIR, shard_file(self.number, ".parquet")))
        stats = {
            "shard": self.number,
            "tar": self.out.uri_of(SUBDIR, shard_file(self.number, ".tar")),
            "count": len(self.rows),
            "tar_bytes": tar_bytes,
            "video_bytes": self._bytes,
            "format": self.fmt,
            "render_seconds": round(sum(r.get("seconds") or 0.0 for r in self.rows), 6),
            "encode_seconds": round(sum(r.get("encode_seconds") or 0.0 for r in self.rows), 6),
            "opened_at": self._opened_at,
            "published_at": published_at,
            "first_id": self.rows[0]["id"],
            "last_id": self.rows[-1]["id"],
        }
        text = json.dumps(stats, indent=2) + "\n"
        self.out.write_bytes(self.out.path(SUBDIR, shard_file(self.number, "_stats.json")), text.encode())
        rows = [{k: v for k, v in r.items() if k != "key"} for r in self.rows]
        self.rows = []
        self.number += 1
        self.published += 1
        self.commit(rows)  # the commit point

    def abort(self) -> None:
        """Drop the open shard (its rows render again on the next run)."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
                os.remove(self._spool)
            except OSError:
                pass
        self._tar = self._file = self._spool = None
        self.rows = []
