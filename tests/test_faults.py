"""Faults that used to end in a traceback: SIGINT / SIGTERM during ``vcut run``, an output that
cannot be written (a file size limit: the kernel's EFBIG on the real write path; an object store
that goes away), a Ray cluster at ``--address`` that refuses the driver's token, and an
``http://`` image whose server is down. Each ends with one line, the rows committed so far
kept, and a documented exit status (``jobs.stop.ExitStatus``).

The jobs run ``vcut run`` in a subprocess (what a terminal shows, and the process a signal is
sent to), joined with ``--address`` to one Ray instance for the module, with the no-op renderer
of ``jobs.testing`` (through ``VCUT_TEST_RENDERER``), which sleeps ``delay`` seconds per row and
writes no video: these tests are about the driver. Why not a tiny tmpfs for "disk full": mounting
needs privileges the test machine does not give; and as root, ``chmod`` stops no write. A file
size limit (``RLIMIT_FSIZE``, with SIGXFSZ ignored) makes the kernel refuse the driver's own
writes past a size, through the same ``write`` calls and error handling as ENOSPC.
"""

from __future__ import annotations

import base64
import errno
import http.server
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import AWS_UNSET, free_port, moto_server, ray_head_node, subprocess_env

from jobs import stop
from jobs.preflight import ClusterUnavailableError, check_address
from jobs.testing import TEST_RENDERER_ENV

ROOT = Path(__file__).resolve().parents[1]


def _fake_model(folder: Path) -> Path:
    """A folder that passes the model pre-flight (the no-op renderer loads nothing)."""
    folder.mkdir(parents=True)
    parts = ("vae", "image_encoder", "unet", "scheduler", "feature_extractor")
    index = {"_class_name": "StableVideoDiffusionPipeline", **{c: ["x", "Y"] for c in parts}}
    (folder / "model_index.json").write_text(json.dumps(index))
    for c in ("unet", "vae", "image_encoder"):
        (folder / c).mkdir()
        (folder / c / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return folder


def _manifest(tmp_path: Path, n: int, notes: list[str] | None = None) -> Path:
    from PIL import Image

    rng = np.random.default_rng(n)
    rows = []
    for i in range(n):
        path = tmp_path / "imgs" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
        rows.append({"id": f"row-{i:02d}", "image": str(path), "note": notes[i] if notes else ""})
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # RAY_AUTH_*: a driver joining the module's cluster needs its auth settings
    return subprocess_env(keep=("RAY_AUTH_",), HF_HUB_OFFLINE="1", **extra)


def _start(tmp_path, ray_address, out, manifest, delay, *extra, env=None, **popen) -> subprocess.Popen:
    """``vcut run`` in a subprocess, rendering with ``jobs.testing``'s no-op renderer (``delay``
    s a row) and encoder (``VCUT_TEST_RENDERER``); ``ray_address`` None: a local Ray instance
    of its own."""
    args = ["run", str(manifest), "--out", str(out), "--model", str(tmp_path / "model")]
    args += ["--address", ray_address] if ray_address else []
    args += ["--workers", "1", "workers.batch_size=1", "progress_interval_s=3600"]
    if not (tmp_path / "model").exists():
        _fake_model(tmp_path / "model")
    seams = f"jobs.testing:fake_seams(delay_s={float(delay)!r})"
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.main", *args, *extra],
        env={**(env or _env(tmp_path)), TEST_RENDERER_ENV: seams},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _parts(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith("part-")] if folder.is_dir() else []


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the driver ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _hidden(out: Path) -> list[str]:
    return [
        n
        for sub in ("results", "videos")
        if (out / sub).is_dir()
        for n in os.listdir(out / sub)
        if n[0] == "."
    ]


def _errors(stderr: str) -> list[str]:
    """The lines that end the job (not warnings, not the acknowledgement of a signal)."""
    assert "Traceback" not in stderr, stderr
    return [ln for ln in stderr.splitlines() if ln.startswith(("vcut: error: ", "vcut: stopped by "))]


# -- SIGINT and SIGTERM ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig, times", [(signal.SIGINT, 1), (signal.SIGTERM, 2)])
def test_signal_commits_what_finished_and_a_rerun_completes(ray_address, tmp_path, sig, times):
    """One signal: no new batch, the ones in flight finish and are committed, exit 130 / 143.
    Two: the batches in flight are dropped at once (a row sleeps 8 s; the driver ends sooner).

    SIGINT as a terminal's Ctrl-C sends it: to the whole process group of a driver that started
    its own Ray (whose processes, workers included, block SIGINT: the batches in flight
    finish); SIGTERM as ``kill`` or Kubernetes do, to the driver joined to a cluster."""
    n, delay = 12, (0.4 if times == 1 else 8.0)
    manifest, out = _manifest(tmp_path, n), tmp_path / "out"
    if sig == signal.SIGINT:  # Ray's session folder: a short path (its socket names are limited)
        env = _env(tmp_path, RAY_TMPDIR=tempfile.mkdtemp(prefix="vrf", dir="/tmp"))
        proc = _start(tmp_path, None, out, manifest, delay, env=env, start_new_session=True)
    else:
        proc = _start(tmp_path, ray_address, out, manifest, delay)
    _wait_for(lambda: len(_parts(out / "results")) >= (3 if times == 1 else 1), proc)
    for _ in range(times):
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # the group of the process this test started
        else:
            proc.send_signal(sig)
        time.sleep(2.0)  # the driver's loop wakes up every second: two signals, not one
    stdout, stderr = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig == stop.exit_for_signal(name), stderr
    lines = _errors(stderr)
    assert len(lines) == 1 and lines[0].startswith(f"vcut: stopped by {name}: "), stderr
    assert "left; rerun the same command to resume" in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == name and "manifest rows" in stdout
    table = pq.read_table(out / "results")
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) == summary["ok"] == summary["rendered_this_run"] and 0 < len(ids) < n
    assert f"{len(ids)} rows committed this run, {n - len(ids)} left" in lines[0]
    assert _hidden(out) == []
    acknowledged = [ln for ln in stderr.splitlines() if ln.startswith(f"vcut: {name} received")]
    assert len(acknowledged) == times, stderr
    if times == 2:  # stopped at once: the batches in flight (8 s a row) are dropped, not waited for
        assert re.search(rf"stopped \({name}\): [12] batch\(es\) in flight not committed", stderr), stderr
    else:
        assert "0 batch(es) in flight not committed" in stderr
    # the same command again renders the rest only
    proc = _start(tmp_path, ray_address, out, manifest, 0.0)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["ok"], summary["rendered_this_run"], summary["skipped_already_ok"]) == (
        n,
        n - len(ids),
        len(ids),
    )
    assert "stopped" not in summary
    final = pq.read_table(out / "results")["id"].to_pylist()
    assert sorted(final) == sorted(set(final)) == [f"row-{i:02d}" for i in range(n)]


def test_stop_signals_route_to_the_runner_and_restore_the_handlers():
    calls: list[tuple[str, float]] = []
    before = signal.getsignal(signal.SIGTERM)
    with stop.StopSignals(grace_s=7.0) as signals:
        with pytest.raises(stop.Interrupted) as info:  # no runner yet: stop at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        assert info.value.signum == signal.SIGINT and stop.exit_for_signal(info.value.signum) == 130
        signals.received.clear()
        signals.target = lambda reason, grace: calls.append((reason, grace))
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        assert calls == [("SIGTERM", 7.0), ("SIGTERM", 0.0)]  # the first signal names the stop
        with pytest.raises(stop.Interrupted):  # a third: now, wherever the driver is
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGTERM) is before


# -- the output cannot be written ---------------------------------------------------------------


def _limit_file_size(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@pytest.mark.slow
def test_output_write_failure_mid_job_keeps_what_was_committed(ray_address, tmp_path):
    """The driver may write files up to 64 KiB; rows 4.. carry 200 KB of text, so their commit
    fails mid-job: exit 74, one line naming the folder and the cause, rows 0-3 kept, no
    temporary left, and the same command without the limit renders the rest."""
    n = 8
    big = base64.b64encode(os.urandom(150_000)).decode()  # does not compress below the limit
    manifest, out = _manifest(tmp_path, n, notes=[""] * 4 + [big] * 4), tmp_path / "out"
    limit = _limit_file_size(64 * 1024)
    one_at_a_time = "workers.inflight_per_worker=1"  # rows commit in manifest order
    proc = _start(tmp_path, ray_address, out, manifest, 0.0, one_at_a_time, preexec_fn=limit)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == stop.ExitStatus.IO_ERROR == 74, stderr
    lines = [ln for ln in _errors(stderr) if not ln.startswith("vcut: warning: ")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"vcut: error: cannot write to {out}: File too large (EFBIG): "), lines
    assert "ulimit -f" in lines[0] and "4 rows committed this run are kept, 4 left" in lines[0]
    assert "rerun the same command to resume" in lines[0]
    assert "manifest rows" in stdout  # the summary of what is committed
    table = pq.read_table(out / "results")
    assert sorted(table["id"].to_pylist()) == [f"row-{i:02d}" for i in range(4)]
    assert _hidden(out) == []  # the failed part's temporary was removed
    summary = json.loads((out / "summary.json").read_text())  # small enough to be written
    assert summary["ok"] == 4 and summary["stopped"].startswith("output error: File too large")

    proc = _start(tmp_path, ray_address, out, manifest, 0.0)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    table = pq.read_table(out / "results")
    assert sorted(table["id"].to_pylist()) == [f"row-{i:02d}" for i in range(n)]
    assert table.filter(pa.compute.equal(table["id"], "row-07"))["note"].to_pylist() == [big]


def test_failed_local_write_leaves_no_temporary(tmp_path):
    """The atomic write itself: a write that fails (here: the kernel's file size limit, in a
    child process) raises the OSError and removes its hidden temporary."""
    code = (
        "import sys\nfrom jobs.output import open_output\nout = open_output(sys.argv[1])\n"
        "try:\n    out.write_bytes(out.path('part.parquet'), b'x' * 100_000)\n"
        "except OSError as exc:\n    print(exc.errno)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limit_file_size(4096),
    )
    assert proc.stdout.strip() == str(errno.EFBIG), proc.stderr
    assert os.listdir(tmp_path) == []


def test_output_failures_are_told_apart_from_bugs():
    cause, advice = stop.output_failure(OSError(errno.ENOSPC, "No space left on device"))
    assert cause == "No space left on device (ENOSPC)" and "free some space" in advice
    assert "read-only" in stop.output_failure(OSError(errno.EROFS, "Read-only file system"))[1]
    botocore = pytest.importorskip("botocore.exceptions")
    cause, advice = stop.output_failure(botocore.EndpointConnectionError(endpoint_url="http://x"))
    assert cause.startswith("EndpointConnectionError: Could not connect") and "object store" in advice
    assert stop.output_failure(TypeError("a bug")) is None
    assert stop.output_failure(ValueError("a bug")) is None


def _s3(boto3, endpoint: str):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def test_orphaned_storage_tracebacks_leave_the_terminal():
    """asyncio's "Task exception was never retrieved" for a broken object-store connection is
    lowered to DEBUG (the log file keeps it); any other asyncio error stays as it is."""
    aiohttp = pytest.importorskip("aiohttp")
    stop.quiet_orphaned_storage_errors()
    stop.quiet_orphaned_storage_errors()  # idempotent
    logger = logging.getLogger("asyncio")
    assert sum(isinstance(f, stop._OrphanedStorageErrors) for f in logger.filters) == 1

    def record(exc: BaseException) -> logging.LogRecord:
        rec = logger.makeRecord(
            "asyncio", logging.ERROR, __file__, 1, "Task exception was never retrieved", (), None
        )
        rec.exc_info = (type(exc), exc, None)
        assert logger.filter(rec)
        return rec

    broken = aiohttp.ClientConnectionResetError("Cannot write to closing transport")
    assert record(broken).levelno == logging.DEBUG
    assert record(ValueError("a bug")).levelno == logging.ERROR


@pytest.mark.slow
def test_object_store_gone_mid_job(ray_address, tmp_path, monkeypatch):
    """The S3 endpoint stops answering after a few commits: exit 74, one line naming the cause;
    what was committed is still there when the store is back, and a rerun completes."""
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    n, uri = 10, "s3://vcut-faults/out"
    manifest = _manifest(tmp_path, n)
    with moto_server() as aws:
        for name in AWS_UNSET:
            monkeypatch.delenv(name, raising=False)
        env = _env(tmp_path, **aws, AWS_MAX_ATTEMPTS="1")  # botocore: no retries of its own (faster)
        s3 = _s3(boto3, aws["AWS_ENDPOINT_URL"])
        s3.create_bucket(Bucket="vcut-faults")

        def committed() -> list[str]:
            listed = s3.list_objects_v2(Bucket="vcut-faults", Prefix="out/results/").get("Contents", [])
            return [o["Key"] for o in listed if "/part-" in o["Key"]]

        proc = _start(tmp_path, ray_address, uri, manifest, 0.5, env=env)
        _wait_for(lambda: len(committed()) >= 2, proc)
        before = committed()
    # the server is stopped here (its in-memory backend lives on in this process)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 74, stderr
    lines = [ln for ln in _errors(stderr) if not ln.startswith("vcut: warning: ")]
    assert len(lines) == 1 and lines[0].startswith(f"vcut: error: cannot write to {uri}: "), stderr
    assert "Could not connect to the endpoint URL" in lines[0] and "object store answers" in lines[0]
    assert "rerun the same command to resume" in lines[0]

    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()  # the store is back (on another port), with what was committed
    try:
        endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
        s3 = _s3(boto3, endpoint)
        after = committed()
        assert set(before) <= set(after)  # nothing committed was lost
        # the driver could not delete its lease while the store was gone (it expires after
        # its ttl); a person would wait, the test removes it
        s3.delete_object(Bucket="vcut-faults", Key="out/.vcut.lease")
        env["AWS_ENDPOINT_URL"] = endpoint
        proc = _start(tmp_path, ray_address, uri, manifest, 0.0, env=env)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        summary = json.loads(s3.get_object(Bucket="vcut-faults", Key="out/summary.json")["Body"].read())
        assert summary["ok"] == n and summary["rendered_this_run"] == n - summary["skipped_already_ok"]
        assert summary["skipped_already_ok"] >= len(before)
    finally:
        server.stop()


# -- --address ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_address_with_token_auth(tmp_path, monkeypatch):
    """A cluster with token authentication: without its token, `vcut run --address` ends within
    seconds with one line naming the address and RAY_AUTH_MODE=token, exit 69, Ray not started
    here; with the token, the address check passes."""
    token = os.urandom(16).hex()
    with ray_head_node(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token) as address:
        env = _env(
            tmp_path, HOME=str(tmp_path), RAY_TMPDIR=str(tmp_path / "raytmp"), RAY_AUTH_MODE="disabled"
        )
        manifest = _manifest(tmp_path, 2)
        proc = _start(tmp_path, address, tmp_path / "out", manifest, 0.0, env=env)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == stop.ExitStatus.UNAVAILABLE == 69, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"vcut: error: --address '{address}': "), stderr
        assert "token authentication" in lines[0] and "RAY_AUTH_MODE=token" in lines[0]
        assert "RAY_AUTH_TOKEN" in lines[0]
        assert not (tmp_path / "raytmp").exists() and not (tmp_path / "out").exists()

        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 32)  # a wrong token
        with pytest.raises(ClusterUnavailableError, match="refuses this driver's token"):
            check_address(address)
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
        assert "Ray GCS answers" in check_address(address)


@pytest.mark.slow
def test_address_that_is_not_a_ray_gcs(monkeypatch):
    """Something listens (an HTTP server, as on the dashboard port), but no Ray GCS answers."""
    monkeypatch.setattr("jobs.preflight.NETWORK_TIMEOUT_S", 1.5)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ClusterUnavailableError, match="no Ray GCS answers there.*8265 is the dashboard"):
            check_address(f"127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()


# -- http images ------------------------------------------------------------------------------


def test_unreachable_http_image_is_not_called_not_found():
    from pipeline.errors import ImageError
    from pipeline.images import load_image

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(404 if self.path.endswith("missing.png") else 403)
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    closed = f"http://127.0.0.1:{free_port()}/a.png"
    try:
        with pytest.raises(ImageError) as info:
            load_image(closed)
        assert str(info.value).startswith(f"image '{closed}' cannot be read: connection refused")
        missing = f"http://127.0.0.1:{server.server_port}/missing.png"
        with pytest.raises(ImageError, match=rf"^image '{missing}' not found$"):
            load_image(missing)
        with pytest.raises(ImageError, match="cannot be read: the server answered HTTP 403"):
            load_image(f"http://127.0.0.1:{server.server_port}/secret.png")
    finally:
        server.shutdown()


# -- the one table -----------------------------------------------------------------------------


def test_every_exit_status_is_documented_once():
    from jobs.lock import EXIT_LOCKED
    from jobs.main import build_parser

    assert set(stop.EXIT_MEANINGS) == set(stop.ExitStatus) and EXIT_LOCKED == stop.ExitStatus.LOCKED
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    text = run.format_help()
    for status in stop.ExitStatus:
        assert f"{int(status):>3}  {stop.EXIT_MEANINGS[status]}" in text
    operations = (ROOT / "docs" / "operations.md").read_text()
    table = operations.split("### Exit status", 1)[1].split("\n\n", 2)[1]  # the table after the heading
    documented = {int(n) for row in table.splitlines()[2:] for n in row.split("|")[1].split("/")}
    assert documented == {int(status) for status in stop.ExitStatus}
