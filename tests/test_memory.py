"""The driver's memory at the end of a job does not grow with the rows (issue 18 point 4).

The report (``DIR/report.html``, written at the end of every job) used to read the whole
results table and turn six of its columns into Python objects: ~800 bytes a row, 700 MiB of
the driver's 1,081 MiB peak at a million rows. It now streams the parts (``iter_results``)
and keeps a few numbers a row; these tests show it with Python's own allocation tracer
(deterministic, no RSS, no timing)."""

from __future__ import annotations

import json
import tracemalloc
from datetime import datetime, timezone

import pytest

from jobs import output, report, results

PARTS, PART_ROWS = 8, 5_000
T0 = 1_700_000_000.0


def _results(out: output.OutputDir) -> None:
    """PARTS parts of PART_ROWS rows each (ok and failed, two workers, ties in finish time)."""
    writer = results.ResultWriter(out, merge_every=10**6, merge_rows=10**9)  # no merge: PARTS parts
    for p in range(PARTS):
        rows = []
        for i in range(p * PART_ROWS, (p + 1) * PART_ROWS):
            ok = i % 7 != 0
            rows.append(
                {
                    "id": f"img{i % 5}-s{i}",
                    "image": "img.png",
                    "status": "ok" if ok else "failed",
                    "output": f"/somewhere/videos/img{i % 5}-s{i}.mp4" if ok else None,
                    "error": None if ok else f"ImageError: cannot open '/x/{i}.png'",
                    "seconds": 1.0 + (i % 13) / 10,
                    "encode_seconds": 0.1,
                    "macs": 100,
                    "macs_saved": 10,
                    "worker": f"worker-{i % 2}",
                    "node": "host",
                    "vcut_mode": "full",
                    "finished_at": datetime.fromtimestamp(T0 + i // 3, timezone.utc),
                }
            )
        writer.commit(rows)


@pytest.fixture()
def out(tmp_path) -> output.OutputDir:
    out = output.open_output(str(tmp_path / "job"))
    _results(out)
    return out


def _streamed(out: output.OutputDir, seen: list[tuple[list[str], int]]):
    def parts(columns: list[str]):
        for table in results.iter_results(out, columns):
            seen.append((list(columns), table.num_rows))
            yield table

    return parts


def test_the_streamed_report_is_the_table_report(out):
    """Streaming changes nothing on the page: the same data as from the whole table, the
    second pass reads only ``id`` and ``output``, and no pass sees more than one part."""
    seen: list[tuple[list[str], int]] = []
    whole = report.report_data(results.read_results(out, report.COLUMNS), {"ok": 1})
    streamed = report.report_data(_streamed(out, seen), {"ok": 1})
    assert json.dumps(streamed, sort_keys=True) == json.dumps(whole, sort_keys=True)
    assert len(streamed["contact"]) == report.SAMPLE and streamed["failed"] == len(
        range(0, PARTS * PART_ROWS, 7)
    )
    passes = [cols for cols, _ in seen]
    assert "output" not in passes[0] and passes[-1] == ["id", "output"]
    assert max(n for _, n in seen) == PART_ROWS and len(seen) == 2 * PARTS


def test_write_report_never_reads_the_whole_table(out, monkeypatch):
    def whole(*a, **k):
        raise AssertionError("read_results: the whole table in memory")

    monkeypatch.setattr(results, "read_results", whole)
    report.write_report(out, thumbnailer=lambda *a, **k: None)
    assert "worker-1" in open(out.path("report.html"), encoding="utf-8").read()


def test_the_report_keeps_a_few_bytes_a_row(out):
    """Python's allocations (objects and numpy buffers) at their peak while the report data is
    built from the parts: under 150 bytes a row. Reading the whole table and six of its
    columns as Python objects (before) peaked at 474 bytes a row here."""
    source = _streamed(out, [])
    report.report_data(source)  # imports and caches warmed up
    tracemalloc.start()
    try:
        report.report_data(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak / (PARTS * PART_ROWS) < 150, peak / (PARTS * PART_ROWS)
