"""Data integrity of an output folder: one driver per ``--out``, carried columns whose type
changes between runs, ``_``-prefixed columns, string ids, one range per parameter, and never
creating a bucket. Unit-level (no Ray), but for ``vcut run`` refusing an output in use."""

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
from conftest import moto_s3
from omegaconf import OmegaConf

from jobs import manifest, output, results
from jobs.config import check_config, load_config
from jobs.fingerprint import Changes
from jobs.lock import EXIT_LOCKED, LEASE_NAME, LOCK_NAME, OutputLock, OutputLockedError
from jobs.runner import Runner, resolve_params
from pipeline.params import SEED_MAX, as_int

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = str(ROOT / "examples" / "manifest.parquet")
TINY_JOB = str(ROOT / "examples" / "tiny-job.yaml")

HOLD = """
import sys, time
from jobs.lock import OutputLock
lock = OutputLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _holder(out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


# -- 1. one driver per output folder ---------------------------------------------------------


def test_local_lock_is_exclusive_and_released(tmp_path):
    out = tmp_path / "out"
    with OutputLock(out) as first:
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["started_at"]
        with pytest.raises(OutputLockedError, match=rf"in use by the driver with pid {os.getpid()} on host"):
            OutputLock(out).acquire()
        assert first.info == holder
    assert not (out / LOCK_NAME).exists()  # removed on release
    OutputLock(out).acquire().release()  # free again


def test_lock_of_a_killed_driver_does_not_block(tmp_path):
    out = tmp_path / "out"
    proc = _holder(out)
    try:
        with pytest.raises(OutputLockedError, match=f"pid {proc.pid} "):
            OutputLock(out).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / LOCK_NAME).exists()  # left behind by the killed driver, but not locked
    with OutputLock(out) as lock:
        assert lock.info["pid"] == os.getpid()


def test_second_vcut_run_is_refused_and_keeps_the_first_drivers_temporaries(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    (out / "videos").mkdir(parents=True)
    tmp_video = out / "videos" / ".a.mp4.tmp-0123456789ab"  # the first driver's video in progress
    tmp_video.write_bytes(b"partial")
    proc = _holder(out)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VCUT_"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RAY_TMPDIR=str(tmp_path / "raytmp"))
    try:
        args = ["run", MANIFEST, "--out", str(out), "--model", str(tiny_model_dir), "--config", TINY_JOB]
        run = subprocess.run(
            [sys.executable, "-m", "jobs.main", *args], env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("vcut: error: ")]
    assert run.returncode == EXIT_LOCKED == 75, run.stderr
    assert len(lines) == 1 and f"pid {proc.pid} " in lines[0] and "one driver per output" in lines[0]
    assert tmp_video.read_bytes() == b"partial"  # not cleaned by the refused driver
    assert not (tmp_path / "raytmp").exists(), "Ray was started"
    assert not (out / "results").exists()


# -- 2. a carried column whose type changes between runs -------------------------------------


def _row(row_id: str, **carried) -> dict:
    return {"id": row_id, "image": "x.png", "status": "ok", "seed": 1, **carried}


@pytest.mark.parametrize(
    "runs",
    [
        [(pa.string(), "a"), (pa.int64(), 7), (pa.string(), "b")],  # text, then integers, then text
        [(pa.int64(), 1), (pa.string(), "two"), (pa.int64(), 3), (pa.float64(), 4.5)],
    ],
)
def test_carried_column_type_change_between_runs(tmp_path, runs):
    out = tmp_path / "out"
    for i, (type_, value) in enumerate(runs):
        writer = results.ResultWriter(out, pa.schema([("note", type_)]))
        writer.commit([_row(f"r{i}", note=value)])
        writer.commit([_row("shared", note=value)])  # an id rendered again: the last row wins
        assert results.compact(out) >= 0
        table = results.read_results(out)
        assert table.num_rows == i + 2
        notes = dict(zip(table.column("id").to_pylist(), table.column("note").to_pylist(), strict=True))
        for j, (_, v) in enumerate(runs[: i + 1]):
            assert str(notes[f"r{j}"]).rstrip("0").rstrip(".") == str(v).rstrip("0").rstrip(".")
        assert str(notes["shared"]).rstrip("0").rstrip(".") == str(value).rstrip("0").rstrip(".")
        summary = results.summarize(out, manifest_rows=i + 2, rendered=2, skipped=0, wall_seconds=1.0)
        assert summary["ok"] == i + 2
    assert results.done_ids(out).size == len(runs) + 1


def test_carried_values_cast_to_the_committed_type(tmp_path):
    out = tmp_path / "out"
    results.ResultWriter(out, pa.schema([("note", pa.string())])).commit([_row("a", note="x")])
    writer = results.ResultWriter(out, pa.schema([("note", pa.int64())]))
    assert writer.schema.field("note").type == pa.string()  # integers go into the text column
    writer.commit([_row("b", note=7)])
    assert {pq.read_schema(out / "results" / n).field("note").type for n in os.listdir(out / "results")} == {
        pa.string()
    }


# -- 3. carried columns whose names start with "_" -------------------------------------------


def test_underscore_columns_are_carried(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": ["a.png", "b.png"], "_note": ["x", None], "__n": [1, 2]}), path)
    info = manifest.validate_manifest(str(path), reserved=results.RESERVED_COLUMNS)
    assert info.carried == ["_note", "__n"]
    rows = next(manifest.iter_manifest(str(path)))
    runner = Runner.__new__(Runner)  # only _commit: no Ray, no workers
    runner.cfg_dict = {"defaults": {}, "model": {"vcut": "full"}}
    runner.shards = None
    full = OmegaConf.to_container(load_config(), resolve=True, enum_to_str=True)
    runner.changes = Changes(tmp_path / "out", full, resolve_params)  # the rows' fingerprints
    committed: list[dict] = []
    runner._commit_rows = committed.extend
    runner._commit(mf_batch(rows), [{"status": "ok"} for _ in rows])
    writer = results.ResultWriter(tmp_path / "out", info.carried_schema)
    writer.commit(committed)
    table = results.read_results(tmp_path / "out")
    assert table.column("_note").to_pylist() == ["x", None] and table.column("__n").to_pylist() == [1, 2]
    assert "_image" not in table.column_names and "_row" not in table.column_names


def mf_batch(rows):
    from jobs.runner import Batch

    return Batch(rows)


def test_private_names_are_refused(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": ["a.png"], "_image": ["b.png"]}), path)
    with pytest.raises(manifest.ManifestError, match="'_image' is reserved"):
        manifest.validate_manifest(str(path), reserved=results.RESERVED_COLUMNS)


# -- 4. ids are strings, whatever the format -------------------------------------------------


def test_csv_ids_are_strings(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,image,seed\n007,1.png,1\n7,2.png,2\n0x1,3,3\n")
    info = manifest.validate_manifest(str(path), reserved=results.RESERVED_COLUMNS)  # 007 and 7: no duplicate
    assert info.num_rows == 3
    rows = next(manifest.iter_manifest(str(path)))
    assert [r["id"] for r in rows] == ["007", "7", "0x1"] and rows[2]["image"] == "3"
    assert [r["seed"] for r in rows] == [1, 2, 3]
    dup = tmp_path / "dup.csv"
    dup.write_text("id,image\n007,1.png\n007,2.png\n")
    with pytest.raises(manifest.ManifestError, match="duplicate '007'"):
        manifest.validate_manifest(str(dup))


def test_jsonl_ids_are_strings(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "007", "image": "a.png"}\n{"id": "7", "image": "b.png"}\n')
    manifest.validate_manifest(str(path))
    assert [r["id"] for r in next(manifest.iter_manifest(str(path)))] == ["007", "7"]
    numbers = tmp_path / "n.jsonl"
    numbers.write_text('{"id": 7, "image": "a.png"}\n')
    assert next(manifest.iter_manifest(str(numbers)))[0]["id"] == "7"


# -- 5. one range per parameter --------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**63, 2**64 - 1])
def test_seed_above_int64_is_refused_everywhere(tmp_path, seed):
    message = f"must be in [0, {SEED_MAX}], got {seed}"
    with pytest.raises(ValueError, match=rf"defaults\.seed {re.escape(message)}"):
        check_config(load_config(dotlist=[f"defaults.seed={seed}"]))
    with pytest.raises(ValueError, match=re.escape(f"seed {message}")):
        as_int("seed", seed)
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": ["a.png", "b.png"], "seed": pa.array([1, seed], pa.uint64())}), path)
    with pytest.raises(
        manifest.ManifestError, match=re.escape(f"'seed' is out of range [0, {SEED_MAX}]: {seed} at row 1")
    ):
        manifest.validate_manifest(str(path))
    pq.write_table(pa.table({"image": ["a.png"], "seed": [float(seed)]}), path)
    with pytest.raises(manifest.ManifestError, match=r"'seed' is out of range"):
        manifest.validate_manifest(str(path))


def test_renderer_uses_the_same_range():
    from pipeline.params import check_value  # what Renderer.generate_batch checks each seed with

    assert check_value("seed", SEED_MAX) == SEED_MAX and check_value("seed", np.uint64(SEED_MAX)) == SEED_MAX
    assert check_value("seed", 5.0) == 5 and check_value("seed", np.float64(5.0)) == 5
    for bad in (2**63, 2**64 - 1, 5.5, -1, "5", True, float("nan"), None):
        with pytest.raises(ValueError, match="seed must be"):
            check_value("seed", bad)


def test_largest_seed_and_integral_floats_are_accepted(tmp_path):
    check_config(load_config(dotlist=[f"defaults.seed={SEED_MAX}"]))
    path = tmp_path / "m.parquet"
    seeds = pa.array([5.0, None, float(2**53)], pa.float64())  # pandas: an int column with a gap
    pq.write_table(
        pa.table({"image": ["a.png", "b.png", "c.png"], "seed": seeds, "fps": [7.0, 8.0, 9.0]}), path
    )
    manifest.validate_manifest(str(path))
    rows = next(manifest.iter_manifest(str(path)))
    assert [r["seed"] for r in rows] == [5, None, 2**53] and isinstance(rows[0]["seed"], int)
    assert [r["fps"] for r in rows] == [7, 8, 9]
    pq.write_table(pa.table({"image": ["a.png"], "seed": [5.5]}), path)
    with pytest.raises(manifest.ManifestError, match=r"'seed' expects an integer, got 5.5 at row 0"):
        manifest.validate_manifest(str(path))
    # the results schema holds the largest seed (int64)
    results.ResultWriter(tmp_path / "out").commit([_row("a", seed=SEED_MAX) | {"seed": SEED_MAX}])
    assert results.read_results(tmp_path / "out").column("seed").to_pylist() == [SEED_MAX]


# -- 6. never create a bucket ----------------------------------------------------------------


@pytest.fixture(name="moto_s3")
def moto_s3_fixture(monkeypatch):
    with moto_s3(monkeypatch) as fs:
        yield fs


def _buckets(fs) -> set[str]:
    fs.invalidate_cache()
    return {b.rstrip("/") for b in fs.ls("", detail=False)}


def test_writers_never_create_a_bucket(moto_s3, tmp_path):
    from pipeline.encode import encode_video
    from pipeline.errors import EncodeError

    fs = moto_s3
    missing = "vcut-integrity-missing"
    assert missing not in _buckets(fs)
    out = output.open_output(f"s3://{missing}/renders/x")
    out.makedirs("results")
    out.makedirs("videos")
    writer = results.ResultWriter(out)  # pre-flight bypassed: the writer itself must not create it
    with pytest.raises(OSError):
        writer.commit([_row("a")])
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(EncodeError):
        encode_video(frames, output.video_path(out, "a", "mp4"), fps=7)
    with pytest.raises(OSError):
        OutputLock(out).acquire()
    assert missing not in _buckets(fs)


def test_object_store_lease(moto_s3):
    fs = moto_s3
    fs.mkdir("vcut-integrity-lease")
    uri = "s3://vcut-integrity-lease/out"
    first = OutputLock(uri, ttl_s=3, settle_s=0.1).acquire()
    lease = json.loads(fs.cat_file(f"vcut-integrity-lease/out/{LEASE_NAME}"))
    assert lease["pid"] == os.getpid() and lease["expires"] > time.time()
    with pytest.raises(OutputLockedError, match=f"pid {os.getpid()} on host"):
        OutputLock(uri, settle_s=0.1).acquire()
    time.sleep(2.5)  # refreshed every ttl / 3: still held after most of a ttl
    with pytest.raises(OutputLockedError):
        OutputLock(uri, settle_s=0.1).acquire()
    first._stop.set()  # a driver that died: no more refreshes, the lease expires
    first._thread.join()
    time.sleep(3.2)
    second = OutputLock(uri, settle_s=0.1).acquire()
    racer = OutputLock(uri, settle_s=0.1)  # saw no lease, then lost the conditional create
    reads = iter([None])
    real_read = racer._read_lease
    racer._read_lease = lambda: next(reads, None) or real_read()
    with pytest.raises(OutputLockedError, match=f"pid {os.getpid()} on host"):
        racer.acquire()
    second.release()
    fs.invalidate_cache()
    assert not fs.exists(f"vcut-integrity-lease/out/{LEASE_NAME}")  # removed on release
