"""Last row wins: which committed results row of each id counts.

An id committed more than once (a failed row rendered again on resume, ``--overwrite``) counts
by its last committed row; parts are named in commit order (``jobs.results``). Everything
that reads the results (resume, compaction, the summary, the report, the writer's merges)
asks this module for per-part masks of the rows that win.

Memory: the ids are compared as 64-bit hashes (``jobs.manifest.hash_ids``). One sorted copy
of every hash finds the duplicated ones; only the rows of those are ordered by commit
position. A results folder with no duplicate id (the usual one: after each job's compaction)
costs 8 bytes a row kept and 8 more while sorting, not a sort permutation per row.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.manifest import hash_ids


def last_of_id(hashes: list[np.ndarray]) -> list[np.ndarray]:
    """Per part, a mask of the rows that are the last committed row of their id (``hashes``:
    each part's id hashes, in commit order)."""
    if not hashes:
        return []
    ordered = np.concatenate(hashes)
    ordered.sort()
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    del ordered
    masks = [np.ones(h.size, dtype=bool) for h in hashes]
    if repeated.size == 0:
        return masks
    repeated = np.unique(repeated)
    # the rows of a repeated id: (hash, part, row); of each hash only the last stays
    hit_hash, hit_part, hit_row = [], [], []
    for i, h in enumerate(hashes):
        rows = np.flatnonzero(np.isin(h, repeated))
        hit_hash.append(h[rows])
        hit_part.append(np.full(rows.size, i, dtype=np.int64))
        hit_row.append(rows)
    hh, part, row = np.concatenate(hit_hash), np.concatenate(hit_part), np.concatenate(hit_row)
    order = np.lexsort((row, part, hh))  # by hash, then commit position
    superseded = np.zeros(order.size, dtype=bool)
    superseded[:-1] = hh[order][:-1] == hh[order][1:]  # a later row of its hash follows
    losers = order[superseded]
    for i in np.unique(part[losers]):
        masks[i][row[losers[part[losers] == i]]] = False
    return masks


def latest(
    parts: list[str], read: Callable[[str], pa.Table], between: Callable[[], None] = lambda: None
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per part: the last-row-of-its-id mask, the id hashes and whether the row is ``ok``.
    ``read(part)``: the part's ``id`` and ``status`` columns; ``between()`` runs after each
    part (``jobs.results.release_memory``). Streams: one part at a time, and only 17 bytes a
    row are kept (no table stays in memory)."""
    hashes, oks = [], []
    for path in parts:
        table = read(path)
        hashes.append(hash_ids(table.column("id").to_pylist()))
        oks.append(pc.fill_null(pc.equal(table.column("status"), "ok"), False).to_numpy(zero_copy_only=False))
        del table
        between()
    return last_of_id(hashes), hashes, oks
