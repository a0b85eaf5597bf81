"""The benchmark scripts' machinery (not timings: benchmarks are scripts, never timed tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the benchmarks are scripts in the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import common, plot, unet_ab  # noqa: E402


def test_quantile_and_summarize():
    s = common.summarize([4.0, 1.0, 3.0, 2.0])
    assert s["n"] == 4 and s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0
    assert s["p25"] == pytest.approx(1.75) and s["p75"] == pytest.approx(3.25)
    assert common.quantile([5.0], 0.5) == 5.0


def test_rotated_schedule_puts_every_mode_first_equally():
    modes = list(unet_ab.MODES)
    firsts = [common.rotated(modes, k)[0] for k in range(6)]
    assert sorted(firsts) == sorted(modes * 2)
    assert all(sorted(common.rotated(modes, k)) == sorted(modes) for k in range(5))


def test_summarize_ab_pairs_rounds():
    rounds = [
        {"order": ["off", "exact", "full"], "seconds_per_call": {"off": 2.0, "exact": 1.8, "full": 1.6}},
        {"order": ["exact", "full", "off"], "seconds_per_call": {"off": 4.0, "exact": 3.8, "full": 3.0}},
    ]
    s = unet_ab.summarize_ab(rounds)
    assert s["off"]["seconds_per_call"]["median"] == 3.0
    assert s["full"]["ratio_to_off_paired"]["median"] == pytest.approx((0.8 + 0.75) / 2)
    assert s["exact"]["ratio_of_medians"] == pytest.approx(2.8 / 3.0)


def test_shared_weight_copies_share_weights_and_leave_stock_untouched():
    stock = unet_ab.build_stock_unet(unet_ab.SIZES["tiny"], "cpu", torch.float32)
    n_before = sum(p.numel() for p in stock.parameters())
    models, reports = unet_ab.make_variants(stock)
    assert reports["off"]["params_removed"] == 0
    assert reports["full"]["params_removed"] > reports["exact"]["params_removed"] > 0
    assert sum(p.numel() for p in stock.parameters()) == n_before
    stock_ptrs = {p.data_ptr() for p in stock.parameters()}
    for mode in ("exact", "full"):
        assert models[mode] is not stock
        assert {p.data_ptr() for p in models[mode].parameters()} <= stock_ptrs  # no weight was copied
    inputs = unet_ab.make_inputs(stock, unet_ab.SIZES["tiny"], "cpu", torch.float32)
    check = unet_ab.check_outputs(models, inputs)
    assert check["all_finite"]
    assert check["exact_rel_diff_vs_off"] < 1e-4
    assert check["full_rel_diff_vs_off"] > 1e-4


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHON"] = sys.executable
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_gpu_script_cpu_tiny_path_writes_all_fields(tmp_path):
    out = tmp_path / "gpu_bench.json"
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "gpu.sh"),
            "--device",
            "cpu",
            "--tiny",
            "--threads",
            "1",
            "--no-compile",
            "--rounds",
            "2",
            "--warmup",
            "1",
            "--vae-reps",
            "1",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in (
        "benchmark",
        "date",
        "command",
        "machine",
        "versions",
        "git",
        "size",
        "dtype",
        "setup",
        "check",
        "eager",
        "peak_memory_bytes",
        "macs",
        "mfu",
        "vae_decode",
        "per_video_estimate",
        "stages_done",
    ):
        assert key in data, key
    assert data["benchmark"] == "gpu_bench" and data["device"] == "cpu" and data["size"]["name"] == "tiny"
    assert data["machine"]["cpu_model"] and data["machine"]["logical_cores"] >= 1
    assert data["versions"]["torch"] and data["versions"]["diffusers"] and data["versions"]["python"]
    summary = data["eager"]["summary"]
    assert set(summary) == {"off", "exact", "full"}
    for mode in ("off", "exact", "full"):
        assert summary[mode]["seconds_per_call"]["median"] > 0
        assert len(data["eager"]["timing"]["rounds"]) == 2
        assert data["mfu"]["eager"][mode]["achieved_tflops"] > 0
        assert data["mfu"]["eager"][mode]["mfu"] is None  # no peak on a CPU
        assert f"unet_step_{mode}" in data["peak_memory_bytes"]
    assert summary["full"]["ratio_to_off_paired"]["n"] == 2
    assert 0 < data["macs"]["full"]["predicted_ratio"] < data["macs"]["exact"]["predicted_ratio"] < 1
    assert data["vae_decode"]["seconds"]["median"] > 0 and data["vae_decode"]["frames"] == 4
    assert data["per_video_estimate"]["eager"]["off"]["ratio_to_off"] == 1.0
    assert data["check"]["exact_rel_diff_vs_off"] < 1e-4
    assert data["stages_skipped"]["compiled"] == "--no-compile"
    assert data["stages_done"][-1] == "done"


def test_gpu_script_without_cuda_says_how_to_run_on_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--out", str(tmp_path / "x.json")],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "--device cpu --tiny" in proc.stderr


def test_plot_writes_pngs_from_results(tmp_path):
    rounds = [
        {
            "order": common.rotated(list(unet_ab.MODES), k),
            "seconds_per_call": {"off": 1.0 + 0.1 * k, "exact": 0.98 + 0.1 * k, "full": 0.95 + 0.1 * k},
        }
        for k in range(4)
    ]
    result = {
        **common.header("unet_ab"),
        "size": asdict(unet_ab.SIZES["tiny"]),
        "device": "cpu",
        "dtype": "fp32",
        "compile": False,
        "timing": {"rounds": rounds},
        "summary": unet_ab.summarize_ab(rounds),
        "macs": {"exact": {"predicted_ratio": 0.98}, "full": {"predicted_ratio": 0.96}},
    }
    common.write_json(tmp_path / "unet_ab_tiny.json", result)
    assert plot.main(["--results", str(tmp_path), "--table"]) == 0
    png = tmp_path / "ab_ratios.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tiny" in plot.markdown_table(plot.load_results(tmp_path))
