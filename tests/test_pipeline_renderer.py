"""The renderer on the tiny model loaded from disk: equality with stock diffusers, cache, determinism,
validation, decode back-off and render_to_file."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import FakeClock, random_image
from diffusers import StableVideoDiffusionPipeline
from PIL import Image

from pipeline import ImageError, Renderer, fit_image, frames_to_uint8, load_image, probe_video

SMALL = dict(height=64, width=64, num_frames=3, num_inference_steps=2)



@pytest.fixture(scope="module")
def renderers(tiny_model_dir: Path) -> dict[str, Renderer]:
    return {mode: Renderer.from_pretrained(tiny_model_dir, vcut=mode) for mode in ("off", "exact", "full")}


@pytest.fixture(scope="module")
def stock(tiny_model_dir: Path) -> StableVideoDiffusionPipeline:
    pipe = StableVideoDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock_frames(stock: StableVideoDiffusionPipeline, image: Image.Image, seed: int, **kw) -> np.ndarray:
    fitted = fit_image(load_image(image), kw["width"], kw["height"])
    out = stock(fitted, generator=torch.Generator().manual_seed(seed), output_type="np", **kw)
    return frames_to_uint8(out.frames[0])


@pytest.mark.parametrize("mode", ["off", "exact"])
def test_frames_equal_stock_diffusers(renderers, stock, mode: str) -> None:
    kw = dict(SMALL, fps=6, motion_bucket_id=100, noise_aug_strength=0.05, max_guidance_scale=2.5)
    img = random_image(1)
    gen = renderers[mode].generate(img, seed=123, **kw)
    ref = _stock_frames(stock, img, 123, **kw)
    assert gen.frames.shape == (3, 64, 64, 3) and gen.frames.dtype == np.uint8
    diff = np.abs(gen.frames.astype(int) - ref.astype(int)).max()
    assert diff <= (0 if mode == "off" else 1), diff
    if mode == "exact":
        assert renderers[mode].vcut_report.spatial_cross_attentions_replaced > 0


def test_full_mode_renders(renderers) -> None:
    gen = renderers["full"].generate(random_image(1), seed=1, **SMALL)
    assert gen.frames.shape == (3, 64, 64, 3)
    assert renderers["full"].vcut_report.temporal_cross_attentions_removed > 0


@pytest.mark.parametrize("mode", ["off", "exact", "full"])
def test_cache_hit_gives_exactly_the_frames_of_a_miss(renderers, mode: str) -> None:
    r = renderers[mode]
    img = random_image(7)
    before = r.cache_stats()
    miss = r.generate(img, seed=5, **SMALL)
    hit = r.generate(img, seed=5, **SMALL)
    after = r.cache_stats()
    assert not miss.cache_hit and hit.cache_hit
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"] + 1
    assert np.array_equal(miss.frames, hit.frames)
    # the same pixels from another source (bytes) are the same cache entry
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert r.generate(buf.getvalue(), seed=5, **SMALL).cache_hit


def test_cache_skips_the_image_encoder(renderers) -> None:
    r = renderers["off"]
    img = random_image(11)
    r.generate(img, seed=0, **SMALL)
    calls = []
    vision = r.pipe.image_encoder.vision_model  # the CLIP tower, inside the encoder's cache hook
    handle = vision.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    try:
        assert r.generate(img, seed=0, **SMALL).cache_hit and not calls
        assert not r.generate(random_image(12), seed=0, **SMALL).cache_hit and calls == [1]
    finally:
        handle.remove()


def test_cache_hook_is_registered_once_and_leaves_the_source_pipeline_stock(stock) -> None:
    from diffusers.hooks import HookRegistry

    from pipeline.svd import EMBEDDING_CACHE_HOOK, RenderPipeline

    r = Renderer.from_pipe(stock, vcut="off", model_id="hook-test")
    hook = HookRegistry.check_if_exists_or_initialize(r.pipe.image_encoder).get_hook(EMBEDDING_CACHE_HOOK)
    assert hook is r.pipe.embedding_hook and hook.cache is r.cache
    # the encoder it was built from has no hook and no instance forward: stock diffusers still
    assert not hasattr(stock.image_encoder, "_diffusers_hook") and "forward" not in vars(stock.image_encoder)
    assert r.pipe.image_encoder is not stock.image_encoder
    pairs = zip(r.pipe.image_encoder.parameters(), stock.image_encoder.parameters(), strict=True)
    assert all(a is b for a, b in pairs)  # the same weights
    # a pipeline built from a RenderPipeline's components gets one hook, its own
    again = RenderPipeline(**r.pipe.components)
    registry = again.image_encoder._diffusers_hook
    assert registry._hook_order == [EMBEDDING_CACHE_HOOK]
    assert registry.get_hook(EMBEDDING_CACHE_HOOK) is not hook
    img = fit_image(random_image(13), 64, 64)
    ref = stock._encode_image(img, torch.device("cpu"), 1, True)
    again.embedding_cache = r.cache
    r.cache.clear()
    for hit in (False, True):
        assert torch.equal(again._encode_image(img, torch.device("cpu"), 1, True), ref)
        assert again.last_cache_hits == [hit]


def test_same_seed_same_video_whatever_came_before(renderers, tiny_model_dir: Path) -> None:
    r = renderers["exact"]
    img = random_image(3)
    first = r.generate(img, seed=42, **SMALL).frames
    r.generate(random_image(4), seed=1, **dict(SMALL, num_frames=4))  # something else in between
    r.generate(random_image(5), seed=2, height=48, width=48, num_frames=2, num_inference_steps=3)
    again = r.generate(img, seed=42, **SMALL).frames
    fresh = Renderer.from_pretrained(tiny_model_dir, vcut="exact").generate(img, seed=42, **SMALL).frames
    assert np.array_equal(first, again) and np.array_equal(first, fresh)
    assert not np.array_equal(first, r.generate(img, seed=43, **SMALL).frames)


def test_generation_record_and_timings(renderers, monkeypatch) -> None:
    """Each stage's timing is the time spent in that stage, on a fake clock that only the
    stages move: loading the image 1 s, each VAE encode 10 s, each UNet call 100 s, each VAE
    decode 1000 s (what lies between them takes no time on it)."""
    import pipeline.renderer
    import pipeline.svd

    r = renderers["off"]
    clock = FakeClock(0.0)
    for module in (pipeline.renderer, pipeline.svd):
        monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=clock))
    calls: Counter[str] = Counter()

    def ticking(obj: object, name: str, seconds: float) -> None:
        real = getattr(obj, name)

        def run(*args, **kwargs):
            calls[name] += 1
            clock.advance(seconds)
            return real(*args, **kwargs)

        monkeypatch.setattr(obj, name, run)

    ticking(r, "prepare_image", 1)
    ticking(r.pipe.vae, "encode", 10)
    ticking(r.pipe.unet, "forward", 100)
    ticking(r.pipe.vae, "decode", 1000)
    gen = r.generate(random_image(1), seed=0, fps=9, **SMALL)
    t = gen.timings
    assert calls["prepare_image"] == calls["encode"] == 1 and calls["decode"] >= 1
    assert calls["forward"] == SMALL["num_inference_steps"]  # guidance: both halves in one call
    assert t["image_load"] == 1 and t["conditioning"] == 10 and t["postprocess"] == 0
    assert t["denoise"] == 100 * calls["forward"] and t["decode"] == 1000 * calls["decode"]
    assert t["total"] == sum(v for k, v in t.items() if k != "total")
    assert (gen.num_inference_steps, gen.fps, gen.seed) == (2, 9, 0)


def test_num_frames_defaults_to_the_unet_config(renderers) -> None:
    gen = renderers["off"].generate(random_image(1), seed=0, height=64, width=64, num_inference_steps=1)
    assert gen.frames.shape[0] == 4


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(height=60), "height"),
        (dict(width=0), "width"),
        (dict(num_frames=0), "num_frames"),
        (dict(num_frames=1), "num_frames"),  # stock diffusers fails on one frame
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(fps=0), "fps"),
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(decode_chunk_size=0), "decode_chunk_size"),
        (dict(noise_aug_strength=float("nan")), "noise_aug_strength"),
        (dict(motion_bucket_id=-3), "motion_bucket_id"),
        (dict(fit="stretch"), "fit"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_parameter(renderers, kwargs, name) -> None:
    args = dict(SMALL, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        renderers["off"].generate(random_image(1), **args)


def test_bad_image_raises_image_error(renderers, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    with pytest.raises(ImageError, match=r"bad\.jpg.*empty"):
        renderers["off"].generate(bad, seed=0, **SMALL)


def test_decode_oom_backs_off_to_smaller_chunks(renderers, monkeypatch, caplog) -> None:
    r = renderers["off"]
    img = random_image(9)
    kw = dict(SMALL, num_frames=4)
    reference = r.generate(img, seed=3, decode_chunk_size=1, **kw).frames

    vae = r.pipe.vae
    real_decode = vae.decode
    seen: list[int] = []

    def decode(latents, *args, **kwargs):
        seen.append(latents.shape[0])
        if latents.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_decode(latents, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", decode)
    with caplog.at_level(logging.WARNING, logger="pipeline.svd"):
        gen = r.generate(img, seed=3, decode_chunk_size=4, **kw)
    assert seen[:2] == [4, 2] and gen.decode_chunk_size == 1 and gen.decode_retries == 2
    assert np.array_equal(gen.frames, reference)
    assert "decode_chunk_size=4; retrying with 2" in caplog.text
    assert "decode_chunk_size=2; retrying with 1" in caplog.text

    monkeypatch.setattr(vae, "decode", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(torch.OutOfMemoryError):
        r.generate(img, seed=3, decode_chunk_size=2, **kw)


def test_render_to_file(renderers, tmp_path: Path) -> None:
    r = renderers["full"]
    img_path = tmp_path / "in.png"
    random_image(2, 100, 60).save(img_path)
    out = tmp_path / "videos" / "out.mp4"
    rec = r.render_to_file(img_path, out, seed=8, fps=8, preset="ultrafast", crf=23, **SMALL)
    assert rec.path == str(out) and rec.frames == 3 and rec.fps == 8 and (rec.width, rec.height) == (64, 64)
    assert rec.encode_seconds > 0 and rec.seconds >= rec.timings["total"] and "encode" in rec.timings
    assert rec.duration_s == pytest.approx(3 / 8)
    info = probe_video(out)
    assert (info.codec, info.width, info.height, info.frames) == ("h264", 64, 64, 3)
    assert info.fps == pytest.approx(8.0)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.mp4"]
    rec2 = r.render_to_file(img_path, tmp_path / "out.gif", seed=8, format="gif", **SMALL)
    assert rec2.cache_hit and probe_video(tmp_path / "out.gif").frames == 3
