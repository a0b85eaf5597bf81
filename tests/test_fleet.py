"""The job core without Ray: the row record, dispatch with shape affinity, the worker pool's
slots (and the Prometheus series they bound), the writer thread, merges from memory,
streamed reads, the storage boundary's typed errors and the exit-status table."""

from __future__ import annotations

import errno
import sys
import threading
import types
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from omegaconf import OmegaConf

from jobs import dispatch, output, results, stop
from jobs.commits import Committer
from jobs.config import load_config
from jobs.metrics import JobMetrics
from jobs.planner import Batch, RowTask, plan_batches
from jobs.pool import PoolWorker, WorkerPool
from pipeline.fetch import fetch_budget_s
from pipeline.params import BATCH_PARAMS, ROW_PARAMS

# -- the row record ------------------------------------------------------------------------------


def test_a_row_is_resolved_once_into_its_record():
    row = {
        "id": "r1",
        "image": "a.png",
        "_image": "/data/a.png",
        "_row": 3,
        "seed": 5,
        "fps": None,
        "note": "x",
    }
    defaults = {k: 7 for k in ROW_PARAMS}
    task = RowTask.from_row(row, defaults, output="/out/videos/r1.mp4")
    assert task.image == "/data/a.png" and task.output == "/out/videos/r1.mp4"
    assert task.params["seed"] == 5 and task.params["fps"] == 7  # the row's, else the job's
    assert [k for k, _ in task.key] == list(BATCH_PARAMS) and "seed" not in dict(task.key)
    assert task.columns == {"image": "a.png", "note": "x"}  # carried, no private keys, no params
    committed = task.result_row({"status": "ok", "worker": "worker-0"}, "full", attempts=2)
    assert committed["id"] == "r1" and committed["image"] == "a.png" and committed["note"] == "x"
    assert committed["seed"] == 5 and committed["vcut_mode"] == "full" and committed["attempts"] == 2
    with pytest.raises(AttributeError):
        task.id = "other"  # frozen: nobody changes a row after the planner


def test_batches_carry_records_and_their_key():
    rows = [{"id": f"r{i}", "_image": "a.png", "width": 64 if i < 2 else 128} for i in range(4)]
    defaults = {k: 1 for k in ROW_PARAMS}
    make = lambda r: RowTask.from_row(r, defaults)  # noqa: E731
    batches = list(plan_batches(iter([rows]), np.zeros(0, np.uint64), 4, {"skipped": 0}, make, by_key=True))
    assert [[t.id for t in b.rows] for b in batches] == [["r0", "r1"], ["r2", "r3"]]
    assert dict(batches[0].key)["width"] == 64 and dict(batches[1].key)["width"] == 128


# -- dispatch --------------------------------------------------------------------------------------


def _w(label: str, keys=(), inflight: int = 0) -> PoolWorker:
    return PoolWorker(actor=None, label=label, keys=set(keys), inflight=dict.fromkeys(range(inflight), 0.0))


def test_a_shape_goes_to_a_worker_that_has_it():
    a, b, fresh = _w("a", {"s1"}, inflight=1), _w("b", {"s2"}), _w("c")
    assert dispatch.choose_worker("s1", [b, fresh, a]) is a  # has s1 though busier
    assert dispatch.choose_worker("s2", [a, fresh, b]) is b
    assert dispatch.choose_worker("s3", [a, b, fresh]) is fresh  # a new shape: a fresh worker
    many = _w("d", {"s1", "s2", "s4"})
    assert dispatch.choose_worker("s3", [many, a]) is a  # else the one with the fewest shapes
    assert dispatch.choose_worker("s3", []) is None


# -- the worker pool, without Ray ---------------------------------------------------------------------


class _Ref:
    pass


class _Method:
    def __init__(self, calls: list, name: str):
        self.calls, self.name = calls, name

    def remote(self, *args: Any) -> _Ref:
        self.calls.append((self.name, args))
        return _Ref()


class _Actor:
    def __init__(self, label: str):
        self.label, self.calls = label, []
        self.info = _Method(self.calls, "info")
        self.render_batch = _Method(self.calls, "render_batch")


class _FakeRay(types.ModuleType):
    """Just what ``WorkerPool`` calls: ``remote(cls).options(...).remote(...)`` and ``kill``."""

    def __init__(self):
        super().__init__("ray")
        self.killed: list[_Actor] = []

    def remote(self, cls):
        fake = self

        class _Options:
            def options(self, **kw):
                return self

            def remote(self, cfg, label, *rest):
                return _Actor(label)

        del fake
        return _Options()

    def kill(self, actor, no_restart=True):
        self.killed.append(actor)


@pytest.fixture()
def pool(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", _FakeRay())
    cfg = load_config(dotlist=["workers.max_restarts=5", "workers.inflight_per_worker=1"])
    failed: list = []
    p = WorkerPool(
        cfg, OmegaConf.to_container(cfg), output.open_output(tmp_path), lambda b, e: failed.append(b)
    )
    return p


def _ready(pool: WorkerPool, worker: PoolWorker, node: str = "n1") -> None:
    ref = next(r for r, w in pool.starting.items() if w is worker)
    del pool.starting[ref]
    pool.started(
        worker, {"node": node, "node_ip": "127.0.0.1", "node_id": "ab", "pid": 1, "device": "cpu"}, None
    )


def _task(i: int, width: int) -> RowTask:
    params = {k: 1 for k in ROW_PARAMS} | {"width": width}
    return RowTask(f"r{i}", "a.png", params, tuple((k, params[k]) for k in BATCH_PARAMS))


def test_a_replacement_takes_its_slots_label_and_metrics_series_stay_bounded(pool):
    workers = [pool.start_worker() for _ in range(3)]
    for w in workers:
        _ready(pool, w)
    assert [w.label for w in workers] == ["worker-0", "worker-1", "worker-2"]
    metrics = JobMetrics()

    def row(worker: PoolWorker) -> dict:
        return {"worker": worker.label, "node": "n1", "status": "ok", "frames": 1, "seconds": 1.0}

    for w in workers:
        metrics.record(row(w))
    series = len(list(_samples(metrics)))
    for _ in range(4):  # the same slot dies four times
        dead = next(w for w in pool.workers if w.label == "worker-1" and w.alive)
        pool.worker_died(dead, RuntimeError("gone"))
        new = pool.workers[-1]
        assert new.label == "worker-1" and new is not dead and not new.ready
        _ready(pool, new)
        metrics.record(row(new))
    assert len(list(_samples(metrics))) == series  # no new series for a replacement
    assert {w.label for w in pool.workers} == {"worker-0", "worker-1", "worker-2"}
    assert len(pool.workers) == 7 and sum(w.alive for w in pool.workers) == 3


def _samples(metrics: JobMetrics):
    for family in metrics.registry.collect():
        for sample in family.samples:
            if "worker" in sample.labels:
                yield sample.name, tuple(sorted(sample.labels.items()))


def test_dispatch_sends_each_shape_back_to_the_worker_that_met_it(pool):
    a, b = pool.start_worker(), pool.start_worker()
    _ready(pool, a)
    _ready(pool, b)
    batches = iter([Batch([_task(0, 64)]), Batch([_task(1, 128)])])
    assert pool.submit(batches) and len(pool.inflight) == 2 and next(batches, None) is None
    first = {w.label: w.keys for w in (a, b)}
    assert sorted(len(k) for k in first.values()) == [1, 1]  # one shape each
    for ref, (worker, _batch) in list(pool.inflight.items()):
        pool.done(worker, ref, 1)
    pool.submit(iter([Batch([_task(2, 128)]), Batch([_task(3, 64)])]))
    for worker, batch in pool.inflight.values():
        assert batch.key in first[worker.label]  # each shape went back to its worker
    assert all(len(w.keys) == 1 for w in (a, b))


def test_a_worker_that_never_started_is_named_with_its_node(pool):
    w = pool.start_worker()
    ref = next(iter(pool.starting))
    del pool.starting[ref]
    pool.started(
        w, {"node": "gpu-7", "node_ip": "10.0.0.7", "error": "RuntimeError: CUDA", "traceback": "tb"}, None
    )
    never = pool.never_started()
    assert never == [{"worker": "worker-0", "node": "gpu-7 (10.0.0.7)", "error": "RuntimeError: CUDA"}]
    log = pool.out.path("logs", "worker-0.startup-error.log")
    assert open(log).read().startswith("worker-0 on gpu-7 (10.0.0.7)\n")


def test_each_started_worker_is_listed_with_its_startup_and_compile_seconds(pool):
    first = pool.start_worker()
    ref = next(r for r, w in pool.starting.items() if w is first)
    del pool.starting[ref]
    info = {"node": "n1", "node_ip": "127.0.0.1", "pid": 7, "device": "cpu", "startup_seconds": 2.5}
    pool.started(first, dict(info, compile="default"), None)
    pool.note_committed([{"worker": "worker-0", "compile_seconds": 30.0}, {"worker": "worker-0"}])
    pool.worker_died(first, RuntimeError("gone"))  # its replacement takes the label
    second = pool.workers[-1]
    ref = next(r for r, w in pool.starting.items() if w is second)
    del pool.starting[ref]
    pool.started(second, dict(info, pid=8, startup_seconds=1.5, compile="default"), None)
    pool.note_committed([{"worker": "worker-0", "compile_seconds": 4.0}])
    listed = pool.started_workers()
    seconds = [(w["pid"], w["startup_seconds"], w["compile_seconds"]) for w in listed]
    assert seconds == [(7, 2.5, 30.0), (8, 1.5, 4.0)]
    assert all(w["node"] == "n1 (127.0.0.1)" and w["ready_after_s"] >= 0 for w in listed)


def test_deadline_median_is_computed_once_per_check(pool, monkeypatch):
    calls = []
    real = dispatch.statistics.median

    def counting(values):
        calls.append(1)
        return real(values)

    import jobs.pool as jp

    monkeypatch.setattr(jp.statistics, "median", counting)
    workers = [pool.start_worker() for _ in range(20)]
    for w in workers:
        _ready(pool, w)
    pool.per_row.extend([20.0] * 100)  # deadline: 5 x 1 row x 20 s = 100 s
    pool.submit(iter([Batch([_task(i, 64)]) for i in range(20)]))
    for w in workers:  # every batch is past the floor (looked at), none past its deadline
        w.last_done, w.batches_done = 0.0, 1
        for ref in w.inflight:
            w.inflight[ref] = 0.0
    pool.check_deadlines(now=dispatch.BATCH_DEADLINE_FLOOR_S + 10.0)
    assert len(calls) == 1 and all(w.alive for w in workers)
    pool.check_deadlines(now=dispatch.BATCH_DEADLINE_FLOOR_S + 10.5)  # within the check period
    assert len(calls) == 1
    # past every deadline (100 s in the model + the batch's image fetch budget): all taken for hung
    pool.check_deadlines(now=101.0 + fetch_budget_s(1, pool.fetch_limits))
    assert len(calls) == 2 and not any(w.alive for w in workers)


# -- the writer thread -----------------------------------------------------------------------------


class _SlowWriter:
    """A ResultWriter stand-in whose commit waits for ``release`` (a store that hangs)."""

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Event()
        self.parts: list[list[str]] = []

    def commit(self, rows):
        self.entered.set()
        assert self.release.wait(30)
        self.parts.append([r["id"] for r in rows])


def test_the_loop_never_waits_on_a_slow_commit_and_waiting_rows_share_a_part():
    writer = _SlowWriter()
    committer = Committer(writer, max_pending=100)
    committer.put([{"id": "a"}])
    assert writer.entered.wait(30)  # the thread is inside a commit that does not return
    for name in "bcd":
        committer.put([{"id": name}])  # returns at once: the loop goes on
    assert committer.committed() == []  # nothing is on storage yet: nothing counted
    writer.release.set()
    committer.close()
    assert writer.parts == [["a"], ["b", "c", "d"]]  # what queued meanwhile is one part
    assert [[r["id"] for r in rows] for rows in committer.committed()] == [["a"], ["b"], ["c"], ["d"]]


def test_a_storage_failure_in_the_thread_reaches_the_loop_as_the_typed_error(tmp_path, monkeypatch):
    out = output.open_output(tmp_path)
    writer = results.ResultWriter(out)
    committer = Committer(writer)
    committer.put([{"id": "a", "status": "ok"}])
    committer.close()
    assert len(committer.committed()) == 1

    def full(fs, path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output, "put_atomic", full)
    committer = Committer(writer)
    committer.put([{"id": "b", "status": "ok"}])
    with pytest.raises(output.OutputError) as info:
        committer.close()
    assert info.value.cause == "No space left on device (ENOSPC)" and "free some space" in info.value.advice
    assert stop.exit_status(info.value) == stop.ExitStatus.IO_ERROR


# -- results: merges from memory, streamed reads -------------------------------------------------


def test_merges_read_nothing_back_and_delete_in_bulk(tmp_path, monkeypatch):
    out = output.open_output(tmp_path)
    writer = results.ResultWriter(out, merge_every=4)
    reads, bulk = [], []
    monkeypatch.setattr(output.OutputDir, "read_table", lambda self, *a, **k: reads.append(a))
    real_remove_many = output.OutputDir.remove_many
    monkeypatch.setattr(
        output.OutputDir,
        "remove_many",
        lambda self, paths: (bulk.append(len(paths)), real_remove_many(self, paths)),
    )
    for i, rid in enumerate(["a", "b", "a", "c"]):
        writer.commit([{"id": rid, "status": "ok" if i else "failed"}])
    assert reads == [] and bulk == [4]
    monkeypatch.undo()
    table = results.read_results(out)
    assert sorted(table.column("id").to_pylist()) == ["a", "b", "c"]
    assert len(out.listdir("results")) == 1
    assert dict(zip(table["id"].to_pylist(), table["status"].to_pylist(), strict=True))["a"] == "ok"


def test_summary_resume_and_report_read_only_their_columns(tmp_path, monkeypatch):
    out = output.open_output(tmp_path)
    writer = results.ResultWriter(out, pa.schema([("note", pa.string())]))
    for i in range(3):
        writer.commit([{"id": f"r{i}", "status": "ok", "macs": 10, "note": "x" * 100}])
    seen: list = []
    real = output.OutputDir.read_table

    def spy(self, path, columns=None):
        seen.append(None if columns is None else tuple(columns))
        return real(self, path, columns)

    monkeypatch.setattr(output.OutputDir, "read_table", spy)
    assert results.done_ids(out).size == 3
    summary = results.summarize(out, manifest_rows=3, rendered=3, skipped=0, wall_seconds=1.0)
    assert summary["ok"] == 3 and summary["total_macs"] == 30
    assert results.read_results(out, ["id", "seconds", "nosuch"]).column_names == ["id", "seconds"]
    assert None not in seen and all("note" not in cols for cols in seen)


# -- exit statuses ----------------------------------------------------------------------------------


def test_one_table_maps_errors_to_exit_statuses():
    from jobs.lock import OutputLockedError
    from jobs.manifest import ManifestError
    from jobs.pool import JobError
    from jobs.preflight import ClusterUnavailableError, PreflightError

    assert stop.exit_status(output.OutputError("/o", "x", "y")) == 74
    assert stop.exit_status(ClusterUnavailableError("x")) == 69
    assert stop.exit_status(PreflightError("x")) == 2
    assert stop.exit_status(ManifestError("x")) == 2
    assert stop.exit_status(JobError("x")) == 1
    assert stop.exit_status(OutputLockedError.__new__(OutputLockedError)) == 75
    assert stop.exit_status(TypeError("a bug")) is None


def test_the_storage_boundary_raises_typed_errors_and_lets_bugs_through(tmp_path):
    out = output.open_output(tmp_path / "f")
    (tmp_path / "f").write_text("a file where the folder should be")
    with pytest.raises(output.OutputError) as info:
        out.makedirs("results")
    assert "EEXIST" in info.value.cause or "ENOTDIR" in info.value.cause
    with pytest.raises(TypeError):  # a bug stays itself
        out.write_bytes(None, b"x")  # type: ignore[arg-type]


# -- no surprise clusters --------------------------------------------------------------------------

_CONNECT = """
import ray
from jobs.preflight import connect_ray
connect_ray(None)
print("GCS", ray.get_runtime_context().gcs_address)
ray.shutdown()
"""


@pytest.mark.slow
def test_without_address_a_registered_cluster_is_not_joined(tmp_path):
    """A cluster `ray start` registered on this machine (its address in
    ``$RAY_TMPDIR/ray/ray_current_cluster``, where ``ray.init()`` looks): without ``--address``
    the driver starts an instance of its own instead of joining it."""
    import os
    import shutil
    import subprocess
    import tempfile

    from conftest import ray_head_node

    with ray_head_node() as head:
        registry = tempfile.mkdtemp(prefix="vrt", dir="/tmp")  # short: Ray's socket paths
        try:
            os.makedirs(os.path.join(registry, "ray"))
            with open(os.path.join(registry, "ray", "ray_current_cluster"), "w") as f:
                f.write(head)  # what `ray start` writes there
            env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
            env.update(RAY_TMPDIR=registry, RAY_AUTH_MODE="disabled", PYTHONPATH=os.getcwd())
            proc = subprocess.run(
                [sys.executable, "-c", _CONNECT], env=env, capture_output=True, text=True, timeout=300
            )
        finally:
            shutil.rmtree(registry, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gcs = [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("GCS ")]
    # Ray may name the head by another of this machine's addresses: the GCS port tells them apart
    assert gcs and gcs[0].rsplit(":", 1)[1] != head.rsplit(":", 1)[1], (gcs, head)


def test_final_lines_name_workers_that_never_started_and_never_print_results_none():
    from jobs.progress import format_summary

    summary = {"manifest_rows": 2, "ok": 2, "failed": 0, "results": "/o/results"}
    summary["workers_not_started"] = [{"worker": "worker-3", "node": "gpu-2 (10.0.0.2)", "error": "OOM"}]
    text = format_summary(summary)
    assert "worker-3 on gpu-2 (10.0.0.2): OOM" in text and "/o/results" in text
    unreadable = {"manifest_rows": 2, "ok": "unknown", "failed": "unknown", "rendered_this_run": 1}
    unreadable.update(skipped_already_ok=0, wall_seconds=1.0)  # what is known when --out fails
    assert "None" not in format_summary(unreadable)


def test_the_rows_held_for_a_merge_are_bounded(tmp_path):
    out = output.open_output(tmp_path)
    writer = results.ResultWriter(out, merge_every=1000, merge_rows=3)
    writer.commit([{"id": "a", "status": "ok"}, {"id": "b", "status": "ok"}])
    assert len(out.listdir("results")) == 1 and writer._recent_rows == 2
    writer.commit([{"id": "c", "status": "ok"}, {"id": "d", "status": "ok"}])  # 4 rows >= 3: merged
    assert len(out.listdir("results")) == 1 and writer._recent == [] and writer._recent_rows == 0
    assert sorted(results.read_results(out).column("id").to_pylist()) == ["a", "b", "c", "d"]


def test_rows_written_together_that_fail_are_written_apart_so_only_the_failing_ones_are_lost():
    class Writer(_SlowWriter):
        def commit(self, rows):
            ids = [r["id"] for r in rows]
            if "bad" in ids:
                raise OSError(errno.EFBIG, "File too large")
            super().commit(rows)

    writer = Writer()
    committer = Committer(writer, linger_s=0.0)
    committer.put([{"id": "a"}])
    assert writer.entered.wait(30)
    for name in ("b", "bad", "c"):
        committer.put([{"id": name}])
    writer.release.set()
    with pytest.raises(OSError, match="File too large"):
        committer.close()
    assert writer.parts == [["a"], ["b"]]  # b alone after b+bad+c failed; nothing after bad
    assert [[r["id"] for r in rows] for rows in committer.committed()] == [["a"], ["b"]]
