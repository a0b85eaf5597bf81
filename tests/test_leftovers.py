"""``kill -9`` of a driver that started its own Ray leaves the raylet's agents behind
(``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``); ``jobs.leftovers`` finds exactly the
processes of sessions whose vcut driver is gone, ``vcut doctor`` lists them with the command
to end them, and the next run ends them. A real Ray instance started by ``connect_ray`` (what
``vcut run`` without ``--address`` calls) in a subprocess driver, killed with SIGKILL."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jobs import doctor, leftovers

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import sys, time
from jobs.preflight import connect_ray
import ray
connect_ray(None)
print(ray._private.worker._global_node.get_session_dir_path(), flush=True)
time.sleep(600)
"""


def _in_session(session: str) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and session in leftovers._sessions(int(p))]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="Linux /proc")
def test_a_killed_drivers_ray_agents_are_found_listed_and_ended():
    tmp_path = Path(tempfile.mkdtemp(prefix="vl-", dir="/tmp"))  # Ray's socket paths: < 108 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        RAY_TMPDIR=str(tmp_path),
        RAY_AUTH_MODE="disabled",
    )
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], env=env, stdout=subprocess.PIPE, text=True)
    session = ""
    try:
        session = proc.stdout.readline().strip()
        assert session.startswith(str(tmp_path)) and os.path.isfile(os.path.join(session, leftovers.MARKER))

        def agents() -> list[str]:
            return [
                leftovers._name(p) for p in _in_session(session) if leftovers._name(p).startswith("ray::")
            ]

        _wait(lambda: {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= set(agents()), 180, "Ray's agents")
        assert not [p for p in leftovers.find() if p.session == session]  # its driver still runs

        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _wait(
            lambda: {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= {p.name for p in leftovers.find()},
            60,
            "leftovers",
        )
        found = leftovers.find()
        assert {p.session for p in found} == {session}  # never another session's processes
        assert {p.driver_pid for p in found} == {proc.pid}
        row = doctor._leftovers_row()
        # Ray's own gcs_server and raylet may notice the dead driver and exit between the two looks;
        # the agents are what linger, so the row must name them and nothing outside the session.
        listed = re.search(r"`kill ([0-9 ]+)`", row.detail)
        assert row.status == "WARN" and listed, row.detail
        pids = {int(pid) for pid in listed.group(1).split()}
        assert pids <= {p.pid for p in found}
        assert {p.pid for p in found if p.name in ("ray::DashboardAgent", "ray::RuntimeEnvAgent")} <= pids

        leftovers.end_and_say()  # what the next `vcut run` does before it starts its own Ray
        _wait(lambda: not leftovers.find(), 30, "the leftovers to end")
        assert doctor._leftovers_row().status == "OK"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        for pid in _in_session(session) if session else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(tmp_path, ignore_errors=True)
