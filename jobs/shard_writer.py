"""The shard format and the worker's side of ``output.layout: webdataset`` (``jobs.shards``
says how the whole works): names, sample keys, and :class:`WorkerShards`, a worker's open
shard filled across its batches and published under a number the driver reserved.

Imported by the worker process; it needs no results table, no Ray.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from jobs.output import MAX_NAME, open_output, safe_name
from pipeline.storage import put_atomic, temporary_name

SUBDIR = "shards"
#: ``00012.tar``, ``00012.parquet``, ``00012_stats.json``.
SHARD_FILE = re.compile(r"^(\d{5,})(\.tar|\.parquet|_stats\.json)$")


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


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


#: The key of a result that carries a worker's shard reports back to the driver.
REPORTS = "shard_reports"


@dataclass(frozen=True)
class ShardSpec:
    """What a worker needs to write shards (sent once, with the worker's start)."""

    out: str  # the output's URI (``OutputDir.uri``)
    shard_size: int
    fmt: str
    schema: pa.Schema  # a shard's Parquet: the results rows' own types, plus ``key``
    caption_column: str | None = None
    max_age_s: float = float("inf")  # an open shard this old is closed, full or not


@dataclass
class _Spool:
    path: str
    tar: tarfile.TarFile
    file: Any
    opened_at: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    video_bytes: int = 0


_SPOOL_PREFIX = "vcut-shard-"


def _remove_dead_spools(folder: str) -> None:
    """Local spools (object-store outputs) of worker processes on this node that died."""
    for name in os.listdir(folder):
        if not name.startswith(_SPOOL_PREFIX):
            continue
        try:
            os.kill(int(name[len(_SPOOL_PREFIX) :].split("-", 1)[0]), 0)
        except ProcessLookupError:
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass
        except (ValueError, PermissionError):
            pass


class WorkerShards:
    """A worker's shards (module docstring): one open spool filled across batches, full spools
    kept until a reserved number arrives, and reports of the shards published."""

    def __init__(self, spec: ShardSpec, label: str, clock: Any = time.time):
        self.spec = spec
        self.clock = clock
        self.label = label
        self.out = open_output(spec.out)
        self._lock = threading.Lock()
        self._open: _Spool | None = None
        self._full: list[_Spool] = []  # closed, waiting for a number
        self._numbers: list[int] = []  # reserved for this worker by the driver, not used yet
        self._used: set[int] = set()
        self._reports: list[dict[str, Any]] = []
        self._uploads: list[Future] = []
        self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-publish")
        if not self.out.local:
            _remove_dead_spools(tempfile.gettempdir())
        # pyarrow's lazy imports for a table from rows (pandas among them: ~1 s on a loaded
        # node) at the worker's start, not in its first publish: that report then rides back
        # with the next batch instead of several batches later
        pa.Table.from_pylist([], schema=spec.schema)

    def _new_spool(self) -> _Spool:
        if self.out.local:  # beside its final names: the rename is atomic
            self.out.makedirs(SUBDIR)
            path = self.out.path(SUBDIR, temporary_name(f"{safe_name(self.label)}.tar"))
        else:  # object stores: one upload from a local file at publish time
            fd, path = tempfile.mkstemp(prefix=f"{_SPOOL_PREFIX}{os.getpid()}-", suffix=".tar")
            os.close(fd)
        file = open(path, "wb")  # noqa: SIM115 (closed when full, or removed by _drop)
        tar = tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT)
        return _Spool(path, tar, file, self.clock())

    @staticmethod
    def _member(spool: _Spool, name: str, size: int, source: Any, mtime: float) -> None:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mtime = int(mtime)
        info.mode = 0o444
        info.uname = info.gname = "vcut"
        spool.tar.addfile(info, source)

    def add(self, row: dict[str, Any], video_path: str) -> None:
        """Append one rendered row (its full results row, and its encoded video file, removed
        here) to the open shard; a shard that is full is closed (published by ``reports``)."""
        with self._lock:
            try:
                self._add(row, video_path)
            except BaseException as exc:
                self._drop_open(exc)  # a sample half in the tar: the shard is lost, its rows reported
                raise
            finally:
                try:
                    os.remove(video_path)
                except OSError:
                    pass

    def _add(self, row: dict[str, Any], video_path: str) -> None:
        spool = self._open = self._open or self._new_spool()
        key = sample_key(row["id"])
        now = self.clock()
        meta = {k: v for k, v in row.items() if k not in ("committed_at", "shard", "output", REPORTS)}
        meta["key"] = key
        size = os.path.getsize(video_path)
        with open(video_path, "rb") as f:
            self._member(spool, f"{key}.{self.spec.fmt}", size, f, now)
        data = json.dumps(meta, default=_json_default).encode()
        self._member(spool, f"{key}.json", len(data), _bytes(data), now)
        caption = row.get(self.spec.caption_column) if self.spec.caption_column else None
        if caption is not None:
            text = str(caption).encode()
            self._member(spool, f"{key}.txt", len(text), _bytes(text), now)
        spool.rows.append(dict(meta))
        spool.video_bytes += size
        if len(spool.rows) >= self.spec.shard_size or now - spool.opened_at >= self.spec.max_age_s:
            self._close(spool)
            self._full.append(spool)
            self._open = None

    @staticmethod
    def _close(spool: _Spool) -> None:
        spool.tar.close()
        spool.file.flush()
        os.fsync(spool.file.fileno())
        spool.file.close()

    def _drop_open(self, exc: BaseException) -> None:
        spool, self._open = self._open, None
        if spool is None:
            return
        try:
            spool.file.close()
            os.remove(spool.path)
        except OSError:
            pass
        if spool.rows:
            ids = [r["id"] for r in spool.rows]
            self._reports.append({"dropped": ids, "error": f"spool: {type(exc).__name__}: {exc}"})

    def reports(self, numbers: list[int], *, flush: bool = False, wait: bool = False) -> list[dict[str, Any]]:
        """Start publishing the full shards (with ``flush``, the open one too) under the reserved
        ``numbers``, one after another on a background thread (an upload never holds a batch);
        the reports of every shard published or dropped since the last call (with ``flush`` or
        ``wait``: once every upload started is done)."""
        with self._lock:
            self._numbers.extend(n for n in numbers if n not in self._used and n not in self._numbers)
            if flush and self._open is not None and self._open.rows:
                self._close(self._open)
                self._full.append(self._open)
                self._open = None
            while self._full and self._numbers:
                spool, number = self._full.pop(0), self._numbers.pop(0)
                self._used.add(number)
                self._uploads.append(self._uploader.submit(self._publish_or_drop, spool, number))
            taken, kept = [], []
            for upload in self._uploads:  # one look at each: a report is taken exactly once
                (taken if flush or wait or upload.done() else kept).append(upload)
            self._uploads = kept
            reports, self._reports = self._reports, []
        return reports + [u.result() for u in taken]

    def _publish_or_drop(self, spool: _Spool, number: int) -> dict[str, Any]:
        try:
            return self._publish(spool, number)
        except Exception as exc:  # the driver fails its rows (the output's error)
            return {"dropped": [r["id"] for r in spool.rows], "error": f"{type(exc).__name__}: {exc}"}
        finally:
            if os.path.exists(spool.path) and not self.out.local:
                os.remove(spool.path)

    def _publish(self, spool: _Spool, number: int) -> dict[str, Any]:
        tar_bytes = os.path.getsize(spool.path)
        final = self.out.path(SUBDIR, shard_file(number, ".tar"))
        if self.out.local:
            os.replace(spool.path, final)
        else:
            put_atomic(self.out.fs, final, spool.path)
        uri = self.out.uri_of(SUBDIR, shard_file(number, ".tar"))
        published_at = self.clock()
        rows = [dict(r, shard=number, output=uri, committed_at=int(published_at * 1e6)) for r in spool.rows]
        table = pa.Table.from_pylist(rows, schema=self.spec.schema)
        self.out.write_table(table, self.out.path(SUBDIR, shard_file(number, ".parquet")))
        stats = {
            "shard": number,
            "tar": uri,
            "count": len(rows),
            "tar_bytes": tar_bytes,
            "video_bytes": spool.video_bytes,
            "format": self.spec.fmt,
            "worker": self.label,
            "render_seconds": round(sum(r.get("seconds") or 0.0 for r in rows), 6),
            "encode_seconds": round(sum(r.get("encode_seconds") or 0.0 for r in rows), 6),
            "opened_at": spool.opened_at,
            "published_at": published_at,
            "first_id": rows[0]["id"],
            "last_id": rows[-1]["id"],
        }
        text = json.dumps(stats, indent=2, default=_json_default) + "\n"
        self.out.write_bytes(self.out.path(SUBDIR, shard_file(number, "_stats.json")), text.encode())
        return {"shard": number, "tar": uri, "ids": [r["id"] for r in rows]}

    def attach(self, results: list[dict[str, Any]], numbers: list[int]) -> None:
        """Publish what is full; the reports ready so far go on the batch's first result."""
        reports = self.reports(numbers)
        if reports and results:
            results[0][REPORTS] = reports


def _bytes(data: bytes) -> Any:
    return io.BytesIO(data)
