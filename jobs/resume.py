"""What a job starts from on its output, and how it leaves it: the output generation
(``jobs.generation``: ``--overwrite`` and its resume), the ids already done, and for
``output.layout: webdataset`` the driver's shard book (``jobs.shards``).

Used by the driver's loop (``jobs.loop``) before its first batch and after its last commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from jobs import generation
from jobs.generation import Generation
from jobs.output import OutputDir
from jobs.planner import rows_per_task
from jobs.shards import ShardBook, scan


@dataclass
class JobStart:
    """``generation``: the one this run renders in; ``done``: sorted hashes of the ids that
    are done in it; ``shards``: the shard book (layout webdataset), else None."""

    generation: Generation
    done: np.ndarray
    shards: ShardBook | None = None


def begin(cfg: Any, out: OutputDir, schema: pa.Schema, webdataset: bool) -> JobStart:
    """Start (or resume) the output's generation and read what is done in it; a webdataset
    job resumes at shard granularity (rows in a published shard are done) after removing every
    unpublished shard file. ``schema``: the results rows' own types (a shard's Parquet)."""
    # --overwrite: a new generation, resumed by the next runs until complete
    gen = generation.begin(out, bool(cfg.output.overwrite))
    if not webdataset:
        return JobStart(gen, generation.done_ids(out, gen))
    state = scan(out, clean=True, gen=gen)
    book = ShardBook.for_job(cfg, out, schema, state.next_number, rows_per_task(cfg))
    return JobStart(gen, state.done, book)


def finish(out: OutputDir, start: JobStart, stopped: bool) -> Generation:
    """After the last commit (and compaction): an open generation is complete when the job was
    not stopped and lost no rendered row; a webdataset output then drops the shards that hold
    no committed row of it (or no committed row at all). The generation, as it now stands."""
    lost = start.shards.pending() if start.shards is not None else 0
    gen = generation.finish(out, start.generation, not stopped and not lost)
    if start.shards is not None:
        scan(out, clean=True, gen=gen)
    return gen


def summary_fields(out: OutputDir, gen: Generation) -> dict[str, Any]:
    """``summary.json``'s ``output_generation`` (none for an output never overwritten)."""
    return {"output_generation": generation.report(out, gen)} if gen.id is not None else {}
