"""The pool's decisions, without Ray: how many workers of what size, which worker gets a
batch (shape affinity), and how long a batch may take before its worker is taken for hung.
Pure functions, so that each is unit-tested on its own (``jobs.pool`` applies them)."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("jobs")

#: Seconds between two looks at the cluster's GPUs with ``workers.count=auto``.
ELASTIC_PERIOD_S = 5.0
#: Auto batch deadline: BATCH_DEADLINE_FACTOR x rows x median seconds per row, at least
#: BATCH_DEADLINE_FLOOR_S; a worker's first batch (warm-up, compilation) at least start_timeout_s.
BATCH_DEADLINE_FACTOR = 5.0
BATCH_DEADLINE_FLOOR_S = 60.0
#: Seconds between two deadline checks (deadlines are tens of seconds at least).
DEADLINE_CHECK_PERIOD_S = 1.0


def batch_deadline(
    rows: int,
    per_row: list[float] | None,
    fixed: float | None,
    first_floor: float | None = None,
    median: float | None = None,
    *,
    first_per_row: list[float] | None = None,
    fetch_s: float = 0.0,
) -> float:
    """Seconds a batch of ``rows`` may take on its worker before the worker is taken for hung.

    ``fixed`` (``workers.batch_timeout_s``), else ``BATCH_DEADLINE_FACTOR`` x rows x the median
    of ``per_row`` (seconds per row of the batches finished so far on this job; or ``median``
    when the caller computed it already), at least ``BATCH_DEADLINE_FLOOR_S`` (and with no
    measurement yet, at least ``first_floor``). A worker's first batch (``first_floor`` given:
    ``workers.start_timeout_s``) always gets at least ``first_floor``: its first call may
    import, compile or warm up for minutes; once ``first_per_row`` (seconds per row of workers'
    first batches on this job) is measured, that warm-up x ``BATCH_DEADLINE_FACTOR`` when
    shorter. ``fetch_s`` (``pipeline.fetch.fetch_budget_s``: the longest the batch's image
    fetches may take, bounded by their timeouts) is added: a worker is killed as hung for time
    in the model, never for a slow image host.
    """
    if first_floor is not None and first_per_row:
        first_floor = min(float(first_floor), BATCH_DEADLINE_FACTOR * rows * statistics.median(first_per_row))
    return _deadline(rows, per_row, fixed, first_floor, median) + fetch_s


def _deadline(
    rows: int,
    per_row: list[float] | None,
    fixed: float | None,
    first_floor: float | None,
    median: float | None,
) -> float:
    if fixed is not None:
        return max(float(fixed), float(first_floor or 0.0))
    if median is None and per_row:
        median = statistics.median(per_row)
    floor = BATCH_DEADLINE_FLOOR_S
    if first_floor is not None or median is None:
        floor = max(floor, float(first_floor or 0.0))
    if median is None:
        return floor
    return max(floor, BATCH_DEADLINE_FACTOR * rows * median)


def size_workers(cfg: Any, resources: dict[str, float]) -> tuple[int, float, float]:
    """(count, num_cpus, num_gpus) per worker. CPU workers together reserve at most CPUs - 1
    (never below 0.25 each), so the driver and Ray's own processes are never starved."""
    w = cfg.workers
    cpus, gpus = float(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    num_gpus = float(w.num_gpus) if w.num_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    fixed = None if w.count is None or str(w.count).lower() == "auto" else int(w.count)
    if num_gpus > 0:
        count = fixed or max(1, int(gpus // num_gpus))
        num_cpus = float(w.num_cpus if w.num_cpus is not None else 1.0)
    else:
        count = fixed or 1
        num_cpus = float(w.num_cpus) if w.num_cpus is not None else max(0.25, (cpus - 1) / count)
    if count * num_cpus > cpus or (num_gpus and count * num_gpus > gpus):
        log.warning(
            "%d workers x (%.2f CPU, %.2f GPU) exceed the cluster's %.0f CPU / %.0f GPU: "
            "some start only when the cluster grows",
            count,
            num_cpus,
            num_gpus,
            cpus,
            gpus,
        )
    return count, num_cpus, num_gpus


def choose_worker(key: Any, hungry: Iterable[Any]) -> Any:
    """Where a batch of batching key ``key`` goes among the workers with a free slot: one that
    was already sent ``key`` (it has compiled that shape), else one that has met the fewest
    shapes (a fresh worker first); ties go to the least busy. None when none is hungry."""
    best, best_rank = None, None
    for worker in hungry:
        rank = (key not in worker.keys, len(worker.keys), len(worker.inflight))
        if best_rank is None or rank < best_rank:
            best, best_rank = worker, rank
    return best
