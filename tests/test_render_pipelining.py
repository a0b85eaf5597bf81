"""The renderer's fixed cost and compiled batches (issue 17, points 3 and 4), on the CPU at tiny size:

* a short last batch under compile is padded to ``render_batch`` and compiles no new graph,
  and its rows' frames are those rows rendered alone;
* ``generate_stream`` decodes one call while the next denoises, with every frame equal to the
  calls rendered one after another, and the decode waiting for the next call's conditioning.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import max_level_diff, random_image
from diffusers import StableVideoDiffusionPipeline

from pipeline import Renderer
from pipeline.compile import CompileWatch
from pipeline.renderer import frames_to_uint8, frames_to_uint8_torch

SMALL = dict(height=64, width=64, num_frames=4, num_inference_steps=2, noise_aug_strength=0.05)




@pytest.fixture(scope="module")
def stock(tiny_model_dir: Path) -> StableVideoDiffusionPipeline:
    return StableVideoDiffusionPipeline.from_pretrained(tiny_model_dir)


def test_uint8_on_the_device_is_numpys_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=g)
    # the halves and the ends, where rounding and clipping decide
    x.view(-1)[:6] = torch.tensor([0.5 / 255, 1.5 / 255, 254.5 / 255, 0.0, 1.0, 1.0 + 1e-3])
    assert np.array_equal(frames_to_uint8_torch(x).numpy(), frames_to_uint8(x.numpy()))


@pytest.mark.slow  # torch.compile, as the other compile tests
def test_short_last_batch_under_compile_compiles_no_new_graph(stock) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    images, seeds = [random_image(1), random_image(2), random_image(3)], [10, 11, 12]
    padded = Renderer.from_pipe(
        copy.deepcopy(stock), vcut="full", compile="default", compile_backend="eager", render_batch=3
    )
    with CompileWatch() as first:
        padded.generate_batch(images, seeds=seeds, **SMALL)  # a full batch: compiles
    assert first.compiles > 0
    with CompileWatch(strict=True, what="the short last batch"):  # any compile raises here
        short = padded.generate_batch(images[:2], seeds=seeds[:2], **SMALL)
        one = padded.generate_batch(images[2:], seeds=seeds[2:], **SMALL)
    assert [g.batch_size for g in short] == [2, 2] and one[0].batch_size == 1
    assert [g.seed for g in short + one] == seeds
    # the rows' frames are theirs alone (eager, no padding), within test_batched's tolerance
    eager = Renderer.from_pipe(copy.deepcopy(stock), vcut="full")
    for gen, image, seed in zip(short + one, images, seeds, strict=True):
        alone = eager.generate(image, seed=seed, **SMALL)
        assert max_level_diff(gen.frames, alone.frames) <= 1
    assert max_level_diff(short[0].frames, short[1].frames) > 50  # different videos: no row mix-up

    # the control: without padding (render_batch 1), the same short batch compiles again
    unpadded = Renderer.from_pipe(
        copy.deepcopy(stock), vcut="full", compile="default", compile_backend="eager"
    )
    unpadded.generate_batch(images, seeds=seeds, **SMALL)
    with CompileWatch() as again:
        unpadded.generate_batch(images[:2], seeds=seeds[:2], **SMALL)
    assert again.compiles > 0
    torch._dynamo.reset()


def test_render_batch_is_checked(stock) -> None:
    with pytest.raises(ValueError, match="render_batch must be an integer >= 1"):
        Renderer.from_pipe(copy.deepcopy(stock), vcut="off", render_batch=0)


def test_overlapped_stream_renders_the_same_frames(stock) -> None:
    renderer = Renderer.from_pipe(copy.deepcopy(stock), vcut="full")
    requests = [
        dict(images=[random_image(1), random_image(2)], seeds=[1, 2], **SMALL),
        dict(images=[random_image(3)], seeds=[3], **dict(SMALL, num_inference_steps=3)),
        dict(images=[random_image(4), random_image(5)], seeds=[4, 5], decode_chunk_size=3, **SMALL),
        dict(images=[], seeds=[]),
    ]
    events: list[tuple[str, str]] = []
    pipe = renderer.pipe
    decode, prepare = pipe.decode_latents, pipe.prepare_latents

    def logged_decode(*args, **kwargs):
        events.append(("decode", threading.current_thread().name))
        return decode(*args, **kwargs)

    def logged_prepare(*args, **kwargs):
        out = prepare(*args, **kwargs)
        events.append(("conditioned", threading.current_thread().name))
        return out

    pipe.decode_latents, pipe.prepare_latents = logged_decode, logged_prepare
    try:
        overlapped = list(renderer.generate_stream(requests))
        kinds = [kind for kind, _ in events]
        decode_events = list(events)
        threads = {kind: {t for k, t in events if k == kind} for kind in ("conditioned",)}
        events.clear()
        sequential = list(renderer.generate_stream(requests, overlap=False))
    finally:
        pipe.decode_latents, pipe.prepare_latents = decode, prepare
    one_by_one = [renderer.generate_batch(**r) for r in requests]
    assert [len(v) for v in overlapped] == [2, 1, 2, 0]
    for a, b, c in zip(overlapped, sequential, one_by_one, strict=True):
        for x, y, z in zip(a, b, c, strict=True):
            assert np.array_equal(x.frames, y.frames) and np.array_equal(x.frames, z.frames)
            assert x.seed == y.seed and x.decode_chunk_size == y.decode_chunk_size
            assert x.frames.flags["C_CONTIGUOUS"] and x.frames.dtype == np.uint8
    assert overlapped[2][0].decode_chunk_size == 3
    # overlapped: each decode but the last ran on the decode thread, after the next call's
    # conditioning (the last call has no next one: decoded at once)
    assert kinds == ["conditioned", "conditioned", "decode", "conditioned", "decode", "decode"], kinds
    assert [t for k, t in decode_events if k == "decode"][:2] == ["vae-decode_0"] * 2, decode_events
    assert threads["conditioned"] == {threading.main_thread().name}
    assert all(t == threading.main_thread().name for _, t in events)  # overlap=False: one thread


def test_stream_raises_a_bad_request_after_the_videos_before_it(stock) -> None:
    renderer = Renderer.from_pipe(copy.deepcopy(stock), vcut="off")
    stream = renderer.generate_stream(
        [
            dict(images=[random_image(1)], seeds=[1], **SMALL),
            dict(images=[random_image(2)], seeds=[2], fps=0, **SMALL),
        ]
    )
    with pytest.raises(ValueError, match="fps"):
        first = next(stream)
        assert first[0].frames.shape == (4, 64, 64, 3)
        next(stream)
