"""``vcut run --dry-run``: rows, images, shapes, MACs and a GPU-hours estimate, without Ray.

The CLI runs once in a subprocess with ``RAY_TMPDIR`` pointing at a folder that must not
appear (Ray creates its session folder there as soon as it starts); the other cases call
``main`` in this process. MACs come from the tiny model's UNet config (no weights loaded).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import subprocess_env

from jobs import results
from jobs.main import main

ROOT = Path(__file__).resolve().parents[1]
TINY_JOB = str(ROOT / "examples" / "tiny-job.yaml")
BENCH = ROOT / "benchmarks" / "results" / "gpu_bench_svd-xt-full_nvidia-h100-80gb-hbm3.json"


def _manifest(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), i, np.uint8)).save(folder / f"img{i}.png")
    rows = [{"id": f"r{i}", "image": f"img{i % 2}.png", "width": None} for i in range(4)]
    rows += [{"id": f"wide{i}", "image": "img0.png", "width": 128} for i in range(2)]
    path = folder / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _args(manifest: Path, out: Path, model: Path) -> list[str]:
    return ["run", str(manifest), "--out", str(out), "--model", str(model), "--config", TINY_JOB]


def _hours(text: str, unit: str = "GPU") -> float:
    return float(re.search(rf"estimate: ([0-9.e+-]+) {unit}-hours", text).group(1))


@pytest.mark.slow
def test_dry_run_cli_starts_no_ray_and_uses_a_benchmark_file(tiny_model_dir, tmp_path):
    manifest, out, ray_tmp = _manifest(tmp_path / "in"), tmp_path / "out", tmp_path / "raytmp"
    env = subprocess_env(drop=(), RAY_TMPDIR=str(ray_tmp))
    args = [
        *_args(manifest, out, tiny_model_dir),
        "--dry-run",
        "output.layout=webdataset",
        "--timing",
        str(BENCH),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.main", *args, "output.shard_size=4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "to render: 6 rows (0 already ok" in text
    assert "new shard(s)" in text and "2 new shard(s) of up to 4 samples" in text
    assert "distinct images: 2" in text
    assert "64x64x4, 2 steps: 4" in text and "64x128x4, 2 steps: 2" in text
    assert re.search(r"MACs \(vcut full, step cache off\):\n  spent \S+ \S+ of \S+ \S+ stock", text)
    assert "saved by VCUT" in text and "by step caching 0 MAC" in text
    assert "H100" in text and "benchmark" in text and _hours(text) > 0
    assert not ray_tmp.exists(), "Ray was started"
    assert not out.exists(), "the dry run wrote to --out"


def test_dry_run_after_earlier_results_and_without_timings(tiny_model_dir, tmp_path, capsys, monkeypatch):
    manifest, out = _manifest(tmp_path / "in"), tmp_path / "out"
    # an earlier job committed r0..r2 (64x64x4, 2 steps: 2.0 s each) and r3 failed
    writer = results.ResultWriter(str(out))
    common = {"height": 64, "num_frames": 4, "frames": 4, "num_inference_steps": 2, "seconds": 2.0}
    writer.commit([{"id": f"r{i}", "status": "ok", "width": 64, "macs": 10**9, **common} for i in range(3)])
    writer.commit([{"id": "r3", "status": "failed", "width": 64, **common}])

    assert main([*_args(manifest, out, tiny_model_dir), "--dry-run", "--vcut", "exact"]) == 0
    text = capsys.readouterr().out
    assert "to render: 3 rows (3 already ok" in text and "distinct images: 2" in text
    assert "64x64x4, 2 steps: 1" in text and "64x128x4, 2 steps: 2" in text
    assert "vcut exact" in text
    assert "per-shape timings of 3 earlier ok rows" in text and "1 rows by their shape's mean seconds" in text
    assert "2 scaled by MACs" in text
    from vcut import count_macs

    wide = count_macs(
        str(tiny_model_dir), height=64, width=128, num_frames=4, num_inference_steps=2, mode="exact"
    )
    expect = (2.0 + 2 * wide.vcut_macs * 2.0 / 10**9) / 3600
    # the earlier rows recorded no GPU memory peak: they ran on CPUs, and their hours say so
    assert "GPU-hours" not in text and _hours(text, "CPU") == pytest.approx(expect, rel=1e-3)
    assert sorted(os.listdir(out)) == ["results"]  # nothing written

    # no earlier results and no --timing: none, and the line says what to give
    assert main([*_args(manifest, tmp_path / "fresh", tiny_model_dir), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "estimate: none (no timing source" in text and "--timing FILE" in text
    assert "to render: 6 rows" in text


def test_dry_run_timing_from_another_jobs_results(tiny_model_dir, tmp_path, capsys):
    """``--timing DIR``: a fresh job takes the per-shape timings of another job's results
    (never a file of the source checkout); DIR's own timings win when they cover every shape."""
    manifest, other, fresh = _manifest(tmp_path / "in"), tmp_path / "other", tmp_path / "fresh"
    common = {"height": 64, "num_frames": 4, "frames": 4, "num_inference_steps": 2, "status": "ok"}
    rows = [{"id": f"a{i}", "width": 64, "seconds": 3.0, **common} for i in range(2)]
    rows += [{"id": f"b{i}", "width": 128, "seconds": 5.0, **common} for i in range(2)]
    results.ResultWriter(str(other)).commit(rows)

    assert main([*_args(manifest, fresh, tiny_model_dir), "--dry-run", "--timing", str(other)]) == 0
    text = capsys.readouterr().out
    assert f"per-shape timings of 4 ok rows in --timing {other}" in text
    assert _hours(text) == pytest.approx((4 * 3.0 + 2 * 5.0) / 3600, rel=1e-3)
    assert not fresh.exists()

    # a results Parquet file works the same; a file that is neither is one line, exit 2
    part = next((other / "results").glob("part-*.parquet"))
    assert main([*_args(manifest, fresh, tiny_model_dir), "--dry-run", "--timing", str(part)]) == 0
    assert _hours(capsys.readouterr().out) == pytest.approx((4 * 3.0 + 2 * 5.0) / 3600, rel=1e-3)
    bad = tmp_path / "t.json"
    bad.write_text("{}")
    assert main([*_args(manifest, fresh, tiny_model_dir), "--dry-run", "--timing", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"--timing {str(bad)!r}" in err and "KeyError" in err
    # --timing without --dry-run is refused before anything runs
    assert main([*_args(manifest, fresh, tiny_model_dir), "--timing", str(other)]) == 2
    assert "--timing goes with --dry-run" in capsys.readouterr().err


def test_dry_run_rejects_an_invalid_manifest(tiny_model_dir, tmp_path, capsys):
    manifest = tmp_path / "bad.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"id": "a", "image": "x.png"}, {"id": "a", "image": "y.png"}]), manifest
    )
    assert main([*_args(manifest, tmp_path / "out", tiny_model_dir), "--dry-run"]) == 2
    assert "duplicate" in capsys.readouterr().err.lower()
    good = _manifest(tmp_path / "in")  # a caption column the manifest lacks: exit 2, named
    assert (
        main([*_args(good, tmp_path / "out", tiny_model_dir), "--dry-run", "output.caption_column=text"]) == 2
    )
    assert "output.caption_column 'text' is not a column" in capsys.readouterr().err
