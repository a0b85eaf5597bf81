"""``output.layout: webdataset``: videos in WebDataset tar shards that the workers write.

``DIR/shards/`` holds, per shard ``N``: ``NNNNN.tar`` (per sample ``<key>.<format>``,
``<key>.json`` and, with ``output.caption_column``, ``<key>.txt``), ``NNNNN.parquet`` (the
same rows, with their ``key``) and ``NNNNN_stats.json`` (counts, bytes, seconds, worker).

**Workers write the shards** (``jobs.shard_writer.WorkerShards``); no video byte goes through
the driver. Each worker keeps one open shard across its batches: every video it renders is encoded to a
local temporary file and appended to the open shard's spool (local output: a hidden
``storage.temporary_name`` in ``DIR/shards/``; object stores: a local temporary file), and the
row's result goes back to the driver without the video. Once the shard holds
``output.shard_size`` samples, has been open ``output.shard_max_age_s`` seconds (default 600:
what a worker's death can cost in renders is bounded), or when the driver asks at the end of
the job, the worker publishes it, in this order:

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

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import generation as generations
from jobs.generation import Generation
from jobs.manifest import ManifestError, hash_ids
from jobs.output import OutputDir, open_output
from jobs.shard_writer import REPORTS, SHARD_FILE, SUBDIR, ShardSpec, sample_key, shard_file
from pipeline.storage import is_temporary

__all__ = [
    "SUBDIR",
    "ShardBook",
    "ShardSpec",
    "check_layout",
    "pop_reports",
    "sample_key",
    "scan",
    "shard_file",
]

log = logging.getLogger("jobs")


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
        m = SHARD_FILE.match(name)
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
        spec = ShardSpec(
            out.uri,
            size,
            str(cfg.output.format),
            pa.schema(fields),
            cfg.output.caption_column,
            float(cfg.output.shard_max_age_s),
        )
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
