"""``output.layout: webdataset``: videos in WebDataset tar shards that the workers write.

``DIR/shards/`` holds, per shard ``N``: ``NNNNN.tar`` (per sample ``<key>.<format>``,
``<key>.json`` and, with ``output.caption_column``, ``<key>.txt``), ``NNNNN.parquet`` (the
same rows, with their ``key``) and ``NNNNN_stats.json`` (counts, bytes, seconds, worker).

**Workers write the shards** (:class:`WorkerShards`); no video byte goes through the driver.
Each worker keeps one open shard across its batches: every video it renders is encoded to a
local temporary file and appended to the open shard's spool (local output: a hidden
``storage.temporary_name`` in ``DIR/shards/``; object stores: a local temporary file), and the
row's result goes back to the driver without the video. Once the shard holds
``output.shard_size`` samples (or when the driver asks at the end of the job) the worker
publishes it, in this order:

1. the tar under its final name, atomically (local: fsync + rename of the spool; elsewhere
   ``pipeline.storage.put_atomic``: one upload under the final name on an object store);
2. the shard's Parquet and stats files (each atomic);
3. a report (number, ids) that rides back with the batch's results.

The driver (:class:`ShardBook`) holds every ``ok`` row a worker returned until a report names
it, then commits the shard's rows as one results part with ``shard`` = N: **the commit point**.
Numbers are reserved by the driver, a few per worker, handed out with each batch (a worker with
no free number keeps its full shard until one arrives), so two workers never use one number and
a number is never reused; unused reservations leave gaps in the numbering.

A worker that dies takes its open (and any unreported) shard with it: the driver sends the rows
it held for that worker to the other workers again (rendered again, never lost, never twice:
a tar published but not committed is not part of the output and is removed by :func:`scan`).

Rules (applied by :func:`scan` at the start of every job and after it):

- a shard is *published* when its tar exists and a committed row (the latest of its id, ``ok``,
  and counted by the output's generation: ``jobs.generation``) names it; any other file in
  ``DIR/shards/`` (a spool of a dead worker, a tar whose rows were never committed, a shard
  whose rows were all rendered again, a tar deleted by hand: its Parquet and stats) is removed,
  so each ``ok`` id is in exactly one published shard after every job;
- an id is done when its latest row is ``ok``, of the current generation, and its shard is
  published; every other row is rendered again, into a new shard;
- failed rows are committed at once (``shard`` null): they are in no shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import generation as generations
from jobs.generation import Generation
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


def _latest_ok_shards(
    out: OutputDir, gen: Generation
) -> tuple[list[str], list[int | None], list[bool], set[int]]:
    """Of the latest committed rows that are ok: ids, shard, whether each counts as done in
    ``gen``, keeping only rows whose shard ``gen`` publishes; and every shard number any
    committed row names."""
    ids: list[str] = []
    shards: list[int | None] = []
    counts: list[bool] = []
    named: set[int] = set()
    for mask, table in generations.latest_rows(out, ["shard"]):
        shard = table.column("shard")
        named.update(v for v in pc.unique(shard).to_pylist() if v is not None)
        keep = mask & pc.equal(table.column("status"), "ok").to_numpy(zero_copy_only=False)
        row_gens = table.column(generations.COLUMN).to_pylist()
        keep &= np.array([gen.publishes(g) for g in row_gens], dtype=bool)
        ids.extend(pc.filter(table.column("id"), pa.array(keep)).to_pylist())
        shards.extend(pc.filter(shard, pa.array(keep)).cast(pa.int64()).to_pylist())
        counts.extend(gen.counts(g) for g, k in zip(row_gens, keep, strict=True) if k)
    return ids, shards, counts, named


def scan(out: OutputDir, *, clean: bool, gen: Generation | None = None) -> ShardState:
    """The resume state of a webdataset job in generation ``gen`` (default: the recorded one);
    with ``clean``, remove temporaries and every shard file that is not part of a published
    shard (see the module docstring)."""
    out = open_output(out)
    gen = generations.read(out) if gen is None else gen
    names = out.listdir(SUBDIR)
    ids, shards, counts, named = _latest_ok_shards(out, gen)
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
    done_ids = [i for i, s, c in zip(ids, shards, counts, strict=True) if c and s in published]
    done = np.sort(hash_ids(done_ids)) if done_ids else np.zeros(0, dtype=np.uint64)
    next_number = max([*files, *named, -1]) + 1
    return ShardState(published, done, next_number, removed)


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

    def __init__(self, spec: ShardSpec, label: str):
        self.spec = spec
        self.label = label
        self.out = open_output(spec.out)
        self._lock = threading.Lock()
        self._open: _Spool | None = None
        self._full: list[_Spool] = []  # closed, waiting for a number
        self._numbers: list[int] = []  # reserved for this worker by the driver, not used yet
        self._used: set[int] = set()
        self._reports: list[dict[str, Any]] = []
        if not self.out.local:
            _remove_dead_spools(tempfile.gettempdir())

    def _new_spool(self) -> _Spool:
        if self.out.local:  # beside its final names: the rename is atomic
            self.out.makedirs(SUBDIR)
            path = self.out.path(SUBDIR, temporary_name(f"{safe_name(self.label)}.tar"))
        else:  # object stores: one upload from a local file at publish time
            fd, path = tempfile.mkstemp(prefix=f"{_SPOOL_PREFIX}{os.getpid()}-", suffix=".tar")
            os.close(fd)
        file = open(path, "wb")  # noqa: SIM115 (closed when full, or removed by _drop)
        tar = tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT)
        return _Spool(path, tar, file, time.time())

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
            except BaseException:
                self._drop_open()  # a sample half in the tar: the shard is lost, its rows reported
                raise
            finally:
                try:
                    os.remove(video_path)
                except OSError:
                    pass

    def _add(self, row: dict[str, Any], video_path: str) -> None:
        spool = self._open = self._open or self._new_spool()
        key = sample_key(row["id"])
        now = time.time()
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
        if len(spool.rows) >= self.spec.shard_size:
            self._close(spool)
            self._full.append(spool)
            self._open = None

    @staticmethod
    def _close(spool: _Spool) -> None:
        spool.tar.close()
        spool.file.flush()
        os.fsync(spool.file.fileno())
        spool.file.close()

    def _drop_open(self) -> None:
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
            self._reports.append({"dropped": ids, "error": "the shard's spool could not be written"})

    def reports(self, numbers: list[int], *, flush: bool = False) -> list[dict[str, Any]]:
        """Publish the full shards (with ``flush``, the open one too) under the reserved
        ``numbers``; the reports of everything published or dropped since the last call."""
        with self._lock:
            self._numbers.extend(n for n in numbers if n not in self._used and n not in self._numbers)
            if flush and self._open is not None and self._open.rows:
                self._close(self._open)
                self._full.append(self._open)
                self._open = None
            while self._full and self._numbers:
                spool, number = self._full[0], self._numbers.pop(0)
                self._used.add(number)
                try:
                    self._reports.append(self._publish(spool, number))
                except Exception as exc:  # the rows are failed by the driver (output error)
                    ids = [r["id"] for r in spool.rows]
                    self._reports.append({"dropped": ids, "error": f"{type(exc).__name__}: {exc}"})
                finally:
                    self._full.pop(0)
                    if os.path.exists(spool.path) and not self.out.local:
                        os.remove(spool.path)
            reports, self._reports = self._reports, []
            return reports

    def _publish(self, spool: _Spool, number: int) -> dict[str, Any]:
        tar_bytes = os.path.getsize(spool.path)
        final = self.out.path(SUBDIR, shard_file(number, ".tar"))
        if self.out.local:
            os.replace(spool.path, final)
        else:
            put_atomic(self.out.fs, final, spool.path)
        uri = self.out.uri_of(SUBDIR, shard_file(number, ".tar"))
        published_at = time.time()
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
        """Publish what is full and put the reports on the batch's first result."""
        reports = self.reports(numbers)
        if reports and results:
            results[0][REPORTS] = reports


def _bytes(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


def pop_reports(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The shard reports a batch's results carry (removed from the results)."""
    return [rep for r in results for rep in (r.pop(REPORTS, None) or [])]


@dataclass
class _Held:
    row: dict[str, Any]  # the results row to commit
    source: dict[str, Any]  # the manifest row (to render again)


class ShardBook:
    """The driver's side: ``ok`` rows held per worker until a report says their shard is
    published; numbers reserved per worker. Never touches a video or the storage."""

    def __init__(self, first_number: int, reserve: int, spec: ShardSpec | None = None):
        self.spec = spec  # what the workers are started with
        self.next_number = first_number
        self.reserve = max(2, int(reserve))
        self.held: dict[str, dict[str, _Held]] = {}  # worker label -> id -> held row
        self.numbers: dict[str, list[int]] = {}  # worker label -> reserved, not reported used
        self.parked: list[tuple[str, dict[str, Any]]] = []  # reports naming rows not back yet
        self.published = 0
        self.orphaned = 0  # rows a dead worker held, sent to render again

    @classmethod
    def for_job(
        cls, cfg: Any, out: OutputDir, schema: pa.Schema, first_number: int, rows_per_task: int
    ) -> ShardBook:
        """The book of a job (``schema``: the results rows' own types). Each worker has as many
        numbers reserved as it may use before the driver hears of them: the shards its batches
        in flight can fill, plus one."""
        size = int(cfg.output.shard_size)
        reserve = int(cfg.workers.inflight_per_worker) * math.ceil(rows_per_task / size) + 1
        fields = [*schema, pa.field("key", pa.string())]
        spec = ShardSpec(out.uri, size, str(cfg.output.format), pa.schema(fields), cfg.output.caption_column)
        return cls(first_number, reserve, spec)

    def numbers_for(self, label: str) -> list[int]:
        mine = self.numbers.setdefault(label, [])
        while len(mine) < self.reserve:
            mine.append(self.next_number)
            self.next_number += 1
        return list(mine)

    def hold(self, row: dict[str, Any], source: dict[str, Any]) -> None:
        self.held.setdefault(row["worker"], {})[row["id"]] = _Held(row, source)

    def receive(self, reports: list[dict[str, Any]], label: str) -> list[list[dict[str, Any]]]:
        """Handle a batch's reports (after its rows are held); the rows to commit, per shard:
        a published shard's rows (``shard``, ``output`` set), or a dropped one's as failed."""
        self.parked.extend((label, rep) for rep in reports)
        ready, still = [], []
        for owner, rep in self.parked:
            held = self.held.get(owner, {})
            ids = rep.get("ids") or rep.get("dropped") or []
            if "shard" in rep and rep["shard"] in self.numbers.get(owner, []):
                self.numbers[owner].remove(rep["shard"])
            if not all(i in held for i in ids):
                still.append((owner, rep))
                continue
            rows = [held.pop(i).row for i in ids]
            for row in rows:
                if "shard" in rep:
                    row.update(shard=rep["shard"], output=rep["tar"])
                else:
                    row.update(status="failed", error=f"shard not written: {rep['error']}", output=None)
            self.published += "shard" in rep
            ready.append(rows)
        self.parked = still
        return ready

    def orphans(self, label: str) -> list[dict[str, Any]]:
        """The manifest rows a dead worker held in its open or unreported shards: they render
        again. Its reserved numbers are never handed out again."""
        held = self.held.pop(label, {})
        self.orphaned += len(held)
        self.numbers.pop(label, None)
        self.parked = [(owner, rep) for owner, rep in self.parked if owner != label]
        if held:
            log.warning(
                "%s held %d rendered row(s) in an unpublished shard: they render again", label, len(held)
            )
        return [h.source for h in held.values()]

    def pending(self) -> int:
        """Rows rendered but in no committed shard."""
        return sum(len(h) for h in self.held.values())

    def flush(
        self,
        workers: list[tuple[str, Any]],
        commit: Callable[[list[dict[str, Any]]], None],
        timeout_s: float = 600.0,
    ) -> None:
        """End of the job: each (label, actor) with nothing in flight publishes its open shard
        (``RenderWorker.publish_shard``), and the driver commits it. A worker that fails to
        leaves its rows to the next run."""
        import ray

        refs = {
            w.publish_shard.remote(self.numbers_for(label)): label
            for label, w in workers
            if self.held.get(label)
        }
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
        for ref in ready:
            try:
                reports = ray.get(ref)
            except Exception as exc:
                log.warning("%s could not publish its last shard: %s", refs[ref], type(exc).__name__)
                continue
            for rows in self.receive(reports, refs[ref]):
                commit(rows)
        if self.pending():
            log.warning(
                "%d rendered row(s) are in no published shard: they render on the next run", self.pending()
            )
