"""The results: safe output names, committed part files, resume state, compaction, summary.

``DIR/results/`` holds Parquet part files named ``part-<commit ns>-<seq>-<tag>.parquet``; the
name order is the commit order. Each finished batch is one part, written under a hidden
temporary name (readers skip names starting with ``.``) and renamed, so a crash loses at most
the batches in flight and never leaves half a file. Rule: for an id present more than once
(a failed row rendered again on resume, or ``--overwrite``), the last committed row wins;
``compact`` applies the rule on disk, so after a job each id has exactly one row.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.manifest import GENERATION_COLUMNS, hash_ids

MAX_NAME = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

#: Columns every results row has, in order; the manifest's unknown columns follow.
RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.string()),
        ("status", pa.string()),
        ("output", pa.string()),
        ("error", pa.string()),
        ("seed", pa.int64()),
        ("num_frames", pa.int64()),
        ("fps", pa.int64()),
        ("vcut_mode", pa.string()),
        ("seconds", pa.float64()),
        ("encode_seconds", pa.float64()),
        ("macs", pa.int64()),
        ("macs_saved", pa.int64()),
        ("worker", pa.string()),
        ("worker_pid", pa.int64()),
        ("cache_hit", pa.bool_()),
        ("node", pa.string()),
        ("frames", pa.int64()),
        ("denoise_seconds", pa.float64()),
        ("num_inference_steps", pa.int64()),
        ("gpu_memory_bytes", pa.int64()),
        ("motion_bucket_id", pa.int64()),
        ("noise_aug_strength", pa.float64()),
        ("min_guidance_scale", pa.float64()),
        ("max_guidance_scale", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("attempts", pa.int64()),
        ("committed_at", pa.timestamp("us", tz="UTC")),
    ]
)
RESERVED_COLUMNS = set(RESULT_SCHEMA.names) - {"image", "id", *GENERATION_COLUMNS}


def safe_name(row_id: str) -> str:
    """A file name for an id that stays inside its folder: only ``[A-Za-z0-9._-]``, no leading
    dot, at most MAX_NAME characters. When the id had to change, a hash of the original id is
    appended so that two ids never share a file."""
    name = _UNSAFE.sub("_", row_id).lstrip(".")
    if name == row_id and 0 < len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{name[: MAX_NAME - 13]}-{digest}" if name else digest


def video_path(out_dir: str, row_id: str, ext: str) -> str:
    path = os.path.join(os.path.abspath(out_dir), "videos", f"{safe_name(row_id)}.{ext}")
    assert os.path.dirname(path) == os.path.join(os.path.abspath(out_dir), "videos")
    return path


def results_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "results")


class ResultWriter:
    """Commits result rows, one small Parquet part per call, atomically (temp + rename)."""

    def __init__(self, out_dir: str, carried_schema: pa.Schema | None = None, merge_every: int = 256):
        self.out_dir = out_dir
        self.merge_every = merge_every  # merge this writer's small parts every N commits
        self._recent: list[str] = []
        self.dir = results_dir(out_dir)
        os.makedirs(self.dir, exist_ok=True)
        fields = list(RESULT_SCHEMA) + [
            f for f in (carried_schema or []) if f.name not in RESULT_SCHEMA.names
        ]
        self.schema = pa.schema(fields)
        self._tag = uuid.uuid4().hex[:8]
        self._seq = 0

    def commit(self, rows: list[dict[str, Any]]) -> str:
        now = time.time_ns()
        for row in rows:
            row["committed_at"] = now // 1000
        table = pa.Table.from_pylist(rows, schema=self.schema)
        self._seq += 1
        name = f"part-{now:020d}-{self._seq:06d}-{self._tag}.parquet"
        path = os.path.join(self.dir, name)
        _atomic_write(table, path)
        self._recent.append(path)
        if len(self._recent) >= self.merge_every:
            self.merge()
        return name

    def merge(self) -> None:
        """Merge the parts this writer committed since the last merge into one (few files)."""
        compact(self.out_dir, parts=self._recent)
        self._recent = []


def _atomic_write(table: pa.Table, path: str) -> None:
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp")
    with open(tmp, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _parts(out_dir: str) -> list[str]:
    folder = results_dir(out_dir)
    if not os.path.isdir(folder):
        return []
    return sorted(
        os.path.join(folder, n)
        for n in os.listdir(folder)
        if n.startswith("part-") and n.endswith(".parquet")
    )


def clean_temporaries(out_dir: str) -> int:
    """Remove hidden temporary files left by a crash (results and videos). Returns the count."""
    removed = 0
    for sub in ("results", "videos"):
        folder = os.path.join(out_dir, sub)
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name.startswith(".") and ".tmp" in name:
                os.remove(os.path.join(folder, name))
                removed += 1
    return removed


def _latest_mask(parts: list[str]) -> tuple[list[np.ndarray], list[pa.Table]]:
    """Per part, a mask of the rows that are the last committed row of their id."""
    tables = [pq.read_table(p, columns=["id", "status"]) for p in parts]
    hashes = [hash_ids(t.column("id").to_pylist()) for t in tables]
    if not hashes:
        return [], []
    allh = np.concatenate(hashes)
    position = np.arange(allh.size)
    order = np.lexsort((position, allh))  # by hash, then commit position
    last = np.ones(allh.size, dtype=bool)
    sorted_h = allh[order]
    last_sorted = np.ones(allh.size, dtype=bool)
    last_sorted[:-1] = sorted_h[:-1] != sorted_h[1:]
    last[order] = last_sorted
    masks, start = [], 0
    for h in hashes:
        masks.append(last[start : start + h.size])
        start += h.size
    return masks, tables


def done_ids(out_dir: str) -> np.ndarray:
    """Sorted 64-bit hashes of the ids whose latest committed row is ``ok`` (8 bytes per id)."""
    masks, tables = _latest_mask(_parts(out_dir))
    ok = []
    for mask, table in zip(masks, tables, strict=True):
        status = pc.equal(table.column("status"), "ok").to_numpy(zero_copy_only=False)
        ok.append(hash_ids(pc.filter(table.column("id"), pa.array(mask & status)).to_pylist()))
    return np.sort(np.concatenate(ok)) if ok else np.zeros(0, dtype=np.uint64)


def is_done(hashes: np.ndarray, done: np.ndarray) -> np.ndarray:
    if done.size == 0:
        return np.zeros(hashes.size, dtype=bool)
    pos = np.clip(np.searchsorted(done, hashes), 0, done.size - 1)
    return done[pos] == hashes


def compact(out_dir: str, target_rows: int = 100_000, parts: list[str] | None = None) -> int:
    """Apply the last-row-wins rule on disk and merge small parts, one file at a time.

    Consecutive parts with one schema merge into a part named after the last of them, so the
    commit order is kept; the inputs are deleted only after the merged part is renamed into
    place. A crash in between leaves rows that the rule (and the next compaction) resolves.
    ``parts`` (consecutive in commit order) limits the work to those files. Returns the number
    of superseded rows removed.
    """
    parts = _parts(out_dir) if parts is None else sorted(parts)
    masks, _ = _latest_mask(parts)
    dropped = 0
    groups: list[list[int]] = []
    schema = None
    rows = 0
    for i, path in enumerate(parts):
        part_schema = pq.read_schema(path)
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
        last = os.path.basename(parts[group[-1]])
        tables = [pq.read_table(parts[i]).filter(pa.array(masks[i])) for i in group]
        merged = pa.concat_tables(tables)
        stem = last[: -len(".parquet")]
        if merged.num_rows:
            _atomic_write(
                merged, os.path.join(results_dir(out_dir), f"{stem}-c{uuid.uuid4().hex[:6]}.parquet")
            )
        for i in group:
            os.remove(parts[i])
    return dropped


def read_results(out_dir: str, columns: list[str] | None = None) -> pa.Table:
    """The results table, one row per id (the last committed row wins)."""
    parts = _parts(out_dir)
    if not parts:
        return RESULT_SCHEMA.empty_table()
    masks, _ = _latest_mask(parts)
    schema = pa.unify_schemas([pq.read_schema(p) for p in parts], promote_options="permissive")
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    tables = []
    for path, mask in zip(parts, masks, strict=True):
        t = pq.read_table(path).filter(pa.array(mask))
        cols = [
            t.column(f.name).cast(f.type) if f.name in t.column_names else pa.nulls(t.num_rows, f.type)
            for f in schema
        ]
        tables.append(pa.table(cols, schema=schema))
    return pa.concat_tables(tables)


def summarize(out_dir: str, *, manifest_rows: int, rendered: int, skipped: int, wall_seconds: float) -> dict:
    """Counts over the whole results table plus this run's throughput."""
    status = read_results(out_dir, ["status", "macs_saved", "macs"]) if _parts(out_dir) else None
    ok = failed = 0
    macs_saved = macs = 0
    if status is not None and status.num_rows:
        is_ok = pc.equal(status.column("status"), "ok")
        ok = int(pc.sum(is_ok).as_py() or 0)
        failed = status.num_rows - ok
        macs_saved = int(pc.sum(pc.filter(status.column("macs_saved"), is_ok)).as_py() or 0)
        macs = int(pc.sum(pc.filter(status.column("macs"), is_ok)).as_py() or 0)
    return {
        "manifest_rows": manifest_rows,
        "ok": ok,
        "failed": failed,
        "rendered_this_run": rendered,
        "skipped_already_ok": skipped,
        "wall_seconds": round(wall_seconds, 3),
        "videos_per_second": round(rendered / wall_seconds, 4) if wall_seconds > 0 else 0.0,
        "total_macs": macs,
        "total_macs_saved": macs_saved,
        "host": socket.gethostname(),
    }
