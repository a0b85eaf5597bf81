"""The planner: manifest rows -> one typed record per row (:class:`RowTask`) -> batches.

A row is resolved here, once: its generation values (the row's own, else the job's
``defaults``), its batching key (what rows must share to render in one pipeline call), its
output name and the manifest columns it carries into the results. The driver sends the
record, the worker renders it (``jobs.worker``) and the commit writes it (:meth:`RowTask.result_row`);
nobody resolves a row again. To add a field: add it to :class:`RowTask` and set it in
:meth:`RowTask.from_row`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.params import BATCH_PARAMS, ROW_PARAMS

if TYPE_CHECKING:
    import numpy as np

    from jobs.fingerprint import Changes


def resolve_params(row: Mapping[str, Any], generation: Mapping[str, Any]) -> dict[str, Any]:
    """A row's generation values, the job config's where the row has none."""
    return {k: (row.get(k) if row.get(k) is not None else generation.get(k)) for k in ROW_PARAMS}


def batch_key_of(params: Mapping[str, Any]) -> tuple:
    """What rows must share to render in one pipeline call: every generation value but seed."""
    return tuple((k, params[k]) for k in BATCH_PARAMS)


def render_key(row: Mapping[str, Any], generation: Mapping[str, Any]) -> tuple:
    """:func:`batch_key_of` a manifest row under the job's ``generation`` defaults."""
    return batch_key_of(resolve_params(row, generation))


@dataclass(frozen=True)
class RowTask:
    """One manifest row, resolved once.

    ``image``: the resolved image path or URI (what the worker loads); ``params``: every
    generation value (``ROW_PARAMS``), resolved; ``key``: the batching key (``batch_key_of``);
    ``output``: the video's path or URI (None with ``output.layout=webdataset``, where the
    worker puts the video into its open shard, ``jobs.shard_writer``); ``columns``: the
    manifest's own columns carried to the results (``image`` as written in the manifest, and
    every unknown column), not the private ones; ``generation``: the output generation the row
    renders in (``jobs.generation``; None when the output was never overwritten);
    ``fingerprint``: what determines its video (``jobs.fingerprint``; None without a job key).
    """

    id: str
    image: str
    params: dict[str, Any]
    key: tuple
    output: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)
    generation: str | None = None
    fingerprint: str | None = None

    @classmethod
    def from_row(
        cls,
        row: Mapping[str, Any],
        defaults: Mapping[str, Any],
        output: str | None = None,
        generation: str | None = None,
        job_key: str | None = None,
    ) -> RowTask:
        """The record of a manifest row (``jobs.manifest.iter_manifest``'s dict); with
        ``job_key`` (``jobs.fingerprint.job_key``), its fingerprint. On the driver only:
        ``jobs.manifest`` (pyarrow) is imported here, so a worker that unpickles a RowTask
        imports neither pyarrow nor numpy."""
        from jobs.fingerprint import row_fingerprint
        from jobs.manifest_checks import PRIVATE_KEYS

        params = resolve_params(row, defaults)
        columns = {
            k: v for k, v in row.items() if k not in PRIVATE_KEYS and k not in params and k != "id"
        }
        image = row.get("_image", row.get("image"))
        fingerprint = row_fingerprint(image, params, job_key) if job_key is not None else None
        key = batch_key_of(params)
        return cls(str(row["id"]), image, params, key, output, columns, generation, fingerprint)

    def sample_row(self, result: Mapping[str, Any], vcut_mode: str) -> dict[str, Any]:
        """The row as the worker knows it: the carried columns, the resolved parameters, the
        output generation and fingerprint, then the worker's ``result`` (status, timings,
        placement ...). A webdataset sample's metadata (``<key>.json`` and its shard's Parquet)."""
        row = {"id": self.id, **self.columns, **self.params, "fingerprint": self.fingerprint}
        row.setdefault("vcut_mode", vcut_mode)
        row["output_generation"] = self.generation  # jobs.generation.COLUMN
        row.update(result)
        return row

    def result_row(self, result: Mapping[str, Any], vcut_mode: str, attempts: int) -> dict[str, Any]:
        """The committed row: :meth:`sample_row` and the attempts."""
        return {**self.sample_row(result, vcut_mode), "attempts": attempts}


@dataclass
class Batch:
    """Rows that travel to one worker in one task and are committed together."""

    rows: list[RowTask]
    attempts: int = 0  # how many worker processes died while holding it
    last_error: str = ""

    @property
    def key(self) -> tuple | None:
        """The batching key its rows share (the first row's; with ``render_batch`` 1 a batch
        may mix keys, and shape affinity then follows its first row)."""
        return self.rows[0].key if self.rows else None


def rows_per_task(cfg: Any) -> int:
    """Rows per task (and commit): ``workers.batch_size``, raised to ``workers.render_batch``
    when that is larger, so that a task can fill one pipeline call."""
    return max(int(cfg.workers.batch_size), int(cfg.workers.render_batch))


def plan_batches(
    chunks: Iterator[list[dict[str, Any]]],
    done: np.ndarray,
    batch_size: int,
    counters: dict[str, int],
    make: Callable[[dict[str, Any]], RowTask],
    by_key: bool = False,
    changes: Changes | None = None,
) -> Iterator[Batch]:
    """Batches of not-yet-ok rows, each row made into its record by ``make``; within each
    chunk, rows that share an image are adjacent and travel in one batch (a group larger than
    ``batch_size`` is cut into full batches).

    With ``by_key`` (``workers.render_batch`` > 1), a batch holds rows of one batching key only:
    rows that can render in one pipeline call travel together, image groups adjacent within
    them, and rows of another key start a new batch. ``changes`` (``jobs.fingerprint``) counts
    done rows whose inputs changed (and renders them again with ``--rerender changed``)."""
    from jobs import manifest, results  # the driver's: a worker needs RowTask only

    current: list[RowTask] = []
    current_key: Hashable = None
    for chunk in chunks:
        skip = results.is_done(manifest.hash_ids([r["id"] for r in chunk]), done)
        skip = changes.check(chunk, skip) if changes is not None else skip  # jobs.fingerprint
        counters["skipped"] += int(skip.sum())
        groups: dict[Hashable, dict[str, list[RowTask]]] = {}
        for row, skipped in zip(chunk, skip, strict=True):
            if not skipped:
                task = make(row)
                k = task.key if by_key else None
                groups.setdefault(k, {}).setdefault(task.image, []).append(task)
        for k, images in groups.items():
            for group in images.values():
                if current and (k != current_key or len(current) + len(group) > batch_size):
                    yield Batch(current)
                    current = []
                while len(group) > batch_size:
                    yield Batch(group[:batch_size])
                    group = group[batch_size:]
                current.extend(group)
                current_key = k
    if current:
        yield Batch(current)
