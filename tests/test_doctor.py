"""``vcut doctor``: on this machine with the tiny model (exit 0), with mistakes (exit 1, FAIL
rows with the fix), and against a ``ray start --head`` cluster started here.

The cluster gets its own temporary folder and free loopback ports, runs ``--block`` in its own
process group, and is stopped by killing that group (never ``ray stop``: other Ray instances
may run on this machine).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, no_hub, ray_head_node, subprocess_env

ROOT = Path(__file__).resolve().parents[1]

# every test runs `vcut doctor` in a subprocess (one against `ray start --head`)
pytestmark = pytest.mark.slow


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return subprocess_env(
        drop=("HF_", "RAY_", "VCUT_"), **no_hub(tmp_path), RAY_TMPDIR=str(tmp_path / "raytmp"), **extra
    )


def doctor(args: list[str], env: dict[str, str]) -> tuple[int, dict[str, tuple[str, str]], str]:
    """Run ``vcut doctor ARGS``: (exit status, {check: (status, detail)}, stdout)."""
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.main", "doctor", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    rows = {}
    for line in proc.stdout.splitlines()[2:]:
        parts = line.split(None, 1)
        if not parts:
            break
        for status in ("OK", "WARN", "FAIL"):
            check, sep, detail = line.partition(f"  {status}  ")
            if sep:
                rows[check.strip()] = (status, detail.strip())
                break
    return proc.returncode, rows, proc.stdout + proc.stderr


ALL_ROWS = {
    "python",
    "torch",
    "GPUs (torch)",
    "ffmpeg",
    "Ray",
    "GPUs (Ray)",
    "model",
    "HF cache, token",
    "output",
    "Ray leftovers",
}


def test_doctor_on_this_machine_with_the_tiny_model(tmp_path, tiny_model_dir):
    rc, rows, text = doctor(["--model", str(tiny_model_dir), "--out", str(tmp_path / "out")], _env(tmp_path))
    assert rc == 0, text
    assert set(rows) == ALL_ROWS, text
    assert not [c for c, (status, _) in rows.items() if status == "FAIL"], text
    assert rows["model"] == ("OK", f"local folder {tiny_model_dir}")
    assert "libx264" in rows["ffmpeg"][1] and "torch" in text
    assert "a job would run" in text
    assert not (tmp_path / "out").exists() and not (tmp_path / "raytmp").exists()  # probes only


def test_doctor_fails_rows_with_their_fix(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = ["--model", "/tmp/typo-vcut-nothing-here", "--out", str(blocker / "sub")]
    args += ["--address", f"127.0.0.1:{free_port()}"]
    rc, rows, text = doctor(args, _env(tmp_path, VCUT_FFMPEG=str(tmp_path / "no-ffmpeg")))
    assert rc == 1, text
    failed = {c for c, (status, _) in rows.items() if status == "FAIL"}
    assert failed == {"model", "output", "ffmpeg", "Ray", "GPUs (Ray)"}, text
    assert "ray start --head" in rows["Ray"][1] and "VCUT_FFMPEG" in rows["ffmpeg"][1]
    assert "hub id" in rows["model"][1] and "which is a file" in rows["output"][1]
    assert "a job would NOT run" in text


@pytest.fixture
def ray_head():
    """A ``ray start --head`` node of its own (``conftest.ray_head_node``); yields its address."""
    with ray_head_node() as address:
        yield address


def test_doctor_against_a_ray_start_cluster(tmp_path, tiny_model_dir, ray_head):
    env = _env(tmp_path, RAY_AUTH_MODE="disabled")
    rc, rows, text = doctor(["--model", str(tiny_model_dir), "--address", ray_head], env)
    assert rc == 0, text
    status, detail = rows["Ray"]
    assert status == "OK" and f"{ray_head} reached: 1 node(s), 1 CPU(s)" in detail, text
    assert "auth: disabled" in detail
    assert rows["GPUs (Ray)"] == ("WARN", "none in the cluster: workers render on CPUs; add GPU nodes")
