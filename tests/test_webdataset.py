"""``output.layout=webdataset``: shards published, read back (webdataset, Ray Data), resumed,
crash-safe, locally and on S3 (moto's server on loopback).

Jobs run through ``jobs.runner.run_job`` with the test double ``jobs.testing.FakeRenderer``
(one 16x16 black frame, instantly) and the real ffmpeg encoder, so each shard holds real,
decodable MP4s in a second. One Ray instance serves the module; it starts after the S3
variables are set (its workers inherit them) and with ``HF_HUB_OFFLINE=1`` (the no-op
renderer has no UNet config: the worker's MAC count fails at once instead of retrying the hub).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_object_storage import BUCKET, s3  # noqa: F401 (the moto S3 server fixture)

from jobs import output
from jobs.shards import sample_key
from jobs.testing import FakeRenderer
from pipeline.storage import is_temporary

ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZE = 2


@pytest.fixture(scope="module")
def ray_env(s3):  # noqa: F811
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        # the workers import this module (its crash and cluster drivers)
        mp.setenv(
            "PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
        )
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        try:
            yield ray.get_runtime_context().gcs_address, s3
        finally:
            ray.shutdown()


def _cfg(*extra: str):
    from jobs.config import check_config, load_config

    cfg = load_config(
        None,
        {"workers.count": 1},
        [
            "output.layout=webdataset",
            f"output.shard_size={SHARD_SIZE}",
            "output.caption_column=caption",
            "output.preset=ultrafast",
            "workers.batch_size=1",
            "progress_interval_s=3600",
            *extra,
        ],
    )
    check_config(cfg)
    return cfg


class _GatedRenderer(FakeRenderer):
    """``FakeRenderer(delay_s)`` for one worker rendering one row per batch: before its row
    ``k`` it waits (up to a minute) until every shard it closed before (``k // SHARD_SIZE`` of
    them, numbered from 0) is published (its stats file, written last, exists), so that each
    shard's report rides back with the next batch however loaded the machine is."""

    def __init__(self, out: str, delay_s: float):
        super().__init__(delay_s)
        self.out, self.rows = out, 0

    def generate(self, image, **kwargs):
        out = output.open_output(self.out)
        closed, self.rows = self.rows // SHARD_SIZE, self.rows + 1
        names = [f"{n:05d}_stats.json" for n in range(closed)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if out.fs is not None:
                out.fs.invalidate_cache()
            if set(names) <= set(out.listdir("shards")):
                break
            time.sleep(0.05)
        return super().generate(image, **kwargs)


@dataclasses.dataclass(frozen=True)
class GatedRendererFactory:
    """A picklable ``renderer_factory`` of :class:`_GatedRenderer` (the workers import this module)."""

    out: str
    delay_s: float

    def __call__(self, model: dict, cache: dict) -> _GatedRenderer:
        return _GatedRenderer(self.out, self.delay_s)


def _run(manifest: str, out: str, *extra: str, delay: float = 0.0, factory=None) -> dict:
    from jobs.runner import run_job
    from jobs.testing import FakeRendererFactory
    from pipeline.encode import encode_video

    with open(os.devnull, "w") as devnull:
        return run_job(
            _cfg(*extra),
            manifest,
            out,
            renderer_factory=factory or FakeRendererFactory(delay_s=delay),
            encoder=encode_video,
            progress_stream=devnull,
        )


IDS = ["clip.0", "clip.1", "../escape", "plain", "a b.c"]


def _manifest(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / f"img{i}.png")
    rows = [
        {"id": rid, "image": f"img{i % 3}.png", "seed": i, "caption": f"caption of {rid}", "note": i}
        for i, rid in enumerate(IDS)
    ]
    path = folder / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _check_samples(samples: list[dict], tmp_path: Path) -> None:
    """webdataset's samples: video, json with every field, caption; one video decodes."""
    from pipeline import probe_video

    by_id = {}
    for sample in samples:
        meta = json.loads(sample["json"])
        assert sample["__key__"] == sample_key(meta["id"]) and "." not in sample["__key__"]
        assert sample["txt"].decode() == f"caption of {meta['id']}"
        by_id[meta["id"]] = (sample, meta)
    assert sorted(by_id) == sorted(IDS)
    sample, meta = by_id["../escape"]
    for field in ("id", "image", "seed", "num_frames", "fps", "motion_bucket_id", "noise_aug_strength"):
        assert field in meta
    for field in ("num_inference_steps", "min_guidance_scale", "max_guidance_scale", "width", "height"):
        assert field in meta
    assert meta["seed"] == 2 and meta["note"] == 2 and meta["caption"] == "caption of ../escape"
    assert meta["seconds"] is not None and meta["encode_seconds"] > 0 and meta["status"] == "ok"
    video = tmp_path / "decoded.mp4"
    video.write_bytes(sample["mp4"])
    probe = probe_video(str(video))
    assert (probe.frames, probe.width, probe.height) == (1, 16, 16)


def _read_webdataset(urls: list[str]) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_sample_keys_have_no_dots_and_stay_distinct():
    ids = ["a.b", "a_b", "x.y.z", "../x", "plain", "é.mp4", "." * 3, "a" * 300 + ".b"]
    keys = [sample_key(i) for i in ids]
    assert len(set(keys)) == len(ids)
    assert all("." not in k and "/" not in k and k and len(k) <= output.MAX_NAME for k in keys)
    assert sample_key("plain") == "plain" and sample_key("a_b") == "a_b"


@pytest.mark.slow
def test_local_shards_read_back_resume_and_lost_shard(ray_env, tmp_path):
    import ray

    manifest = _manifest(tmp_path / "in")
    out = tmp_path / "out"
    summary = _run(str(manifest), str(out))
    assert (summary["ok"], summary["failed"], summary["shards_published_this_run"]) == (5, 0, 3)
    names = sorted(os.listdir(out / "shards"))
    assert names == [f"{n:05d}{s}" for n in range(3) for s in (".parquet", ".tar", "_stats.json")]
    # no videos/ folder: the videos are in the shards
    assert sorted(os.listdir(out)) == ["logs", "report.html", "results", "shards", "summary.json"]
    tars = [str(out / "shards" / f"{n:05d}.tar") for n in range(3)]

    # read back: webdataset, Ray Data, the per-shard Parquet and stats, the results table
    _check_samples(_read_webdataset(tars), tmp_path)
    ds = ray.data.read_webdataset(tars, decoder=False)
    rows = ds.take_all()
    assert len(rows) == 5 and {"mp4", "json", "txt"} <= set(rows[0])
    metas = [r["json"] if isinstance(r["json"], dict) else json.loads(r["json"]) for r in rows]
    assert sorted(m["id"] for m in metas) == sorted(IDS)
    assert all(bytes(r["mp4"])[4:8] == b"ftyp" for r in rows)  # MP4 bytes, as written
    results = {r["id"]: r for r in pq.read_table(out / "results").to_pylist()}
    assert sorted(results) == sorted(IDS)
    for n in range(3):
        shard = pq.read_table(out / "shards" / f"{n:05d}.parquet").to_pylist()
        stats = json.loads((out / "shards" / f"{n:05d}_stats.json").read_text())
        with tarfile.open(tars[n]) as tar:
            members = sorted(tar.getnames())
        assert stats["count"] == len(shard) == (SHARD_SIZE if n < 2 else 1)
        assert members == sorted(f"{r['key']}.{ext}" for r in shard for ext in ("json", "mp4", "txt"))
        for row in shard:
            assert results[row["id"]]["shard"] == n and results[row["id"]]["output"] == tars[n]

    # the same job again: nothing renders, the shards are untouched
    mtimes = {n: os.stat(out / "shards" / n).st_mtime_ns for n in names}
    summary = _run(str(manifest), str(out))
    assert (summary["rendered_this_run"], summary["skipped_already_ok"], summary["ok"]) == (0, 5, 5)
    assert {n: os.stat(out / "shards" / n).st_mtime_ns for n in os.listdir(out / "shards")} == mtimes

    # a lost shard: exactly its rows render again, into a new shard; its other files go
    lost = {r["id"] for r in pq.read_table(out / "shards" / "00001.parquet").to_pylist()}
    os.remove(tars[1])
    summary = _run(str(manifest), str(out))
    assert (summary["rendered_this_run"], summary["skipped_already_ok"]) == (len(lost), 5 - len(lost))
    assert {n: os.stat(out / "shards" / n).st_mtime_ns for n in names if not n.startswith("00001")} == {
        n: t for n, t in mtimes.items() if not n.startswith("00001")
    }
    assert not [n for n in os.listdir(out / "shards") if n.startswith("00001")]
    assert {r["id"] for r in pq.read_table(out / "shards" / "00003.parquet").to_pylist()} == lost
    table = pq.read_table(out / "results")
    assert table.num_rows == 5
    assert {r["id"] for r in table.to_pylist() if r["shard"] == 3} == lost
    _check_samples(_read_webdataset(sorted(str(p) for p in (out / "shards").glob("*.tar"))), tmp_path)


_CRASH = """
import os, sys
from jobs import commits, runner, shards

where = sys.argv[4]
original_commit, original_receive = runner.Runner._commit_rows, shards.ShardBook.receive
original_committer = commits.Committer.__init__
committers = []

def commit(self, rows):  # in the loop: queued for the writer thread
    original_commit(self, rows)
    if where == "spool" and any(r.get("shard") == 0 for r in rows):
        self.committer.close()  # shard 0 is on storage
        os._exit(9)  # shard 0 committed; a sample of the next shard is in its worker's spool

def receive(self, reports, label):
    if where == "commit" and any(r.get("shard") == 1 for r in reports):
        committers[0].close()  # what the loop committed before (shard 0) is on storage
        os._exit(9)  # shard 1 published by its worker, its rows not committed
    return original_receive(self, reports, label)

def committer(self, *args, **kwargs):
    original_committer(self, *args, **kwargs)
    committers.append(self)

runner.Runner._commit_rows, shards.ShardBook.receive = commit, receive
commits.Committer.__init__ = committer
import ray, test_webdataset as t
ray.init(address=sys.argv[3], logging_level="WARNING")
# one batch at a time; each shard's report rides back with the next batch
gated = t.GatedRendererFactory(sys.argv[2], 0.2)
t._run(sys.argv[1], sys.argv[2], "workers.inflight_per_worker=1", factory=gated)
"""


@pytest.mark.slow
@pytest.mark.parametrize("where,store", [("spool", "local"), ("commit", "local"), ("commit", "s3")])
def test_driver_crash_leaves_no_partial_shard(ray_env, tmp_path, where, store):
    address, fs = ray_env
    manifest = _manifest(tmp_path / "in")
    if store == "local":
        out = str(tmp_path / "out")
        listdir = lambda: sorted(os.listdir(Path(out) / "shards"))  # noqa: E731
        results = lambda: pq.read_table(Path(out) / "results").to_pylist()  # noqa: E731
        local_tar = lambda name: str(Path(out) / "shards" / name)  # noqa: E731
    else:
        out = f"s3://{BUCKET}/crash-{where}/out"

        def listdir() -> list[str]:
            fs.invalidate_cache()
            return sorted(k.rsplit("/", 1)[1] for k in fs.find(f"{out[5:]}/shards"))

        def results() -> list[dict]:
            fs.invalidate_cache()
            return pq.read_table(f"{out[5:]}/results", filesystem=fs).to_pylist()

        def local_tar(name: str) -> str:
            fs.get_file(f"{out[5:]}/shards/{name}", str(tmp_path / name))
            return str(tmp_path / name)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH, str(manifest), out, address, where],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 9, proc.stderr[-3000:]
    names = listdir()
    committed = results()
    assert {r["shard"] for r in committed} == {0} and len(committed) == SHARD_SIZE
    if where == "spool":  # shard 1 only exists as its worker's hidden spool file
        assert names[1:] == ["00000.parquet", "00000.tar", "00000_stats.json"]
        assert names[0].startswith(".worker-0.tar.tmp-") and is_temporary(names[0])
    else:  # shard 1 is complete under its final names, but no committed row names it
        final = [n for n in names if not is_temporary(n)]  # (and a spool may hold the next row)
        assert final == [f"{n:05d}{s}" for n in range(2) for s in (".parquet", ".tar", "_stats.json")]
        with tarfile.open(local_tar("00001.tar")) as tar:
            assert len(tar.getnames()) == 3 * SHARD_SIZE
    if store == "s3":
        # The killed driver's lease on the object store would expire 120 s after its last refresh;
        # an operator who knows that driver is dead removes it instead (jobs/lock.py).
        from jobs.lock import LEASE_NAME

        fs.rm(f"{out[5:]}/{LEASE_NAME}")

    summary = _run(str(manifest), out)
    assert (summary["rendered_this_run"], summary["skipped_already_ok"], summary["ok"]) == (3, 2, 5)
    first = 1 if where == "spool" else 2  # an orphan's number is never reused
    expect = [f"{n:05d}{s}" for n in (0, first, first + 1) for s in (".parquet", ".tar", "_stats.json")]
    assert listdir() == expect
    _check_samples(_read_webdataset([local_tar(n) for n in expect if n.endswith(".tar")]), tmp_path)


@pytest.mark.slow
def test_s3_shards_read_back_and_lost_shard(ray_env, tmp_path):
    import ray
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    _, fs = ray_env
    local = _manifest(tmp_path / "in")
    for name in os.listdir(local.parent):
        fs.put_file(str(local.parent / name), f"{BUCKET}/wds/in/{name}")
    manifest, out = f"s3://{BUCKET}/wds/in/manifest.parquet", f"s3://{BUCKET}/wds/out"
    summary = _run(manifest, out)
    assert (summary["ok"], summary["shards_published_this_run"]) == (5, 3)
    fs.invalidate_cache()
    keys = sorted(fs.find(f"{BUCKET}/wds/out"))
    assert not [k for k in keys if ".tmp" in k]
    shard_keys = [k.rsplit("/", 1)[1] for k in keys if "/shards/" in k]
    assert shard_keys == [f"{n:05d}{s}" for n in range(3) for s in (".parquet", ".tar", "_stats.json")]
    tars = [f"{BUCKET}/wds/out/shards/{n:05d}.tar" for n in range(3)]
    for key in tars:
        fs.get_file(key, str(tmp_path / key.rsplit("/", 1)[1]))
    _check_samples(_read_webdataset([str(tmp_path / f"{n:05d}.tar") for n in range(3)]), tmp_path)
    ds = ray.data.read_webdataset(tars, filesystem=PyFileSystem(FSSpecHandler(fs)), decoder=False)
    assert ds.count() == 5
    results = pq.read_table(f"{BUCKET}/wds/out/results", filesystem=fs).to_pylist()
    assert all(r["output"] == f"s3://{tars[r['shard']]}" for r in results)

    fs.rm_file(tars[0])
    lost = {r["id"] for r in results if r["shard"] == 0}
    summary = _run(manifest, out)
    assert (summary["rendered_this_run"], summary["skipped_already_ok"]) == (len(lost), 5 - len(lost))
    fs.invalidate_cache()
    names = sorted(k.rsplit("/", 1)[1] for k in fs.find(f"{BUCKET}/wds/out/shards"))
    assert names == [f"{n:05d}{s}" for n in (1, 2, 3) for s in (".parquet", ".tar", "_stats.json")]
    results = pq.read_table(f"{BUCKET}/wds/out/results", filesystem=fs).to_pylist()
    assert len(results) == 5 and {r["id"] for r in results if r["shard"] == 3} == lost


# -- worker-written shards: the driver's book and the worker's spool, in process --------------


def _held(row_id: str, worker: str) -> dict:
    return {"id": row_id, "worker": worker, "status": "ok", "output": None}


def test_book_numbers_never_collide_and_commit_only_reports_whose_rows_are_back():
    from jobs.shards import ShardBook

    book = ShardBook(first_number=5, reserve=2)
    assert book.numbers_for("w0") == [5, 6] and book.numbers_for("w1") == [7, 8]
    assert book.numbers_for("w0") == [5, 6]  # the same reservation until one is reported used
    # w0 published shard 5 with r0 (its result not back yet: another batch) and r1 (this batch)
    book.hold(_held("r1", "w0"), {"id": "r1"})
    assert book.receive([{"shard": 5, "tar": "t5", "ids": ["r0", "r1"]}], "w0") == []
    assert book.numbers_for("w0") == [6, 9]  # 5 is used: a new number, never one of w1's
    book.hold(_held("r0", "w0"), {"id": "r0"})
    [rows] = book.receive([], "w0")
    assert [(r["id"], r["shard"], r["output"]) for r in rows] == [("r0", 5, "t5"), ("r1", 5, "t5")]
    assert book.pending() == 0 and book.published == 1
    # a shard the worker could not write: its rows are committed as failed, with the cause
    book.hold(_held("r2", "w1"), {"id": "r2"})
    [rows] = book.receive([{"dropped": ["r2"], "error": "OSError: disk full"}], "w1")
    assert rows[0]["status"] == "failed" and "disk full" in rows[0]["error"] and rows[0]["output"] is None
    # a worker dies: the rows it held render again; its parked report and numbers are forgotten
    book.hold(_held("r3", "w1"), {"id": "r3", "_image": "x.png"})
    assert book.receive([{"shard": 7, "tar": "t7", "ids": ["r3", "r4"]}], "w1") == []
    assert book.orphans("w1") == [{"id": "r3", "_image": "x.png"}]
    assert book.pending() == 0 and book.parked == [] and book.orphaned == 1
    assert min(book.numbers_for("w2")) > 9  # w1's reserved 8 is never handed out again


def _spec(out: str, size: int):
    from jobs.results import RESULT_SCHEMA
    from jobs.shard_writer import ShardSpec

    return ShardSpec(out, size, "mp4", pa.schema([*RESULT_SCHEMA, pa.field("key", pa.string())]), None)


def _video(folder: Path, i: int) -> str:
    path = folder / f"v{i}.mp4"
    path.write_bytes(b"\0\0\0\x18ftypmp42" + bytes([i]) * 100)
    return str(path)


@pytest.mark.parametrize("store", ["local", "s3"])
def test_worker_shard_is_invisible_until_published_and_waits_for_a_number(store, tmp_path, request):
    from jobs.shard_writer import WorkerShards

    if store == "local":
        out = str(tmp_path / "out")
        names = lambda: sorted(os.listdir(Path(out) / "shards"))  # noqa: E731
        fetch = lambda name: str(Path(out) / "shards" / name)  # noqa: E731
    else:
        fs = request.getfixturevalue("s3")
        out = f"s3://{BUCKET}/worker-{tmp_path.name}/out"

        def names() -> list[str]:
            fs.invalidate_cache()
            return sorted(k.rsplit("/", 1)[1] for k in fs.find(f"{out[5:]}/shards"))

        def fetch(name: str) -> str:
            fs.get_file(f"{out[5:]}/shards/{name}", str(tmp_path / name))
            return str(tmp_path / name)

    shards = WorkerShards(_spec(out, 2), "worker-3")
    videos = [_video(tmp_path, i) for i in range(3)]
    for i, video in enumerate(videos):
        shards.add({"id": f"r{i}", "status": "ok", "worker": "worker-3"}, video)
    assert not any(os.path.exists(v) for v in videos)  # each video file moved into a spool
    # one full spool and one open: hidden temporaries locally, nothing at all on the store
    assert all(is_temporary(n) for n in names()) and len(names()) == (2 if store == "local" else 0)
    assert shards.reports([]) == []  # full, but no number reserved: it waits
    [report] = shards.reports([7], wait=True)
    assert (report["shard"], report["ids"]) == (7, ["r0", "r1"])
    assert report["tar"].endswith("/shards/00007.tar")
    [report] = shards.reports([7, 8], flush=True)  # 7 is used: never twice
    assert (report["shard"], report["ids"]) == (8, ["r2"])
    assert names() == [f"{n:05d}{s}" for n in (7, 8) for s in (".parquet", ".tar", "_stats.json")]
    samples = _read_webdataset([fetch("00007.tar"), fetch("00008.tar")])
    assert [json.loads(s["json"])["id"] for s in samples] == ["r0", "r1", "r2"]
    assert [s["mp4"][-1] for s in samples] == [0, 1, 2]
    shard = pq.read_table(fetch("00008.parquet")).to_pylist()
    assert [(r["id"], r["shard"], r["key"]) for r in shard] == [("r2", 8, "r2")]
    stats = json.loads(Path(fetch("00007_stats.json")).read_text())
    assert (stats["count"], stats["worker"], stats["video_bytes"]) == (2, "worker-3", 2 * 112)


def test_worker_shard_open_too_long_is_closed_before_it_is_full(tmp_path):
    """``output.shard_max_age_s`` bounds what a worker's death costs: a shard open that long is
    published at the next sample, full or not (a fake clock)."""
    from dataclasses import replace

    from jobs.shard_writer import WorkerShards

    now = [1000.0]
    spec = replace(_spec(str(tmp_path / "out"), 100), max_age_s=60.0)
    shards = WorkerShards(spec, "worker-0", clock=lambda: now[0])
    shards.add({"id": "a", "status": "ok"}, _video(tmp_path, 0))
    now[0] += 59.0
    shards.add({"id": "b", "status": "ok"}, _video(tmp_path, 1))
    assert shards.reports([0, 1], wait=True) == []  # 59 s old, 2 of 100 samples: still open
    now[0] += 1.0
    shards.add({"id": "c", "status": "ok"}, _video(tmp_path, 2))
    [report] = shards.reports([0, 1], wait=True)
    assert (report["shard"], report["ids"]) == (0, ["a", "b", "c"])
    shards.add({"id": "d", "status": "ok"}, _video(tmp_path, 3))  # a new shard, its own age
    assert shards.reports([1], wait=True) == []


def test_stop_line_says_how_an_overwrite_resumes():
    from jobs.cli.run import stopped_line as _stopped_line

    summary = {"manifest_rows": 5, "ok": 2, "rendered_this_run": 2}
    plain = _stopped_line("SIGTERM", summary)
    assert plain.endswith("rerun the same command to resume")
    assert "3 left" in plain
    summary["ok"] = 5  # older rows count as ok; 2 rows are of the open generation
    summary["output_generation"] = {
        "id": "abc",
        "started_at": "2026-12-04T20:00:00Z",
        "complete": False,
        "ok": 2,
    }
    line = _stopped_line("SIGTERM", summary)
    assert line.startswith(plain) and "continues the --overwrite begun at 2026-12-04T20:00:00Z" in line


# -- --overwrite: a generation that a rerun resumes --------------------------------------------


class _StopAfter:
    """``run_job``'s ``signals`` (the runner sets ``target``) and a hook that asks the job to stop,
    with no grace, once ``rows`` rows are committed: an interrupted run, in process."""

    def __init__(self, rows: int):
        self.rows, self.seen, self.target = rows, 0, None

    def on_result(self, row: dict) -> None:
        self.seen += 1
        if self.seen == self.rows and self.target is not None:
            self.target("test stop", 0.0)


def _job(manifest: Path, out: Path, layout: str, *flags: str, stop: _StopAfter | None = None) -> dict:
    from jobs.runner import run_job
    from jobs.testing import FakeRendererFactory
    from pipeline.encode import encode_video

    extra = [f"output.layout={layout}", *flags]
    with open(os.devnull, "w") as devnull:
        return run_job(
            _cfg(*extra),
            str(manifest),
            str(out),
            renderer_factory=FakeRendererFactory(delay_s=0.3),
            encoder=encode_video,
            progress_stream=devnull,
            hook=stop,
            signals=stop,
        )


def _published_samples(out: Path) -> list[dict]:
    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    return [json.loads(s["json"]) for s in _read_webdataset(tars)]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["webdataset", "files"])
def test_interrupted_overwrite_resumes_and_leaves_no_old_sample(ray_env, tmp_path, layout):
    manifest, out = _manifest(tmp_path / "in"), tmp_path / "out"
    first = _job(manifest, out, layout)
    assert first["ok"] == 5 and "output_generation" not in first
    assert ("shards" in first, "videos" in first) == (layout == "webdataset", layout == "files")
    old_shards = sorted(p.name for p in (out / "shards").glob("*.tar")) if layout == "webdataset" else []

    # --overwrite, stopped once the first rows of the new generation are committed
    stop = _StopAfter(SHARD_SIZE if layout == "webdataset" else 1)
    stopped = _job(manifest, out, layout, "output.overwrite=true", stop=stop)
    assert stopped["stopped"] == "test stop" and stopped["output_generation"]["complete"] is False
    gen = stopped["output_generation"]["id"]
    assert json.loads((out / "generation.json").read_text())["id"] == gen
    rows = pq.read_table(out / "results").to_pylist()
    kept = {r["id"] for r in rows if r["output_generation"] == gen}
    assert 0 < len(kept) < 5 and all(r["status"] == "ok" for r in rows)
    assert stopped["output_generation"]["ok"] == len(kept) and stopped["ok"] == 5  # 5 ok, of them 'kept' new

    # the same command again: only the rows not yet rendered in this generation render
    again = _job(manifest, out, layout, "output.overwrite=true")
    assert (again["rendered_this_run"], again["skipped_already_ok"]) == (5 - len(kept), len(kept))
    assert again["output_generation"]["id"] == gen and again["output_generation"]["complete"] is True
    rows = pq.read_table(out / "results").to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(IDS)
    assert {(r["status"], r["output_generation"]) for r in rows} == {("ok", gen)}
    if layout == "webdataset":  # each id once, all of this generation; the old shards are gone
        samples = _published_samples(out)
        assert sorted(s["id"] for s in samples) == sorted(IDS)
        assert {s["output_generation"] for s in samples} == {gen}
        assert not set(old_shards) & {p.name for p in (out / "shards").glob("*.tar")}
        assert not [n for n in os.listdir(out / "shards") if is_temporary(n)]
    else:
        assert sorted(os.listdir(out / "videos")) == sorted(f"{output.safe_name(i)}.mp4" for i in IDS)

    # complete: a plain rerun renders nothing; a new --overwrite is a new generation
    assert _job(manifest, out, layout)["rendered_this_run"] == 0
    new = _job(manifest, out, layout, "output.overwrite=true")
    assert new["rendered_this_run"] == 5 and new["output_generation"]["id"] != gen
    if layout == "webdataset":
        samples = _published_samples(out)
        assert len(samples) == 5 and {s["output_generation"] for s in samples} == {
            new["output_generation"]["id"]
        }


# -- a real multi-node cluster: a node dies while its worker holds an open shard ---------------

#: ``python -c CLUSTER_DRIVER MANIFEST OUT ADDRESS VICTIMS RESULT``: a webdataset job on the
#: cluster at ADDRESS; the first time a worker on a node of VICTIMS (JSON: node id -> the PID
#: of its ``ray start`` process group) holds two rendered rows in its open shard, that node is
#: killed. Writes the summary, the committed rows the hook saw and the rows sent to render
#: again to RESULT (JSON).
CLUSTER_DRIVER = """
import functools, json, os, signal, sys
import ray
from jobs import shards
from jobs.config import check_config, load_config
from jobs.runner import Runner
from jobs.testing import FakeRendererFactory, fake_encode

manifest, out, address, result = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[5]
victims = json.loads(sys.argv[4])
killed, committed = [], []
original_hold = shards.ShardBook.hold

def hold(self, row, source):
    original_hold(self, row, source)
    if not killed and row["node_id"] in victims and len(self.held[row["worker"]]) >= 2:
        killed.append(row["worker"])
        os.killpg(victims[row["node_id"]], signal.SIGKILL)

shards.ShardBook.hold = hold

class Hook:
    def on_result(self, row):
        committed.append(row)

ray.init(address=address, logging_level="WARNING")
cfg = load_config(None, None, [
    "output.layout=webdataset", "output.shard_size=4", "workers.count=2", "workers.num_gpus=1",
    "workers.allow_cpu_fallback=true", "workers.batch_size=1", "workers.start_timeout_s=20",
    "output.report=false", "progress_interval_s=3600",
])
check_config(cfg)
runner = Runner(
    cfg, manifest, out, hook=Hook(),
    renderer_factory=FakeRendererFactory(delay_s=0.3),
    encoder=functools.partial(fake_encode, size=1000),
    progress_stream=open(os.devnull, "w"),
)
summary = runner.run()
found = {"summary": summary, "killed": killed, "orphaned": runner.shards.orphaned, "committed": committed}
with open(result, "w") as f:
    json.dump(found, f, default=lambda v: ["BYTES", len(v)] if isinstance(v, bytes) else str(v))
"""


@pytest.mark.slow
def test_cluster_node_death_rows_in_its_open_shard_render_again_once(s3, tmp_path):  # noqa: F811
    from test_cluster import RayCluster

    fs = s3
    if shutil.which("ray", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("the ray CLI is not installed beside this Python")
    n = 16
    from PIL import Image

    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in" / "img.png")
    ids = [f"r{i:03d}" for i in range(n)]
    pq.write_table(
        pa.Table.from_pylist([{"id": i, "image": "img.png"} for i in ids]), tmp_path / "in" / "m.parquet"
    )
    out = f"s3://{BUCKET}/cluster/out"
    cluster = RayCluster()  # its nodes inherit the moto S3 variables of this process
    cluster.env["TMPDIR"] = str(tmp_path / "node-tmp")  # the workers' local spools (object store)
    (tmp_path / "node-tmp").mkdir()
    try:
        cluster.add(gpus=0, cpus=0)  # the driver's head
        gpu_nodes = [cluster.add(), cluster.add()]
        env = {k: v for k, v in cluster.env.items() if k != "TMPDIR"}
        env["OMP_NUM_THREADS"] = "1"
        probe = subprocess.run(
            [sys.executable, "-c", _NODE_IDS, cluster.address, json.dumps([x.port for x in gpu_nodes])],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert probe.returncode == 0, probe.stderr[-3000:]
        victims = {
            node_id: node.pid for node_id, node in zip(json.loads(probe.stdout), gpu_nodes, strict=True)
        }
        result = tmp_path / "result.json"
        args = [str(tmp_path / "in" / "m.parquet"), out, cluster.address, json.dumps(victims), str(result)]
        proc = subprocess.run(
            [sys.executable, "-c", CLUSTER_DRIVER, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
    finally:
        cluster.close()
    found = json.loads(result.read_text())
    summary = found["summary"]
    # the dead worker's open shard was lost: its held rows were sent to render again (the kill
    # comes at two held rows; in the whole suite one of them was, twice, already released by a
    # shard report the driver handled before it noticed the death, so at least one is counted)
    assert found["killed"] and found["orphaned"] >= 1
    assert (summary["ok"], summary["failed"]) == (n, 0)

    # no video byte reached the driver: the committed rows hold none
    assert sorted(r["id"] for r in found["committed"]) == ids
    assert not [
        v for r in found["committed"] for v in r.values() if isinstance(v, list) and v[:1] == ["BYTES"]
    ]
    assert not [r for r in found["committed"] if "video" in r]

    # every id in exactly one published shard; nothing half-written on the store
    fs.invalidate_cache()
    keys = sorted(fs.find(f"{BUCKET}/cluster/out/shards"))
    assert not [k for k in keys if is_temporary(k.rsplit("/", 1)[1]) or ".tmp" in k]
    tars = [k for k in keys if k.endswith(".tar")]
    for key in tars:
        fs.get_file(key, str(tmp_path / key.rsplit("/", 1)[1]))
    samples = _read_webdataset([str(tmp_path / k.rsplit("/", 1)[1]) for k in tars])
    assert sorted(json.loads(s["json"])["id"] for s in samples) == ids
    assert all(len(s["mp4"]) == 1000 for s in samples)
    rows = pq.read_table(f"{BUCKET}/cluster/out/results", filesystem=fs).to_pylist()
    assert sorted(r["id"] for r in rows) == ids
    numbers = {int(k.rsplit("/", 1)[1][:-4]) for k in tars}
    assert {r["shard"] for r in rows} == numbers


#: ``python -c _NODE_IDS ADDRESS PORTS``: the Ray node ids of the nodes on those manager ports.
_NODE_IDS = """
import json, sys
import ray
ray.init(address=sys.argv[1], logging_level="WARNING")
by_port = {n["NodeManagerPort"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
print(json.dumps([by_port[p] for p in json.loads(sys.argv[2])]))
"""
