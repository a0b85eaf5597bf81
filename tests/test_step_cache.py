"""Step caching (``vcut.apply_step_cache``): exactness when off, determinism, no leakage between
videos, composition with VCUT and torch.compile, exact MAC accounting, and the job plumbing."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import macs_args, random_image, unet_call_macs
from PIL import Image

import vcut
from jobs.planner import RowTask, batch_key_of
from pipeline.params import ROW_PARAMS

SIZE = 32  # pixels (the tiny VAE downsamples by 2: 16x16 latents)
RENDER = dict(height=SIZE, width=SIZE, num_frames=3, num_inference_steps=4, decode_chunk_size=3)


def _image(seed: int, size: int = SIZE) -> Image.Image:
    return random_image(seed, size, size)


def _render(pipe, image_seed: int = 0, seed: int = 0, **overrides) -> np.ndarray:
    kwargs = dict(RENDER, **overrides)
    image = _image(image_seed, kwargs["height"])
    out = pipe(image, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    return np.asarray(out.frames[0], dtype=np.float64)


def _cached(stock, interval, depth=1, mode="off"):
    pipe = copy.deepcopy(stock)
    vcut.apply_vcut(pipe, mode)
    vcut.apply_step_cache(pipe, interval, depth)
    return pipe


@pytest.fixture(scope="module")
def stock_frames(stock_pipe):
    return _render(stock_pipe)


# -- output ------------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [None, 1])
def test_off_gives_frames_identical_to_no_cache(stock_pipe, stock_frames, interval):
    pipe = copy.deepcopy(stock_pipe)
    report = vcut.apply_step_cache(pipe, interval)
    assert not report.enabled and report.skipped_blocks == ()
    assert vcut.step_cache_state(pipe) is None
    assert np.array_equal(_render(pipe), stock_frames)


def test_interval_3_changes_the_output_deterministically(stock_pipe, stock_frames):
    pipe = _cached(stock_pipe, 3)
    first = _render(pipe)
    state = vcut.step_cache_state(pipe)
    assert (state.full_steps, state.shallow_steps) == (2, 2)  # steps 0 and 3 full, 1 and 2 shallow
    assert first.shape == stock_frames.shape
    assert np.abs(first - stock_frames).max() > 1e-3
    assert np.array_equal(_render(pipe), first)  # again, same pipeline: same frames
    assert (state.full_steps, state.shallow_steps, state.videos) == (4, 4, 2)


def test_wraps_without_changing_weights_and_undoes(stock_pipe, stock_frames):
    pipe = copy.deepcopy(stock_pipe)
    keys = list(pipe.unet.state_dict())
    params = sum(p.numel() for p in pipe.unet.parameters())
    report = vcut.apply_step_cache(pipe, 3)
    assert report.cached_block == "up_blocks.0"
    assert set(report.skipped_blocks) == {
        "down_blocks.1",
        "down_blocks.0.downsamplers.0",
        "mid_block",
        "up_blocks.0",
    }
    assert list(pipe.unet.state_dict()) == keys
    assert sum(p.numel() for p in pipe.unet.parameters()) == params
    assert vcut.apply_step_cache(pipe.unet, 3) is report  # same settings: a no-op
    with pytest.raises(vcut.VCUTError, match="remove_step_cache"):
        vcut.apply_step_cache(pipe, 2)
    vcut.remove_step_cache(pipe)
    assert np.array_equal(_render(pipe), stock_frames)
    # Depth 2 on the two-level tiny UNet caches the mid block only: also a valid setting.
    assert vcut.apply_step_cache(pipe, 2, depth=2).cached_block == "mid_block"


def test_bad_settings_raise_with_a_message(stock_pipe):
    unet = copy.deepcopy(stock_pipe.unet)
    for interval, match in [
        (0, "step_cache must be >= 1"),
        (-2, "step_cache"),
        (2.5, "integer"),
        (True, "integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            vcut.apply_step_cache(unet, interval)
    with pytest.raises(ValueError, match=r"step_cache_depth must be in \[1, 2\]"):
        vcut.apply_step_cache(unet, 3, depth=3)
    with pytest.raises(TypeError, match="StableVideoDiffusionPipeline"):
        vcut.apply_step_cache(torch.nn.Linear(2, 2), 3)


@pytest.mark.parametrize("mode", ["exact", "full"])
def test_composes_with_vcut(stock_pipe, mode):
    cached_stock = _render(_cached(stock_pipe, 3))
    vcut_only = _render(_cached(stock_pipe, 1, mode=mode))
    both = _cached(stock_pipe, 3, mode=mode)
    got = _render(both)
    assert np.array_equal(_render(both), got)
    if mode == "exact":  # exact VCUT is exact with the cache too
        assert np.abs(got - cached_stock).max() <= 1e-5
    else:
        assert np.abs(got - cached_stock).max() > 1e-4
    assert np.abs(got - vcut_only).max() > 1e-3


def test_nothing_leaks_between_videos(stock_pipe):
    pipe = _cached(stock_pipe, 3, mode="full")
    a1, b, a2 = _render(pipe, 0, 0), _render(pipe, 1, 5), _render(pipe, 0, 0)
    assert np.array_equal(a1, a2)
    assert np.array_equal(b, _render(_cached(stock_pipe, 3, mode="full"), 1, 5))  # B rendered fresh
    assert np.abs(a1 - b).max() > 1e-3
    # Another shape right after: a new video too.
    small = _render(pipe, 0, 0, num_frames=2, decode_chunk_size=2)
    assert np.array_equal(
        small, _render(_cached(stock_pipe, 3, mode="full"), 0, 0, num_frames=2, decode_chunk_size=2)
    )


def test_video_boundaries_on_a_bare_unet(stock_pipe):
    stock = stock_pipe.unet
    unet = copy.deepcopy(stock)
    vcut.apply_step_cache(unet, 2)
    state = vcut.step_cache_state(unet)
    torch.manual_seed(0)
    sample = torch.randn(2, 2, 8, 8, 8)
    ids = torch.tensor([[6.0, 127.0, 0.02]] * 2)
    emb = torch.randn(2, 1, stock.config.cross_attention_dim)

    def call(model, t, e=emb, x=sample):
        with torch.no_grad():
            return model(x, t, encoder_hidden_states=e, added_time_ids=ids).sample

    steps = []
    for t, e, x in [
        (10.0, emb, sample),  # new video
        (5.0, emb, sample),  # continues (decreasing timestep): shallow
        (4.0, emb, sample),  # full (step 2)
        (4.0, emb, sample),  # same timestep again: a new video
        (3.0, emb.clone(), sample),  # another embedding tensor: a new video
        (2.0, emb.clone(), sample[:, :1]),  # another shape: a new video
    ]:
        before = state.videos
        out = call(unet, t, e, x)
        steps.append((state.videos - before, state.step, state.shallow))
        if not state.shallow:  # every full step equals the uncached UNet exactly
            assert torch.equal(out, call(stock, t, e, x))
    assert steps == [(1, 0, False), (0, 1, True), (0, 2, False), (1, 0, False), (1, 0, False), (1, 0, False)]
    call(unet, 10.0)
    vcut.reset_step_cache(unet)
    call(unet, 5.0)  # would continue, but the reset starts a new video
    assert (state.step, state.shallow) == (0, False)
    # The pipeline's timesteps are views of one schedule tensor: read from metadata only.
    schedule = torch.tensor([9.0, 8.0, 7.0])
    call(unet, schedule[0])
    call(unet, schedule[1])
    assert (state.step, state.shallow) == (1, True)
    call(unet, torch.tensor([9.0, 8.0, 7.0])[2])  # another schedule: a new video
    assert (state.step, state.shallow) == (0, False)


@pytest.mark.slow  # torch.compile (dynamo) of the tiny UNet: ~10 s
def test_torch_compile_has_a_full_and_a_shallow_graph(stock_pipe):
    from torch._dynamo.utils import counters

    expected = _render(_cached(stock_pipe, 2))
    pipe = _cached(stock_pipe, 2)
    torch._dynamo.reset()
    counters.clear()
    pipe.unet.forward = torch.compile(pipe.unet.forward, backend="eager", fullgraph=True)
    try:
        assert np.array_equal(_render(pipe), expected)
        assert np.array_equal(_render(pipe), expected)
        assert counters["stats"]["unique_graphs"] == 2
    finally:
        torch._dynamo.reset()


# -- MACs ------------------------------------------------------------------------------------


def _real_unet_macs(pipe, size: int, frames: int, steps: int) -> list[int]:
    """Each UNet call's MACs in a real pipeline run (CPU, tiny model; ``unet_call_macs``)."""
    size_kw = dict(
        height=size, width=size, num_frames=frames, num_inference_steps=steps, decode_chunk_size=frames
    )
    return unet_call_macs(pipe, lambda: _render(pipe, **size_kw))


@pytest.mark.parametrize("frames,size", [(2, 32), (3, 48)])
def test_counted_macs_match_a_real_run_with_the_cache(stock_pipe, frames, size):
    steps, interval = 5, 3
    pipe = _cached(stock_pipe, interval, mode="full")
    counts = _real_unet_macs(pipe, size, frames, steps)
    # The tiny VAE downsamples by 2, count_macs assumes SVD's 8: same latents at 4x the pixels.
    report = vcut.count_macs(
        stock_pipe.unet,
        height=size * 4,
        width=size * 4,
        num_frames=frames,
        num_inference_steps=steps,
        mode="full",
        step_cache=interval,
    )
    assert (report.full_calls, report.shallow_calls) == (2, 3)
    assert abs(sum(counts) / report.vcut_macs - 1) < 0.01
    assert counts[1] == counts[2] == counts[4] == report.shallow_call_macs
    assert report.macs_saved == report.macs_saved_vcut + report.macs_saved_step_cache
    assert report.macs_saved_vcut > 0 and report.macs_saved_step_cache > 0


def test_mac_report_per_lever(stock_pipe):
    unet = stock_pipe.unet  # two levels: depth 2 caches the mid block only
    kw = dict(height=64, width=64, num_frames=3, num_inference_steps=10)
    plain = vcut.count_macs(unet, mode="full", **kw)
    assert vcut.count_macs(unet, mode="full", step_cache=1, **kw) == plain
    assert plain.macs_saved_step_cache == 0 and plain.macs_saved_vcut == plain.macs_saved
    d1 = vcut.count_macs(unet, mode="full", step_cache=3, **kw)
    d2 = vcut.count_macs(unet, mode="full", step_cache=3, step_cache_depth=2, **kw)
    off = vcut.count_macs(unet, mode="off", step_cache=3, **kw)
    assert d1.macs_saved_vcut == d2.macs_saved_vcut == plain.macs_saved_vcut
    assert d1.macs_saved_step_cache > d2.macs_saved_step_cache > 0  # a deeper branch saves less
    assert off.macs_saved_vcut == 0 and off.macs_saved == off.macs_saved_step_cache > 0
    for r in (d1, d2, off):
        assert r.macs_saved == r.macs_saved_vcut + r.macs_saved_step_cache == r.baseline_macs - r.vcut_macs
        assert (r.full_calls, r.shallow_calls) == (4, 6)  # steps 0, 3, 6, 9 full
    data = d1.to_dict()
    assert data["macs_saved_vcut"] + data["macs_saved_step_cache"] == data["macs_saved"]
    assert "by step caching" in d1.format_table()
    with pytest.raises(ValueError, match="step_cache must be >= 1"):
        vcut.count_macs(unet, step_cache=0, **kw)
    with pytest.raises(ValueError, match="step_cache_depth"):
        vcut.count_macs(unet, step_cache=3, step_cache_depth=3, **kw)


def test_macs_command_with_step_cache(capsys, tiny_model_dir):
    from jobs.main import main

    args = macs_args(tiny_model_dir, 6)
    assert main([*args, "--step-cache", "3", "--step-cache-depth", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["step_cache"], data["step_cache_depth"], data["full_calls"]) == (3, 2, 2)
    assert data["macs_saved_vcut"] > 0 and data["macs_saved_step_cache"] > 0
    assert main([*args, "--step-cache", "0"]) == 2
    assert "step_cache must be >= 1" in capsys.readouterr().err


# -- renderer and job plumbing -------------------------------------------------------------


def test_renderer_from_pipe_step_cache(stock_pipe):
    from pipeline import Renderer

    with pytest.raises(ValueError, match="step_cache must be >= 1"):
        Renderer.from_pipe(copy.deepcopy(stock_pipe), step_cache=0)
    with pytest.raises(ValueError, match="step_cache_depth"):
        Renderer.from_pipe(copy.deepcopy(stock_pipe), step_cache=3, step_cache_depth=3)
    off = Renderer.from_pipe(copy.deepcopy(stock_pipe), vcut="off", step_cache=1)
    assert off.step_cache is None and vcut.step_cache_state(off.pipe) is None

    renderer = Renderer.from_pipe(copy.deepcopy(stock_pipe), vcut="full", step_cache=3)
    assert renderer.step_cache == 3 and renderer.step_cache_report.enabled
    kw = dict(height=SIZE, width=SIZE, num_frames=3, num_inference_steps=4)
    a = renderer.generate(_image(0), seed=0, **kw).frames
    b = renderer.generate(_image(1), seed=1, **kw).frames
    state = vcut.step_cache_state(renderer.pipe)
    state._last = None  # (belt and braces) the renderer resets at every generation anyway
    assert np.array_equal(renderer.generate(_image(0), seed=0, **kw).frames, a)
    assert (state.full_steps, state.shallow_steps) == (6, 6)
    assert not np.array_equal(a, b)


def test_job_config_accepts_and_checks_step_cache():
    from jobs.config import check_config, load_config

    cfg = load_config(dotlist=["model.step_cache=3", "model.step_cache_depth=2"])
    check_config(cfg)
    assert (cfg.model.step_cache, cfg.model.step_cache_depth) == (3, 2)
    assert load_config().model.step_cache is None
    for bad, match in [
        ("model.step_cache=0", "model.step_cache must be >= 1"),
        ("model.step_cache=-1", "model.step_cache"),
        ("model.step_cache_depth=0", "model.step_cache_depth"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_config(load_config(dotlist=[bad]))


def test_worker_passes_step_cache_and_rows_carry_macs_per_lever(stock_pipe, monkeypatch):
    from omegaconf import OmegaConf

    import pipeline
    from jobs import worker as jw
    from jobs.config import load_config
    from jobs.metrics import JobMetrics
    from jobs.results import RESULT_SCHEMA

    seen = {}
    monkeypatch.setattr(pipeline.Renderer, "from_pretrained", lambda model, **kw: seen.update(kw) or "r")
    cfg = OmegaConf.to_container(load_config(dotlist=["model.step_cache=3", "model.step_cache_depth=2"]))
    assert jw.load_renderer(cfg["model"], cfg["cache"]) == "r"
    assert (seen["step_cache"], seen["step_cache_depth"]) == (3, 2)

    renderer = pipeline.Renderer.from_pipe(copy.deepcopy(stock_pipe), vcut="full", step_cache=3)
    worker = jw.RenderWorker(cfg, "w0", renderer_factory=lambda m, c: renderer, encoder=lambda *a, **k: 0.0)
    params = dict(cfg["defaults"], height=SIZE, width=SIZE, num_frames=3, num_inference_steps=4)
    params = {k: params[k] for k in ROW_PARAMS}
    result, frames = worker._render(RowTask("a", _image(0), params, batch_key_of(params)))
    assert frames is not None and "error" not in result, result.get("error")
    for key in ("macs", "macs_saved", "macs_saved_vcut", "macs_saved_step_cache"):
        assert isinstance(result[key], int) and result[key] > 0, key
        assert key in RESULT_SCHEMA.names
    assert result["macs_saved"] == result["macs_saved_vcut"] + result["macs_saved_step_cache"]

    metrics = JobMetrics()
    metrics.record(dict(result, status="ok"))
    by_lever = {
        s.labels["lever"]: s.value
        for s in metrics.macs_saved_by_lever.collect()[0].samples
        if s.name.endswith("_total")
    }
    assert by_lever == {
        "vcut": result["macs_saved_vcut"],
        "step_cache": result["macs_saved_step_cache"],
        "guidance": result["macs_saved_guidance"],
    }


def test_vcut_and_step_cache_under_inference_mode(stock_pipe):
    """Inference tensors have no version counter: VCUT and the step cache must still work, the
    same as under no_grad (the pipeline's own mode), and not leak between two videos."""
    pipe = _cached(stock_pipe, 3, mode="exact")
    expected_a, expected_b = _render(pipe, 0, 0), _render(pipe, 1, 5)
    with torch.inference_mode():
        a, b, a_again = _render(pipe, 0, 0), _render(pipe, 1, 5), _render(pipe, 0, 0)
    assert np.abs(a - expected_a).max() <= 1e-6
    assert np.abs(b - expected_b).max() <= 1e-6
    assert np.array_equal(a, a_again)
    assert np.abs(a - b).max() > 0.01
