"""The distributor: streams the manifest to a pool of Ray worker actors and commits results.

The driver reads the manifest in windows of ``workers.window_rows`` rows, drops ids already
``ok`` in ``DIR/results/``, groups the rest by image (with ``workers.render_batch`` > 1, first
by every generation value but seed, so rows that can render in one call travel together) and
packs them into small batches. Each worker has at most ``workers.inflight_per_worker``
batches queued. A finished batch is committed at once as one results part. When a worker
process dies, every batch queued on it is retried on the others and a replacement worker
starts; a batch that keeps killing workers is split into single rows, and a row that still
does becomes ``failed``.

Workers start all at once and each gets batches as soon as its ``info()`` says it is ready
(one ``ray.wait`` over start-ups and batches); a worker not ready ``workers.start_timeout_s``
after its own start is killed (so it never holds a GPU that joins later). A worker whose
oldest batch is not back by its deadline (``batch_deadline``: ``workers.batch_timeout_s``, or
k x rows x the median seconds per row measured on this job, never below a floor) is taken for
hung: killed, its batches retried like a dead worker's. With ``workers.count=auto`` the driver
looks at the cluster every ``ELASTIC_PERIOD_S`` and starts a worker on each GPU that joined.
``Runner.request_stop`` (signals, see ``jobs.stop``) stops submitting, lets the batches in
flight finish until a grace deadline, and ends the job normally with what was committed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from jobs import manifest, output, results
from jobs.fingerprint import Changes
from jobs.hooks import JobHook, SafeHook
from jobs.progress import Progress
from jobs.shards import ShardWriter, check_layout, scan
from jobs.stop import OutputWriteError, StopSignals, output_failure
from jobs.worker import RenderWorker
from pipeline.fetch import FetchLimits, fetch_budget_s
from pipeline.params import BATCH_PARAMS, ROW_PARAMS

log = logging.getLogger("jobs")


class JobError(RuntimeError):
    """The job cannot go on (no worker could start, every worker is gone). ``causes``: one line
    per distinct reason workers failed to start (tracebacks are in DIR/logs/)."""

    def __init__(self, message: str, causes: list[str] | None = None):
        super().__init__(message)
        self.causes = list(causes or [])


def _death_line(exc: BaseException | None) -> str:
    """One line for a worker process that died (Ray's message is many): Ray's exit detail
    (e.g. killed by the memory monitor) when it gives one, else its first line."""
    text = str(exc or "").strip()
    for line in text.splitlines():
        if "exit detail" in line.lower():
            return f"{type(exc).__name__}: {line.strip()}"
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@dataclass
class Batch:
    rows: list[dict[str, Any]]
    attempts: int = 0  # how many worker processes died while holding it
    last_error: str = ""


#: Seconds between two looks at the cluster's GPUs with ``workers.count=auto``.
ELASTIC_PERIOD_S = 5.0
#: Auto batch deadline: BATCH_DEADLINE_FACTOR x rows x median seconds per row, at least
#: BATCH_DEADLINE_FLOOR_S; a worker's first batch (warm-up, compilation) at least start_timeout_s.
BATCH_DEADLINE_FACTOR = 5.0
BATCH_DEADLINE_FLOOR_S = 60.0


def batch_deadline(
    rows: int,
    per_row: list[float] | None,
    fixed: float | None,
    first_floor: float | None = None,
    *,
    first_per_row: list[float] | None = None,
    fetch_s: float = 0.0,
) -> float:
    """Seconds a batch of ``rows`` may take on its worker before the worker is taken for hung.

    ``fixed`` (``workers.batch_timeout_s``), else ``BATCH_DEADLINE_FACTOR`` x rows x the median
    of ``per_row`` (seconds per row of the batches finished so far on this job), at least
    ``BATCH_DEADLINE_FLOOR_S`` (and with no measurement yet, at least ``first_floor``). A
    worker's first batch (``first_floor`` given: ``workers.start_timeout_s``) always gets at
    least ``first_floor``: its first call may import, compile or warm up for minutes; once
    ``first_per_row`` (seconds per row of workers' first batches on this job) is measured, that
    warm-up, x ``BATCH_DEADLINE_FACTOR``, when shorter. ``fetch_s`` (``pipeline.fetch``: the
    longest the batch's image fetches may take, bounded by their timeouts) is added: a worker
    is killed as hung for time in the model, never for a slow image host.
    """
    if first_floor is not None and first_per_row:
        first_floor = min(float(first_floor), BATCH_DEADLINE_FACTOR * rows * statistics.median(first_per_row))
    if fixed is not None:
        return max(float(fixed), float(first_floor or 0.0)) + fetch_s
    floor = BATCH_DEADLINE_FLOOR_S
    if first_floor is not None or not per_row:
        floor = max(floor, float(first_floor or 0.0))
    if not per_row:
        return floor + fetch_s
    return max(floor, BATCH_DEADLINE_FACTOR * rows * statistics.median(per_row)) + fetch_s


@dataclass
class _Worker:
    actor: Any
    label: str
    started_at: float = field(default_factory=time.monotonic)
    inflight: dict = field(default_factory=dict)  # ref -> monotonic time it was submitted, in order
    alive: bool = True
    ready: bool = False  # its info() came back without a start-up error: it may get batches
    last_done: float = 0.0  # when its last batch came back (or it became ready)
    batches_done: int = 0
    info: dict = field(default_factory=dict)
    elastic: bool = False  # started on a GPU that joined (workers.count=auto)

    def oldest(self) -> tuple[Any, float] | None:
        """Its oldest batch in flight and when that batch could start running (submitted, and
        the worker's previous batch back: batches run one after another on a worker)."""
        for ref, submitted in self.inflight.items():
            return ref, max(submitted, self.last_done)
        return None


def resolve_params(row: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any]:
    """A row's generation values, the job config's where the row has none."""
    return {k: (row.get(k) if row.get(k) is not None else generation.get(k)) for k in ROW_PARAMS}


def plan_batches(
    chunks: Iterator[list[dict[str, Any]]],
    done: np.ndarray,
    batch_size: int,
    counters: dict[str, int],
    key: Callable[[dict[str, Any]], Hashable] | None = None,
    changes: Changes | None = None,
) -> Iterator[Batch]:
    """Batches of not-yet-ok rows; within each chunk, rows that share an image are adjacent and
    travel in one batch (a group larger than ``batch_size`` is cut into full batches).

    With ``key`` (the driver's: a row's generation values but seed), a batch holds rows of one
    key only: rows that can render in one pipeline call travel together, image groups
    adjacent within them, and rows of another key start a new batch. ``changes``
    (``jobs.fingerprint``) counts done rows whose inputs changed (and renders them again
    with ``--rerender changed``)."""
    current: list[dict[str, Any]] = []
    current_key: Hashable = None
    for chunk in chunks:
        skip = results.is_done(manifest.hash_ids([r["id"] for r in chunk]), done)
        skip = changes.check(chunk, skip) if changes is not None else skip  # jobs.fingerprint
        counters["skipped"] += int(skip.sum())
        groups: dict[Hashable, dict[str, list[dict[str, Any]]]] = {}
        for row, skipped in zip(chunk, skip, strict=True):
            if not skipped:
                k = key(row) if key is not None else None
                groups.setdefault(k, {}).setdefault(row["_image"], []).append(row)
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


def render_key(row: dict[str, Any], generation: dict[str, Any]) -> tuple:
    """What rows must share to render in one pipeline call: every generation value but seed."""
    params = resolve_params(row, generation)
    return tuple((k, params[k]) for k in BATCH_PARAMS)


def rows_per_task(cfg: DictConfig) -> int:
    """Rows per task (and commit): ``workers.batch_size``, raised to ``workers.render_batch``
    when that is larger, so that a task can fill one pipeline call."""
    return max(int(cfg.workers.batch_size), int(cfg.workers.render_batch))


def size_workers(cfg: DictConfig, resources: dict[str, float]) -> tuple[int, float, float]:
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


class Runner:
    """One job: manifest -> workers -> committed results. Use ``run()``."""

    def __init__(
        self,
        cfg: DictConfig,
        manifest_path: str,
        out_dir: str | output.OutputDir,
        *,
        hook: JobHook | None = None,
        renderer_factory: Callable | None = None,
        encoder: Callable | None = None,
        progress_stream: Any = None,
        info: manifest.ManifestInfo | None = None,
    ):
        self.cfg = cfg
        self.info = info
        self.cfg_dict = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        self.manifest_path = manifest_path
        # Resolved once; the workers get URIs (strings), never this filesystem object.
        self.out = output.open_output(out_dir)
        self.hook = SafeHook(hook)  # any object with some JobHook methods; its errors never stop the job
        self.renderer_factory = renderer_factory
        self.encoder = encoder
        self.progress_stream = progress_stream
        self.counters = {"skipped": 0, "rendered": 0}
        self.shards: ShardWriter | None = None  # layout webdataset
        self.workers: list[_Worker] = []
        self.inflight: dict[Any, tuple[_Worker, Batch]] = {}
        self.retry: deque[Batch] = deque()
        self.starting: dict[Any, _Worker] = {}  # info() refs of workers not yet ready
        self.start_failures: dict[str, list[str]] = {}  # one line per cause -> "worker (node)"
        self._next_label = 0
        self.stopped: str | None = None  # request_stop's reason, once asked to stop
        self._stop_deadline = math.inf
        self.per_row: deque[float] = deque(maxlen=256)  # seconds per row of finished batches
        self.first_per_row: deque[float] = deque(maxlen=64)  # the same, of workers' first batches
        self.fetch_limits = FetchLimits(**self.cfg_dict["images"])  # jobs.config.ImagesConfig
        self.elastic = str(cfg.workers.count).lower() == "auto"
        self._next_elastic_check = 0.0
        self._elastic_warned = False
        self._failed_starts = 0
        self.num_cpus, self.num_gpus = 1.0, 0.0

    def request_stop(self, reason: str, grace_s: float) -> None:
        """Stop the job early (a signal, see ``jobs.stop``): no new batch is submitted, the
        batches in flight may finish for ``grace_s`` seconds and are committed; then the job
        ends as usual (compaction, summary with ``stopped``), and rows not committed render on
        the next run. Safe to call from a signal handler or a hook; a second call only
        shortens the grace period."""
        self.stopped = self.stopped or reason
        self._stop_deadline = min(self._stop_deadline, time.monotonic() + max(0.0, float(grace_s)))

    # -- workers -----------------------------------------------------------------------

    def _start_worker(self, elastic: bool = False) -> _Worker:
        import ray

        label = f"worker-{self._next_label}"
        self._next_label += 1
        remote = ray.remote(RenderWorker).options(
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            max_concurrency=2,  # the next batch renders while this one's last video encodes
            max_restarts=0,  # the driver replaces dead workers and retries their batches
            name=None,
        )
        threads = max(1, math.floor(self.num_cpus))
        log_dir = self.out.path("logs") if self.out.local else None
        actor = remote.remote(self.cfg_dict, label, self.renderer_factory, self.encoder, threads, log_dir)
        worker = _Worker(actor, label, elastic=elastic)
        self.workers.append(worker)
        self.starting[actor.info.remote()] = worker
        return worker

    def _started(self, worker: _Worker, info: dict[str, Any] | None, exc: BaseException | None) -> None:
        """A worker's ``info()`` came back (or failed): ready, or dead with its cause recorded once."""
        import ray

        if info is not None and "error" not in info:
            worker.ready = True
            worker.info = info
            worker.last_done = time.monotonic()
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
        if info is not None:
            cause, node, detail = info["error"], info["node"], info["traceback"]
        else:
            cause, node, detail = _death_line(exc), "?", str(exc)
        name = f"{worker.label}.startup-error.log"
        try:
            self.out.makedirs("logs")
            self.out.write_bytes(self.out.path("logs", name), f"{worker.label} on {node}\n{detail}".encode())
            where = self.out.uri_of("logs", name)
        except Exception as write_exc:  # the cause still reaches the terminal
            where = f"not written: {type(write_exc).__name__}"
        new = cause not in self.start_failures
        self.start_failures.setdefault(cause, []).append(f"{worker.label} on {node} ({where})")
        if new:
            log.warning("%s could not start on %s: %s (traceback: %s)", worker.label, node, cause, where)
        try:
            ray.kill(worker.actor, no_restart=True)
        except Exception:
            pass

    def start_failure_lines(self) -> list[str]:
        """One line per distinct start-up failure: the cause, then which workers and where."""
        return [f"{cause} [{'; '.join(where)}]" for cause, where in self.start_failures.items()]

    def _check_start_timeouts(self, now: float) -> None:
        """Give up on workers not ready ``workers.start_timeout_s`` after their own start: kill
        them (``_started``), so that a node joining later does not hand them a GPU they hold unused."""
        timeout = float(self.cfg.workers.start_timeout_s)
        for ref, worker in list(self.starting.items()):
            if now - worker.started_at > timeout:
                del self.starting[ref]
                error = TimeoutError(f"not ready within workers.start_timeout_s={timeout:g} s")
                self._started(worker, None, error)

    def _check_deadlines(self, now: float) -> None:
        """A worker whose oldest batch is past its deadline (``batch_deadline``) is taken for hung:
        killed, and its batches retried like a dead worker's."""
        fixed = self.cfg.workers.batch_timeout_s
        first = float(self.cfg.workers.start_timeout_s)
        floor = float(fixed) if fixed is not None else BATCH_DEADLINE_FLOOR_S  # no deadline is shorter
        for worker in self.workers:
            oldest = worker.oldest() if worker.alive else None
            if oldest is None or now - oldest[1] <= floor:
                continue
            ref, since = oldest
            rows = len(self.inflight[ref][1].rows)
            deadline = batch_deadline(
                rows,
                list(self.per_row),
                fixed,
                first if worker.batches_done == 0 else None,
                first_per_row=list(self.first_per_row),
                fetch_s=fetch_budget_s(rows, self.fetch_limits),
            )
            if now - since > deadline:
                node = worker.info.get("node_ip") or worker.info.get("node") or "?"
                log.warning(
                    "%s (pid %s on %s) has not returned a batch of %d row(s) in %.0f s (deadline %.0f s): "
                    "taken for hung, killed",
                    worker.label,
                    worker.info.get("pid", "?"),
                    node,
                    rows,
                    now - since,
                    deadline,
                )
                self._worker_died(worker, TimeoutError(f"batch deadline of {deadline:.0f} s passed"))

    def _check_elastic(self, now: float) -> None:
        """``workers.count=auto``: start a worker on each GPU the cluster gained (up to one per
        GPU; not counted against ``workers.max_restarts``). Stops after more failed starts than
        ``workers.max_restarts`` (a node whose GPUs cannot start a worker is not retried forever)."""
        import ray

        if not self.elastic or self.num_gpus <= 0 or now < self._next_elastic_check or self.stopped:
            return
        self._next_elastic_check = now + ELASTIC_PERIOD_S
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
            log.warning("could not read the cluster's resources: %s", _death_line(exc))
            return
        live = sum(w.alive for w in self.workers)
        new = min(int(total // self.num_gpus) - live, int(free // self.num_gpus))
        for _ in range(max(0, new)):
            worker = self._start_worker(elastic=True)
            log.info("started %s on a GPU that joined (%g GPU(s) in the cluster)", worker.label, total)

    def _worker_died(self, worker: _Worker, exc: BaseException) -> None:
        import ray

        if not worker.alive:
            return
        worker.alive = False
        log.warning(
            "%s died (%s); retrying its %d batch(es)", worker.label, _death_line(exc), len(worker.inflight)
        )
        for ref in list(worker.inflight):
            _, batch = self.inflight.pop(ref)
            batch.attempts += 1
            batch.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self._requeue(batch)
        worker.inflight.clear()
        try:
            ray.kill(worker.actor, no_restart=True)
        except Exception:
            pass
        if self.restarts_left > 0 and not self.stopped:
            self.restarts_left -= 1
            new = self._start_worker()  # gets batches once its info() says it is ready
            log.info("started %s to replace %s", new.label, worker.label)

    def _requeue(self, batch: Batch) -> None:
        max_attempts = int(self.cfg.workers.max_attempts)
        if batch.attempts < max_attempts:
            self.retry.append(batch)
        elif len(batch.rows) > 1:  # isolate the row that kills workers: one last try each
            self.retry.extend(Batch([r], max_attempts - 1, batch.last_error) for r in batch.rows)
        else:
            error = f"worker process died {batch.attempts} times rendering this row ({batch.last_error})"
            self._commit(batch, [{"status": "failed", "error": error} for _ in batch.rows])

    # -- results -----------------------------------------------------------------------

    def _task(self, row: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": row["id"],
            "image": row["_image"],
            "output": None if self.shards else output.video_path(self.out, row["id"], self.cfg.output.format),
            "params": resolve_params(row, self.cfg_dict["defaults"]),
        }

    def _commit(self, batch: Batch, results: list[dict[str, Any]]) -> None:
        rows = []
        for row, result in zip(batch.rows, results, strict=True):
            out = {k: v for k, v in row.items() if k not in manifest.PRIVATE_KEYS}  # `_x` columns too
            out.update(resolve_params(row, self.cfg_dict["defaults"]))
            out.setdefault("vcut_mode", self.cfg_dict["model"]["vcut"])
            out["fingerprint"] = self.changes.of(row)
            video = result.pop("video", None)
            out.update(result)
            out["attempts"] = batch.attempts + 1
            if self.shards is not None and out["status"] == "ok":
                # committed with its shard, once the shard is published (jobs/shards.py)
                self.shards.add(out, video if video is not None else b"")
            else:
                rows.append(out)
        if rows:
            self._commit_rows(rows)

    def _commit_rows(self, rows: list[dict[str, Any]]) -> None:
        self.writer.commit(rows)
        ok = sum(r["status"] == "ok" for r in rows)
        self.counters["rendered"] += len(rows)
        for row in rows:
            self.hook.on_result(row)
        self.progress.skipped = self.counters["skipped"]
        self.progress.update(ok=ok, failed=len(rows) - ok)

    # -- the loop ----------------------------------------------------------------------

    def _submit(self, batches: Iterator[Batch]) -> bool:
        """Fill every live worker up to its in-flight limit; False when nothing is left."""
        if self.stopped:  # finish what is in flight, submit nothing
            return bool(self.inflight) and time.monotonic() < self._stop_deadline
        per_worker = int(self.cfg.workers.inflight_per_worker)
        exhausted = False
        now = time.monotonic()
        for worker in self.workers:
            while worker.alive and worker.ready and len(worker.inflight) < per_worker:
                batch = self.retry.popleft() if self.retry else next(batches, None)
                if batch is None:
                    exhausted = True
                    break
                ref = worker.actor.render_batch.remote([self._task(r) for r in batch.rows])
                worker.inflight[ref] = now
                self.inflight[ref] = (worker, batch)
        return not exhausted or bool(self.inflight) or bool(self.retry)

    def _collect(self, timeout: float) -> None:
        import ray
        from ray.exceptions import RayTaskError

        refs = list(self.inflight) + list(self.starting)
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        for ref in ready:
            if ref in self.starting:  # a replacement worker finished starting (or failed to)
                starting = self.starting.pop(ref)
                try:
                    self._started(starting, ray.get(ref), None)
                except Exception as exc:
                    self._started(starting, None, exc)
                continue
            if ref not in self.inflight:  # already requeued with its dead worker
                continue
            worker, batch = self.inflight[ref]
            try:
                results = ray.get(ref)
            except RayTaskError as exc:  # render_batch itself raised: the rows fail, the worker lives
                if isinstance(exc.cause, BaseException) and not isinstance(exc.cause, Exception):
                    self._worker_died(worker, exc)
                    continue
                self._done(worker, ref, None)
                error = f"{type(exc.cause).__name__}: {exc.cause}"
                self._commit(batch, [{"status": "failed", "error": error} for _ in batch.rows])
                continue
            except Exception as exc:  # the actor's process is gone
                self._worker_died(worker, exc)
                continue
            self._done(worker, ref, len(batch.rows))
            self._commit(batch, results)

    def _done(self, worker: _Worker, ref: Any, rows: int | None) -> None:
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

    def run(self) -> dict[str, Any]:
        """The job; returns its summary. ``--out`` failing (disk full, read-only, object store
        gone) raises :class:`jobs.stop.OutputWriteError` with what is committed so far."""
        started = time.monotonic()
        try:
            return self._run()
        except Exception as exc:
            failure = output_failure(exc)
            if failure is None or not _from_output_code(exc):
                raise
            if self.shards is not None:  # its spool cannot be published: no temporary left
                self.shards.abort()
            raise OutputWriteError(self.out.uri, *failure, self._summary_after(exc, started)) from exc

    def _summary_after(self, exc: BaseException, started: float) -> dict[str, Any]:
        """What is committed after ``--out`` failed: read back when it still can be (a full
        disk reads), else this run's counts only; ``summary.json`` too, when it can be written."""
        manifest_rows = self.info.num_rows if self.info is not None else 0
        counts = {
            "manifest_rows": manifest_rows,
            "rendered": self.counters["rendered"],
            "skipped": self.counters["skipped"],
            "wall_seconds": time.monotonic() - started,
        }
        try:
            summary = results.summarize(self.out, **counts)
        except Exception:
            return {
                "manifest_rows": manifest_rows,
                "ok": "unknown (the results cannot be read either)",
                "failed": "unknown",
                "rendered_this_run": counts["rendered"],
                "skipped_already_ok": counts["skipped"],
                "wall_seconds": round(counts["wall_seconds"], 3),
            }
        summary["stopped"] = f"output error: {output_failure(exc)[0]}"  # type: ignore[index]
        try:
            _write_json(self.out, summary)
        except Exception as write_exc:
            log.info("summary.json not written either: %s", type(write_exc).__name__)
        return summary

    def _run(self) -> dict[str, Any]:
        import ray

        started = time.monotonic()
        info = self.info or manifest.validate_manifest(self.manifest_path, reserved=results.RESERVED_COLUMNS)
        self.info = info
        webdataset = self.cfg_dict["output"]["layout"] == "webdataset"
        self.out.makedirs("shards" if webdataset else "videos")
        output.clean_temporaries(self.out)
        self.writer = results.ResultWriter(self.out, info.carried_schema)
        if webdataset:  # resume at shard granularity: rows in a published shard are done
            state = scan(self.out, clean=True)
            done = state.done
            self.shards = ShardWriter(
                self.out,
                first_number=state.next_number,
                shard_size=int(self.cfg.output.shard_size),
                fmt=str(self.cfg.output.format),
                schema=self.writer.input_schema,  # the rows' own types; commit casts them
                commit=self._commit_rows,
                caption_column=self.cfg.output.caption_column,
            )
        else:
            done = np.zeros(0, dtype=np.uint64) if self.cfg.output.overwrite else results.done_ids(self.out)
        if self.cfg.output.overwrite:
            done = np.zeros(0, dtype=np.uint64)
        count, self.num_cpus, self.num_gpus = size_workers(self.cfg, ray.cluster_resources())
        if self.elastic and self.num_gpus <= 0:
            log.info("workers.count=auto follows GPUs only: %d CPU worker(s), none added mid-job", count)
        self._next_elastic_check = time.monotonic() + ELASTIC_PERIOD_S
        self.restarts_left = int(self.cfg.workers.max_restarts)
        chunks = manifest.iter_manifest(self.manifest_path, int(self.cfg.workers.window_rows))
        batch_size = rows_per_task(self.cfg)
        if batch_size > int(self.cfg.workers.batch_size):
            log.info("workers.batch_size raised to workers.render_batch=%d (rows per task)", batch_size)
        defaults = self.cfg_dict["defaults"]
        key = (lambda row: render_key(row, defaults)) if int(self.cfg.workers.render_batch) > 1 else None
        rerender = self.cfg_dict["output"].get("rerender") == "changed"
        self.changes = Changes(self.out, self.cfg_dict, resolve_params, rerender=rerender)
        batches = plan_batches(chunks, done, batch_size, self.counters, key, self.changes)
        log.info(
            "job: %d manifest rows, %d already ok, %d worker(s) x %.2f CPU / %.2f GPU",
            info.num_rows,
            done.size,
            count,
            self.num_cpus,
            self.num_gpus,
        )
        self.progress = Progress(
            info.num_rows, interval_s=float(self.cfg.progress_interval_s), stream=self.progress_stream
        )
        try:
            first = next(batches, None)  # nothing left to render: no worker, no model load
            if first is not None:
                self.retry.append(first)
                for _ in range(0 if self.stopped else count):  # each gets batches once ready
                    self._start_worker()
            while first is not None and self._submit(batches):
                now = time.monotonic()
                self._check_start_timeouts(now)
                self._check_deadlines(now)
                self._check_elastic(now)
                if not any(w.alive for w in self.workers) and not self.stopped:
                    if not any(w.ready for w in self.workers):
                        raise JobError("no worker could start", self.start_failure_lines())
                    raise JobError(
                        "every worker died and the restart budget is spent", self.start_failure_lines()
                    )
                self._collect(timeout=min(1.0, max(0.0, self._stop_deadline - now)))
                self.progress.skipped = self.counters["skipped"]
                self.progress.update()  # a log line every interval, even between commits
                self.hook.on_pending(info.num_rows - self.progress.done)
                self.hook.on_workers(
                    sum(w.alive for w in self.workers), sum(bool(w.inflight) for w in self.workers)
                )
        except Exception:
            if self.shards is not None:  # e.g. every worker died: keep what was rendered
                try:
                    self.shards.publish()
                except Exception as exc:
                    log.warning("the open shard could not be published: %s: %s", type(exc).__name__, exc)
            raise
        finally:
            for worker in self.workers:
                try:
                    ray.kill(worker.actor, no_restart=True)
                except Exception:
                    pass
            self.progress.close()
        if self.stopped:
            log.warning(
                "stopped (%s): %d batch(es) in flight not committed; they render on the next run",
                self.stopped,
                len(self.inflight),
            )
        if self.shards is not None:
            self.shards.publish()  # the last, partial shard
        results.compact(self.out)
        if self.shards is not None:  # shards whose rows were all rendered again (--overwrite)
            scan(self.out, clean=True)
        summary = results.summarize(
            self.out,
            manifest_rows=info.num_rows,
            rendered=self.counters["rendered"],
            skipped=self.counters["skipped"],
            wall_seconds=time.monotonic() - started,
        )
        summary["results"] = self.out.uri_of("results")
        summary["layout"] = self.cfg_dict["output"]["layout"]
        if self.shards is not None:
            summary["shards"] = self.out.uri_of("shards")
            summary["shards_published_this_run"] = self.shards.published
        else:
            summary["videos"] = self.out.uri_of("videos")
        summary["vcut_mode"] = self.cfg_dict["model"]["vcut"]
        summary["changed_ok_rows"] = self.changes.changed
        if self.changes.line():
            log.warning("%s", self.changes.line())
        if self.stopped:
            summary["stopped"] = self.stopped
        _write_json(self.out, summary)
        if self.cfg.output.report:
            _write_report(self.out)
        self.hook.on_pending(0)
        self.hook.on_finish(summary)
        return summary


#: Where ``--out`` is read and written: an exception through these files is the output's.
_OUTPUT_CODE = ("jobs/output.py", "jobs/results.py", "jobs/shards.py", "pipeline/storage.py")


def _from_output_code(exc: BaseException) -> bool:
    """``exc`` came through the output's code (not, say, a manifest read on the same store)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    return any(f.filename.replace("\\", "/").endswith(_OUTPUT_CODE) for f in frames)


def _write_json(out: output.OutputDir, data: dict) -> None:
    """``DIR/summary.json``, atomically (local: temporary + rename; object store: one upload)."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    out.write_bytes(out.path("summary.json"), text.encode())


def _write_report(out: output.OutputDir) -> None:
    """``DIR/report.html`` (``jobs.report``); a failure is a warning, never the job's."""
    try:
        from jobs.report import write_report

        log.info("wrote %s", write_report(out))
    except Exception as exc:
        log.warning("job report not written: %s: %s", type(exc).__name__, exc)


def run_job(
    cfg: DictConfig,
    manifest_path: str,
    out_dir: str | output.OutputDir,
    *,
    verbose: bool = False,
    signals: StopSignals | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run a job on the connected Ray cluster, or on a local Ray instance started (and shut
    down) here: ``cfg.ray_address``, else ``RAY_ADDRESS``, else local. Returns the summary.

    A cluster that cannot be joined or lacks the GPUs the config asks for raises
    ``PreflightError`` before any worker starts, and an output folder another driver holds
    raises ``jobs.lock.OutputLockedError`` (see ``jobs.lock``); ``verbose`` streams the workers' output to
    this terminal (they always log to ``DIR/logs/`` when DIR is local). SIGINT and SIGTERM
    stop the job gracefully (``jobs.stop``: ``signals``, else handlers installed here); the
    summary then has ``stopped``."""
    import ray

    from jobs.lock import OutputLock
    from jobs.preflight import check_gpus, connect_ray, ray_address

    info = kwargs.pop("info", None)
    info = info or manifest.validate_manifest(manifest_path, reserved=results.RESERVED_COLUMNS)
    check_layout(cfg, info)
    out_dir = output.open_output(out_dir)  # an unknown protocol or a missing s3fs/gcsfs: before Ray
    # One driver per output folder (raises OutputLockedError), held until the job ends: only
    # its holder cleans temporaries, so a second driver never deletes the first one's files.
    grace_s = float(cfg.workers.stop_grace_s)
    stop = StopSignals(grace_s) if signals is None else contextlib.nullcontext(signals)
    with OutputLock(out_dir), stop as sig:
        own = not ray.is_initialized()
        address = ray_address(cfg.ray_address)
        try:
            if own:
                connect_ray(address, verbose=verbose)
                sig.install()  # again: ray.init sets its own SIGTERM handler
            check_gpus(cfg, ray.cluster_resources(), address)
            runner = Runner(cfg, manifest_path, out_dir, info=info, **kwargs)
            sig.target = runner.request_stop  # from now on a signal stops the job gracefully
            return runner.run()
        finally:
            sig.target = None
            if own:
                ray.shutdown()
