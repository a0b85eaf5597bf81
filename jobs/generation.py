"""Output generations: ``--overwrite`` starts a new generation of the output, which the next
runs resume until it is complete.

``DIR/generation.json`` records the output's current generation: ``{"id", "started_at",
"complete", "completed_at"}``. Every results row a job commits carries the generation it was
rendered in (column ``output_generation``; null for rows committed before any ``--overwrite``).
Rules:

- a folder never overwritten has no current generation: every latest ``ok`` row is done;
- ``--overwrite`` with no open generation starts one (a new id, ``complete`` false): no row of an
  older generation is done any more, so every row renders again;
- while a generation is open, every run (the same command, with or without ``--overwrite``)
  resumes it: a row is done only when its latest row is ``ok`` *and* of that generation;
- a job of an open generation that ends with nothing left to render (not stopped, no rendered
  row lost) marks it complete; from then on only its rows count, so the webdataset layout's
  last scan (``jobs.shards.scan``) drops every shard that holds no row of it: no sample of an
  older generation stays in a published shard. A later ``--overwrite`` starts the next one.

A user who wants to give up an open overwrite and keep the old outputs removes
``DIR/generation.json`` (rows then count whatever their generation, as before any overwrite).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import results
from jobs.manifest import hash_ids
from jobs.output import OutputDir, storage_errors
from jobs.part_reads import read_table

log = logging.getLogger("jobs")

FILE = "generation.json"
#: The results column that records the generation a row was rendered in.
COLUMN = "output_generation"


@dataclass(frozen=True)
class Generation:
    """The output's current generation (``id`` None: never overwritten)."""

    id: str | None = None
    started_at: str | None = None
    complete: bool = True
    completed_at: str | None = None
    resumed: bool = False  # this run resumes an open generation a previous run started

    def counts(self, row_generation: str | None) -> bool:
        """Whether a row of ``row_generation`` can be done in this generation."""
        return self.id is None or row_generation == self.id

    def publishes(self, row_generation: str | None) -> bool:
        """Whether an ``ok`` row of ``row_generation`` keeps its shard published: any row while
        the generation is open (readers keep the old shards until it is complete), only its own
        rows once it is."""
        return self.id is None or not self.complete or row_generation == self.id

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "resumed" and v is not None}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read(out: OutputDir) -> Generation:
    """The recorded generation (a missing file: none)."""
    try:
        with storage_errors(out.uri):  # a storage failure is the output's (jobs.output.OutputError)
            if out.local:
                with open(out.path(FILE), "rb") as f:
                    data = json.loads(f.read())
            else:
                data = json.loads(out.fs.cat_file(out.path(FILE)))
    except FileNotFoundError:
        return Generation()
    return Generation(
        id=data["id"],
        started_at=data.get("started_at"),
        complete=bool(data.get("complete")),
        completed_at=data.get("completed_at"),
    )


def _write(out: OutputDir, gen: Generation) -> None:
    text = json.dumps(gen.summary(), indent=2) + "\n"
    out.write_bytes(out.path(FILE), text.encode())


def begin(out: OutputDir, overwrite: bool, *, write: bool = True) -> Generation:
    """The generation this run renders in: an open one is resumed (with or without
    ``overwrite``); ``overwrite`` otherwise starts a new one (recorded unless ``write`` is false:
    the dry run)."""
    current = read(out)
    if current.id is not None and not current.complete:
        log.info(
            "resuming the overwrite begun at %s (generation %s): rows rendered before it render again",
            current.started_at,
            current.id,
        )
        return Generation(current.id, current.started_at, False, None, resumed=True)
    if not overwrite:
        return current
    gen = Generation(id=uuid.uuid4().hex[:12], started_at=_now(), complete=False)
    if write:
        _write(out, gen)
    return gen


def finish(out: OutputDir, gen: Generation, complete: bool) -> Generation:
    """Mark an open generation complete when the job left nothing to render."""
    if gen.id is None or gen.complete or not complete:
        return gen
    done = Generation(gen.id, gen.started_at, True, _now())
    _write(out, done)
    log.info("overwrite complete (generation %s): no row of an earlier generation remains", gen.id)
    return done


def latest_rows(out: OutputDir, columns: list[str]) -> Iterator[tuple[np.ndarray, pa.Table]]:
    """Per results part, one part at a time: (mask of the rows that are the latest of their
    id, the part's ``id``, ``status``, ``output_generation`` and ``columns``; a column a part
    lacks is null)."""
    parts = results._parts(out)
    masks = results._latest(out, parts)[0]
    for path, mask in zip(parts, masks, strict=True):
        names = set(out.read_schema(path).names)
        table = read_table(out, path, columns=[c for c in ["id", "status", COLUMN, *columns] if c in names])
        for c in [COLUMN, *columns]:
            if c not in names:
                table = table.append_column(c, pa.nulls(table.num_rows, pa.string()))
        yield mask, table


def done_ids(out: OutputDir, gen: Generation) -> np.ndarray:
    """Sorted hashes of the ids whose latest row is ``ok`` and counts in ``gen`` (the ``files``
    layout's resume state)."""
    if gen.id is None:
        return results.done_ids(out)
    ok = []
    for mask, table in latest_rows(out, []):
        keep = mask & pc.equal(table.column("status"), "ok").to_numpy(zero_copy_only=False)
        keep &= pc.equal(table.column(COLUMN), gen.id).fill_null(False).to_numpy(zero_copy_only=False)
        ok.append(hash_ids(pc.filter(table.column("id"), pa.array(keep)).to_pylist()))
    return np.sort(np.concatenate(ok)) if ok else np.zeros(0, dtype=np.uint64)


def report(out: OutputDir, gen: Generation) -> dict:
    """``summary.json``'s ``output_generation``; while open, with ``ok``: the rows already
    rendered in it (what a rerun keeps; the summary's own ``ok`` counts older rows too)."""
    found = gen.summary()
    if not gen.complete:
        found["ok"] = int(done_ids(out, gen).size)
    return found


def resume_note(summary: dict) -> str:
    """For the stop line: how a rerun treats an open overwrite (empty when none is open)."""
    gen = summary.get("output_generation") or {}
    if not gen or gen.get("complete"):
        return ""
    return (
        f" (it continues the --overwrite begun at {gen.get('started_at')}, with or without "
        "--overwrite: rows rendered before it render again, rows rendered since are kept)"
    )
