"""A quiet terminal: Ray's own output on the driver goes to ``DIR/logs/ray.log`` unless
``--verbose`` (``jobs.cli.ray_output``), and vcut's own lines stay on the terminal.

The channels, as seen on a 2-node loopback cluster whose worker node's raylet is killed
mid-job (``test_raylet_death_stays_in_the_logs``): the GCS pushes ``(raylet) Raylet is
terminated ... Last 20 lines of the Raylet logs:`` and ``[state-dump]`` lines (about 46) that
Ray's error listener prints on stdout; the driver's C++ core worker writes its ERROR lines
(``[2026-... E pid tid] rpc_client.h:204: ...``) straight to file descriptor 2, as it does when
the GCS goes away; Ray's Python loggers have a stderr handler of their own. The first test
sends one line down each channel in a child process (a real descriptor 2).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env

from jobs.testing import TEST_RENDERER_ENV

#: A line of Ray's C++ logging: ``[2026-12-04 23:40:35,930 E 22030 23153] rpc_client.h:204: ...``.
CPP_LINE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\]")
#: What the raylet's death pushes to the driver (observed with Ray 2.60).
RAYLET_LINES = ("(raylet)", "Raylet is terminated", "[state-dump]")

_CHANNELS = """
import logging, os, sys
from jobs.cli.logs import setup_logging
from jobs.cli.ray_output import ray_output_in_logs
from jobs.output import open_output

setup_logging(False)
out = open_output(sys.argv[1])
with ray_output_in_logs(out, sys.argv[2] == "verbose") as path:
    import ray._private.worker as w
    os.write(2, b"[2026-12-04 23:40:35,930 E 1 2] rpc_client.h:204: C++ LINE\\n")
    w.print_to_stdstream({"lines": ["RAYLET MESSAGE"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    logging.getLogger("ray").warning("RAY LOGGER")
    logging.getLogger("jobs").info("VCUT LOG LINE")
    print("vcut: warning: VCUT STDERR LINE", file=sys.stderr)
    print("VCUT STDOUT LINE")
    print("PATH", path)
    raise RuntimeError("VCUT CRASH")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_each_channel_of_ray_output_goes_to_the_log_and_vcut_lines_to_the_terminal(tmp_path, verbose):
    pytest.importorskip("ray")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", _CHANNELS, str(out), "verbose" if verbose else "quiet"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    terminal = proc.stdout + proc.stderr
    # vcut's own lines, and the traceback of its crash (raised inside the block), on the terminal
    for line in ("VCUT LOG LINE", "vcut: warning: VCUT STDERR LINE", "VCUT STDOUT LINE"):
        assert line in terminal
    assert proc.returncode == 1 and "RuntimeError: VCUT CRASH" in proc.stderr.splitlines()[-1]
    ray_lines = ("C++ LINE", "RAYLET MESSAGE", "RAY LOGGER")
    log = out / "logs" / "ray.log"
    if verbose:  # as Ray prints them, and no file
        assert all(line in terminal for line in ray_lines), terminal
        assert "PATH None" in proc.stdout and not log.exists()
        return
    assert not [line for line in ray_lines if line in terminal], terminal
    assert f"PATH {log}" in proc.stdout
    text = log.read_text()
    assert all(line in text for line in ray_lines), text
    assert "(raylet) RAYLET MESSAGE" in text and CPP_LINE.search(text)
    assert "VCUT" not in text


class _ObjectStore:
    """The ``jobs.output.OutputDir`` calls an object-store DIR gets, recorded."""

    local = False

    def __init__(self) -> None:
        self.written: dict[str, bytes] = {}

    def path(self, *names: str) -> str:
        return "/".join(("bucket/out", *names))

    def uri_of(self, *names: str) -> str:
        return "s3://" + self.path(*names)

    def makedirs(self, *names: str) -> None:
        pass

    def write_bytes(self, path: str, data: bytes) -> None:
        self.written[path] = data


def test_object_store_dir_gets_the_file_when_the_job_ends():
    pytest.importorskip("ray")
    from jobs.cli.ray_output import ray_output_in_logs

    out = _ObjectStore()
    with ray_output_in_logs(out, verbose=False) as uri:
        os.write(2, b"C++ LINE\n")
        local = os.readlink("/proc/self/fd/2")
        assert out.written == {}
    assert uri == "s3://bucket/out/logs/ray.log"
    assert out.written == {"bucket/out/logs/ray.log": b"C++ LINE\n"}
    assert not os.path.exists(local) and os.readlink("/proc/self/fd/2") != local


# -- a raylet dies mid-job ---------------------------------------------------------------------


def _raylet_pid(node) -> int:
    """The raylet of a ``ray start`` node: the process of that node's own process group whose
    program is ``.../raylet`` (found by PID and group, never by name across the machine)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) != node.pid:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                program = f.read().split(b"\0")[0]
        except OSError:
            continue
        if program.endswith(b"/raylet"):
            return int(pid)
    raise AssertionError(f"no raylet in the process group of node {node.pid}")


def _run_and_kill_raylet(cluster, node, tmp_path: Path, name: str, *extra: str) -> tuple[str, str, Path]:
    """``vcut run --address`` (the fake renderer, 0.4 s a row) on the cluster; once both workers
    are ready, the raylet of ``node`` is killed. Returns the driver's stdout, stderr and DIR."""
    from test_faults import _fake_model, _manifest

    folder = tmp_path / name
    folder.mkdir()
    model = _fake_model(folder / "model")
    manifest = _manifest(folder, 30)
    out = folder / "out"
    args = ["run", str(manifest), "--out", str(out), "--model", str(model), "--address", cluster.address]
    args += [
        "--workers",
        "2",
        "workers.batch_size=1",
        "workers.num_gpus=1",
        "workers.allow_cpu_fallback=true",
    ]
    args += ["workers.start_timeout_s=120", "output.report=false", *extra]
    env = {**cluster.env, "HF_HUB_OFFLINE": "1", TEST_RENDERER_ENV: "jobs.testing:fake_seams(delay_s=0.4)"}
    stdout, stderr = folder / "stdout", folder / "stderr"
    with open(stdout, "w") as so, open(stderr, "w") as se:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.main", *args], env=env, stdout=so, stderr=se, cwd=folder
        )
        try:
            deadline = time.monotonic() + 180
            while stderr.read_text().count("ready after") < 2:
                assert proc.poll() is None, stderr.read_text()
                assert time.monotonic() < deadline, "the two workers were not ready in 180 s"
                time.sleep(0.2)
            os.kill(_raylet_pid(node), signal.SIGKILL)
            assert proc.wait(timeout=300) == 0, stderr.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return stdout.read_text(), stderr.read_text(), out


@pytest.mark.slow
def test_raylet_death_stays_in_the_logs_unless_verbose(tmp_path):
    """Head (1 fake GPU) + one node (1 fake GPU); its raylet is killed mid-job. The terminal has
    vcut's lines (the worker that died, the summary) and none of Ray's; ``DIR/logs/ray.log`` has
    them. Then a second node and the same with ``--verbose``: Ray's lines are on the terminal."""
    from test_cluster import RayCluster

    pytest.importorskip("ray")
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "ray")):
        pytest.skip("the ray CLI is not installed beside this Python")
    cluster = RayCluster()
    try:
        cluster.add(gpus=1, cpus=1)
        stdout, stderr, out = _run_and_kill_raylet(cluster, cluster.add(), tmp_path, "quiet")
        terminal = stdout + stderr
        assert re.search(r"worker-\d died", stderr) and "Ray's own output: " in stderr
        assert re.search(r"^ok +30$", stdout, re.M), stdout
        assert not [p for p in RAYLET_LINES if p in terminal], terminal
        assert not CPP_LINE.search(terminal), terminal
        ray_log = (out / "logs" / "ray.log").read_text()
        assert all(p in ray_log for p in RAYLET_LINES), ray_log

        stdout, stderr, out = _run_and_kill_raylet(cluster, cluster.add(), tmp_path, "verbose", "--verbose")
        assert re.search(r"worker-\d died", stderr) and re.search(r"^ok +30$", stdout, re.M), stdout
        assert all(p in stdout + stderr for p in RAYLET_LINES), stdout + stderr
        assert not (out / "logs" / "ray.log").exists()
    finally:
        cluster.close()
