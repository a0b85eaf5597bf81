"""End-to-end jobs on a local Ray instance with the real Renderer and the tiny model (CPU).

One Ray instance serves the whole module. The driver-kill test runs ``vcut run`` in a
subprocess joined to that instance with ``--address``, so that SIGKILL leaves no Ray of its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import subprocess_env

from jobs.main import main

ROOT = Path(__file__).resolve().parents[1]

# every test runs a job on Ray (and some in a `vcut run` subprocess): integration tests
pytestmark = pytest.mark.slow
TINY_JOB = str(ROOT / "examples" / "tiny-job.yaml")



def _images(folder: Path, n: int) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _run_args(manifest, out, model, *extra) -> list[str]:
    return ["run", str(manifest), "--out", str(out), "--model", str(model), "--config", TINY_JOB, *extra]


def _check_outputs(out: Path, expect_rows: int) -> pa.Table:
    """One row per id on disk, every ok video decodable, no temporaries, nothing outside out/."""
    from pipeline import probe_video

    table = pq.read_table(out / "results")
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)) == expect_rows
    for row in table.to_pylist():
        if row["status"] == "ok":
            assert os.path.dirname(row["output"]) == str(out / "videos")
            assert probe_video(row["output"]).frames == row["frames"] == 4
    leftovers = [n for sub in ("videos", "results") for n in os.listdir(out / sub) if n.startswith(".")]
    assert leftovers == []
    return table


def test_mixed_manifest_statuses_cache_hits_escapes_and_resume(ray_address, tiny_model_dir, tmp_path, capsys):
    imgs = _images(tmp_path / "imgs", 3)
    corrupt = tmp_path / "imgs" / "corrupt.png"
    corrupt.write_bytes(b"this is not a png")
    escapes = ["../escape", "/abs/evil", "nul\x00id", "x" * 300]
    rows = [
        {"id": "shared-0", "image": imgs[0], "seed": 0},
        {"id": "shared-1", "image": imgs[0], "seed": 1},
        {"id": "shared-2", "image": imgs[0], "seed": 2},
        {"id": "plain", "image": "imgs/img1.png", "seed": 0},  # relative to the manifest
        {"id": escapes[0], "image": imgs[2], "seed": 0},
        {"id": escapes[1], "image": imgs[2], "seed": 1},
        {"id": escapes[2], "image": imgs[1], "seed": 5},
        {"id": escapes[3], "image": imgs[1], "seed": 6},
        {"id": "missing", "image": str(tmp_path / "nope.png"), "seed": 0},
        {"id": "corrupt", "image": str(corrupt), "seed": 0},
        {"id": "bad-width", "image": imgs[1], "seed": 0, "width": 60},  # not a multiple of 8
    ]
    for i, row in enumerate(rows):
        row["note"] = f"carried-{i}"
        row.setdefault("width", None)  # from_pylist takes its columns from the first row
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    out = tmp_path / "job" / "out"

    assert main(_run_args(manifest, out, tiny_model_dir, "--workers", "2")) == 3
    assert "failed" in capsys.readouterr().out

    table = _check_outputs(out, len(rows))
    by_id = {r["id"]: r for r in table.to_pylist()}
    failed = {i for i, r in by_id.items() if r["status"] == "failed"}
    assert failed == {"missing", "corrupt", "bad-width"}
    assert all(by_id[i]["error"] for i in failed) and "width" in by_id["bad-width"]["error"]
    assert [by_id[f"shared-{i}"]["cache_hit"] for i in range(3)].count(True) == 2
    assert by_id["plain"]["note"] == "carried-3" and by_id["plain"]["vcut_mode"] == "full"
    ok = by_id["plain"]
    assert ok["macs"] > 0 and ok["macs_saved"] > 0 and ok["seconds"] > 0 and ok["encode_seconds"] > 0
    assert ok["worker"].startswith("worker-") and ok["node"] and ok["num_inference_steps"] == 2
    # ids that try to escape DIR: their videos are in DIR/videos, nothing was written elsewhere
    for i in escapes:
        assert by_id[i]["status"] == "ok"
    assert sorted(os.listdir(tmp_path / "job")) == ["out"]
    listing = ["logs", "report.html", "results", "summary.json", "videos"]  # logs: vcut.log, workers
    assert sorted(os.listdir(out)) == listing
    assert len(os.listdir(out / "videos")) == len(rows) - 3
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["ok"], summary["failed"], summary["rendered_this_run"]) == (8, 3, 11)
    assert summary["total_macs_saved"] == sum(r["macs_saved"] for r in by_id.values() if r["status"] == "ok")

    # the same command again renders only the rows that are not ok; still one row per id
    mtimes = {n: os.stat(out / "videos" / n).st_mtime_ns for n in os.listdir(out / "videos")}
    assert main(_run_args(manifest, out, tiny_model_dir)) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rendered_this_run"], summary["skipped_already_ok"], summary["failed"]) == (3, 8, 3)
    _check_outputs(out, len(rows))
    assert {n: os.stat(out / "videos" / n).st_mtime_ns for n in os.listdir(out / "videos")} == mtimes


class _KillOnce:
    """Metrics-style hook that SIGKILLs the worker process of the first committed row, and then
    raises in every call (a broken user hook): neither may cost a row or stop the job."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.killed: int | None = None
        self.finished: dict | None = None

    def on_result(self, row: dict) -> None:
        self.rows.append(row)
        if self.killed is None:
            self.killed = row["worker_pid"]
            os.kill(self.killed, signal.SIGKILL)
        raise RuntimeError("hook broke in on_result")

    def on_pending(self, n: int) -> None:
        raise RuntimeError("hook broke in on_pending")

    def on_workers(self, alive: int, busy: int) -> None:
        raise RuntimeError("hook broke in on_workers")

    def on_finish(self, summary: dict) -> None:
        self.finished = summary
        raise RuntimeError("hook broke in on_finish")


def test_killed_worker_loses_no_rows_and_a_raising_hook_is_logged_once(
    ray_address, tiny_model_dir, tmp_path, caplog
):
    from jobs.config import load_config
    from jobs.runner import run_job

    imgs = _images(tmp_path / "imgs", 4)
    rows = [{"image": img, "seed": s} for img in imgs for s in range(3)]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    cfg = load_config(
        TINY_JOB, {"model.id": str(tiny_model_dir), "workers.count": 2}, ["workers.batch_size=2"]
    )
    hook = _KillOnce()
    summary = run_job(cfg, str(manifest), str(tmp_path / "out"), hook=hook)
    assert hook.killed is not None and hook.finished == summary
    assert (summary["ok"], summary["failed"]) == (12, 0)
    table = _check_outputs(tmp_path / "out", 12)
    # the hook saw each row exactly once, and some rows were retried on another worker
    assert sorted(r["id"] for r in hook.rows) == sorted(table["id"].to_pylist())
    retried = [r for r in table.to_pylist() if r["attempts"] > 1]
    assert retried and all(r["worker_pid"] != hook.killed for r in retried)
    # each of the hook's four methods raised on every call: one warning line per method
    hook_lines = sorted(r.getMessage() for r in caplog.records if "job hook" in r.getMessage())
    assert [line.split(" failed")[0] for line in hook_lines] == [
        f"job hook _KillOnce.{m}" for m in ("on_finish", "on_pending", "on_result", "on_workers")
    ]


def test_driver_sigkill_then_rerun_completes(ray_address, tiny_model_dir, tmp_path):
    imgs = _images(tmp_path / "imgs", 8)
    rows = [{"image": img, "seed": s} for img in imgs for s in range(2)]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    out = tmp_path / "out"
    args = _run_args(manifest, out, tiny_model_dir, "--address", ray_address, "--workers", "1")
    env = subprocess_env(drop=())
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.main", *args, "workers.batch_size=1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            parts = [n for n in os.listdir(out / "results")] if (out / "results").is_dir() else []
            if len([n for n in parts if n.startswith("part-")]) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the driver finished before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    committed = pq.read_table(out / "results")
    assert 0 < committed.num_rows < len(rows)
    ok_before = set(committed["id"].to_pylist())

    assert main(_run_args(manifest, out, tiny_model_dir)) == 0
    table = _check_outputs(out, len(rows))
    assert set(table["status"].to_pylist()) == {"ok"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_already_ok"] == len(ok_before)
    assert summary["rendered_this_run"] == len(rows) - len(ok_before)


#: The only lines `vcut run` writes to a stderr that is not a terminal: the job's own INFO lines
#: (start, workers ready, progress, report), no library's and no warning.
JOB_LINE = re.compile(r"\d{4}-\d\d-\d\d [\d:,]+ INFO jobs: ")


def test_example_manifest_renders(ray_address, tiny_model_dir, tmp_path):
    """The README's main command, on the committed example manifest; the first run is a real
    `vcut run --verbose` process: its stderr holds the job's own lines and nothing else (no
    library notice, banner or warning, from the driver or, streamed by --verbose, the workers)."""
    manifest, out = ROOT / "examples" / "manifest.parquet", tmp_path / "out"
    rows = pq.read_metadata(manifest).num_rows
    env = subprocess_env(drop=())
    args = _run_args(manifest, out, tiny_model_dir, "--address", ray_address, "--verbose")
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.main", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "manifest rows" in proc.stdout and f"progress: {rows}/{rows} rows" in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if not JOB_LINE.match(ln)] == []
    _check_outputs(out, rows)
    # again: nothing to do, no worker started; with --overwrite: everything again, no duplicates
    assert main(_run_args(manifest, out, tiny_model_dir)) == 0
    assert json.loads((out / "summary.json").read_text())["rendered_this_run"] == 0
    assert main(_run_args(manifest, out, tiny_model_dir, "--overwrite")) == 0
    assert json.loads((out / "summary.json").read_text())["rendered_this_run"] == rows
    _check_outputs(out, rows)
