"""The worker renders its calls through ``Renderer.generate_stream`` (issue 17, point 4): one
call's decode overlaps the next call's denoising, with the frames of ``generate_batch`` call
after call (tiny model, CPU), and a failing image, call or decode costs only its own rows."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import FakeClock, FrameRecorder, random_image, tiny_job_cfg
from omegaconf import OmegaConf

from jobs.config import load_config
from jobs.planner import RowTask, batch_key_of, resolve_params
from jobs.render_calls import GroupCall, PeakMemory, render_calls
from jobs.testing import FakeRenderer
from jobs.worker import RenderWorker
from pipeline import Renderer
from pipeline.params import ROW_PARAMS

ROOT = Path(__file__).resolve().parents[1]
TINY_JOB = str(ROOT / "examples" / "tiny-job.yaml")


@pytest.fixture(scope="module")
def renderer(tiny_model_dir: Path) -> Renderer:
    return Renderer.from_pretrained(tiny_model_dir, vcut="full")


class _Spy:
    """The real renderer, recording each request its stream takes, the ``overlap`` asked for,
    and the thread of each VAE decode."""

    def __init__(self, renderer: Renderer) -> None:
        self.renderer = renderer
        self.requests: list[dict[str, Any]] = []
        self.overlap: list[bool] = []
        self.decode_threads: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.renderer, name)

    def generate_stream(self, requests, *, overlap: bool = True):
        self.overlap.append(overlap)

        def recorded():
            for request in requests:
                self.requests.append(request)
                yield request

        pipe = self.renderer.pipe
        real = pipe.decode_latents

        def decode(*args, **kwargs):
            self.decode_threads.append(threading.current_thread().name)
            return real(*args, **kwargs)

        pipe.decode_latents = decode
        try:
            yield from self.renderer.generate_stream(recorded(), overlap=overlap)
        finally:
            pipe.decode_latents = real


def _tasks(cfg: dict, tmp_path: Path) -> list[RowTask]:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    spec = [  # (name, image seed or None: the corrupt file, row values)
        ("a", 1, {}),
        ("b", 2, {}),
        ("c", 3, {"motion_bucket_id": 60}),  # its own call
        ("bad", None, {}),
        ("e", 5, {}),
        ("f", 6, {}),
        ("g", 7, {"num_inference_steps": 3}),  # its own call
    ]
    tasks = []
    for i, (name, image_seed, params) in enumerate(spec):
        path = corrupt
        if image_seed is not None:
            path = tmp_path / f"{name}.png"
            random_image(image_seed).save(path)
        resolved = resolve_params({"seed": 100 + i, **params}, cfg["defaults"])
        tasks.append(RowTask(name, str(path), resolved, batch_key_of(resolved), output=name))
    return tasks


def _run(renderer: Renderer, cfg: dict, tasks: list[RowTask]) -> tuple[list[dict], FrameRecorder, _Spy]:
    spy, encoder = _Spy(renderer), FrameRecorder()
    worker = RenderWorker(cfg, "w0", renderer_factory=lambda m, c: spy, encoder=encoder)
    return worker.render_batch(tasks), encoder, spy


def test_overlapped_worker_renders_the_frames_of_generate_batch_bit_for_bit(
    renderer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    tasks = _tasks(tiny_job_cfg(tiny_model_dir), tmp_path)
    runs = {}
    for overlap in (True, False):
        cfg = tiny_job_cfg(tiny_model_dir, "workers.render_batch=2", f"workers.overlap_decode={overlap}")
        runs[overlap] = _run(renderer, cfg, tasks)
    (on, on_frames, on_spy), (off, off_frames, off_spy) = runs[True], runs[False]
    assert on_spy.overlap == [True] and off_spy.overlap == [False]
    # the calls, by batching key: a+b, bad+e (bad's image failed: e alone), f; c; g
    assert [r["seeds"] for r in on_spy.requests] == [[100, 101], [104], [105], [102], [106]]
    assert [r["seeds"] for r in off_spy.requests] == [r["seeds"] for r in on_spy.requests]
    # overlapped: every decode but the last on the renderer's decode thread; else none
    assert on_spy.decode_threads[:-1] == ["vae-decode_0"] * 4, on_spy.decode_threads
    assert "vae-decode_0" not in off_spy.decode_threads

    for results in (on, off):
        assert [r["status"] for r in results] == ["ok", "ok", "ok", "failed", "ok", "ok", "ok"]
        assert "ImageError" in results[3]["error"] and "corrupt" in results[3]["error"]
        for r in results:
            assert r["finished_at"] > 0
        for r in results[:3] + results[4:]:
            assert r["macs"] > 0 and r["frames"] == 4 and r["seconds"] >= r["denoise_seconds"] > 0
        assert results[0]["denoise_seconds"] == results[1]["denoise_seconds"]  # the call's share
    assert [r.get("macs") for r in on] == [r.get("macs") for r in off]
    assert on[6]["num_inference_steps"] == 3

    # today's path: generate_batch call after call, on the same requests
    for request in on_spy.requests:
        videos = renderer.generate_batch(**request)
        for seed, video in zip(request["seeds"], videos, strict=True):
            name = tasks[seed - 100].output
            assert np.array_equal(on_frames.frames[name], video.frames), name
            assert np.array_equal(off_frames.frames[name], video.frames), name
    assert sorted(on_frames.frames) == sorted(off_frames.frames) == ["a", "b", "c", "e", "f", "g"]


def test_a_decode_that_fails_mid_stream_costs_a_retry_not_a_row(
    renderer, tiny_model_dir: Path, tmp_path: Path, caplog
) -> None:
    """The first call's decode (on the decode thread, beside the second call's denoising)
    raises once: the stream ends there; the first call's rows render again one by one, and the
    second call, begun but never finished, renders again in a new stream."""
    cfg = tiny_job_cfg(tiny_model_dir, "workers.render_batch=2", "workers.overlap_decode=true")
    tasks = [t for t in _tasks(cfg, tmp_path) if t.id in ("a", "b", "e", "f")]
    _, reference, _ = _run(renderer, cfg, tasks)
    pipe, real = renderer.pipe, renderer.pipe.decode_latents
    failed: list[str] = []

    def decode_once(*args, **kwargs):
        if not failed:
            failed.append(threading.current_thread().name)
            raise RuntimeError("decode blew up")
        return real(*args, **kwargs)

    spy, encoder = _Spy(renderer), FrameRecorder()
    worker = RenderWorker(cfg, "w0", renderer_factory=lambda m, c: spy, encoder=encoder)
    pipe.decode_latents = decode_once
    try:
        with caplog.at_level(logging.WARNING, logger="jobs.worker"):
            results = worker.render_batch(tasks)
    finally:
        pipe.decode_latents = real
    assert failed == ["vae-decode_0"]
    assert [r["status"] for r in results] == ["ok"] * 4, [r.get("error") for r in results]
    assert "a batch of 2 rows failed (RuntimeError: decode blew up)" in caplog.text
    # a+b, e+f (denoised, lost with the stream), then e+f again in the new stream
    assert [r["seeds"] for r in spy.requests] == [[100, 101], [104, 105], [104, 105]]
    assert spy.overlap == [True, True]
    # e, f: the batched frames of the run without a fault, bit for bit; a, b: rendered alone
    for task in tasks:
        if task.id in ("e", "f"):
            expected = reference.frames[task.output]
        else:
            expected = renderer.generate(task.image, **{k: task.params[k] for k in ROW_PARAMS}).frames
        assert np.array_equal(encoder.frames[task.output], expected), task.id


def test_a_call_that_fails_in_the_stream_fails_only_its_row(
    renderer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """render_batch 1: the second row's denoising raises; the first row's video (decoded after
    it) and the rows after it are kept."""
    cfg = tiny_job_cfg(tiny_model_dir, "workers.overlap_decode=true")
    tasks = [t for t in _tasks(cfg, tmp_path) if t.id in ("a", "b", "c", "e")]
    _, reference, _ = _run(renderer, cfg, tasks)
    pipe, real = renderer.pipe, renderer.pipe.prepare_latents
    calls = []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("denoise blew up")
        return real(*args, **kwargs)

    pipe.prepare_latents = second_fails
    try:
        results, encoder, spy = _run(renderer, cfg, tasks)
    finally:
        pipe.prepare_latents = real
    assert [r["status"] for r in results] == ["ok", "failed", "ok", "ok"]
    assert results[1]["error"] == "RuntimeError: denoise blew up"
    assert results[1]["seconds"] >= 0 and results[1]["finished_at"] > 0
    assert "macs" not in results[1] and "frames" not in results[1]
    assert [r["seeds"] for r in spy.requests] == [[100], [101], [102], [104]]
    assert spy.overlap == [True, True]  # the stream that raised, then the one after it
    assert sorted(encoder.frames) == ["a", "c", "e"]
    for name in encoder.frames:
        assert np.array_equal(encoder.frames[name], reference.frames[name]), name


# -- the pieces, without the model -------------------------------------------------------------


def _calls(*seeds: list[int]) -> list[GroupCall]:
    calls = []
    for group in seeds:
        call = GroupCall({"fps": 7})
        for seed in group:
            call.add(seed, f"img{seed}", seed, 0.0)
        calls.append(call)
    return calls


def test_render_calls_starts_a_new_stream_after_a_failing_call() -> None:
    """A scripted stream, overlapped (it takes the next request before yielding a call's videos):
    the decode of seed 2's call raises while seed 3's call is under way, and seed 5's call fails
    on its own. Every other call comes back once, in order; the lost one is sent again."""
    clock, taken = FakeClock(), []

    def stream(requests):
        pending = None
        for request in requests:
            seeds = request["seeds"]
            taken.append(seeds)
            clock.advance(1.0)  # each call denoises in 1 s
            if seeds == [5]:
                if pending is not None:
                    yield pending
                raise RuntimeError("call 5")
            if pending is not None:
                if pending == [2] and taken.count([2]) == 1:
                    raise RuntimeError("decode 2")
                yield pending
            pending = seeds
        if pending is not None:
            yield pending

    calls = _calls([1], [2], [3, 4], [5], [6])
    peaks = PeakMemory(on_cuda=False)
    outcomes = [
        (call.seeds, o.videos, str(o.error) if o.error else None, o.seconds, o.peak)
        for call, o in render_calls(stream, calls, peaks, clock=clock)
    ]
    assert [(s, v, e) for s, v, e, _, _ in outcomes] == [
        ([1], [1], None),
        ([2], None, "decode 2"),
        ([3, 4], [3, 4], None),
        ([5], None, "call 5"),
        ([6], [6], None),
    ]
    assert taken == [[1], [2], [3, 4], [3, 4], [5], [6]]  # 3+4 lost with the first stream, sent again
    # seconds: from the stream taking the call to its outcome, the next call's 1 s included where
    # the stream took one (overlapped); 5 failed before any next call, 6 was the last
    assert [s for _, _, _, s, _ in outcomes] == [2.0, 2.0, 2.0, 1.0, 1.0]
    assert {p for *_, p in outcomes} == {None}  # off CUDA


def test_peak_memory_goes_to_every_call_in_flight(monkeypatch) -> None:
    """The device's peak, read and reset at each start and stop, goes to the calls in flight:
    overlapped, a call's peak includes its neighbour's decode beside it."""
    import torch

    allocated = {"peak": 0}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: allocated["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: allocated.update(peak=0))
    peaks, first, second = PeakMemory(on_cuda=True), object(), object()
    allocated["peak"] = 50  # before either call: nobody's
    peaks.start(first)
    allocated["peak"] = 10  # the first call's denoising
    peaks.start(second)
    allocated["peak"] = 30  # the first call's decode beside the second call's denoising
    assert peaks.stop(first) == 30
    allocated["peak"] = 20  # the second call's decode, alone
    assert peaks.stop(second) == 30


def test_fake_renderer_stream_keeps_the_contract() -> None:
    """jobs.testing.FakeRenderer.generate_stream: each request's videos in order, one call behind
    when overlapped (as the model's stream), a bad request raised after the videos before it."""
    fake, taken = FakeRenderer(), []

    def requests():
        for seed, fps in ((1, 7), (2, 7), (3, 0)):  # fps 0: out of range, raises
            taken.append(seed)
            yield {"images": ["x"], "seeds": [seed], "fps": fps}

    for overlap, ahead in ((True, [1, 2]), (False, [1])):
        taken.clear()
        stream = fake.generate_stream(requests(), overlap=overlap)
        assert [g.seed for g in next(stream)] == [1] and taken == ahead
        assert [g.seed for g in next(stream)] == [2]
        with pytest.raises(ValueError, match="fps"):
            next(stream)


def test_worker_with_the_fake_renderer_keeps_every_row_but_the_bad_ones(tmp_path: Path) -> None:
    """The VCUT_TEST_RENDERER seam's renderer, batched 2 at a time, with and without the
    overlap: a row whose value fails fails alone (its call retried row by row), the rest are ok."""

    class Counting(FakeRenderer):
        def __init__(self) -> None:
            super().__init__(load_images=True)
            self.overlap: list[bool] = []

        def generate_stream(self, requests, *, overlap=True):
            self.overlap.append(overlap)
            return super().generate_stream(requests, overlap=overlap)

    random_image(1).save(tmp_path / "x.png")
    for overlap in (True, False):
        cfg = OmegaConf.to_container(
            load_config(dotlist=["workers.render_batch=2", f"workers.overlap_decode={overlap}"]),
            resolve=True,
            enum_to_str=True,
        )
        fake = Counting()
        worker = RenderWorker(
            cfg, "w0", renderer_factory=lambda m, c, fake=fake: fake, encoder=FrameRecorder()
        )
        tasks = []
        for i, params in enumerate([{}, {}, {"width": 100}, {"width": 100}, {}]):  # 100: no multiple of 8
            resolved = resolve_params({"seed": i, **params}, cfg["defaults"])
            tasks.append(
                RowTask(str(i), str(tmp_path / "x.png"), resolved, batch_key_of(resolved), output=str(i))
            )
        results = worker.render_batch(tasks)
        assert fake.overlap == [overlap]
        assert [r["status"] for r in results] == ["ok", "ok", "failed", "failed", "ok"]
        assert "multiple of 8" in results[2]["error"] and "width" in results[3]["error"]
        assert all(r["finished_at"] > 0 for r in results)


def test_overlap_decode_is_auto_by_default_on_a_gpu_only(tmp_path: Path) -> None:
    """``workers.overlap_decode``: auto (the default) overlaps on a GPU only; true and false (YAML
    booleans) always and never; anything else is refused by the config check, naming the key."""
    from jobs.config import check_config, overlap_decode

    assert load_config().workers.overlap_decode == "auto"
    assert [overlap_decode("auto", on_cuda) for on_cuda in (True, False)] == [True, False]
    for value, expected in (("True", True), ("false", False), ("on", True), ("off", False)):
        assert overlap_decode(value, on_cuda=False) is expected
        assert overlap_decode(value, on_cuda=True) is expected
    with pytest.raises(ValueError, match="workers.overlap_decode must be auto, true or false, got 'maybe'"):
        check_config(load_config(dotlist=["workers.overlap_decode=maybe"]))

    # the worker: on this CPU, auto renders call after call; true overlaps
    asked: list[bool] = []

    class Recording(FakeRenderer):
        def generate_stream(self, requests, *, overlap=True):
            asked.append(overlap)
            return super().generate_stream(requests, overlap=overlap)

    random_image(1).save(tmp_path / "x.png")
    for setting, expected in (("auto", False), ("true", True)):
        cfg = OmegaConf.to_container(load_config(dotlist=[f"workers.overlap_decode={setting}"]), resolve=True)
        asked.clear()
        worker = RenderWorker(cfg, "w0", renderer_factory=lambda m, c: Recording(), encoder=FrameRecorder())
        resolved = resolve_params({"seed": 1}, cfg["defaults"])
        task = RowTask("a", str(tmp_path / "x.png"), resolved, batch_key_of(resolved), output="a")
        assert [r["status"] for r in worker.render_batch([task])] == ["ok"]
        assert asked == [expected], setting
