"""``vcut run s3://.../manifest.parquet --out s3://.../out`` against a real S3 API on loopback.

moto's S3 server runs in a thread on 127.0.0.1; ``AWS_ENDPOINT_URL`` (honoured by botocore, so by
s3fs) points every process at it. The variables are set before Ray starts, so the local Ray
workers inherit them, as pods inherit theirs from the deployment. Needs ``moto[server]`` and
``s3fs``: missing, the tests fail under ``CI`` and skip otherwise.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import posixpath
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import moto_s3

from jobs import output
from jobs.main import main

ROOT = Path(__file__).resolve().parents[1]
TINY_JOB = str(ROOT / "examples" / "tiny-job.yaml")
BUCKET = "vcut-test"


def _need(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"{module} is not installed (pip install 'moto[server]' s3fs)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback with one bucket; yields an s3fs filesystem on it."""
    with pytest.MonkeyPatch.context() as mp, moto_s3(mp) as fs:
        fs.mkdir(BUCKET)
        yield fs


@pytest.fixture(scope="module")
def ray_with_s3_env(s3):
    """A local Ray instance started after the S3 variables are set: its workers inherit them."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield s3
    finally:
        ray.shutdown()


def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_uri_out_keeps_escaping_ids_under_the_root(s3):
    out = output.open_output(f"s3://{BUCKET}/renders/x/")
    assert (out.uri, out.root, out.object_store) == (f"s3://{BUCKET}/renders/x", f"{BUCKET}/renders/x", True)
    videos = f"s3://{BUCKET}/renders/x/videos/"
    for bad in ["../x", "../../etc/passwd", "/abs/path", "a/../../b", "s3://other/x", ".", "..", "x" * 500]:
        path = output.video_path(out, bad, "mp4")
        name = path[len(videos) :]
        assert path.startswith(videos) and "/" not in name and "\\" not in name
        assert not name.startswith(".") and len(name) <= 130  # never "." or "..", never hidden
        assert posixpath.dirname(posixpath.normpath(path.split("://", 1)[1])) == f"{BUCKET}/renders/x/videos"
    assert output.video_path(f"s3://{BUCKET}/renders/x", "../x", "mp4") == output.video_path(
        out, "../x", "mp4"
    )


@pytest.mark.slow
def test_run_manifest_and_out_in_s3_then_resume(ray_with_s3_env, tiny_model_dir, tmp_path):
    from pipeline import probe_video

    fs = ray_with_s3_env
    for i in range(3):
        fs.pipe_file(f"{BUCKET}/job/imgs/img{i}.png", _png(i))
    rows = [
        {"id": "a", "image": f"s3://{BUCKET}/job/imgs/img0.png"},
        {"id": "../escape", "image": f"s3://{BUCKET}/job/imgs/img1.png"},
        {"id": "relative", "image": "imgs/img2.png"},  # against the manifest's folder URI
    ]
    with fs.open(f"{BUCKET}/job/manifest.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)
    manifest, out = f"s3://{BUCKET}/job/manifest.parquet", f"s3://{BUCKET}/out"
    args = ["run", manifest, "--out", out, "--model", str(tiny_model_dir), "--config", TINY_JOB]
    args += ["--workers", "1", "defaults.num_frames=2"]

    assert main(args) == 0

    fs.invalidate_cache()
    videos = sorted(fs.ls(f"{BUCKET}/out/videos", detail=False))
    assert len(videos) == 3 and all(v.endswith(".mp4") for v in videos)
    assert sorted(fs.ls(f"{BUCKET}/out", detail=False)) == [
        f"{BUCKET}/out/{n}" for n in ("report.html", "results", "summary.json", "videos")
    ]
    report = fs.cat_file(f"{BUCKET}/out/report.html").decode()  # thumbnails read back from the bucket
    assert report.count('src="data:image/jpeg;base64,') == 3 and 'href="videos/' in report
    assert not [p for p in fs.find(f"{BUCKET}/out") if ".tmp" in p]  # no temporaries left
    table = pq.read_table(f"{BUCKET}/out/results", filesystem=fs)
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert sorted(by_id) == sorted(r["id"] for r in rows) and table.num_rows == 3
    assert {r["status"] for r in by_id.values()} == {"ok"}, [r["error"] for r in by_id.values()]
    assert by_id["relative"]["image"] == "imgs/img2.png"
    for r in by_id.values():
        assert r["output"].startswith(f"s3://{BUCKET}/out/videos/") and fs.exists(r["output"])
    local = tmp_path / "escape.mp4"
    fs.get_file(by_id["../escape"]["output"], str(local))
    assert probe_video(str(local)).frames == by_id["../escape"]["frames"] == 2
    summary = json.loads(fs.cat_file(f"{BUCKET}/out/summary.json"))
    assert (summary["ok"], summary["failed"], summary["rendered_this_run"]) == (3, 0, 3)
    assert summary["results"] == f"{out}/results" and summary["videos"] == f"{out}/videos"

    # the same command again: resume over S3 renders nothing, the videos are untouched
    before = {v: fs.info(v)["ETag"] + str(fs.info(v)["LastModified"]) for v in videos}
    assert main(args) == 0
    fs.invalidate_cache()
    summary = json.loads(fs.cat_file(f"{BUCKET}/out/summary.json"))
    assert (summary["rendered_this_run"], summary["skipped_already_ok"], summary["ok"]) == (0, 3, 3)
    assert {v: fs.info(v)["ETag"] + str(fs.info(v)["LastModified"]) for v in videos} == before
    assert pq.read_table(f"{BUCKET}/out/results", filesystem=fs).num_rows == 3


#: S3 calls that write an object (or part of one): every key they name is recorded.
_WRITES = ("put_object", "create_multipart_upload", "upload_part", "complete_multipart_upload", "copy_object")


@pytest.fixture
def s3_writes(s3, monkeypatch):
    """Every object key written through s3fs (any instance) while the test runs, in order."""
    import s3fs

    keys: list[tuple[str, str]] = []
    real = s3fs.S3FileSystem._call_s3

    async def spy(self, method, *args, **kwargs):
        if method in _WRITES:
            keys.append((method, f"{kwargs.get('Bucket')}/{kwargs.get('Key')}"))
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", spy)
    return keys


@pytest.mark.slow
def test_put_atomic_on_s3_is_one_upload_under_the_final_name(s3, s3_writes, tmp_path, monkeypatch):
    from pipeline.storage import put_atomic

    fs = s3
    put_atomic(fs, f"{BUCKET}/atomic/a.bin", b"bytes")
    src = tmp_path / "b.bin"
    src.write_bytes(b"file" * 1000)
    put_atomic(fs, f"{BUCKET}/atomic/b.bin", str(src))
    assert s3_writes == [("put_object", f"{BUCKET}/atomic/a.bin"), ("put_object", f"{BUCKET}/atomic/b.bin")]
    assert fs.cat_file(f"{BUCKET}/atomic/b.bin") == b"file" * 1000

    real = type(fs)._call_s3

    async def failing(self, method, *args, **kwargs):
        if method == "put_object":
            raise OSError("simulated upload failure")
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(type(fs), "_call_s3", failing)
    with pytest.raises(OSError, match="simulated"):
        put_atomic(fs, f"{BUCKET}/atomic/c.bin", b"never")
    fs.invalidate_cache()
    listed = sorted(fs.ls(f"{BUCKET}/atomic", detail=False))
    assert listed == [f"{BUCKET}/atomic/a.bin", f"{BUCKET}/atomic/b.bin"]  # no c.bin, no temporary


@pytest.mark.slow
def test_encode_upload_on_s3_writes_only_the_final_object(s3, s3_writes, tmp_path):
    from pipeline import encode_video, probe_video

    fs = s3
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    encode_video(frames, f"s3://{BUCKET}/enc/videos/v.mp4", fps=7, preset="ultrafast")
    assert s3_writes == [("put_object", f"{BUCKET}/enc/videos/v.mp4")]  # no temporary, no copy
    fs.invalidate_cache()
    assert fs.find(f"{BUCKET}/enc") == [f"{BUCKET}/enc/videos/v.mp4"]
    fs.get_file(f"{BUCKET}/enc/videos/v.mp4", str(tmp_path / "v.mp4"))
    assert probe_video(str(tmp_path / "v.mp4")).frames == 3
