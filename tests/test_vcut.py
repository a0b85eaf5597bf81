"""VCUT against stock diffusers: the tests that would catch a wrong VCUT."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import macs_args, random_image
from diffusers import StableVideoDiffusionPipeline
from diffusers.models.attention import BasicTransformerBlock, TemporalBasicTransformerBlock
from PIL import Image

import vcut
from vcut.tiny import TINY_HEIGHT, TINY_WIDTH

RENDER = dict(height=TINY_HEIGHT, width=TINY_WIDTH, num_frames=3, num_inference_steps=3, decode_chunk_size=3)


def _patched(stock: StableVideoDiffusionPipeline, mode: str) -> StableVideoDiffusionPipeline:
    pipe = copy.deepcopy(stock)
    vcut.apply_vcut(pipe, mode)
    return pipe


def _image(seed: int) -> Image.Image:
    return random_image(seed, TINY_WIDTH, TINY_HEIGHT)


def _render(pipe: StableVideoDiffusionPipeline, image: Image.Image, seed: int) -> np.ndarray:
    out = pipe(image, generator=torch.Generator().manual_seed(seed), output_type="np", **RENDER)
    return np.asarray(out.frames[0], dtype=np.float64)


def test_exact_matches_stock_pipeline_back_to_back(stock_pipe):
    patched = _patched(stock_pipe, "exact")
    # Two different images, several seeds, rendered one after the other with the same
    # patched pipeline: the cached constants must never leak from one video to the next.
    for image_seed, seed in [(0, 0), (1, 0), (0, 7), (1, 123)]:
        image = _image(image_seed)
        expected = _render(stock_pipe, image, seed)
        got = _render(patched, image, seed)
        assert np.abs(got - expected).max() <= 1e-5, (image_seed, seed)


def test_different_images_give_different_videos(stock_pipe):
    # Guards the test above against a model in which the conditioning does nothing.
    a, b = _render(stock_pipe, _image(0), 0), _render(stock_pipe, _image(1), 0)
    assert np.abs(a - b).max() > 1e-3


def test_full_equals_temporal_cross_attention_removed_by_hand(stock_pipe):
    by_hand = copy.deepcopy(stock_pipe)
    removed = 0
    for module in by_hand.unet.modules():
        if isinstance(module, TemporalBasicTransformerBlock) and module.attn2 is not None:
            module.attn2 = None
            module.norm2 = None
            removed += 1
    assert removed > 0
    full = _patched(stock_pipe, "full")
    for image_seed, seed in [(0, 3), (1, 4)]:
        image = _image(image_seed)
        expected = _render(by_hand, image, seed)
        assert np.abs(_render(full, image, seed) - expected).max() <= 1e-5
    # ... and removing temporal cross-attention really changes the output.
    assert np.abs(_render(full, _image(0), 3) - _render(stock_pipe, _image(0), 3)).max() > 1e-4


def test_exact_runs_no_query_key_or_norm_and_computes_once_per_video(stock_pipe):
    patched = _patched(stock_pipe, "exact")
    spatial = [
        m for m in patched.unet.modules() if isinstance(m, BasicTransformerBlock) and m.attn2 is not None
    ]
    assert spatial
    for block in spatial:
        assert block.attn2.to_q is None and block.attn2.to_k is None
        assert isinstance(block.norm2, torch.nn.Identity)
        assert isinstance(block.attn2.processor, vcut.SpatialCrossAttnLinearProcessor)
    _render(patched, _image(0), 0)
    for block in spatial:
        # One CFG batch holds both halves: one computation, reused at the other 2 steps.
        assert (block.attn2.processor.misses, block.attn2.processor.hits) == (
            1,
            RENDER["num_inference_steps"] - 1,
        )


def test_constants_are_reused_across_videos_of_one_image_without_per_step_compares(stock_pipe, monkeypatch):
    patched = _patched(stock_pipe, "exact")
    processors = [
        m.attn2.processor
        for m in patched.unet.modules()
        if isinstance(m, BasicTransformerBlock) and m.attn2 is not None
    ]
    compares = []
    real_equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: compares.append(1) or real_equal(a, b))
    steps = RENDER["num_inference_steps"]
    _render(patched, _image(0), 0)
    assert compares == []  # nothing remembered yet: nothing to compare
    _render(patched, _image(0), 5)  # same image, new tensor: one content compare, then identity
    assert len(compares) == 1
    _render(patched, _image(1), 0)  # another image: compared once with the one remembered
    assert len(compares) == 2
    for p in processors:
        assert (p.misses, p.hits) == (2, 3 * steps - 2)


def test_cache_is_keyed_by_content_not_by_buffer(stock_pipe):
    stock = stock_pipe.unet
    patched = copy.deepcopy(stock)
    vcut.apply_vcut(patched, "exact")
    torch.manual_seed(0)
    sample = torch.randn(2, 2, 8, 8, 8)
    ids = torch.tensor([[6.0, 127.0, 0.02]] * 2)
    emb = torch.randn(2, 1, stock.config.cross_attention_dim)
    with torch.no_grad():
        for _ in range(2):
            expected = stock(sample, 10.0, encoder_hidden_states=emb, added_time_ids=ids).sample
            got = patched(sample, 10.0, encoder_hidden_states=emb, added_time_ids=ids).sample
            assert (got - expected).abs().max() <= 1e-5
            emb.mul_(-3.0).add_(0.5)  # the same buffer, now holding another image's embedding


def test_report_and_idempotence(stock_pipe):
    pipe = copy.deepcopy(stock_pipe)
    before = sum(p.numel() for p in pipe.unet.parameters())
    report = vcut.apply_vcut(pipe, "full")
    assert report.mode == "full" and report.params_removed > 0
    assert report.params_before - report.params_after == report.params_removed
    assert sum(p.numel() for p in pipe.unet.parameters()) == before - report.params_removed
    assert vcut.apply_vcut(pipe.unet, "full") == report  # same mode again: no-op
    assert sum(p.numel() for p in pipe.unet.parameters()) == before - report.params_removed
    assert vcut.vcut_mode(pipe) == "full"


@pytest.mark.parametrize("first,second", [("exact", "full"), ("full", "exact"), ("exact", "off")])
def test_switching_mode_on_a_patched_model_raises(stock_pipe, first, second):
    unet = copy.deepcopy(stock_pipe.unet)
    vcut.apply_vcut(unet, first)
    with pytest.raises(vcut.VCUTError, match="already patched"):
        vcut.apply_vcut(unet, second)


def test_off_changes_nothing(stock_pipe):
    unet = copy.deepcopy(stock_pipe.unet)
    report = vcut.apply_vcut(unet, "off")
    assert report.params_removed == 0
    assert vcut.vcut_mode(unet) == "off"
    vcut.apply_vcut(unet, "exact")  # "off" patched nothing, so any mode may follow


def test_bad_arguments(stock_pipe):
    with pytest.raises(ValueError, match="unknown VCUT mode"):
        vcut.apply_vcut(copy.deepcopy(stock_pipe.unet), "fast")
    with pytest.raises(TypeError, match="StableVideoDiffusionPipeline"):
        vcut.apply_vcut(torch.nn.Linear(2, 2))


def test_more_than_one_conditioning_token_raises(stock_pipe):
    unet = copy.deepcopy(stock_pipe.unet)
    vcut.apply_vcut(unet, "exact")
    sample = torch.randn(2, 2, 8, 8, 8)
    ids = torch.tensor([[6.0, 127.0, 0.02]] * 2)
    two_tokens = torch.randn(2, 2, unet.config.cross_attention_dim)
    with torch.no_grad(), pytest.raises(vcut.VCUTError, match="single conditioning token"):
        unet(sample, 10.0, encoder_hidden_states=two_tokens, added_time_ids=ids)


def _svd_xt_on_meta():
    from vcut.macs import _meta_unet, load_unet_config

    return _meta_unet(load_unet_config("svd-xt"))


def test_parameters_removed_on_real_svd_xt_architecture():
    unet = _svd_xt_on_meta()
    total = sum(p.numel() for p in unet.parameters())
    temporal = sum(
        p.numel()
        for m in unet.modules()
        if isinstance(m, TemporalBasicTransformerBlock)
        for sub in (m.attn2, m.norm2)
        for p in sub.parameters()
    )
    spatial = sum(
        p.numel()
        for m in unet.modules()
        if isinstance(m, BasicTransformerBlock) and m.attn2 is not None
        for sub in (m.attn2.to_q, m.attn2.to_k, m.norm2)
        for p in sub.parameters()
    )
    assert abs(temporal - 50.38e6) / 50.38e6 < 0.01  # 50.38 M in temporal cross-attention
    report = vcut.apply_vcut(unet, "full")
    assert report.params_removed == temporal + spatial
    assert report.params_after == total - temporal - spatial
    assert report.spatial_cross_attentions_replaced == report.temporal_cross_attentions_removed == 16


@pytest.mark.slow  # the full SVD-XT UNet traced on meta tensors: about 10 s a shape on 2 cores
def test_mac_figures_svd_xt_full_size():
    full = vcut.count_macs(
        "svd-xt", height=576, width=1024, num_frames=25, num_inference_steps=25, mode="full"
    )
    exact = vcut.count_macs(
        "svd-xt", height=576, width=1024, num_frames=25, num_inference_steps=25, mode="exact"
    )
    assert abs(full.baseline_macs / 1609e12 - 1) < 0.01
    assert abs(full.macs_saved / 75e12 - 1) < 0.01
    assert abs(exact.macs_saved / 36e12 - 1) < 0.01
    assert full.baseline_macs_with_attention > full.baseline_macs
    assert abs(full.params_removed - exact.params_removed - 50.38e6) / 50.38e6 < 0.01


@pytest.mark.slow  # four shapes of the full SVD UNet on meta tensors
def test_mac_figures_scale_with_shape():
    small = vcut.count_macs("svd", height=320, width=512, num_frames=14, num_inference_steps=10, mode="full")
    large = vcut.count_macs("svd", height=576, width=1024, num_frames=14, num_inference_steps=10, mode="full")
    assert small.num_frames == 14 and 0 < small.macs_saved < small.baseline_macs
    # 3.6x the pixels: convolutions and linear layers dominate, so MACs grow about as much.
    assert 3.0 < large.baseline_macs / small.baseline_macs < 3.7
    steps25 = vcut.count_macs(
        "svd", height=320, width=512, num_frames=14, num_inference_steps=25, mode="full"
    )
    assert steps25.baseline_macs == small.baseline_macs // 10 * 25
    no_cfg = vcut.count_macs(
        "svd", height=320, width=512, num_frames=14, num_inference_steps=10, guidance=False
    )
    assert abs(no_cfg.baseline_macs * 2 / small.baseline_macs - 1) < 0.01


@pytest.mark.parametrize("mode", ["exact", "full"])
@pytest.mark.parametrize("frames,size", [(2, 32), pytest.param(3, 48, marks=pytest.mark.slow)])
def test_meta_count_matches_a_real_run(stock_pipe, mode, frames, size):
    """The meta-tensor count equals FlopCounterMode over real CPU UNet calls (tiny model)."""
    from torch.utils.flop_counter import FlopCounterMode

    def real_macs(unet, steps: int) -> int:
        torch.manual_seed(0)
        sample = torch.randn(2, frames, 8, size // 8, size // 8)
        emb = torch.randn(2, 1, unet.config.cross_attention_dim)
        ids = torch.tensor([[6.0, 127.0, 0.02]] * 2)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            for _ in range(steps):
                unet(sample, 1.0, encoder_hidden_states=emb, added_time_ids=ids)
        return counter.get_total_flops() // 2

    stock, patched = stock_pipe.unet, copy.deepcopy(stock_pipe.unet)
    vcut.apply_vcut(patched, mode)
    report = vcut.count_macs(
        stock, height=size, width=size, num_frames=frames, num_inference_steps=3, mode=mode
    )
    # Real CPU runs use the fused attention kernel, which FlopCounterMode does not count:
    # the same convention as ``baseline_macs``.
    assert real_macs(stock, 3) == report.baseline_macs
    assert real_macs(patched, 3) == report.vcut_macs
    assert report.macs_saved > 0


def test_macs_command_json(capsys, tiny_model_dir):
    import json

    from jobs.main import main

    assert main(macs_args(tiny_model_dir, 4, "--num-frames", "8", "--mode", "exact")) == 0
    data = json.loads(capsys.readouterr().out)
    for key in (
        "baseline_macs",
        "vcut_macs",
        "macs_saved",
        "params_baseline",
        "params_vcut",
        "params_removed",
    ):
        assert isinstance(data[key], int) and data[key] > 0
    assert data["baseline_macs"] - data["vcut_macs"] == data["macs_saved"]
    assert data["mode"] == "exact" and data["num_frames"] == 8


def test_macs_on_a_local_model_folder(tmp_path, tiny_model_dir):
    report = vcut.count_macs(tiny_model_dir, height=64, width=64, num_frames=2, num_inference_steps=2)
    assert report.params_baseline < 5_000_000 and report.macs_saved > 0
    with pytest.raises(FileNotFoundError, match="not an SVD model folder"):
        vcut.count_macs(tmp_path, height=64, width=64)


def test_tiny_model_command_writes_a_loadable_pipeline(tmp_path, capsys):
    from jobs.main import main

    assert main(["tiny-model", str(tmp_path / "m")]) == 0
    captured = capsys.readouterr()
    assert "RANDOM" in captured.err
    pipe = StableVideoDiffusionPipeline.from_pretrained(tmp_path / "m")
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "m" / "unet").iterdir())
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(_image(0), generator=torch.Generator().manual_seed(0), output_type="np", **RENDER).frames[0]
    assert np.asarray(frames).shape == (3, TINY_HEIGHT, TINY_WIDTH, 3)
