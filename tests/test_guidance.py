"""Guidance on part of the schedule (``guidance_start``/``guidance_stop``, ``vcut.guidance``):
stock with the defaults, guided steps exactly stock CFG and the others exactly stock without CFG,
composition with VCUT, the step cache, batched rows and torch.compile, exact MAC counts."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import macs_args, random_image, unet_call_macs
from PIL import Image

import vcut
from pipeline.renderer import Renderer, frames_to_uint8
from pipeline.svd import RenderPipeline
from vcut.guidance import check_guidance_interval, cond_only_hook, guided_steps
from vcut.step_cache import shallow_steps

SIZE = 32  # pixels (16x16 latents with the tiny VAE)
STEPS = 4
RENDER = dict(height=SIZE, width=SIZE, num_frames=3, num_inference_steps=STEPS, decode_chunk_size=3)


def _image(seed: int, size: int = SIZE) -> Image.Image:
    return random_image(seed, size, size)


def _run(pipe, seed: int = 0, image: int = 0, **overrides) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Float frames and the latents after every step (diffusers' callback_on_step_end)."""
    latents: list[torch.Tensor] = []

    def keep(p, step, t, kw):
        latents.append(kw["latents"].clone())
        return {}

    kwargs = dict(RENDER, **overrides)
    out = pipe(
        _image(image, kwargs["height"]),
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        callback_on_step_end=keep,
        **kwargs,
    )
    return np.asarray(out.frames[0]), latents


def _render_pipe(stock, mode: str = "off", interval: int | None = None) -> RenderPipeline:
    pipe = copy.deepcopy(stock)
    vcut.apply_vcut(pipe, mode)
    vcut.apply_step_cache(pipe, interval)
    render = RenderPipeline(**pipe.components)
    render.set_progress_bar_config(disable=True)
    return render


# -- the rule ---------------------------------------------------------------------------------


def test_which_steps_are_guided() -> None:
    assert guided_steps(25, 0.0, 1.0) == (True,) * 25
    assert sum(guided_steps(25, 0.0, 0.6)) == 15 and guided_steps(25, 0.0, 0.6)[14:16] == (True, False)
    assert guided_steps(4, 0.25, 0.75) == (False, True, True, False)
    assert guided_steps(4, 0.9, 1.0) == (False,) * 4
    assert check_guidance_interval(0, 1) == (0.0, 1.0)
    for start, stop, match in [
        (0.5, 0.5, "guidance_start must be < guidance_stop, got 0.5 >= 0.5"),
        (-0.1, 1, r"guidance_start must be in \[0, 1\]"),
        (0, 1.5, r"guidance_stop must be in \[0, 1\]"),
        ("0", 1, "guidance_start must be a number"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_guidance_interval(start, stop)


# -- output -----------------------------------------------------------------------------------


def test_defaults_are_stock_diffusers_bit_for_bit(tiny_model_dir) -> None:
    from diffusers import StableVideoDiffusionPipeline

    stock = StableVideoDiffusionPipeline.from_pretrained(tiny_model_dir)
    stock.set_progress_bar_config(disable=True)
    expected, expected_latents = _run(stock)
    renderer = Renderer.from_pretrained(tiny_model_dir, vcut="off")
    frames, latents = _run(renderer.pipe, guidance_start=0.0, guidance_stop=1.0)
    assert np.array_equal(frames, expected)
    assert all(torch.equal(a, b) for a, b in zip(latents, expected_latents, strict=True))
    gen = renderer.generate(_image(0), seed=0, **{**RENDER, "guidance_start": 0, "guidance_stop": 1})
    assert np.array_equal(gen.frames, frames_to_uint8(expected))
    assert cond_only_hook(renderer.pipe.unet).cond_only_calls == 0


def test_steps_inside_are_stock_cfg_and_outside_stock_without_cfg(stock_pipe) -> None:
    cfg_frames, cfg = _run(stock_pipe)
    plain_frames, plain = _run(stock_pipe, min_guidance_scale=1.0, max_guidance_scale=1.0)
    pipe = _render_pipe(stock_pipe)
    hook = cond_only_hook(pipe.unet)

    frames, latents = _run(pipe, guidance_start=0.0, guidance_stop=0.5)  # steps 0, 1 guided
    assert (hook.guided_calls, hook.cond_only_calls) == (2, 2)
    assert all(torch.equal(latents[i], cfg[i]) for i in (0, 1))
    assert not torch.equal(latents[2], cfg[2]) and np.abs(frames - cfg_frames).max() > 1e-3

    frames, latents = _run(pipe, guidance_start=0.5, guidance_stop=1.0)  # steps 2, 3 guided
    assert all(torch.equal(latents[i], plain[i]) for i in (0, 1))
    assert not torch.equal(latents[2], plain[2]) and np.abs(frames - plain_frames).max() > 1e-3

    frames, _ = _run(pipe, guidance_start=0.9, guidance_stop=1.0)  # no step guided: stock without CFG
    assert np.array_equal(frames, plain_frames)
    assert (hook.guided_calls, hook.cond_only_calls) == (4, 8)
    # Nothing left behind: the stock call next is untouched, and no CFG at all ignores the interval.
    assert np.array_equal(_run(pipe)[0], cfg_frames)
    assert np.array_equal(
        _run(pipe, guidance_stop=0.5, min_guidance_scale=1.0, max_guidance_scale=1.0)[0], plain_frames
    )
    assert hook.cond_only_calls == 8


@pytest.mark.parametrize("mode", ["exact", "full"])
def test_composes_with_vcut_and_computes_its_constants_once_per_half(stock_pipe, mode: str) -> None:
    window = dict(guidance_start=0.25, guidance_stop=0.75)  # cond-only, CFG, CFG, cond-only
    reference, _ = _run(_render_pipe(stock_pipe), **window)
    pipe = _render_pipe(stock_pipe, mode)
    frames, _ = _run(pipe, **window)
    processors = [
        p for p in pipe.unet.attn_processors.values() if isinstance(p, vcut.SpatialCrossAttnLinearProcessor)
    ]
    # Constants once for the conditional half (step 0) and once for the CFG batch (step 1);
    # step 3 finds the same half tensor again: a hit, without reading it.
    assert {(p.misses, p.hits) for p in processors} == {(2, 2)}
    if mode == "exact":
        assert np.abs(frames - reference).max() <= 1e-5
    else:
        assert np.abs(frames - reference).max() > 1e-4
    assert np.array_equal(_run(pipe, **window)[0], frames)


def test_composes_with_the_step_cache(stock_pipe) -> None:
    window = dict(guidance_start=0.0, guidance_stop=0.5)
    steps = 6
    pipe = _render_pipe(stock_pipe, "full", interval=2)
    state = vcut.step_cache_state(pipe)
    frames, _ = _run(pipe, num_inference_steps=steps, **window)
    batches = [2 if g else 1 for g in guided_steps(steps, 0.0, 0.5)]  # 2, 2, 2, 1, 1, 1
    plan = shallow_steps(2, batches)
    assert plan == [False, True, False, True, False, True]  # step 3 reuses the CFG feature's half
    assert (state.videos, state.full_steps, state.shallow_steps) == (1, plan.count(False), plan.count(True))
    assert np.array_equal(_run(pipe, num_inference_steps=steps, **window)[0], frames)  # deterministic
    uncached, _ = _run(_render_pipe(stock_pipe, "full"), num_inference_steps=steps, **window)
    assert np.abs(frames - uncached).max() > 1e-4
    # The other way round (conditional half first, then CFG): no unconditional feature to reuse.
    assert shallow_steps(2, [1, 1, 2, 2]) == [False, True, False, True]
    assert shallow_steps(2, [1, 2, 2, 2]) == [False, False, False, True]


def test_the_step_cache_follows_a_video_into_its_conditional_half_only(stock_pipe) -> None:
    unet = copy.deepcopy(stock_pipe.unet)
    vcut.apply_step_cache(unet, 2)
    state = vcut.step_cache_state(unet)
    torch.manual_seed(0)
    sample = torch.randn(2, 2, 8, 8, 8)
    ids = torch.tensor([[6.0, 127.0, 0.02]] * 2)
    emb = torch.randn(2, 1, stock_pipe.unet.config.cross_attention_dim)
    schedule = torch.tensor([9.0, 8.0, 7.0, 6.0])

    def call(step: int, half: bool, e: torch.Tensor = emb) -> tuple[int, bool]:
        x, i, e = (sample[1:], ids[1:], e[1:]) if half else (sample, ids, e)
        with torch.no_grad():
            unet(x, schedule[step], encoder_hidden_states=e, added_time_ids=i)
        return state.step, state.shallow

    assert [call(0, False), call(1, True), call(2, True), call(3, False)] == [
        (0, False),
        (1, True),  # the conditional half of the stored CFG feature
        (2, False),
        (3, False),  # back to CFG: no unconditional feature stored, a full step
    ]
    videos = state.videos
    call(0, False)
    with torch.no_grad():  # the unconditional half is no continuation: a new video
        unet(sample[:1], schedule[1], encoder_hidden_states=emb[:1], added_time_ids=ids[:1])
    assert (state.videos, state.step) == (videos + 2, 0)
    call(0, False)
    call(1, True, emb.clone())  # another embedding: a new video
    assert (state.videos, state.step) == (videos + 4, 0)


def test_batched_rows_share_the_interval(stock_pipe) -> None:
    renderer = Renderer.from_pipe(copy.deepcopy(stock_pipe), vcut="full", step_cache=2)
    kw = dict(RENDER, guidance_start=0.0, guidance_stop=0.5)
    rows = renderer.generate_batch([_image(0), _image(1)], seeds=[3, 4], **kw)
    for row, (image, seed) in zip(rows, [(0, 3), (1, 4)], strict=True):
        alone = renderer.generate(_image(image), seed=seed, **kw).frames
        assert row.batch_size == 2
        assert np.abs(row.frames.astype(int) - alone).max() <= 1
    stock = renderer.generate(_image(0), seed=3, **RENDER).frames
    assert np.abs(rows[0].frames.astype(int) - stock).max() > 0
    with pytest.raises(ValueError, match="guidance_start must be < guidance_stop, got 0.5 >= 0.5"):
        renderer.generate(_image(0), seed=0, guidance_start=0.5, guidance_stop=0.5)


@pytest.mark.slow  # torch.compile (dynamo, eager backend) of the tiny UNet
def test_compiled_without_recompiles_after_the_first_video(stock_pipe) -> None:
    from torch._dynamo.utils import counters

    from pipeline.compile import no_recompiles

    kw = dict(RENDER, guidance_start=0.0, guidance_stop=0.5)
    torch._dynamo.reset()
    counters.clear()
    renderer = Renderer.from_pipe(
        copy.deepcopy(stock_pipe), vcut="full", step_cache=2, compile=True, compile_backend="eager"
    )
    expected = Renderer.from_pipe(copy.deepcopy(stock_pipe), vcut="full", step_cache=2)
    try:
        first = renderer.generate(_image(0), seed=0, **kw)
        assert first.timings["compile"] > 0
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 2  # a CFG and a conditional-half variant (full and shallow steps)
        with no_recompiles("later videos"):
            for i in range(1, 3):
                gen = renderer.generate(_image(i), seed=i, **kw)
                assert (
                    np.abs(gen.frames.astype(int) - expected.generate(_image(i), seed=i, **kw).frames).max()
                    <= 1
                )
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()


# -- MACs -------------------------------------------------------------------------------------


def _real_unet_macs(pipe, size: int, frames: int, steps: int, **kw) -> list[int]:
    """Each UNet call's MACs in a real pipeline run (``unet_call_macs``)."""
    size_kw = dict(
        height=size, width=size, num_frames=frames, num_inference_steps=steps, decode_chunk_size=frames
    )
    return unet_call_macs(pipe, lambda: _run(pipe, **size_kw, **kw))


@pytest.mark.parametrize("frames,size,interval", [(2, 32, 3), (3, 48, None)])
def test_counted_macs_equal_a_real_run(stock_pipe, frames: int, size: int, interval: int | None) -> None:
    steps, window = 5, dict(guidance_start=0.2, guidance_stop=0.8)  # steps 1-3 guided
    pipe = _render_pipe(stock_pipe, "full", interval)
    counts = _real_unet_macs(pipe, size, frames, steps, **window)
    # The tiny VAE downsamples by 2, count_macs assumes SVD's 8: same latents at 4x the pixels.
    shape = dict(height=size * 4, width=size * 4, num_frames=frames, num_inference_steps=steps, mode="full")
    report = vcut.count_macs(stock_pipe.unet, step_cache=interval, **shape, **window)
    assert (report.guided_calls, report.unguided_calls) == (3, 2)
    assert sum(counts) == report.vcut_macs  # exactly, VCUT constants and shallow steps included
    every = vcut.count_macs(stock_pipe.unet, step_cache=interval, **shape)
    assert report.macs_saved_guidance == every.vcut_macs - report.vcut_macs > 0
    assert (report.macs_saved_vcut, report.macs_saved_step_cache) == (
        every.macs_saved_vcut,
        every.macs_saved_step_cache,
    )
    assert (
        report.macs_saved
        == report.macs_saved_vcut + report.macs_saved_step_cache + report.macs_saved_guidance
    )
    assert report.baseline_macs == every.baseline_macs and "by guidance interval" in report.format_table()
    unguided = vcut.count_macs(stock_pipe.unet, guidance=False, **shape, **window)
    assert unguided.macs_saved_guidance == 0 and unguided.guided_calls == 0


def test_macs_command_counts_the_interval(capsys, tiny_model_dir) -> None:
    from jobs.main import main

    args = macs_args(tiny_model_dir, 5)
    assert main([*args, "--guidance-start", "0.2", "--guidance-stop", "0.8"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["guidance_start"], data["guidance_stop"], data["guided_calls"], data["unguided_calls"]) == (
        0.2,
        0.8,
        3,
        2,
    )
    assert data["macs_saved_guidance"] > 0
    assert main([*args, "--guidance-start", "0.8", "--guidance-stop", "0.2"]) == 2
    assert "guidance_start must be < guidance_stop" in capsys.readouterr().err


def test_worker_rows_count_the_interval(stock_pipe) -> None:
    from omegaconf import OmegaConf

    from jobs import worker as jw
    from jobs.config import load_config
    from jobs.macs import MAC_FIELDS
    from jobs.results import RESULT_SCHEMA

    cfg = OmegaConf.to_container(load_config(dotlist=["defaults.guidance_stop=0.5"]))
    renderer = Renderer.from_pipe(copy.deepcopy(stock_pipe), vcut="full", step_cache=2)
    worker = jw.RenderWorker(cfg, "w0", renderer_factory=lambda m, c: renderer, encoder=lambda *a, **k: 0.0)
    params = dict(cfg["defaults"], height=SIZE, width=SIZE, num_frames=3, num_inference_steps=STEPS)
    from jobs.planner import RowTask, batch_key_of
    from pipeline.params import ROW_PARAMS

    params = {k: params[k] for k in ROW_PARAMS}
    result, frames = worker._render(RowTask("a", _image(0), params, batch_key_of(params)))
    assert frames is not None and "error" not in result, result.get("error")
    report = vcut.count_macs(
        renderer.unet_config,
        height=SIZE,
        width=SIZE,
        num_frames=3,
        num_inference_steps=STEPS,
        mode="full",
        step_cache=2,
        guidance_stop=0.5,
    )
    assert (
        result["macs"] == report.vcut_macs and result["macs_saved_guidance"] == report.macs_saved_guidance > 0
    )
    assert result["macs_saved"] == sum(result[k] for k in MAC_FIELDS[2:])
    for key in ("guidance_start", "guidance_stop", "macs_saved_guidance"):
        assert key in RESULT_SCHEMA.names
