"""The results table: committed part files, resume state, compaction, summary.

``DIR/results/`` holds Parquet part files named ``part-<commit ns>-<seq>-<tag>.parquet``; the
name order is the commit order. Each finished batch is one part, and a crash loses at most the
batches in flight and never leaves half a file under a final name. Rule: for an id present more
than once (a failed row rendered again on resume, or ``--overwrite``), the last committed row
wins; ``compact`` applies the rule on disk, so after a job each id has exactly one row.

Every read and write goes through the job's :class:`jobs.output.OutputDir` (``--out`` resolved
once; its docstring says how a part appears complete under its final name on each storage).
"""

from __future__ import annotations

import os
import posixpath
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import last_row
from jobs.manifest import hash_ids
from jobs.output import OutputDir, open_output
from jobs.part_reads import CorruptPartError as CorruptPartError  # re-exported: a damaged part
from jobs.part_reads import read_schema as _read_schema
from jobs.part_reads import read_table as _read_table
from pipeline.params import GENERATION_PARAMS, ROW_PARAMS


def param_type(name: str) -> pa.DataType:
    """The results column type of a generation parameter (``pipeline.params``): int64 or float64."""
    return pa.int64() if GENERATION_PARAMS[name].kind == "int" else pa.float64()


#: Columns every results row has, in order; the manifest's unknown columns follow.
RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.string()),
        ("status", pa.string()),
        ("output", pa.string()),
        ("error", pa.string()),
        *((n, param_type(n)) for n in ROW_PARAMS),  # generation parameters: seed, num_frames, fps, ...
        ("vcut_mode", pa.string()),
        ("fingerprint", pa.string()),  # what determines the video (jobs.fingerprint)
        ("seconds", pa.float64()),
        ("encode_seconds", pa.float64()),
        ("macs", pa.int64()),
        ("macs_saved", pa.int64()),
        ("macs_saved_vcut", pa.int64()),
        ("macs_saved_step_cache", pa.int64()),
        ("macs_saved_guidance", pa.int64()),
        ("worker", pa.string()),
        ("worker_pid", pa.int64()),
        ("cache_hit", pa.bool_()),
        ("node", pa.string()),
        ("node_id", pa.string()),  # Ray node id (hex): nodes on one host share a hostname
        ("node_ip", pa.string()),
        ("frames", pa.int64()),
        ("denoise_seconds", pa.float64()),
        ("compile_seconds", pa.float64()),  # torch.compile's part of the row (None: not compiled)
        ("gpu_memory_bytes", pa.int64()),
        ("attempts", pa.int64()),
        ("shard", pa.int64()),  # layout webdataset: the shard holding the row's video
        ("output_generation", pa.string()),  # the --overwrite generation (jobs/generation.py)
        ("committed_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),  # the row's own end (set by its worker)
    ]
)
RESERVED_COLUMNS = set(RESULT_SCHEMA.names) - {"image", "id", *ROW_PARAMS}


def unify_schemas(schemas: list[pa.Schema]) -> pa.Schema:
    """One schema for parts written by different runs: arrow's permissive promotion (int32 and
    int64 to int64, int and float to float, null to anything ...), and ``string`` for a column
    whose types have no common type (text in one run, integers in another)."""
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    by_name: dict[str, list[pa.Field]] = {}
    for schema in schemas:
        for f in schema:
            by_name.setdefault(f.name, []).append(f)
    fields = []
    for name, found in by_name.items():
        try:
            fields.append(pa.unify_schemas([pa.schema([f]) for f in found], promote_options="permissive")[0])
        except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
            fields.append(pa.field(name, pa.string()))
    return pa.schema(fields)


def cast_column(col: pa.Array | pa.ChunkedArray, to: pa.DataType) -> pa.Array | pa.ChunkedArray:
    """``col`` as ``to``; to ``string`` also what arrow cannot cast (a value's ``str()``)."""
    try:
        return col.cast(to)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        if not (pa.types.is_string(to) or pa.types.is_large_string(to)):
            raise
        return pa.array([None if v is None else str(v) for v in col.to_pylist()], to)


def committed_schema(out_dir: str | OutputDir) -> pa.Schema | None:
    """The unified schema of the committed parts (None when there are none)."""
    out = open_output(out_dir)
    parts = _parts(out)
    return unify_schemas([_read_schema(out, p) for p in parts]) if parts else None


def _in_order(schema: pa.Schema) -> pa.Schema:
    """``schema``'s fields in one order: ``RESULT_SCHEMA``'s, then the carried columns."""
    known = [schema.field(n) for n in RESULT_SCHEMA.names if n in schema.names]
    return pa.schema(known + [f for f in schema if f.name not in RESULT_SCHEMA.names])


def conform_table(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns and types (missing ones as nulls)."""
    n = table.num_rows
    cols = [
        cast_column(table.column(f.name), f.type) if f.name in table.column_names else pa.nulls(n, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(cols, schema=schema)


def conform_parts(out_dir: str | OutputDir, schema: pa.Schema | None = None) -> pa.Schema | None:
    """Give every part one schema, so that standard readers (``pandas.read_parquet(DIR/results)``,
    ``pyarrow.parquet.read_table``, ``pyarrow.dataset``, which take the schema of one file)
    read every column and every value: ``schema`` (else the parts' unified one,
    ``unify_schemas``) merged with the parts'. A part that differs is rewritten under its own
    name, atomically (``OutputDir.write_table``): the commit order is kept, and a crash
    leaves each part whole, old or new. Returns the schema (None without parts)."""
    out = open_output(out_dir)
    parts = _parts(out)
    schemas = [_read_schema(out, p) for p in parts]
    if not schemas and schema is None:
        return None
    target = _in_order(unify_schemas(schemas + ([schema] if schema is not None else [])))
    for path, have in zip(parts, schemas, strict=True):
        if not have.equals(target):
            out.write_table(conform_table(_read_table(out, path), target), path)
    return target


class ResultWriter:
    """Commits result rows, one small Parquet part per call, atomically.

    Every part of ``results/`` has one schema (``conform_parts``): the committed parts' and
    this manifest's types unified (int32 and int64 to int64, int and float to float, null to
    anything; types with no common type, text and integers, to text), carried columns of earlier
    runs kept (null in this run's rows), a column new in this run added to the old parts. So a
    type change between runs never breaks the folder for any Parquet reader and never drops a
    value.
    """

    def __init__(
        self,
        out_dir: str | OutputDir,
        carried_schema: pa.Schema | None = None,
        merge_every: int = 256,
        merge_rows: int = 8192,
    ):
        self.out = open_output(out_dir)
        # merge this writer's parts every ``merge_every`` parts or ``merge_rows`` rows (the rows
        # it holds in memory until then: bounded whatever the part sizes)
        self.merge_every, self.merge_rows = merge_every, merge_rows
        self._recent_rows = 0
        self._recent: list[tuple[str, pa.Table]] = []  # parts since the last merge, as written
        self.dir = self.out.path("results")
        self.out.makedirs("results")
        carried = [f for f in (carried_schema or []) if f.name not in RESULT_SCHEMA.names]
        #: The rows' own types (the manifest's): what ``commit`` receives.
        self.input_schema = pa.schema(list(RESULT_SCHEMA) + carried)
        #: The types every part is written with: the committed parts' and this manifest's
        #: unified (``conform_parts`` rewrites the parts that differ, once, before any commit).
        self.schema = conform_parts(self.out, self.input_schema)
        self._tag = uuid.uuid4().hex[:8]
        self._seq = 0

    def table(self, rows: list[dict[str, Any]]) -> pa.Table:
        """The rows as a table of ``schema`` (a carried column that does not cast: as text)."""
        return conform_table(pa.Table.from_pylist(rows, schema=self.input_schema), self.schema)

    def commit(self, rows: list[dict[str, Any]]) -> str:
        now = time.time_ns()
        for row in rows:
            row["committed_at"] = now // 1000
        table = self.table(rows)
        self._seq += 1
        name = f"part-{now:020d}-{self._seq:06d}-{self._tag}.parquet"
        path = self.out.path("results", name)
        self.out.write_table(table, path)  # one request on an object store
        self._recent.append((path, table))
        self._recent_rows += table.num_rows
        if len(self._recent) >= self.merge_every or self._recent_rows >= self.merge_rows:
            self.merge()
        return name

    def merge(self) -> None:
        """Merge the parts this writer committed since the last merge into few files, from the
        tables it still holds (nothing is read back): per run of parts with one schema, one
        put of the merged part and one bulk delete of the inputs."""
        recent, self._recent, self._recent_rows = self._recent, [], 0
        masks = last_row.last_of_id([hash_ids(t.column("id").to_pylist()) for _, t in recent])
        start = 0
        while start < len(recent):
            end = start + 1
            while end < len(recent) and recent[end][1].schema.equals(recent[start][1].schema):
                end += 1
            if end - start > 1:
                run = zip(recent[start:end], masks[start:end], strict=True)
                kept = [t.filter(pa.array(m)) for (_, t), m in run]
                _replace(self.out, [p for p, _ in recent[start:end]], pa.concat_tables(kept))
            start = end


def _parts(out_dir: str | OutputDir) -> list[str]:
    out = open_output(out_dir)
    return sorted(
        out.path("results", n)
        for n in out.listdir("results")
        if n.startswith("part-") and n.endswith(".parquet")
    )


def _latest(out: OutputDir, parts: list[str]) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per part: the last-row-of-its-id mask, the id hashes and whether the row is ``ok``
    (``jobs.last_row.latest``: ``id`` and ``status`` read one part at a time)."""
    read = lambda path: _read_table(out, path, columns=["id", "status"])  # noqa: E731
    return last_row.latest(parts, read, release_memory)


def done_ids(out_dir: str | OutputDir) -> np.ndarray:
    """Sorted 64-bit hashes of the ids whose latest committed row is ``ok`` (8 bytes per id;
    read streaming, ``id`` and ``status`` only)."""
    out = open_output(out_dir)
    masks, hashes, oks = _latest(out, _parts(out))
    ok = []
    while hashes:  # each part's hashes freed as its ok ones are taken
        ok.append(hashes.pop()[masks.pop() & oks.pop()])
    done = np.concatenate(ok[::-1]) if ok else np.zeros(0, dtype=np.uint64)
    del ok
    done.sort()
    return done


def is_done(hashes: np.ndarray, done: np.ndarray) -> np.ndarray:
    if done.size == 0:
        return np.zeros(hashes.size, dtype=bool)
    pos = np.clip(np.searchsorted(done, hashes), 0, done.size - 1)
    return done[pos] == hashes


def compact(out_dir: str | OutputDir, target_rows: int = 100_000, parts: list[str] | None = None) -> int:
    """Apply the last-row-wins rule on disk and merge small parts, one file at a time.

    Consecutive parts with one schema merge into a part named after the last of them, so the
    commit order is kept; the inputs are deleted only after the merged part is complete under
    its final name. A crash in between leaves rows that the rule (and the next compaction) resolves.
    ``parts`` (consecutive in commit order) limits the work to those files. Returns the number
    of superseded rows removed.
    """
    out = open_output(out_dir)
    if parts is None:  # a folder written before parts had one schema: one schema now
        conform_parts(out)
    parts = _parts(out) if parts is None else sorted(parts)
    masks = _latest(out, parts)[0]
    dropped = 0
    groups: list[list[int]] = []
    schema = None
    rows = 0
    for i, path in enumerate(parts):
        part_schema = _read_schema(out, path)
        n = int(masks[i].sum())
        if groups and part_schema.equals(schema) and rows + n <= target_rows:
            groups[-1].append(i)
            rows += n
        else:
            groups.append([i])
            schema, rows = part_schema, n
    for group in groups:
        kept = sum(int(masks[i].sum()) for i in group)
        total = sum(masks[i].size for i in group)
        if len(group) == 1 and kept == total:
            continue
        dropped += total - kept
        tables = [_read_table(out, parts[i]).filter(pa.array(masks[i])) for i in group]
        _replace(out, [parts[i] for i in group], pa.concat_tables(tables))
        del tables
        release_memory()
    return dropped


def release_memory() -> None:
    """Hand the memory pyarrow freed back to the system. Its default pool (mimalloc in the
    wheels) keeps freed pages for reuse; after reading and writing parts of up to 100,000 rows
    one after another, the driver's RSS grew with every part (~25 MiB per 100,000 rows
    compacted: 316 MiB for 400,000 rows instead of 221 with the system allocator). Called
    between parts, it keeps the RSS at one part's worth."""
    pa.default_memory_pool().release_unused()


def _replace(out: OutputDir, parts: list[str], merged: pa.Table) -> None:
    """Write ``merged`` (the kept rows of ``parts``, consecutive in commit order) as one part
    named after the last of them, then delete ``parts`` (in as few requests as the store
    allows). A crash in between leaves duplicate rows, which the last-row-wins rule resolves."""
    last = (os.path if out.local else posixpath).basename(parts[-1])
    stem = last[: -len(".parquet")]
    if merged.num_rows:
        out.write_table(merged, out.path("results", f"{stem}-c{uuid.uuid4().hex[:6]}.parquet"))
    out.remove_many(parts)


def _field(schema: pa.Schema, name: str) -> pa.Field | None:
    if name in schema.names:
        return schema.field(name)
    return RESULT_SCHEMA.field(name) if name in RESULT_SCHEMA.names else None


def iter_results(out_dir: str | OutputDir, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The results table, one row per id (the last committed row wins), one table per part,
    read with ``columns`` only (None: all). Memory: one part at a time, plus 17 bytes a row.
    A column no part has comes as nulls of its results type (unknown names are left out)."""
    out = open_output(out_dir)
    parts = _parts(out)
    if not parts:
        return
    masks = _latest(out, parts)[0]
    schema = unify_schemas([_read_schema(out, p) for p in parts])
    if columns is not None:
        schema = pa.schema([f for f in (_field(schema, c) for c in columns) if f is not None])
    for path, mask in zip(parts, masks, strict=True):
        if not mask.any():
            continue
        release_memory()  # the previous part's buffers (see release_memory)
        names = _read_schema(out, path).names
        t = _read_table(out, path, [f.name for f in schema if f.name in names]).filter(pa.array(mask))
        cols = [
            cast_column(t.column(f.name), f.type)
            if f.name in t.column_names
            else pa.nulls(t.num_rows, f.type)
            for f in schema
        ]
        yield pa.table(cols, schema=schema)


def iter_parts(out_dir: str | OutputDir, columns: list[str]) -> Iterator[pa.Table]:
    """Every committed row, superseded ones too, one part at a time in commit order, with the
    ``columns`` each part has (no last-row-wins masks: nothing is read but ``columns``)."""
    out = open_output(out_dir)
    for path in _parts(out):
        release_memory()  # the previous part's buffers
        names = _read_schema(out, path).names
        yield _read_table(out, path, [c for c in columns if c in names])


def read_results(out_dir: str | OutputDir, columns: list[str] | None = None) -> pa.Table:
    """The results table, one row per id (the last committed row wins), with ``columns`` only
    (None: all; see :func:`iter_results`)."""
    tables = list(iter_results(out_dir, columns))
    if tables:
        return pa.concat_tables(tables)
    empty = RESULT_SCHEMA if columns is None else pa.schema([f for f in RESULT_SCHEMA if f.name in columns])
    return empty.empty_table()


def summarize(
    out_dir: str | OutputDir, *, manifest_rows: int, rendered: int, skipped: int, wall_seconds: float
) -> dict:
    """Counts over the whole results table plus this run's throughput."""
    out = open_output(out_dir)
    saved_cols = ["macs_saved", "macs_saved_vcut", "macs_saved_step_cache"]
    ok = failed = 0
    macs = 0
    saved = dict.fromkeys(saved_cols, 0)
    for part in iter_results(out, ["status", *saved_cols, "macs"]):  # streamed, 5 columns
        is_ok = pc.fill_null(pc.equal(part.column("status"), "ok"), False)
        n_ok = int(pc.sum(is_ok).as_py() or 0)
        ok += n_ok
        failed += part.num_rows - n_ok
        for col in saved_cols:
            saved[col] += int(pc.sum(pc.filter(part.column(col), is_ok)).as_py() or 0)
        macs += int(pc.sum(pc.filter(part.column("macs"), is_ok)).as_py() or 0)
    return {
        "manifest_rows": manifest_rows,
        "ok": ok,
        "failed": failed,
        "rendered_this_run": rendered,
        "skipped_already_ok": skipped,
        "wall_seconds": round(wall_seconds, 3),
        "videos_per_second": round(rendered / wall_seconds, 4) if wall_seconds > 0 else 0.0,
        "total_macs": macs,
        "total_macs_saved": saved["macs_saved"],
        "total_macs_saved_vcut": saved["macs_saved_vcut"],
        "total_macs_saved_step_cache": saved["macs_saved_step_cache"],
        "host": socket.gethostname(),
    }
