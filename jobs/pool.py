"""The worker pool on the driver: starts, readiness, dispatch, deadlines, elastic workers, requeue.

Workers start all at once and each gets batches as soon as its ``info()`` says it is ready; a
worker not ready ``workers.start_timeout_s`` after its own start is killed (so it never holds a
GPU that joins later). A worker whose oldest batch is not back by its deadline
(:func:`batch_deadline`) is taken for hung: killed, its batches retried like a dead worker's.
With ``workers.count=auto`` the pool looks at the cluster every ``ELASTIC_PERIOD_S`` and starts a
worker on each GPU that joined.

Labels are slots: ``worker-<slot>``, and a replacement takes the label of the worker it
replaces, so the set of labels (and of Prometheus series, ``jobs.metrics``) stays bounded by
the pool's size however often workers are replaced. Rows still tell processes apart by
``worker_pid``.

Shape affinity (:func:`choose_worker`): a batch goes preferably to a worker that has already
been sent its batching key, so each worker meets (and compiles) few shapes.

Per-pass costs do not grow with the worker count: only workers with a free slot are looked at
when submitting, the median seconds per row is computed at most once per deadline check, and
deadlines are checked at most every ``DEADLINE_CHECK_PERIOD_S``.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from jobs import dispatch
from jobs.dispatch import BATCH_DEADLINE_FLOOR_S, DEADLINE_CHECK_PERIOD_S, batch_deadline, choose_worker
from jobs.output import OutputDir
from jobs.planner import Batch, rows_per_task
from jobs.pool_worker import PoolWorker, death_line
from jobs.text import error_line
from jobs.worker import RenderWorker
from pipeline.fetch import FetchLimits, fetch_budget_s

log = logging.getLogger("jobs")


class JobError(RuntimeError):
    """The job cannot go on (no worker could start, every worker is gone). ``causes``: one line
    per distinct reason workers failed to start (tracebacks are in DIR/logs/)."""

    def __init__(self, message: str, causes: list[str] | None = None):
        super().__init__(message)
        self.causes = list(causes or [])


class WorkerPool:
    """The job's Ray actors. ``commit_failed(batch, error)`` commits a batch whose rows failed
    for good (a row that kept killing workers); ``shards``: the shard book of a webdataset job
    (``jobs.shards.ShardBook``: the workers write the shards under the numbers it reserves)."""

    def __init__(
        self,
        cfg: Any,
        cfg_dict: dict[str, Any],
        out: OutputDir,
        commit_failed: Callable[[Batch, str], None],
        *,
        renderer_factory: Callable | None = None,
        encoder: Callable | None = None,
        shards: Any = None,
    ):
        self.cfg, self.cfg_dict, self.out, self.shards = cfg, cfg_dict, out, shards
        self.commit_failed = commit_failed
        self.renderer_factory, self.encoder = renderer_factory, encoder
        self.workers: list[PoolWorker] = []  # every worker started, in order (dead ones too)
        self._ready_by_label: dict[str, PoolWorker] = {}  # the latest ready worker of each label
        self.inflight: dict[Any, tuple[PoolWorker, Batch]] = {}
        self.retry: deque[Batch] = deque()
        self.starting: dict[Any, PoolWorker] = {}  # info() refs of workers not yet ready
        self.hungry: set[PoolWorker] = set()  # ready, alive, with a free in-flight slot
        self.start_failures: dict[str, list[str]] = {}  # one line per cause -> "worker (node)"
        self.per_row: deque[float] = deque(maxlen=256)  # seconds per row of finished batches
        self.first_per_row: deque[float] = deque(maxlen=64)  # the same, of workers' first batches
        self.fetch_limits = FetchLimits(**cfg_dict["images"])  # jobs.config.ImagesConfig
        self.per_worker = int(cfg.workers.inflight_per_worker)
        self.elastic = str(cfg.workers.count).lower() == "auto"
        self.restarts_left = int(cfg.workers.max_restarts)
        self.stopping = False  # no replacement, no elastic start
        self.num_cpus, self.num_gpus = 1.0, 0.0
        self._slots = 0
        self._free_slots: list[int] = []  # of workers that died: their replacements take them
        self._next_elastic_check = time.monotonic() + dispatch.ELASTIC_PERIOD_S
        self._next_deadline_check = 0.0
        self._elastic_warned = False
        self._failed_starts = 0

    # -- starting ------------------------------------------------------------------------

    def start_worker(self, elastic: bool = False, slot: int | None = None) -> PoolWorker:
        import ray

        if slot is None:
            slot = self._free_slots.pop(0) if self._free_slots else self._new_slot()
        label = f"worker-{slot}"
        remote = ray.remote(RenderWorker).options(
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            max_concurrency=2,  # the next batch renders while this one's last video encodes
            max_restarts=0,  # the driver replaces dead workers and retries their batches
            name=None,
        )
        threads = max(1, math.floor(self.num_cpus))
        log_dir = self.out.path("logs") if self.out.local else None
        spec = self.shards.spec if self.shards is not None else None  # layout webdataset
        args = (self.cfg_dict, label, self.renderer_factory, self.encoder, threads, log_dir, spec)
        actor = remote.remote(*args)
        worker = PoolWorker(actor, label, slot, elastic=elastic)
        self.workers.append(worker)
        self.starting[actor.info.remote()] = worker
        return worker

    def _new_slot(self) -> int:
        self._slots += 1
        return self._slots - 1

    def started(self, worker: PoolWorker, info: dict[str, Any] | None, exc: BaseException | None) -> None:
        """A worker's ``info()`` came back (or failed): ready, or dead with its cause recorded once."""
        if info is not None and "error" not in info:
            worker.ready = True
            worker.info = info
            worker.last_done = worker.ready_at = time.monotonic()
            self._ready_by_label[worker.label] = worker
            self._update_hunger(worker)
            log.info(
                "%s ready after %.1f s on %s (ip %s, node %s, pid %s, %s)",
                worker.label,
                worker.last_done - worker.started_at,
                info["node"],
                info.get("node_ip"),
                str(info.get("node_id") or "?")[:8],
                info["pid"],
                info["device"],
            )
            return
        worker.alive = False
        self._failed_starts += 1
        self._free_slots.append(worker.slot)
        if info is not None:
            cause, detail = info["error"], info["traceback"]
            worker.info = info
        else:
            cause, detail = death_line(exc), str(exc)
        worker.startup_error = cause
        where = worker.where()
        name = f"{worker.label}.startup-error.log"
        try:
            self.out.makedirs("logs")
            self.out.write_bytes(self.out.path("logs", name), f"{worker.label} {where}\n{detail}".encode())
            file = self.out.uri_of("logs", name)
        except Exception as write_exc:  # the cause still reaches the terminal
            file = f"not written: {type(write_exc).__name__}"
        new = cause not in self.start_failures
        self.start_failures.setdefault(cause, []).append(f"{worker.label} {where} ({file})")
        if new:
            log.warning("%s could not start %s: %s (traceback: %s)", worker.label, where, cause, file)
        _kill(worker.actor)

    def start_failure_lines(self) -> list[str]:
        """One line per distinct start-up failure: the cause, then which workers and where."""
        return [f"{cause} [{'; '.join(where)}]" for cause, where in self.start_failures.items()]

    def note_committed(self, rows: list[dict[str, Any]]) -> None:
        """Add committed rows' compile seconds to the worker that rendered them (the latest
        ready worker of the row's label: a replacement takes its predecessor's label)."""
        for row in rows:
            worker = self._ready_by_label.get(row.get("worker"))
            if worker is not None and row.get("compile_seconds"):
                worker.compile_seconds += float(row["compile_seconds"])

    def started_workers(self) -> list[dict[str, Any]]:
        """Every worker that became ready: where, its start-up seconds (its own, model loaded,
        and as the driver saw it, submitted to ready) and its compile seconds (``summary.json``)."""
        return [
            {
                "worker": w.label,
                "node": w.node(),
                "pid": w.info.get("pid"),
                "startup_seconds": w.info.get("startup_seconds"),
                "ready_after_s": round(w.ready_at - w.started_at, 3) if w.ready_at else None,
                "compile": w.info.get("compile"),
                "compile_seconds": round(w.compile_seconds, 3),
            }
            for w in self.workers
            if w.ready
        ]

    def never_started(self) -> list[dict[str, Any]]:
        """The workers that never became ready: label, node and cause (for ``summary.json``)."""
        return [
            {
                "worker": w.label,
                "node": w.node(),
                "error": w.startup_error or "not ready when the job ended",
            }
            for w in self.workers
            if not w.ready
        ]

    def check_start_timeouts(self, now: float) -> None:
        """Give up on workers not ready ``workers.start_timeout_s`` after their own start: kill
        them (``started``), so that a node joining later does not hand them a GPU they hold unused."""
        timeout = float(self.cfg.workers.start_timeout_s)
        for ref, worker in list(self.starting.items()):
            if now - worker.started_at > timeout:
                del self.starting[ref]
                self.started(
                    worker, None, TimeoutError(f"not ready within workers.start_timeout_s={timeout:g} s")
                )

    # -- dispatch ------------------------------------------------------------------------

    def _update_hunger(self, worker: PoolWorker) -> None:
        if worker.alive and worker.ready and len(worker.inflight) < self.per_worker:
            self.hungry.add(worker)
        else:
            self.hungry.discard(worker)

    def submit(self, batches: Iterator[Batch]) -> bool:
        """Fill every hungry worker up to its in-flight limit, each batch to the worker
        :func:`choose_worker` picks; False when the batches are exhausted."""
        while self.hungry:
            batch = self.retry.popleft() if self.retry else next(batches, None)
            if batch is None:
                return False
            worker = choose_worker(batch.key, self.hungry)
            numbers = self.shards.numbers_for(worker.label) if self.shards is not None else None
            ref = worker.actor.render_batch.remote(batch.rows, numbers)
            worker.inflight[ref] = time.monotonic()
            worker.keys.add(batch.key)
            self.inflight[ref] = (worker, batch)
            self._update_hunger(worker)
        return True

    def done(self, worker: PoolWorker, ref: Any, rows: int | None) -> None:
        """A batch came back from ``worker``: forget it; with ``rows``, measure seconds per row
        (from when it could start running to now) for the auto batch deadline."""
        now = time.monotonic()
        oldest = worker.oldest()
        since = max(worker.inflight.pop(ref), worker.last_done)
        if rows and oldest is not None and oldest[0] == ref:
            self.per_row.append((now - since) / rows)
            if worker.batches_done == 0:  # warm-up included: a later worker's first batch
                self.first_per_row.append((now - since) / rows)
        worker.last_done = now
        worker.batches_done += 1
        del self.inflight[ref]
        self._update_hunger(worker)

    # -- failures ------------------------------------------------------------------------

    def check_deadlines(self, now: float) -> None:
        """A worker whose oldest batch is past its deadline (``batch_deadline``) is taken for hung:
        killed, and its batches retried like a dead worker's. At most every
        ``DEADLINE_CHECK_PERIOD_S``, with the median computed once per check. Call it right
        after collecting what came back, so that time the driver spent elsewhere never counts
        against a batch that had finished."""
        if now < self._next_deadline_check:
            return
        self._next_deadline_check = now + DEADLINE_CHECK_PERIOD_S
        fixed = self.cfg.workers.batch_timeout_s
        first = float(self.cfg.workers.start_timeout_s)
        floor = float(fixed) if fixed is not None else BATCH_DEADLINE_FLOOR_S  # no deadline is shorter
        median: float | None = None
        warmups = list(self.first_per_row)
        for worker in list(self.workers):
            oldest = worker.oldest() if worker.alive else None
            if oldest is None or now - oldest[1] <= floor:
                continue
            if median is None and self.per_row:
                median = statistics.median(self.per_row)
            ref, since = oldest
            rows = len(self.inflight[ref][1].rows)
            first_floor = first if worker.batches_done == 0 else None
            fetch_s = fetch_budget_s(rows, self.fetch_limits)  # the images' fetch limits: never "hung"
            deadline = batch_deadline(
                rows, None, fixed, first_floor, median, first_per_row=warmups, fetch_s=fetch_s
            )
            if now - since > deadline:
                log.warning(
                    "%s (pid %s on %s) has not returned a batch of %d row(s) in %.0f s (deadline %.0f s): "
                    "taken for hung, killed",
                    worker.label,
                    worker.info.get("pid", "?"),
                    worker.info.get("node_ip") or worker.info.get("node") or "?",
                    rows,
                    now - since,
                    deadline,
                )
                self.worker_died(worker, TimeoutError(f"batch deadline of {deadline:.0f} s passed"))

    def check_elastic(self, now: float) -> None:
        """``workers.count=auto``: start a worker on each GPU the cluster gained (up to one per
        GPU; not counted against ``workers.max_restarts``). Stops after more failed starts than
        ``workers.max_restarts`` (a node whose GPUs cannot start a worker is not retried forever)."""
        import ray

        if not self.elastic or self.num_gpus <= 0 or now < self._next_elastic_check or self.stopping:
            return
        self._next_elastic_check = now + dispatch.ELASTIC_PERIOD_S
        if self._failed_starts > int(self.cfg.workers.max_restarts):
            if not self._elastic_warned:
                self._elastic_warned = True
                log.warning(
                    "%d workers failed to start: no more workers on GPUs that join", self._failed_starts
                )
            return
        try:
            total = float(ray.cluster_resources().get("GPU", 0))
            free = float(ray.available_resources().get("GPU", 0))
        except Exception as exc:
            log.warning("could not read the cluster's resources: %s", death_line(exc))
            return
        live = sum(w.alive for w in self.workers)
        new = min(int(total // self.num_gpus) - live, int(free // self.num_gpus))
        for _ in range(max(0, new)):
            worker = self.start_worker(elastic=True)
            log.info("started %s on a GPU that joined (%g GPU(s) in the cluster)", worker.label, total)

    def worker_died(self, worker: PoolWorker, exc: BaseException) -> None:
        """Requeue every batch ``worker`` held, kill it, and start a replacement in its slot
        while the restart budget lasts."""
        if not worker.alive:
            return
        worker.alive = False
        self.hungry.discard(worker)
        log.warning(
            "%s died (%s); retrying its %d batch(es)", worker.label, death_line(exc), len(worker.inflight)
        )
        for ref in list(worker.inflight):
            _, batch = self.inflight.pop(ref)
            batch.attempts += 1
            batch.last_error = error_line(exc)
            self.requeue(batch)
        worker.inflight.clear()
        if self.shards is not None:  # rows in its unpublished shards render again, first
            orphans, size = self.shards.orphans(worker.label), rows_per_task(self.cfg)
            self.retry.extendleft(Batch(orphans[i : i + size]) for i in range(0, len(orphans), size))
        _kill(worker.actor)
        if self.restarts_left > 0 and not self.stopping:
            self.restarts_left -= 1
            new = self.start_worker(slot=worker.slot)  # gets batches once its info() says it is ready
            log.info("started a new process for %s (pid %s was lost)", new.label, worker.info.get("pid", "?"))
        else:
            self._free_slots.append(worker.slot)

    def requeue(self, batch: Batch) -> None:
        max_attempts = int(self.cfg.workers.max_attempts)
        if batch.attempts < max_attempts:
            self.retry.append(batch)
        elif len(batch.rows) > 1:  # isolate the row that kills workers: one last try each
            self.retry.extend(Batch([r], max_attempts - 1, batch.last_error) for r in batch.rows)
        else:
            error = f"worker process died {batch.attempts} times rendering this row ({batch.last_error})"
            self.commit_failed(batch, error)

    def kill_all(self) -> None:
        for worker in self.workers:
            _kill(worker.actor)


def _kill(actor: Any) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:
        pass
