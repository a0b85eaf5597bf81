"""FP8 (``quantize="fp8"``): the refusal where there is no FP8 (renderer, pre-flight, ``vcut run``)
and the arithmetic of the module replacement, run on the CPU (torch's CPU ``_scaled_mm``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import subprocess_env, vcut_error
from PIL import Image
from torch import nn

from pipeline import quantize as q

ROOT = Path(__file__).resolve().parents[1]


def _fake_gpu(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], name: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)


def test_quantize_values() -> None:
    assert q.check_quantize(None) == "off" and q.check_quantize("FP8") == "fp8"
    with pytest.raises(ValueError, match="quantize must be one of off, fp8; got 'int4'"):
        q.check_quantize("int4")


def test_fp8_refused_on_a_cpu_and_before_ada(monkeypatch: pytest.MonkeyPatch) -> None:
    line = q.fp8_refusal("cpu")
    assert line and "\n" not in line and "compute capability >= 8.9" in line and "on cpu" in line
    _fake_gpu(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    line = q.fp8_refusal("cuda")
    assert "NVIDIA A100-SXM4-80GB (cuda:0) has 8.0" in line and "set quantize=off" in line
    _fake_gpu(monkeypatch, (8, 9), "NVIDIA L4")
    assert q.fp8_refusal("cuda:0") is None
    _fake_gpu(monkeypatch, (9, 0), "NVIDIA H200")
    assert q.fp8_refusal(None) is None


def test_preflight_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    assert q.quantize_refusal("off", "cpu") is None
    assert "on cpu" in q.quantize_refusal("fp8", "cpu", cluster=True)  # a CPU is refused anywhere
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "on cpu" in q.quantize_refusal("fp8", None)  # a local job without a GPU
    assert "sees no CUDA device" in q.quantize_refusal("fp8", "cuda")
    assert q.quantize_refusal("fp8", None, cluster=True) is None  # the workers check their GPUs
    _fake_gpu(monkeypatch, (7, 5), "Tesla T4")
    assert "Tesla T4 (cuda:0) has 7.5" in q.quantize_refusal("fp8", None, cluster=True)


# -- the arithmetic -------------------------------------------------------------------------


def _e4m3_rms_relative_error() -> float:
    """RMS relative rounding error of float8_e4m3fn on normal-distributed values, measured."""
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)) * 100
    x = x[x.abs() > 1]  # normal numbers: 3 mantissa bits
    return float(((x.to(torch.float8_e4m3fn).float() - x) / x).pow(2).mean().sqrt())


def test_float8_linear_is_the_dequantized_product_and_close_to_fp32() -> None:
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(256, 64)
    linear.requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 256, generator=g) * 0.05)
        linear.bias.copy_(torch.randn(64, generator=g))
    x = torch.randn(3, 5, 256, generator=g)
    x[0, 0] *= 1000  # one token far larger than the others: per-row scales keep the others exact-ish
    fp8 = q.float8_linear(linear)
    assert q.is_float8_linear(fp8) and fp8.weight_t.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        ref = linear(x)
        y = fp8(x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    # 1. exactly the math it claims: rows of x and W rounded to e4m3 with their own amax/448 scale,
    # multiplied in fp32 (and rounded to bf16 as _scaled_mm's output)
    x2 = x.reshape(-1, 256)
    sx = x2.abs().amax(1, keepdim=True) / q.E4M3_MAX
    sw = linear.weight.abs().amax(1, keepdim=True) / q.E4M3_MAX
    xq = (x2 / sx).to(torch.float8_e4m3fn).float() * sx
    wq = (linear.weight / sw).to(torch.float8_e4m3fn).float() * sw
    expected = ((xq @ wq.t()).to(torch.bfloat16).float() + linear.bias).reshape(ref.shape)
    assert torch.allclose(y, expected, rtol=1e-2, atol=1e-5)  # bf16 output: 8 bits of mantissa
    # 2. close to fp32: each of x and W carries e4m3's rounding error (rms r, measured below), so
    # a product term carries about sqrt(2) r, and a sum of many independent terms the same
    # relative rms error; allowed: 2x that (and it is no copy of fp32: above a tenth of it).
    r = _e4m3_rms_relative_error()
    assert 0.01 < r < 0.05  # 3 mantissa bits
    err = (y - ref).norm() / (ref - linear.bias).norm()
    assert 0.1 * np.sqrt(2) * r < float(err) < 2 * np.sqrt(2) * r, (float(err), r)


def test_quantize_unet_replaces_eligible_linears_on_the_tiny_unet() -> None:
    from vcut.tiny import make_tiny_pipeline

    pipe = make_tiny_pipeline()
    unet = pipe.unet
    linears = [m for m in unet.modules() if type(m) is nn.Linear]
    eligible = [m for m in linears if q.fp8_eligible(m)]
    with pytest.raises(ValueError, match="on cpu"):
        q.quantize_unet(unet, "fp8")  # the device check is on by default
    assert sum(type(m) is nn.Linear for m in unet.modules()) == len(linears)  # nothing changed
    report = q.quantize_unet(unet, "fp8", backend="scaled_mm", check_device=False)
    assert report.backend == "scaled_mm" and report.layers == len(eligible) > 0
    assert report.kept == len(linears) - len(eligible)
    assert sum(q.is_float8_linear(m) for m in unet.modules()) == len(eligible)
    assert report.params == sum(m.weight.numel() for m in eligible)


# -- the renderer and vcut run ------------------------------------------------------------------


def test_renderer_refuses_fp8_on_cpu_before_patching(tiny_model_dir: Path, monkeypatch) -> None:
    from diffusers import StableVideoDiffusionPipeline

    from pipeline import Renderer

    stock = StableVideoDiffusionPipeline.from_pretrained(tiny_model_dir)
    before = {name: type(m) for name, m in stock.unet.named_modules()}
    with pytest.raises(ValueError, match=r"^quantize=fp8 needs a CUDA GPU .* on cpu: set quantize=off$"):
        Renderer.from_pipe(stock, vcut="full", quantize="fp8")
    assert {name: type(m) for name, m in stock.unet.named_modules()} == before  # VCUT not applied

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("pipeline.renderer.load_svd_pipeline", no_load)
    with pytest.raises(ValueError, match="on cpu"):
        Renderer.from_pretrained(tiny_model_dir, device="cpu", quantize="fp8")


@pytest.mark.slow  # torch.compile, as the other compile tests
def test_fp8_composes_with_vcut_step_cache_and_compile_on_cpu(tiny_model_dir: Path, monkeypatch) -> None:
    """FP8 hardware pretended (the refusal patched out): full + fp8 + step cache + compile renders,
    frames near the unquantized ones but not equal."""
    from diffusers import StableVideoDiffusionPipeline

    from pipeline import Renderer

    monkeypatch.setattr("pipeline.renderer.fp8_refusal", lambda device: None)
    monkeypatch.setattr(q, "fp8_refusal", lambda device: None)
    stock = StableVideoDiffusionPipeline.from_pretrained(tiny_model_dir)
    kw = dict(vcut="full", step_cache=2, compile="default", compile_backend="eager")
    plain = Renderer.from_pipe(stock, **kw)
    fp8 = Renderer.from_pipe(
        StableVideoDiffusionPipeline.from_pretrained(tiny_model_dir), quantize="fp8", **kw
    )
    assert fp8.quantize == "fp8" and fp8.quantize_report.layers > 0 and plain.quantize == "off"
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8))
    call = dict(seed=3, height=64, width=64, num_frames=4, num_inference_steps=3)
    a = plain.generate(image, **call).frames.astype(int)
    b = fp8.generate(image, **call).frames.astype(int)
    assert a.shape == b.shape and not np.array_equal(a, b)
    # random weights magnify differences; still, FP8's frames stay near (mean below 8 levels of 255)
    assert np.abs(a - b).mean() < 8, np.abs(a - b).mean()


@pytest.mark.slow
def test_vcut_run_refuses_fp8_on_cpu_before_any_worker(tmp_path: Path, tiny_model_dir: Path) -> None:
    env = subprocess_env(drop=("HF_", "RAY_", "VCUT_"), RAY_TMPDIR=str(tmp_path / "raytmp"))
    args = ["run", str(ROOT / "examples" / "manifest.parquet"), "--out", str(tmp_path / "out")]
    args += ["--model", str(tiny_model_dir), "--config", str(ROOT / "examples" / "tiny-job.yaml")]
    line = vcut_error([*args, "model.quantize=fp8", "model.device=cpu"], env, tmp_path, "model.quantize")
    assert line == (
        "vcut: error: model.quantize: quantize=fp8 needs a CUDA GPU of compute capability >= 8.9 "
        "(Ada, Hopper); this renders on cpu: set quantize=off"
    )
    # a bad value is one line too
    expect = "model.quantize must be one of off, fp8, got 'int4'"
    vcut_error([*args, "model.quantize=int4"], env, tmp_path, expect)
