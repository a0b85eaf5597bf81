"""What the job report shows, computed from the committed results: counts, rates, the
throughput and render-time series, the failures grouped by message, and which videos go on
the contact sheet. Streamed: the results are read one part at a time and only a few numbers a
row are kept (``tests/test_memory.py``). :mod:`jobs.report` renders it."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.text import first_line

#: The results columns the report reads (those a results table lacks are treated as empty).
COLUMNS = ["id", "status", "output", "error", "seconds", "encode_seconds", "macs", "macs_saved",
           "macs_saved_vcut", "macs_saved_step_cache", "worker", "node", "vcut_mode",
           "shard", "finished_at", "committed_at"]  # fmt: skip
SAMPLE = 24  # videos on the contact sheet
MAX_WORKER_LINES = 8
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PATH = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*://|/)[^\s,;:'\"()]+")
_NUMBER = re.compile(r"\b\d+(?:\.\d+)?\b")


def error_group(message: str | None) -> str:
    """The group of an error message: its first line with quoted text, paths and numbers
    replaced, so that the same failure on different rows falls into one group."""
    line = first_line(message, "(no message)")
    line = _QUOTED.sub("'…'", line)
    line = _PATH.sub("<path>", line)
    return _NUMBER.sub("N", line)[:300]


def _column(table: pa.Table, name: str, dtype: Any) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan if dtype is float else None, dtype=dtype)
    col = table.column(name)
    if dtype is float:
        return col.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(float)
    return np.array(col.to_pylist(), dtype=object)


def _timestamps(table: pa.Table, name: str) -> np.ndarray:
    """Seconds since the epoch (NaN where missing)."""
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    micros = table.column(name).cast(pa.int64())
    return micros.to_numpy(zero_copy_only=False).astype(float) / 1e6


def _sample_indices(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when n <= k)."""
    if n <= k:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, k)})


class _Scan:
    """What :func:`report_data` keeps while the results stream by, one part at a time: a few
    numbers a row (times, ok, worker code; id for ok rows), never the part's Python objects."""

    def __init__(self) -> None:
        self.ok: list[np.ndarray] = []
        self.seconds: list[np.ndarray] = []
        self.t0 = np.inf  # the first row's start: its finish less its render and encode seconds
        self.finished: list[np.ndarray] = []
        self.worker: list[np.ndarray] = []
        self.codes: dict[str, int] = {}  # worker name -> code
        self.nodes: dict[str, set[str]] = {}  # worker name -> its nodes
        self.macs = dict.fromkeys(("macs", "macs_saved", "macs_saved_vcut", "macs_saved_step_cache"), 0.0)
        self.modes: set[str] = set()
        self.groups: dict[str, dict[str, Any]] = {}  # failures by error group
        self.ok_ids: list[pa.Array] = []  # ok rows: id, for the contact sheet
        self.ok_in_shard: list[np.ndarray] = []

    def add(self, table: pa.Table) -> None:
        n = table.num_rows
        status = _text(table, "status")
        ok_arrow = pc.fill_null(pc.equal(status, "ok"), False)
        ok = ok_arrow.to_numpy(zero_copy_only=False).astype(bool)
        self.ok.append(ok)
        seconds = _column(table, "seconds", float)
        self.seconds.append(seconds)
        encode = np.nan_to_num(_column(table, "encode_seconds", float))
        finished = _timestamps(table, "finished_at")
        finished = np.where(np.isnan(finished), _timestamps(table, "committed_at"), finished)
        self.finished.append(finished)
        has_t = ~np.isnan(finished)
        if has_t.any():
            starts = finished[has_t] - np.nan_to_num(seconds[has_t]) - encode[has_t]
            self.t0 = min(self.t0, float(starts.min()))
        # workers by code: "" and null are the driver's rows; each name's nodes
        worker = pc.if_else(
            pc.fill_null(pc.equal(_text(table, "worker"), ""), True), "(driver)", _text(table, "worker")
        )
        pairs = pa.table({"w": worker, "n": _text(table, "node")}).group_by(["w", "n"]).aggregate([])
        for name, node in zip(pairs.column("w").to_pylist(), pairs.column("n").to_pylist(), strict=True):
            self.codes.setdefault(name, len(self.codes))
            if node:
                self.nodes.setdefault(name, set()).add(str(node))
        names = pa.array(list(self.codes), pa.string())
        self.worker.append(
            pc.index_in(worker, value_set=names).to_numpy(zero_copy_only=False).astype(np.int32)
        )
        for key in self.macs:
            self.macs[key] += float(np.nansum(_column(table, key, float)[ok]))
        modes = pc.unique(pc.filter(_text(table, "vcut_mode"), ok_arrow)).to_pylist()
        self.modes.update(str(m) for m in modes if m)
        ids = _text(table, "id")
        failed = pc.invert(ok_arrow)
        for row_id, error in zip(
            pc.filter(ids, failed).to_pylist(),
            pc.filter(_text(table, "error"), failed).to_pylist(),
            strict=True,
        ):
            key = error_group(error)
            g = self.groups.setdefault(key, {"group": key, "count": 0, "example": error or "", "ids": []})
            g["count"] += 1
            if len(g["ids"]) < 5:
                g["ids"].append(row_id)
        self.ok_ids.extend(pc.filter(ids, ok_arrow).chunks if n else [])
        self.ok_in_shard.append(~np.isnan(_column(table, "shard", float)[ok]))


def _text(table: pa.Table, name: str) -> pa.ChunkedArray:
    """A column as text (nulls where the table lacks it)."""
    if name not in table.column_names:
        return pa.chunked_array([pa.nulls(table.num_rows, pa.string())])
    return table.column(name).cast(pa.string())


def _since(finished: np.ndarray, mask: np.ndarray, t0: float, scale: float) -> np.ndarray:
    """``(finished[mask] - t0) / scale``, sorted, computed in one array (no temporaries)."""
    xs = finished[mask]
    xs -= t0
    xs /= scale
    xs.sort()
    return xs


def _nanmean(xs: np.ndarray) -> float:
    """``np.nanmean(xs)`` computed in ``xs`` itself (numpy's makes a copy with NaN as 0: the
    same sum of the same values, so the same result)."""
    nan = np.isnan(xs)
    xs[nan] = 0.0
    return float(xs.sum() / (xs.size - int(nan.sum())))


def _cat(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
    """One array of the parts' ``arrays``, which are emptied (a part's copy freed at once)."""
    whole = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
    arrays.clear()
    return whole


def report_data(
    source: pa.Table | Callable[[list[str]], Iterable[pa.Table]],
    summary: dict | None = None,
    *,
    sample: int = SAMPLE,
    every_row: Callable[[list[str]], Iterable[pa.Table]] | None = None,
) -> dict[str, Any]:
    """Everything the page shows, from the results (one row per id) and summary.json.

    ``source``: the results table, or ``columns -> tables`` (``jobs.results.iter_results``),
    read one part at a time so that memory holds a few numbers a row, not the table. The
    ``output`` of the contact sheet's rows is read afterwards from ``every_row`` (``columns ->
    tables`` of every committed row in commit order, superseded ones too: the last row of an
    id wins; ``jobs.results.iter_parts``; default ``source``), ``id`` and ``output`` only.

    A summary counts as current when its ok/failed counts match the table (a finished job);
    then its wall time and throughput are the run's own. Otherwise (a running or interrupted
    job, or none) wall time is the span of the rows' timestamps: the first row's start (its
    finish less its render and encode seconds) to the last finish, and videos per hour are
    the ok rows over that span. A row's finish is ``finished_at``, else ``committed_at``."""
    parts = (lambda columns: [source]) if isinstance(source, pa.Table) else source
    scan = _Scan()
    for part in parts([c for c in COLUMNS if c != "output"]):
        scan.add(part)
    ok_mask = _cat(scan.ok, bool)
    n, ok = ok_mask.size, int(ok_mask.sum())
    failed = n - ok
    seconds, finished = _cat(scan.seconds, float), _cat(scan.finished, float)
    workers = _cat(scan.worker, np.int32)
    current = bool(summary) and (summary.get("ok"), summary.get("failed")) == (ok, failed)

    has_t = ~np.isnan(finished)
    t0 = t1 = None
    if has_t.any():
        t0, t1 = scan.t0, float(np.fmax.reduce(finished))  # the largest, NaN skipped
    if current:
        wall = float(summary.get("wall_seconds") or 0.0)
        per_hour = float(summary.get("videos_per_second") or 0.0) * 3600
        wall_source = "summary.json (this run)"
    else:
        wall = (t1 - t0) if t0 is not None else 0.0
        per_hour = ok / wall * 3600 if wall > 0 else 0.0
        wall_source = "row timestamps (first start to last finish)"
    manifest_rows = summary.get("manifest_rows") if summary else None
    pending = max(0, int(manifest_rows) - n) if manifest_rows is not None else None

    macs = {k: int(v) for k, v in scan.macs.items()}

    # throughput: ok videos per time bin, and the cumulative count per worker
    throughput: dict[str, Any] = {"edges": [], "per_hour": [], "series": []}
    t_ok = has_t & ok_mask
    if t_ok.any() and t0 is not None:
        span = max(t1 - t0, 1e-3)
        unit, scale = ("minutes", 60.0) if span < 3 * 3600 else ("hours", 3600.0)
        bins = int(min(40, max(1, t_ok.sum() // 2)))
        edges = np.linspace(0.0, span / scale, bins + 1)
        every = _since(finished, t_ok, t0, scale)
        counts, _ = np.histogram(every, bins=edges)
        width_h = (edges[1] - edges[0]) * scale / 3600
        throughput.update(unit=unit, edges=edges.tolist(), per_hour=(counts / width_h).tolist())
        present = set(np.unique(workers[t_ok]).tolist())
        names = ["all workers"] + sorted(w for w, c in scan.codes.items() if c in present)
        for name in names[: MAX_WORKER_LINES + 1]:
            if name == "all workers":
                xs = every
            else:
                xs = _since(finished, t_ok & (workers == scan.codes[name]), t0, scale)
            idx = _sample_indices(xs.size, 300)
            throughput["series"].append((name, xs[idx].tolist(), [float(i + 1) for i in idx]))
        throughput["hidden_workers"] = max(0, len(names) - 1 - MAX_WORKER_LINES)
        del every, xs

    per_worker = []
    starts = np.nan_to_num(seconds)  # each row's start: its finish less its seconds
    np.subtract(finished, starts, out=starts)
    for name in sorted(scan.codes):
        mask = workers == scan.codes[name]
        wok = mask & ok_mask
        timed = mask & has_t
        active = 0.0
        if timed.any():  # the first start to the last finish
            last = np.max(finished, where=timed, initial=-np.inf)
            active = float(last - np.min(starts, where=timed, initial=np.inf))
        per_worker.append(
            {
                "worker": name,
                "node": ", ".join(sorted(scan.nodes.get(name, ()))),
                "ok": int(wok.sum()),
                "failed": int(mask.sum() - wok.sum()),
                "mean_seconds": _nanmean(seconds[wok]) if wok.any() else None,
                "videos_per_hour": int(wok.sum()) / active * 3600 if active > 0 else None,
            }
        )

    del workers, has_t, t_ok, starts
    ok_seconds = seconds[ok_mask & ~np.isnan(seconds)]
    hist: dict[str, Any] = {"edges": [], "counts": []}
    if ok_seconds.size:
        lo, hi = float(ok_seconds.min()), float(ok_seconds.max())
        counts, edges = np.histogram(
            ok_seconds, bins=min(30, max(1, ok_seconds.size // 2)), range=(lo, hi if hi > lo else lo + 1e-3)
        )
        hist = {
            "edges": edges.tolist(),
            "counts": counts.tolist(),
            "p50": float(np.percentile(ok_seconds, 50)),
            "p95": float(np.percentile(ok_seconds, 95)),
            "mean": float(ok_seconds.mean()),
        }

    failures = sorted(scan.groups.values(), key=lambda g: (-g["count"], g["group"]))

    # the contact sheet: ok rows in finish order (then id), ``sample`` of them evenly spread;
    # their outputs are read afterwards, for those rows only
    ok_finished = finished[ok_mask]
    ok_finished[np.isnan(ok_finished)] = np.inf
    del finished, ok_seconds  # what the sort does not need, freed before it
    ids = pa.chunked_array(scan.ok_ids, pa.string())
    scan.ok_ids.clear()
    keys = pa.table({"f": ok_finished, "id": ids})
    order = pc.sort_indices(keys, [("f", "ascending"), ("id", "ascending")])
    picked = np.array([order[j].as_py() for j in _sample_indices(ok, sample)], dtype=np.int64)
    del keys, order, ok_finished
    in_shard = _cat(scan.ok_in_shard, bool)[picked]
    ok_seconds = seconds[np.flatnonzero(ok_mask)[picked]]
    contact = [
        {
            "id": ids[int(i)].as_py(),
            "in_shard": bool(in_shard[j]),
            "seconds": None if np.isnan(ok_seconds[j]) else float(ok_seconds[j]),
        }
        for j, i in enumerate(picked)
    ]
    modes = sorted(scan.modes)
    # the per-row arrays are not needed any more: freed before the second pass over the parts
    del scan, ids, ok_mask, seconds
    outputs = _outputs(every_row or parts, [c["id"] for c in contact]) if contact else {}
    for c in contact:
        c["output"] = outputs.get(c["id"])
    return {
        "state": "finished" if current else ("running or interrupted" if n else "no rows yet"),
        "rows": manifest_rows if manifest_rows is not None else n,
        "results": n,
        "ok": ok,
        "failed": failed,
        "pending": pending,
        "wall_seconds": wall,
        "wall_source": wall_source,
        "videos_per_hour": per_hour,
        "started": t0,
        "last_finished": t1,
        "macs": macs,
        "vcut_modes": modes,
        "throughput": throughput,
        "workers": per_worker,
        "render_seconds": hist,
        "failures": failures,
        "contact": contact,
    }


def _outputs(parts: Callable[[list[str]], Iterable[pa.Table]], ids: list[str]) -> dict[str, str | None]:
    """``output`` of the rows ``ids``: the last of each id in ``parts`` (``id``, ``output`` only)."""
    found: dict[str, str | None] = {}
    wanted = pa.array(ids, pa.string())
    for part in parts(["id", "output"]):
        if "output" not in part.column_names:
            continue
        rows = part.filter(pc.is_in(part.column("id").cast(pa.string()), value_set=wanted))
        found.update(zip(rows.column("id").to_pylist(), rows.column("output").to_pylist(), strict=True))
    return found


# -- HTML ------------------------------------------------------------------------------------
