"""The driver's loop: plans batches, keeps the worker pool busy, collects results, commits.

The driver reads the manifest in windows of ``workers.window_rows`` rows, drops ids already
``ok`` in ``DIR/results/``, and the planner (``jobs.planner``) turns every other row into one
:class:`~jobs.planner.RowTask` and packs them into small batches. The pool
(``jobs.pool``) sends each batch to a worker; a finished batch's rows go to the writer thread
(``jobs.commits``), so the loop never waits on storage: it keeps collecting results and
sending batches while a part is written or merged. ``Runner.request_stop`` (signals, see
``jobs.stop``) stops submitting, lets the batches in flight finish until a grace deadline,
and ends the job normally with what was committed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from jobs import manifest, output, results, resume
from jobs.commits import Committer
from jobs.config import compile_cache_uri
from jobs.dispatch import size_workers
from jobs.fingerprint import Changes
from jobs.hooks import JobHook, SafeHook
from jobs.output import OutputError
from jobs.planner import Batch, RowTask, plan_batches, rows_per_task
from jobs.pool import JobError, WorkerPool
from jobs.progress import Progress
from jobs.shards import ShardBook, pop_reports
from jobs.stop import OutputWriteError

log = logging.getLogger("jobs")

#: Seconds between two ``on_workers`` hook calls (counting the workers is O(workers)).
WORKERS_HOOK_PERIOD_S = 1.0


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
        # Resolved once (``run_job`` passes the OutputDir it opened); the workers get URIs.
        self.out = output.open_output(out_dir)
        model = self.cfg_dict["model"]  # the workers' compile cache: DIR/compile-cache unless set
        default_cache = self.out.uri_of("compile-cache")
        model["compile_cache"] = compile_cache_uri(model.get("compile_cache"), default_cache)
        self.hook = SafeHook(hook)  # any object with some JobHook methods; its errors never stop the job
        self.renderer_factory = renderer_factory
        self.encoder = encoder
        self.progress_stream = progress_stream
        self.counters = {"skipped": 0, "rendered": 0}
        self.shards: ShardBook | None = None  # layout webdataset
        self.start: resume.JobStart | None = None  # the output generation, what is done
        self.pool: WorkerPool | None = None
        self.committer: Committer | None = None
        self.stopped: str | None = None  # request_stop's reason, once asked to stop
        self._stop_deadline = math.inf
        self._next_workers_hook = 0.0

    @property
    def workers(self) -> list:
        """Every worker started so far (``jobs.pool_worker.PoolWorker``)."""
        return self.pool.workers if self.pool is not None else []

    def request_stop(self, reason: str, grace_s: float) -> None:
        """Stop the job early (a signal, see ``jobs.stop``): no new batch is submitted, the
        batches in flight may finish for ``grace_s`` seconds and are committed; then the job
        ends as usual (compaction, summary with ``stopped``), and rows not committed render on
        the next run. Safe to call from a signal handler or a hook; a second call only
        shortens the grace period."""
        self.stopped = self.stopped or reason
        self._stop_deadline = min(self._stop_deadline, time.monotonic() + max(0.0, float(grace_s)))
        if self.pool is not None:
            self.pool.stopping = True

    # -- commits -------------------------------------------------------------------------

    def _commit(self, batch: Batch, results: list[dict[str, Any]]) -> None:
        """A batch's results: ok rows of a webdataset job are held until their worker reports
        their shard published, then committed with it (``jobs.shards.ShardBook``); every other
        row goes to the writer thread at once. Shard commits go through the writer thread too."""
        reports = pop_reports(results)
        rows = []
        vcut_mode = self.cfg_dict["model"]["vcut"]
        for task, result in zip(batch.rows, results, strict=True):
            row = task.result_row(result, vcut_mode, batch.attempts + 1)
            if self.shards is not None and row["status"] == "ok":
                self.shards.hold(row, task)  # the task renders again if its worker dies first
            else:
                rows.append(row)
        if rows:
            self._commit_rows(rows)
        if self.shards is not None and results:
            for shard_rows in self.shards.receive(reports, results[0].get("worker")):
                self._commit_rows(shard_rows)

    def _commit_failed(self, batch: Batch, error: str) -> None:
        self._commit(batch, [{"status": "failed", "error": error} for _ in batch.rows])

    def _commit_rows(self, rows: list[dict[str, Any]]) -> None:
        self.committer.put(rows)

    def _drain_commits(self) -> None:
        """Count, show and hand to the hook the rows the writer thread has committed."""
        for rows in self.committer.committed():
            ok = sum(r["status"] == "ok" for r in rows)
            self.counters["rendered"] += len(rows)
            if self.pool is not None:
                self.pool.note_committed(rows)
            for row in rows:
                self.hook.on_result(row)
            self.progress.skipped = self.counters["skipped"]
            self.progress.update(ok=ok, failed=len(rows) - ok)

    # -- the loop ------------------------------------------------------------------------

    def _submit(self, batches: Iterator[Batch]) -> bool:
        """Fill every live worker up to its in-flight limit; False when nothing is left."""
        pool = self.pool
        if self.stopped:  # finish what is in flight, submit nothing
            return bool(pool.inflight) and time.monotonic() < self._stop_deadline
        exhausted = not pool.submit(batches)
        return not exhausted or bool(pool.inflight) or bool(pool.retry)

    def _collect(self, timeout: float) -> None:
        """Wait up to ``timeout`` for one result (or worker start-up), then take every other
        one that is ready too."""
        import ray
        from ray.exceptions import RayTaskError

        pool = self.pool
        refs = list(pool.inflight) + list(pool.starting)
        if not refs:
            return
        ready, rest = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready and rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        for ref in ready:
            if ref in pool.starting:  # a worker finished starting (or failed to)
                starting = pool.starting.pop(ref)
                try:
                    pool.started(starting, ray.get(ref), None)
                except Exception as exc:
                    pool.started(starting, None, exc)
                continue
            if ref not in pool.inflight:  # already requeued with its dead worker
                continue
            worker, batch = pool.inflight[ref]
            try:
                rows = ray.get(ref)
            except RayTaskError as exc:  # render_batch itself raised: the rows fail, the worker lives
                if isinstance(exc.cause, BaseException) and not isinstance(exc.cause, Exception):
                    pool.worker_died(worker, exc)
                    continue
                pool.done(worker, ref, None)
                self._commit_failed(batch, f"{type(exc.cause).__name__}: {exc.cause}")
                continue
            except Exception as exc:  # the actor's process is gone
                pool.worker_died(worker, exc)
                continue
            pool.done(worker, ref, len(batch.rows))
            self._commit(batch, rows)

    def run(self) -> dict[str, Any]:
        """The job; returns its summary. ``--out`` failing (disk full, read-only, object store
        gone: ``jobs.output.OutputError``) raises :class:`jobs.stop.OutputWriteError` with what
        is committed so far."""
        started = time.monotonic()
        try:
            return self._run()
        except OutputError as exc:
            if self.committer is not None:  # rows the writer thread committed before it failed
                with contextlib.suppress(Exception):
                    self._drain_commits()
            raise OutputWriteError(
                self.out.uri, exc.cause, exc.advice, self._summary_after(exc, started)
            ) from exc

    def _summary_after(self, exc: OutputError, started: float) -> dict[str, Any]:
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
            summary = {
                "manifest_rows": manifest_rows,
                "ok": "unknown (the results cannot be read either)",
                "failed": "unknown",
                "rendered_this_run": counts["rendered"],
                "skipped_already_ok": counts["skipped"],
                "wall_seconds": round(counts["wall_seconds"], 3),
            }
            self._describe(summary)
            return summary
        self._describe(summary)
        summary["stopped"] = f"output error: {exc.cause}"
        try:
            write_summary(self.out, summary)
        except Exception as write_exc:
            log.info("summary.json not written either: %s", type(write_exc).__name__)
        return summary

    def _describe(self, summary: dict[str, Any]) -> None:
        """Where things are, and the workers that never started, into ``summary``."""
        summary["results"] = self.out.uri_of("results")
        summary["layout"] = self.cfg_dict["output"]["layout"]
        if self.shards is not None:
            summary["shards"] = self.out.uri_of("shards")
            summary["shards_published_this_run"] = self.shards.published
        else:
            summary["videos"] = self.out.uri_of("videos")
        summary["vcut_mode"] = self.cfg_dict["model"]["vcut"]
        summary["workers"] = self.pool.started_workers() if self.pool is not None else []
        summary["workers_not_started"] = self.pool.never_started() if self.pool is not None else []

    def _plan(self, done: np.ndarray, webdataset: bool) -> Iterator[Batch]:
        chunks = manifest.iter_manifest(self.manifest_path, int(self.cfg.workers.window_rows))
        batch_size = rows_per_task(self.cfg)
        if batch_size > int(self.cfg.workers.batch_size):
            log.info("workers.batch_size raised to workers.render_batch=%d (rows per task)", batch_size)
        defaults, fmt = self.cfg_dict["defaults"], str(self.cfg.output.format)
        rerender = self.cfg_dict["output"].get("rerender") == "changed"
        self.changes = Changes(self.out, self.cfg_dict, rerender=rerender)  # rows whose inputs changed

        gen = self.start.generation.id

        def make(row: dict[str, Any]) -> RowTask:
            video = None if webdataset else output.video_path(self.out, row["id"], fmt)
            return RowTask.from_row(row, defaults, video, gen, job_key=self.changes.key)

        by_key = int(self.cfg.workers.render_batch) > 1
        return plan_batches(chunks, done, batch_size, self.counters, make, by_key, self.changes)

    def _run(self) -> dict[str, Any]:
        import ray

        started = time.monotonic()
        info = self.info or manifest.validate_manifest(self.manifest_path, reserved=results.RESERVED_COLUMNS)
        results.release_memory()  # what validating freed (~70 MiB kept at 1M rows otherwise)
        self.info = info
        webdataset = self.cfg_dict["output"]["layout"] == "webdataset"
        self.out.makedirs("shards" if webdataset else "videos")
        output.clean_temporaries(self.out)
        self.writer = results.ResultWriter(self.out, info.carried_schema)
        self.start = resume.begin(self.cfg, self.out, self.writer.input_schema, webdataset)
        done, self.shards = self.start.done, self.start.shards
        pool = self.pool = WorkerPool(
            self.cfg,
            self.cfg_dict,
            self.out,
            self._commit_failed,
            renderer_factory=self.renderer_factory,
            encoder=self.encoder,
            shards=self.shards,
        )
        pool.stopping = bool(self.stopped)
        count, pool.num_cpus, pool.num_gpus = size_workers(self.cfg, ray.cluster_resources())
        # compile=auto's input (pipeline.compile.compile_pays): rows per worker and shape, taken
        # as one shape (a planner that counts the job's shapes divides by their number)
        self.cfg_dict["model"]["compile_rows"] = max(0, info.num_rows - int(done.size)) / max(1, count)
        if pool.elastic and pool.num_gpus <= 0:
            log.info("workers.count=auto follows GPUs only: %d CPU worker(s), none added mid-job", count)
        batches = self._plan(done, webdataset)
        log.info(
            "job: %d manifest rows, %d already ok, %d worker(s) x %.2f CPU / %.2f GPU",
            info.num_rows,
            done.size,
            count,
            pool.num_cpus,
            pool.num_gpus,
        )
        self.progress = Progress(
            info.num_rows, interval_s=float(self.cfg.progress_interval_s), stream=self.progress_stream
        )
        self.committer = Committer(self.writer)
        try:
            first = next(batches, None)  # nothing left to render: no worker, no model load
            if first is not None:
                pool.retry.append(first)
                for _ in range(0 if self.stopped else count):  # each gets batches once ready
                    pool.start_worker()
            while first is not None and self._submit(batches):
                self._collect(timeout=min(1.0, max(0.0, self._stop_deadline - time.monotonic())))
                now = time.monotonic()  # after collecting: what came back never counts as late
                pool.check_start_timeouts(now)
                pool.check_deadlines(now)
                pool.check_elastic(now)
                if not self.stopped and not any(w.alive for w in pool.workers):
                    if not any(w.ready for w in pool.workers):
                        raise JobError("no worker could start", pool.start_failure_lines())
                    raise JobError(
                        "every worker died and the restart budget is spent", pool.start_failure_lines()
                    )
                self._drain_commits()
                self._tick(info.num_rows, now)
            if self.shards is not None:  # each idle worker publishes its open shard
                idle = [(w.label, w.actor) for w in pool.workers if w.alive and w.ready and not w.inflight]
                self.shards.flush(idle, self._commit_rows)
            self.committer.close()  # everything queued is on storage before compaction
            self._drain_commits()
        except Exception:
            self.committer.abandon()  # writes what is queued (a failed store: nothing more)
            raise
        finally:
            pool.kill_all()
            self.progress.close()
        return self._finish(started)

    def _tick(self, num_rows: int, now: float) -> None:
        """Once a pass: the progress line, and the pending/worker counts for the hook."""
        self.progress.skipped = self.counters["skipped"]
        self.progress.update()  # a log line every interval, even between commits
        self.hook.on_pending(num_rows - self.progress.done)
        if now >= self._next_workers_hook:
            self._next_workers_hook = now + WORKERS_HOOK_PERIOD_S
            workers = self.pool.workers
            self.hook.on_workers(sum(w.alive for w in workers), sum(bool(w.inflight) for w in workers))

    def _finish(self, started: float) -> dict[str, Any]:
        """After the loop: compaction, the output generation, ``summary.json``, the report."""
        if self.stopped:
            log.warning(
                "stopped (%s): %d batch(es) in flight not committed; they render on the next run",
                self.stopped,
                len(self.pool.inflight),
            )
        results.release_memory()  # the manifest reader's buffers, before compaction reads parts
        results.compact(self.out)
        gen = resume.finish(self.out, self.start, bool(self.stopped))
        summary = results.summarize(
            self.out,
            manifest_rows=self.info.num_rows,
            rendered=self.counters["rendered"],
            skipped=self.counters["skipped"],
            wall_seconds=time.monotonic() - started,
        )
        self._describe(summary)
        summary.update(resume.summary_fields(self.out, gen))
        self.changes.report(summary, log)  # changed_ok_rows, and one line when there are some
        if self.stopped:
            summary["stopped"] = self.stopped
        write_summary(self.out, summary)
        if self.cfg.output.report:
            write_report(self.out)
        self.hook.on_pending(0)
        self.hook.on_finish(summary)
        return summary


def write_summary(out: output.OutputDir, data: dict) -> None:
    """``DIR/summary.json``, atomically (local: temporary + rename; object store: one upload)."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    out.write_bytes(out.path("summary.json"), text.encode())


def write_report(out: output.OutputDir) -> None:
    """``DIR/report.html`` (``jobs.report``); a failure is a warning, never the job's."""
    try:
        from jobs.report import write_report as write

        log.info("wrote %s", write(out))
    except Exception as exc:
        log.warning("job report not written: %s: %s", type(exc).__name__, exc)
