"""One line instead of a traceback, exit 2, before any worker (and for these, before Ray)
starts: a ``--metrics-port`` in use, a bad ``--metrics-address``, and a corrupt or truncated
part in ``DIR/results/`` (from ``vcut run``, ``--dry-run`` and ``vcut report``; the line names
the file and the fix). The CLI runs in a subprocess with ``RAY_TMPDIR`` in an empty folder:
that folder not existing afterwards means Ray never started."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import results
from jobs.main import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def job(tmp_path: Path) -> dict:
    """A manifest, a model folder that passes the model pre-flight, and the environment."""
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    pq.write_table(
        pa.Table.from_pylist([{"id": "a", "image": str(tmp_path / "a.png")}]), tmp_path / "m.parquet"
    )
    model = tmp_path / "model"
    model.mkdir()
    parts = ("vae", "image_encoder", "unet", "scheduler", "feature_extractor")
    index = {"_class_name": "StableVideoDiffusionPipeline", **{c: ["x", "Y"] for c in parts}}
    (model / "model_index.json").write_text(json.dumps(index))
    for c in ("unet", "vae", "image_encoder"):
        (model / c).mkdir()
        (model / c / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VCUT_"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        RAY_TMPDIR=str(tmp_path / "raytmp"),
        OMP_NUM_THREADS="1",
    )
    run = ["run", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "out"), "--model", str(model)]
    return {"run": run, "env": env, "tmp": tmp_path}


def one_line(job: dict, args: list[str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.main", *args],
        env=job["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("vcut: error: "), proc.stderr
    assert not (job["tmp"] / "raytmp").exists(), "Ray was started"
    return lines[0]


@pytest.mark.slow
def test_metrics_port_in_use_and_a_bad_metrics_address(job):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = one_line(job, [*job["run"], "--metrics-port", str(port)])
    assert f"--metrics-port {port} is in use on 127.0.0.1" in line
    line = one_line(job, [*job["run"], "--metrics-port", "0", "--metrics-address", "no-such-host.invalid"])
    assert "--metrics-address 'no-such-host.invalid' is not a valid address" in line
    line = one_line(job, [*job["run"], "--metrics-port", "0", "--metrics-address", "192.0.2.1"])
    assert "--metrics-address '192.0.2.1' is not an address of this machine" in line


def _damaged_results(out: Path) -> Path:
    writer = results.ResultWriter(out)
    writer.commit([{"id": "a", "status": "ok"}])
    name = writer.commit([{"id": "b", "status": "ok"}])
    part = out / "results" / name
    part.write_bytes(part.read_bytes()[:40])  # cut short, as by a disk or a copy
    return part


@pytest.mark.slow
def test_a_truncated_results_part_is_one_line_from_run_dry_run_and_report(job):
    part = _damaged_results(job["tmp"] / "out")
    for args in (job["run"], [*job["run"], "--dry-run"], ["report", str(job["tmp"] / "out")]):
        line = one_line(job, args)
        assert f"results part {part} is corrupt or truncated" in line, line
        assert "move it out of results/" in line and "rerun" in line


def test_damage_inside_a_part_is_one_line_too(tmp_path, capsys):
    """A part whose footer reads but whose data does not (a zeroed page): the job's reads
    (``done_ids``, the report) raise ``CorruptPartError`` naming it; ``vcut report`` says it."""
    out = tmp_path / "out"
    writer = results.ResultWriter(out)
    name = writer.commit([{"id": f"id-{i}", "status": "ok", "error": "x" * 50} for i in range(2000)])
    part = out / "results" / name
    data = bytearray(part.read_bytes())
    data[200:4000] = b"\0" * 3800
    part.write_bytes(bytes(data))
    with pytest.raises(results.CorruptPartError, match=f"results part {part} is corrupt or truncated"):
        results.done_ids(out)
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"results part {part} is corrupt" in err[0]
