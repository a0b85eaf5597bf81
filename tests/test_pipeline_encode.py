"""Video encoding: decodes back to the requested frames, size and fps; atomic under crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import pipeline.encode as enc
from pipeline import EncodeError, encode_video, ffmpeg_exe, probe_video, read_video

REPO = Path(__file__).resolve().parents[1]


def _frames(n: int = 5, h: int = 64, w: int = 64) -> np.ndarray:
    """Smooth gradients that move one pixel per frame (noise would not survive 4:2:0 chroma)."""
    y, x = np.mgrid[0:h, 0:w]
    frames = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i, ..., 0] = (x + i) * 255 // (w + n)
        frames[i, ..., 1] = y * 255 // h
        frames[i, ..., 2] = 128
    return frames


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_mp4_decodes_to_requested_frames_size_fps(tmp_path: Path) -> None:
    out = tmp_path / "v.mp4"
    secs = encode_video(_frames(5), out, fps=7, crf=18, preset="ultrafast")
    assert secs > 0
    info = probe_video(out)
    assert (info.codec, info.pix_fmt, info.width, info.height, info.frames) == ("h264", "yuv420p", 64, 64, 5)
    assert info.fps == pytest.approx(7.0)
    assert _leftovers(tmp_path) == ["v.mp4"]
    # +faststart: the moov atom comes before mdat
    data = out.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")
    # quality sanity: a static high-quality encode is close to the input
    decoded = read_video(out, 64, 64)
    assert np.abs(decoded.astype(int) - _frames(5).astype(int)).mean() < 3


def test_encoding_leaves_no_open_pipe(tmp_path: Path) -> None:
    """ffmpeg's stderr pipe is closed after each video (a ResourceWarning per video otherwise)."""
    import gc
    import warnings

    gc.collect()  # what earlier tests left for the collector is theirs, not this encode's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        encode_video(_frames(2), tmp_path / "v.mp4", fps=7, preset="ultrafast")
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


def test_mp4_odd_dimensions_are_padded_to_even(tmp_path: Path) -> None:
    out = tmp_path / "odd.mp4"
    encode_video(_frames(3, 33, 47), out, fps=10, preset="ultrafast")
    info = probe_video(out)
    assert (info.width, info.height, info.frames) == (48, 34, 3)


@pytest.mark.parametrize(("fmt", "codec"), [("webm", "vp9"), ("gif", "gif")])
def test_webm_and_gif(tmp_path: Path, fmt: str, codec: str) -> None:
    out = tmp_path / f"v.{fmt}"
    encode_video(_frames(4), out, fps=10, format=fmt, crf=30, preset="ultrafast")
    info = probe_video(out)
    assert (info.codec, info.width, info.height, info.frames) == (codec, 64, 64, 4)


def test_fsspec_destinations(tmp_path: Path) -> None:
    import fsspec

    encode_video(_frames(3), "memory://vcut-out/sub/v.mp4", fps=7, preset="ultrafast")
    mem = fsspec.filesystem("memory")
    data = mem.cat_file("/vcut-out/sub/v.mp4")
    assert data[4:8] == b"ftyp"
    assert mem.ls("/vcut-out/sub", detail=False) == ["/vcut-out/sub/v.mp4"]

    target = tmp_path / "fsspec-local" / "v.mp4"  # a path on a given fsspec filesystem
    encode_video(_frames(3), str(target), fps=7, preset="ultrafast", filesystem=fsspec.filesystem("file"))
    assert probe_video(target).frames == 3
    assert _leftovers(target.parent) == ["v.mp4"]
    encode_video(_frames(2), f"file://{tmp_path}/file-uri/v.mp4", fps=7, preset="ultrafast")
    assert probe_video(tmp_path / "file-uri" / "v.mp4").frames == 2


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="format"):
        encode_video(_frames(1), "x.avi", fps=7, format="avi")
    with pytest.raises(ValueError, match="uint8"):
        encode_video(_frames(1).astype(np.float32), "x.mp4", fps=7)
    with pytest.raises(ValueError, match="fps"):
        encode_video(_frames(1), "x.mp4", fps=0)
    with pytest.raises(ValueError, match="crf"):
        encode_video(_frames(1), "x.mp4", fps=7, crf=60)
    with pytest.raises(ValueError, match="preset"):
        encode_video(_frames(1), "x.mp4", fps=7, preset="warp")


def test_exception_mid_encode_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash_after_two(frames):
        for i, frame in enumerate(frames):
            if i == 2:
                raise RuntimeError("simulated crash")
            yield frame.tobytes()

    monkeypatch.setattr(enc, "_frame_bytes", crash_after_two)
    out = tmp_path / "v.mp4"
    with pytest.raises(RuntimeError, match="simulated crash"):
        encode_video(_frames(6), out, fps=7, preset="ultrafast")
    assert _leftovers(tmp_path) == []


def test_existing_video_survives_a_failed_rewrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "v.mp4"
    encode_video(_frames(3), out, fps=7, preset="ultrafast")
    before = out.read_bytes()
    monkeypatch.setattr(enc, "_build_command", lambda path, *a: enc.ffmpeg.input("nope").output(path))
    with pytest.raises(EncodeError, match="ffmpeg"):
        encode_video(_frames(3), out, fps=7, preset="ultrafast")
    assert out.read_bytes() == before and _leftovers(tmp_path) == ["v.mp4"]


def test_killed_process_never_leaves_a_final_file(tmp_path: Path) -> None:
    """A real crash: SIGKILL the encoding process half-way; no file exists under the final name."""
    out = tmp_path / "v.mp4"
    script = textwrap.dedent(
        f"""
        import sys, time
        import numpy as np
        import pipeline.encode as enc

        def slow(frames):
            for i, frame in enumerate(frames):
                if i == 3:
                    print("started", flush=True)
                    time.sleep(60)
                yield frame.tobytes()

        enc._frame_bytes = slow
        enc.encode_video(np.zeros((10, 64, 64, 3), np.uint8), {str(out)!r}, fps=7, preset="ultrafast")
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert not out.exists()
    # only the hidden temporary may remain (its ffmpeg child dies with the closed pipe)
    assert all(name.startswith(".v.mp4.tmp-") for name in _leftovers(tmp_path))


def test_ffmpeg_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import imageio_ffmpeg

    monkeypatch.delenv("VCUT_FFMPEG", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no system ffmpeg
    assert ffmpeg_exe() == imageio_ffmpeg.get_ffmpeg_exe()
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert ffmpeg_exe() == str(fake)  # a system ffmpeg on PATH wins over the bundled one
    monkeypatch.setenv("VCUT_FFMPEG", imageio_ffmpeg.get_ffmpeg_exe())
    assert ffmpeg_exe() == imageio_ffmpeg.get_ffmpeg_exe()  # the explicit setting wins over PATH
    monkeypatch.setenv("VCUT_FFMPEG", str(tmp_path / "missing-ffmpeg"))
    with pytest.raises(EncodeError, match="VCUT_FFMPEG"):
        ffmpeg_exe()
