"""Workers on a multi-node Ray cluster: hung workers, workers beyond the GPUs, GPUs that join,
nodes that die, GPU workers without CUDA, early stop. ``jobs.runner`` / ``jobs.worker``.

One cluster serves the module: a head node with no resources (the driver's) and two nodes
with one fake GPU each (``ray start --num-gpus 1``; torch here is a CPU build, so rendering
needs ``workers.allow_cpu_fallback=true``), all on loopback with their own temp dirs and ports.
Tests add and kill nodes of their own; every process is killed by the PID of the ``ray start``
it came from (its process group), never by name. Rows render with ``jobs.testing``'s fake renderer.
The cluster tests are ``slow``; the unit tests at the end (deadline, sizing, config, the CUDA
refusal in-process) are not.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import free_port, subprocess_env
from omegaconf import OmegaConf

from jobs.testing import FakeRendererFactory, fake_encode, fake_renderer
from pipeline.params import ROW_PARAMS

# -- the cluster -------------------------------------------------------------------------------


@dataclass
class Node:
    proc: subprocess.Popen
    temp: str
    port: int  # its node manager port: how ray.nodes() names it

    @property
    def pid(self) -> int:
        return self.proc.pid

    def node_id(self) -> str:
        import ray

        for node in ray.nodes():
            if node["NodeManagerPort"] == self.port and node["Alive"]:
                return node["NodeID"]
        raise AssertionError(f"node on port {self.port} is not in the cluster")


class RayCluster:
    """``ray start`` nodes on loopback, each with its own temp dir and ports and its own
    process group (``start_new_session``): ``kill`` SIGKILLs that group, and only it."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.address: str | None = None
        self.env = subprocess_env(
            drop=("RAY_",),
            RAY_AUTH_MODE="disabled",
            # a dead node is noticed in ~2 s instead of Ray's default ~30 s
            RAY_health_check_initial_delay_ms="1000",
            RAY_health_check_period_ms="500",
            RAY_health_check_timeout_ms="500",
            RAY_health_check_failure_threshold="3",
        )

    def add(self, gpus: int = 1, cpus: int = 1) -> Node:
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        temp = tempfile.mkdtemp(prefix="vrc", dir="/tmp")  # short: socket paths have a length limit
        port = free_port()
        cmd = [ray, "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", temp]
        cmd += ["--num-cpus", str(cpus), "--num-gpus", str(gpus), "--disable-usage-stats"]
        cmd += [f"--node-manager-port={port}", f"--object-manager-port={free_port()}"]
        cmd += [f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        cmd += [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}"]
        if self.address is None:
            gcs = free_port()
            cmd += ["--head", "--port", str(gcs), "--include-dashboard", "false"]
        else:
            cmd += ["--address", self.address]
        log = Path(temp) / "ray-start.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        node = Node(proc, temp, port)
        self.nodes.append(node)
        # printed once the raylet has registered with the GCS: the node is in the cluster
        deadline = time.monotonic() + 60
        while "Ray runtime started" not in (text := log.read_text(errors="replace")):
            assert proc.poll() is None, f"ray start exited:\n{text[-2000:]}"
            assert time.monotonic() < deadline, f"ray start did not start in 60 s:\n{text[-2000:]}"
            time.sleep(0.1)
        if self.address is None:
            self.address = f"127.0.0.1:{gcs}"
        return node

    def kill(self, node: Node) -> None:
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.proc.wait(timeout=30)

    def close(self) -> None:
        for node in reversed(self.nodes):
            self.kill(node)
            shutil.rmtree(node.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    """Head (no CPU, no GPU: only the driver joins it) + two nodes of 1 CPU and 1 fake GPU;
    this process is the driver, connected for the whole module."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("another Ray instance is connected in this process")
    if shutil.which("ray", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("the ray CLI is not installed beside this Python")
    c = RayCluster()
    old_auth = os.environ.get("RAY_AUTH_MODE")
    try:
        c.add(gpus=0, cpus=0)
        second = threading.Thread(target=c.add)  # the two GPU nodes start side by side
        second.start()
        c.add()
        second.join()
        assert len(c.nodes) == 3
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(
            address=c.address, logging_level=logging.WARNING, configure_logging=False, log_to_driver=False
        )
        yield c
    finally:
        ray.shutdown()
        if old_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old_auth
        c.close()


# -- the job -----------------------------------------------------------------------------------


class Hook:
    """Records every committed row (and when); ``each(row)`` runs a test's action per row."""

    def __init__(self, each=None) -> None:
        self.rows: list[dict] = []
        self.times: list[float] = []
        self.each = each
        self.summary: dict | None = None

    def on_result(self, row: dict) -> None:
        self.rows.append(row)
        self.times.append(time.monotonic())
        if self.each is not None:
            self.each(row)

    def on_finish(self, summary: dict) -> None:
        self.summary = summary


def _manifest(tmp_path: Path, n: int) -> str:
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img.png")
    rows = [{"id": f"r{i:03d}", "image": "img.png", "seed": i} for i in range(n)]
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _runner(tmp_path: Path, rows: int, *overrides: str, delay: float = 0.05, hook: Hook | None = None):
    from jobs.config import check_config, load_config
    from jobs.runner import Runner

    cfg = load_config(
        None,
        None,
        [
            "workers.num_gpus=1",
            "workers.allow_cpu_fallback=true",
            "workers.batch_size=1",
            "workers.start_timeout_s=60",
            "output.report=false",
            "progress_interval_s=3600",
            *overrides,
        ],
    )
    check_config(cfg)
    return Runner(
        cfg,
        _manifest(tmp_path, rows),
        str(tmp_path / "out"),
        hook=hook,
        renderer_factory=FakeRendererFactory(delay_s=delay),
        encoder=fake_encode,
        progress_stream=open(os.devnull, "w"),  # noqa: SIM115 (closed with the process)
    )


def _results(tmp_path: Path) -> list[dict]:
    return pq.read_table(tmp_path / "out" / "results").to_pylist()


def _all_ok_once(tmp_path: Path, n: int, hook: Hook) -> list[dict]:
    """Every row ok, exactly one row per id on disk, and the hook saw each id exactly once."""
    rows = _results(tmp_path)
    ids = [r["id"] for r in rows]
    assert sorted(ids) == [f"r{i:03d}" for i in range(n)]
    assert {r["status"] for r in rows} == {"ok"}
    assert sorted(r["id"] for r in hook.rows) == sorted(ids)
    return rows


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (killed, not yet reaped by its raylet) is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_hung_worker_is_killed_and_its_rows_render_elsewhere(cluster, tmp_path, caplog):
    stopped: list[int] = []

    def stop_first_worker(row: dict) -> None:
        if not stopped and row.get("worker_pid"):
            stopped.append(row["worker_pid"])
            os.kill(row["worker_pid"], signal.SIGSTOP)

    hook = Hook(stop_first_worker)
    runner = _runner(tmp_path, 20, "workers.count=2", "workers.batch_timeout_s=3", hook=hook)
    try:
        with caplog.at_level(logging.WARNING, logger="jobs"):
            summary = runner.run()
        assert (summary["ok"], summary["failed"]) == (20, 0)
        rows = _all_ok_once(tmp_path, 20, hook)
        hung = stopped[0]
        assert "taken for hung, killed" in caplog.text
        retried = [r for r in rows if r["attempts"] > 1]
        assert retried and all(r["worker_pid"] != hung for r in retried)
        # ray.kill ended the stopped process (SIGKILL works on a stopped process)
        deadline = time.monotonic() + 15
        while _alive(hung) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(hung)
        assert all(r["node_id"] and r["node_ip"] for r in rows)
        assert len({r["node_id"] for r in rows}) == 2  # the two GPU nodes, same hostname
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_workers_beyond_the_gpus_do_not_delay_the_first_rows(cluster, tmp_path, caplog):
    """3 workers on 2 GPUs: rows commit as soon as one is ready, long before the third's
    start timeout, and the third is killed when it times out (else it would take a GPU that
    joins later and hold it unused). The hook stops the job once it has seen that."""
    import ray

    timeout = 15
    states: dict[str, str] = {}
    runner = None

    def look(row: dict) -> None:
        if not states and time.monotonic() - started > timeout + 1.5:
            for w in runner.workers:
                states[w.label] = ray._private.state.actors(w.actor._actor_id.hex())["State"]
            runner.request_stop("seen", 10.0)

    hook = Hook(look)
    runner = _runner(tmp_path, 2000, "workers.count=3", f"workers.start_timeout_s={timeout}", hook=hook)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="jobs"):
        summary = runner.run()
    assert hook.times[0] - started < timeout - 3, "the first row waited for every worker"
    assert summary["stopped"] == "seen" and summary["failed"] == 0
    rows = _results(tmp_path)
    assert len({r["id"] for r in rows}) == len(rows) == summary["ok"] == len(hook.rows)
    assert (
        "worker-2 could not start (never placed on a node): "
        f"TimeoutError: not ready within workers.start_timeout_s={timeout}"
        in (caplog.text)
    )
    assert states == {"worker-0": "ALIVE", "worker-1": "ALIVE", "worker-2": "DEAD"}


@pytest.mark.slow
def test_gpu_node_joining_mid_job_gets_a_worker_then_stop(cluster, tmp_path, monkeypatch):
    """workers.count=auto: a node with a GPU that joins mid-job gets a worker that renders rows
    (its node id is in the results); then ``request_stop`` ends the job early, committed rows
    intact, and a rerun renders exactly the rest."""
    from jobs import dispatch

    monkeypatch.setattr(dispatch, "ELASTIC_PERIOD_S", 0.5)
    joined: list[Any] = []
    runner = None

    def join_then_stop(row: dict) -> None:
        if not joined:
            joined.append(None)
            threading.Thread(target=lambda: joined.append(cluster.add()), daemon=True).start()
        elif len(joined) == 2 and sum(r["node_id"] == joined[1].node_id() for r in hook.rows) >= 3:
            runner.request_stop("test stop", 10.0)

    hook = Hook(join_then_stop)
    # 0.25 s a row: the job must outlast a node joining and its worker starting (the driver no
    # longer slows it down with commits in its loop)
    runner = _runner(tmp_path, 400, "workers.count=auto", delay=0.25, hook=hook)
    try:
        summary = runner.run()
        new_node = joined[1].node_id()
        assert summary["stopped"] == "test stop" and runner.stopped == "test stop"
        rows = _results(tmp_path)
        assert 0 < len(rows) == summary["ok"] < 400
        assert len({r["id"] for r in rows}) == len(rows) and {r["status"] for r in rows} == {"ok"}
        assert sum(r["node_id"] == new_node for r in rows) >= 3
        assert any(w.elastic for w in runner.workers)

        # a rerun renders only the rest
        hook2 = Hook()
        again = _runner(tmp_path, 400, "workers.count=2", delay=0.0, hook=hook2)
        summary = again.run()
        assert summary["ok"] == 400 and summary["rendered_this_run"] == 400 - len(rows)
        assert "stopped" not in summary
    finally:
        if len(joined) == 2:
            cluster.kill(joined[1])


@pytest.mark.slow
def test_node_killed_mid_job_the_job_finishes(cluster, tmp_path):
    extra = cluster.add()
    extra_id = extra.node_id()
    killed: list[bool] = []

    def kill_extra(row: dict) -> None:
        if not killed and row["node_id"] == extra_id:
            killed.append(True)
            cluster.kill(extra)

    hook = Hook(kill_extra)
    runner = _runner(tmp_path, 60, "workers.count=3", "workers.start_timeout_s=10", delay=0.1, hook=hook)
    try:
        summary = runner.run()
        assert killed and (summary["ok"], summary["failed"]) == (60, 0)
        rows = _all_ok_once(tmp_path, 60, hook)
        assert {r["node_id"] for r in rows} >= {extra_id}
    finally:
        cluster.kill(extra)


@pytest.mark.slow
def test_gpu_worker_without_cuda_refuses_to_start(cluster, tmp_path):
    from jobs.runner import JobError

    runner = _runner(tmp_path, 2, "workers.count=1", "workers.allow_cpu_fallback=false")
    with pytest.raises(JobError, match="no worker could start") as err:
        runner.run()
    (cause,) = err.value.causes
    assert "CUDA_VISIBLE_DEVICES='0'" in cause and "workers.allow_cpu_fallback=true" in cause
    assert "CPU build" in cause or "no CUDA device" in cause
    assert "\n" not in cause


# -- units (no Ray) ----------------------------------------------------------------------------


def test_batch_deadline_from_measured_time_with_floors():
    from jobs.dispatch import BATCH_DEADLINE_FACTOR, BATCH_DEADLINE_FLOOR_S, batch_deadline

    # nothing measured yet: the start timeout (generous: the first call may compile)
    assert batch_deadline(4, [], None, 600.0) == 600.0
    assert batch_deadline(4, [], None) == BATCH_DEADLINE_FLOOR_S
    # measured: k x rows x the median seconds per row, never below the floor
    slow = [30.0, 31.0, 1000.0]  # one outlier does not move the median
    assert batch_deadline(4, slow, None) == BATCH_DEADLINE_FACTOR * 4 * 31.0
    assert batch_deadline(4, [0.01] * 5, None) == BATCH_DEADLINE_FLOOR_S
    # a worker's first batch still gets the start floor; a fixed setting wins otherwise
    assert batch_deadline(4, [0.01] * 5, None, 600.0) == 600.0
    assert batch_deadline(4, slow, 7.5) == 7.5
    assert batch_deadline(4, slow, 7.5, 600.0) == 600.0


def test_workers_count_auto_config_flag_and_sizing():
    from jobs.config import check_config, load_config
    from jobs.dispatch import size_workers
    from jobs.main import build_parser

    cfg = load_config(None, {"workers.count": "auto"})
    check_config(cfg)
    assert size_workers(cfg, {"CPU": 16, "GPU": 3}) == (3, 1.0, 1.0)  # one per GPU at start
    assert size_workers(cfg, {"CPU": 3}) == (1, 2.0, 0.0)
    assert size_workers(load_config(None, {"workers.count": 5}), {"CPU": 16, "GPU": 3})[0] == 5
    for bad in ("many", 0, -1, "true"):
        with pytest.raises(ValueError, match="workers.count must be an integer >= 1 or auto"):
            check_config(load_config(None, None, [f"workers.count={bad}"]))
    with pytest.raises(ValueError, match="workers.batch_timeout_s"):
        check_config(load_config(None, None, ["workers.batch_timeout_s=0"]))
    assert build_parser().parse_args(["run", "m.csv", "--out", "o", "--workers", "auto"]).workers == "auto"
    assert build_parser().parse_args(["run", "m.csv", "--out", "o", "--workers", "2"]).workers == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "m.csv", "--out", "o", "--workers", "two"])


def test_worker_given_a_gpu_without_cuda_refuses_unless_cpu_fallback(monkeypatch, tmp_path):
    import torch

    from jobs import worker as jw
    from jobs.config import load_config

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot happen")
    monkeypatch.setattr(jw, "_assigned_gpus", lambda: ["0"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    cfg = OmegaConf.to_container(load_config(), resolve=True, enum_to_str=True)
    refused = jw.RenderWorker(cfg, "w0", renderer_factory=fake_renderer, encoder=fake_encode)
    info = refused.info()
    assert refused.renderer is None and "\n" not in info["error"]
    assert info["error"].startswith(
        "RuntimeError: Ray gave this worker GPU 0 (CUDA_VISIBLE_DEVICES='0') but torch"
    )
    assert "workers.allow_cpu_fallback=true" in info["error"]
    if torch.version.cuda is None:
        assert "is a CPU build (torch.version.cuda is None)" in info["error"]

    cfg["workers"]["allow_cpu_fallback"] = True
    allowed = jw.RenderWorker(cfg, "w1", renderer_factory=fake_renderer, encoder=fake_encode)
    assert "error" not in allowed.info() and allowed.info()["device"] == "cpu"
    from PIL import Image

    from jobs.planner import RowTask, batch_key_of

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")  # the worker loads images before rendering
    params = {k: cfg["defaults"][k] for k in ROW_PARAMS}
    task = RowTask("a", str(tmp_path / "x.png"), params, batch_key_of(params), output="/dev/null")
    assert allowed.render_batch([task])[0]["status"] == "ok"
    # no GPU given: no check at all (torch not even needed)
    monkeypatch.setattr(jw, "_assigned_gpus", lambda: [])
    cfg["workers"]["allow_cpu_fallback"] = False
    assert "error" not in jw.RenderWorker(cfg, "w2", renderer_factory=fake_renderer).info()
