"""Last row wins (``jobs.last_row``): the masks against a plain reference, and a generation's
resume state read one part at a time."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from jobs import generation, last_row, output, results
from jobs.manifest import hash_ids


def _reference(hashes: list[np.ndarray]) -> list[np.ndarray]:
    """The last position of each hash over all parts in commit order, by a dict."""
    last: dict[int, tuple[int, int]] = {}
    for p, h in enumerate(hashes):
        for r, value in enumerate(h.tolist()):
            last[value] = (p, r)
    masks = [np.zeros(h.size, dtype=bool) for h in hashes]
    for p, r in last.values():
        masks[p][r] = True
    return masks


def test_masks_match_the_reference():
    """Random parts (empty ones, an id repeated in one part and across parts, none repeated)."""
    rng = np.random.default_rng(18)
    for _ in range(200):
        space = int(rng.integers(1, 300))
        hashes = [
            rng.integers(0, space, int(rng.integers(0, 40))).astype(np.uint64)
            for _ in range(int(rng.integers(1, 8)))
        ]
        got = last_row.last_of_id(hashes)
        assert [m.tolist() for m in got] == [m.tolist() for m in _reference(hashes)]
    unique = [np.arange(10, dtype=np.uint64), np.arange(10, 25, dtype=np.uint64)]
    assert all(m.all() for m in last_row.last_of_id(unique))
    assert last_row.last_of_id([]) == []


def _row(i: str, status: str, gen: str | None) -> dict:
    return {"id": i, "image": "a.png", "status": status, "output_generation": gen}


def test_an_open_generations_done_ids_stream_one_part_at_a_time(tmp_path, monkeypatch):
    """``generation.done_ids`` of an open ``--overwrite``: the latest row of an id counts, and
    only when ok and of the generation; ``latest_rows`` reads each part when it is consumed."""
    out = output.open_output(str(tmp_path))
    writer = results.ResultWriter(out, merge_every=10**6, merge_rows=10**9)  # no merge: 3 parts
    writer.commit([_row("a", "ok", None), _row("b", "ok", "g1"), _row("c", "ok", "g1")])
    writer.commit([_row("c", "failed", "g1"), _row("d", "ok", "g1")])
    writer.commit([_row("a", "ok", "g1"), _row("e", "ok", "g0")])
    gen = generation.Generation(id="g1", complete=False)
    done = generation.done_ids(out, gen)
    assert done.tolist() == sorted(hash_ids(["a", "b", "d"]).tolist())
    reads: list[list[str]] = []
    read = generation.read_table
    monkeypatch.setattr(
        generation, "read_table", lambda o, p, columns=None: reads.append(columns) or read(o, p, columns)
    )
    rows = generation.latest_rows(out, ["shard"])
    mask, table = next(rows)
    assert len(reads) == 1 and mask.tolist() == [False, True, False]
    assert table.column("shard").null_count == 3 and isinstance(table, pa.Table)
    assert len(list(rows)) == 2 and len(reads) == 3
