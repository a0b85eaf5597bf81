"""``vcut report``: the report data on a synthetic results table, and a real job's report.html
loaded in headless Chromium (Debian's ``chromium-headless-shell``; ``make test`` installs it
with scripts/install-chromium.sh): no console message, the summary numbers and failure groups
in the DOM, and a screenshot in which the contact sheet shows the videos' first frames."""

from __future__ import annotations

import io
import logging
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import output, report
from jobs.main import main

ROOT = Path(__file__).resolve().parents[1]
TINY_JOB = str(ROOT / "examples" / "tiny-job.yaml")
T0 = 1_700_000_000.0


def _row(i: int, status: str, worker: str, finished: float, error: str | None = None) -> dict:
    return {
        "id": f"r{i}",
        "status": status,
        "output": f"/nowhere/videos/r{i}.mp4" if status == "ok" else None,
        "error": error,
        "seconds": 10.0 if status == "ok" else 0.5,
        "encode_seconds": 2.0 if status == "ok" else None,
        "macs": 100 if status == "ok" else None,
        "macs_saved": 30 if status == "ok" else None,
        "macs_saved_vcut": 20 if status == "ok" else None,
        "macs_saved_step_cache": 10 if status == "ok" else None,
        "worker": worker,
        "node": "n1",
        "vcut_mode": "full",
        "finished_at": datetime.fromtimestamp(finished, timezone.utc),
    }


def _synthetic() -> pa.Table:
    rows = [_row(i, "ok", f"worker-{i % 2}", T0 + 12 + 30 * i) for i in range(10)]  # last: T0 + 282
    rows += [
        _row(10, "failed", "worker-0", T0 + 100, "ImageError: cannot open image '/a/b/x.png': not an image"),
        _row(11, "failed", "worker-1", T0 + 110, "ImageError: cannot open image '/c/y.png': not an image"),
        _row(12, "failed", "worker-1", T0 + 120, "ValueError: width must be a multiple of 8, got 60"),
        _row(13, "failed", "", T0 + 130, "worker process died 3 times rendering this row (X)"),
    ]
    return pa.Table.from_pylist(rows)


def test_report_data_from_a_synthetic_table(tmp_path, capsys):
    assert main(["report", str(tmp_path / "no-job")]) == 2
    assert "has no results yet" in capsys.readouterr().err
    data = report.report_data(_synthetic())
    assert (data["results"], data["ok"], data["failed"], data["pending"]) == (14, 10, 4, None)
    assert data["state"] == "running or interrupted"
    # no current summary: wall = first start (12 s finish - 10 s render - 2 s encode = T0) to last finish
    assert data["wall_seconds"] == pytest.approx(282.0)
    assert data["videos_per_hour"] == pytest.approx(10 / 282 * 3600)
    assert data["macs"] == {
        "macs": 1000,
        "macs_saved": 300,
        "macs_saved_vcut": 200,
        "macs_saved_step_cache": 100,
    }
    groups = [(g["count"], g["ids"]) for g in data["failures"]]
    assert groups[0] == (2, ["r10", "r11"])  # one image error, two paths
    assert sorted(groups[1:]) == [(1, ["r12"]), (1, ["r13"])]
    assert data["failures"][0]["group"] == "ImageError: cannot open image '…': not an image"
    assert [w["worker"] for w in data["workers"]] == ["(driver)", "worker-0", "worker-1"]
    assert [(w["ok"], w["failed"]) for w in data["workers"]] == [(0, 1), (5, 1), (5, 2)]
    names = [s[0] for s in data["throughput"]["series"]]
    assert names == ["all workers", "worker-0", "worker-1"]
    assert data["throughput"]["series"][0][2][-1] == 10  # cumulative count of ok videos
    assert sum(data["render_seconds"]["counts"]) == 10
    assert len(data["contact"]) == 10 and data["contact"][0]["id"] == "r0"
    assert len(report.report_data(_synthetic(), sample=4)["contact"]) == 4

    # a current summary.json (a finished job): its wall time, throughput and manifest rows win
    summary = {"ok": 10, "failed": 4, "manifest_rows": 20, "wall_seconds": 360.0, "videos_per_second": 0.025}
    data = report.report_data(_synthetic(), summary)
    assert (data["state"], data["rows"], data["pending"], data["wall_seconds"]) == ("finished", 20, 6, 360.0)
    assert data["videos_per_hour"] == pytest.approx(90.0)

    # the page: self-contained, a missing video is "no preview", links stay as given
    html = report.build_html(data, title="t", thumbs=[None] * 10, links=[None] * 10)
    assert (
        html.count("no preview") == 10
        and "<script" not in html
        and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )
    empty = report.report_data(_synthetic().slice(0, 0))
    assert empty["state"] == "no rows yet" and "No finished video yet" in report.build_html(
        empty, title="t", thumbs=[], links=[]
    )


def test_histogram_axes_never_repeat_a_tick_label():
    """Render times within a millisecond of each other (and other narrow or large ranges): every
    tick of every axis has its own label (they all read "10" before)."""
    from jobs import report_svg

    for lo, hi in (
        (10.001, 10.004),
        (12_000.1, 12_000.3),
        (3e6, 3.0001e6),
        (1e-5, 3e-5),
        (0, 12_345),
        (-1, 1),
    ):
        labels = report_svg.tick_labels(report_svg.nice_ticks(lo, hi))
        assert len(set(labels)) == len(labels) > 1, (lo, hi, labels)
    seconds = 10.0 + np.arange(6) * 1e-4  # six ok rows, 0.1 ms apart
    table = pa.Table.from_pylist(
        [{**_row(i, "ok", "w", T0 + 20 * i), "seconds": float(s)} for i, s in enumerate(seconds)]
    )
    data = report.report_data(table)
    html = report.build_html(data, title="t", thumbs=[None] * 6, links=[None] * 6)
    for svg in re.findall(r"<svg.*?</svg>", html, re.S):
        x_labels = re.findall(r'<text x="[\d.]+" y="216" text-anchor="middle">([^<]*)</text>', svg)
        y_labels = re.findall(r'<text x="50" y="[\d.]+" text-anchor="end">([^<]*)</text>', svg)
        for labels in (x_labels, y_labels):
            assert len(labels) > 1 and len(set(labels)) == len(labels), labels


def test_the_template_escapes_everything_from_the_data():
    """Ids, error messages, worker names and the title come from users and rows: autoescaped."""
    hostile = '<script>alert("x")</script>'
    table = pa.Table.from_pylist(
        [
            {**_row(0, "ok", hostile, T0 + 10), "id": hostile},
            {**_row(1, "failed", "w", T0 + 20, error=f"ImageError: {hostile}"), "id": "a&b"},
        ]
    )
    html = report.build_html(report.report_data(table), title=hostile, thumbs=[None], links=[hostile])
    assert "<script" not in html and html.count("&lt;script&gt;") >= 4
    assert "a&amp;b" in html and 'href="&lt;script&gt;' in html


def test_webdataset_rows_get_a_real_preview(tmp_path):
    """A WebDataset job's videos live inside shard tars: the contact sheet shows their first
    frame read from the sample in the tar (not "no preview"); a key the tar lacks still does."""
    import tarfile

    from jobs.results import ResultWriter
    from jobs.shards import sample_key
    from pipeline.encode import encode_video

    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    shard = out / "shards" / "00000.tar"
    frames = np.zeros((3, 32, 48, 3), np.uint8)
    frames[..., 0] = 200  # red: the thumbnail must be this video's frame
    with tarfile.open(shard, "w") as tar:
        for row_id in ("a.1", "b"):
            video = tmp_path / f"{sample_key(row_id)}.mp4"
            encode_video(frames, video, fps=7, preset="ultrafast")
            tar.add(video, arcname=video.name)
            meta = tmp_path / f"{sample_key(row_id)}.json"
            meta.write_text("{}")
            tar.add(meta, arcname=meta.name)
    rows = [
        {**_row(i, "ok", "w", T0 + 10 * i), "id": row_id, "output": str(shard), "shard": 0}
        for i, row_id in enumerate(("a.1", "b", "missing"))
    ]
    ResultWriter(str(out)).commit(rows)
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    jpegs = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', html)
    assert len(jpegs) == 2 and html.count("no preview") == 1
    import base64

    from PIL import Image

    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(jpegs[0]))).convert("RGB"), dtype=float)
    assert picture.shape[0] == report.THUMB_HEIGHT and picture[..., 0].mean() > 150 > picture[..., 1].mean()
    assert 'href="shards/00000.tar"' in html

    # a shard on an fsspec filesystem (object storage): the same frame, read through ``fs``
    import fsspec

    from jobs.report_thumbs import thumbnail

    mem = fsspec.filesystem("memory")
    mem.pipe_file("/vcut-report-test/00000.tar", shard.read_bytes())
    try:
        remote = thumbnail("memory://vcut-report-test/00000.tar", mem, sample=sample_key("b"))
        assert remote is not None and remote[:2] == b"\xff\xd8"  # a JPEG
        assert thumbnail("memory://vcut-report-test/00000.tar", mem, sample="nope") is None
    finally:
        mem.rm("/vcut-report-test", recursive=True)


def test_the_report_template_ships_with_the_package():
    """pyproject's package data names the template the report loads (a wheel without it would
    fail every report)."""
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["jobs"]
    templates = sorted(p.relative_to(ROOT / "jobs") for p in (ROOT / "jobs" / "templates").iterdir())
    assert templates and all(any(t.match(p) for p in patterns) for t in templates), (templates, patterns)
    assert "jinja2" in " ".join(data["project"]["dependencies"])


# -- a real job, in a real browser -----------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no headless Chromium on PATH: run scripts/install-chromium.sh (make test does)")


def _browse(html: Path, *args: str, fragment: str = "") -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--enable-logging=stderr", "--v=0", *args, html.as_uri() + fragment]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _screenshot(html: Path, png: Path, size: str, fragment: str = "") -> np.ndarray:
    """A screenshot of the window (``fragment``: scrolled to that section) as float RGB."""
    from PIL import Image

    proc = _browse(html, f"--window-size={size}", f"--screenshot={png}", fragment=fragment)
    assert proc.returncode == 0 and png.exists(), proc.stderr[-2000:]
    return np.asarray(Image.open(io.BytesIO(png.read_bytes())).convert("RGB"), dtype=np.float64)


@pytest.mark.slow
def test_job_report_in_headless_chromium(ray_address, tiny_model_dir, tmp_path):
    from PIL import Image

    _chromium()  # fails at once, before the job, when the browser is missing
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(5):
        path = tmp_path / "imgs" / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        rows.append({"id": f"clip-{i}", "image": str(path), "seed": i})
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not a png")
    rows.append({"id": "bad-image", "image": str(tmp_path / "imgs" / "bad.png"), "seed": 0})
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    out = tmp_path / "out"
    args = ["run", str(manifest), "--out", str(out), "--model", str(tiny_model_dir), "--config", TINY_JOB]
    assert main(args) == 3  # one failed row
    assert (out / "report.html").exists()  # written by the run itself
    table = pq.read_table(out / "results")
    assert table["finished_at"].null_count == 0  # every row carries its own finish time
    (out / "report.html").unlink()
    (out / "videos" / "clip-4.mp4").rename(out / "clip-4.mp4")  # a video not in videos/: "no preview"
    assert main(["report", str(out)]) == 0
    page = out / "report.html"
    text = page.read_text()
    assert not re.search(r'(?:src|href)="(?:https?:)?//', text), "the page must not load anything"

    # loads with no console message at all (the page has no script; an error would be logged)
    proc = _browse(page, "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    assert console == [], console
    dom = proc.stdout
    assert re.search(r'data-key="ok"><div class="v">5</div>', dom)
    assert re.search(r'data-key="failed"><div class="v">1</div>', dom)
    assert re.search(r'data-key="rows"><div class="v">6</div>', dom)
    assert re.search(r'data-key="pending"><div class="v">0</div>', dom)
    groups = re.findall(r'<tr class="failure-group"><td class="n">(\d+)</td>.*?</tr>', dom, re.S)
    assert groups == ["1"] and "bad-image" in dom and "ImageError" in dom
    assert dom.count('src="data:image/jpeg;base64,') == 4 and dom.count("no preview") == 1
    assert 'href="videos/clip-0.mp4"' in dom  # relative links to the local files
    assert dom.count("<svg") == 3  # throughput over time, per worker, render-time histogram

    # the screenshot shows the thumbnails: compared with the same page without them, it has
    # about 4 thumbnails' worth more 8x8 blocks of varied colour (the rest of the page is grey
    # text, flat bars and thin lines), all of them below the contact sheet's heading
    shot = _screenshot(page, tmp_path / "page.png", "1100,1600")
    blank = tmp_path / "blank" / "report.html"
    blank.parent.mkdir()
    report.write_report(out, thumbnailer=lambda *a: None)
    shutil.move(out / "report.html", blank)
    page.write_text(text)
    flat = _screenshot(blank, tmp_path / "blank.png", "1100,1600")
    assert shot.std() > 10 and shot.shape == flat.shape  # not blank
    busy = [_colour_blocks(img) for img in (shot, flat)]
    extra = busy[0] & ~busy[1]
    per_thumb = (report.THUMB_HEIGHT // 8) ** 2
    assert extra.sum() > 4 * per_thumb * 0.7, (extra.sum(), per_thumb)
    rows = np.flatnonzero(extra.any(axis=1)) * 8
    assert rows.min() > 0.5 * shot.shape[0] and rows.max() - rows.min() < 1.5 * report.THUMB_HEIGHT, rows


def _colour_blocks(img: np.ndarray, block: int = 8, threshold: float = 6.0) -> np.ndarray:
    """Per 8x8 block: does its chroma (R-G, G-B) vary? True in photos and rendered frames, false
    in grey text, flat fills and the page background."""
    h, w = (img.shape[0] // block) * block, (img.shape[1] // block) * block
    chroma = np.stack([img[:h, :w, 0] - img[:h, :w, 1], img[:h, :w, 1] - img[:h, :w, 2]], axis=-1)
    blocks = chroma.reshape(h // block, block, w // block, block, 2)
    return blocks.std(axis=(1, 3)).max(axis=-1) > threshold


def test_a_report_failure_is_a_warning_never_the_jobs(tmp_path, monkeypatch, caplog):
    from jobs import loop
    from jobs.config import load_config

    assert load_config().output.report is True
    assert load_config(dotlist=["output.report=false"]).output.report is False

    def broken(out, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report, "write_report", broken)
    with caplog.at_level(logging.WARNING, logger="jobs"):
        loop.write_report(output.open_output(tmp_path))
    assert "job report not written: OSError: disk full" in caplog.text
