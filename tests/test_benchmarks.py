"""The benchmark scripts' machinery (not timings: benchmarks are scripts, never timed tests)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env

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
    return subprocess_env(drop=("OUT",), PYTHON=sys.executable)


def _gpu_bench_cmd(*args: str) -> list[str]:
    return ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu", "--tiny", "--threads", "1", *args]


@pytest.mark.slow
def test_gpu_script_cpu_tiny_path_runs_every_stage(tmp_path):
    """The CPU path of the GPU script: the same stages, tiny model, dynamo without inductor, FP8
    through torch's CPU _scaled_mm (--fp8-on-cpu)."""
    out = tmp_path / "gpu_bench.json"
    env = dict(_env(), OUT=str(tmp_path / "out"))
    args = ("--steps", "1,2", "--steps-per-video", "2", "--batch-size", "2", "--step-cache", "2")
    args += ("--fp8-on-cpu", "--quality-steps", "2", "--budget-s", "900")  # a shared, busy CPU
    proc = subprocess.run(
        _gpu_bench_cmd(*args, "--out", str(out)),
        cwd=ROOT,
        env=dict(env, GPU_BENCH_TIMEOUT_S="1000"),
        capture_output=True,
        text=True,
        timeout=1100,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in ("benchmark", "date", "command", "machine", "versions", "git", "shape", "dtype"):
        assert key in data, key
    assert data["benchmark"] == "gpu_bench" and data["device"] == "cpu" and data["dtype"] == "fp32"
    assert data["compile_backend"] == "eager"  # the CPU default: dynamo without inductor
    assert data["versions"]["torch"] and data["versions"]["diffusers"]
    assert data["stages_done"][:2] == ["build", "stock"] and data["stages_done"][-1] == "done"
    assert "eager" in data["stages_done"]
    stages = data["stages"]
    assert set(stages) == {
        "build", "stock", "eager", "compile", "compile_step_cache", "fp8", "guidance", "whole_video",
        "quality", "batched", "macs",
    }  # fmt: skip
    # every stage that did not run says why
    for name, stage in stages.items():
        assert stage["status"] in ("done", "skipped", "error"), (name, stage)
        if stage["status"] != "done":
            assert data["stages_skipped"][name], name
    configs = data["configs"]
    for name in ("stock", "off", "exact", "full"):
        c = configs[name]
        assert [r["steps"] for r in c["raw"]] == [1, 2], name
        assert all(r["seconds"] > 0 for r in c["raw"]) and c["warmup"]["seconds"] > 0
    assert all(r["frames_finite"] for r in configs["stock"]["raw"])
    # the Renderer with VCUT off renders stock diffusers' frames (same image, seed and steps)
    assert configs["off"]["raw"][-1]["max_abs_diff_vs_stock_uint8"] <= 1
    assert configs["exact"]["raw"][-1]["max_abs_diff_vs_stock_uint8"] <= 2
    assert configs["off"]["raw"][-1]["timings"]["denoise"] > 0
    # compiled figures are compiled ones: either no graph was compiled while timing, or the
    # recompile check stopped the stage (main's VCUT before it was made compile-safe)
    comp = stages["compile"]
    if comp["status"] == "skipped":  # after fp8's compile and the eager ones, on a busy CPU
        assert "time budget" in data["stages_skipped"]["compile"]
    elif comp["status"] == "done":
        assert configs["full+compile"]["graphs_compiled_during_timing"] == 0
        assert configs["full+compile"]["dynamo"]["graphs_compiled"] > 0
        assert configs["full+compile"]["compile_s"] > 0
    else:
        assert "Recompil" in comp["error"] or "compiled during the timed" in comp["error"], comp
        assert (
            configs["full+compile"]["error"]
            and "| full+compile (error: " in out.with_suffix(".md").read_text()
        )
    if stages["compile_step_cache"]["status"] == "done":  # one compiled UNet serves both configurations
        cached = configs["full+compile+cache2"]
        assert cached["reuses_compiled_unet_of"] == "full+compile" and cached["step_cache_interval"] == 2
        assert configs["full+compile"]["step_cache_interval"] == 1
        assert cached["graphs_compiled_during_timing"] == 0 and cached["dynamo"]["graphs_compiled"] >= 1
        assert [r["steps"] for r in cached["raw"]] == [2, 6]
    assert configs["batch1:" + stages["batched"]["renderer_config"]]["shape"]["height"] == 32
    assert configs["batch2:" + stages["batched"]["renderer_config"]]["batch"] == 2
    # the step cache is timed at whole cycles of its schedule: N and 3N steps
    assert [r["steps"] for r in configs["full+cache2"]["raw"]] == [2, 6]
    assert data["whole_video"]["steps"] == 2 and data["whole_video"]["seconds"] > 0
    # FP8: its own compiled UNet, no recompiles while timed, frames moved away from stock's (on a
    # loaded machine the budget may leave no time for a second compile: then it says so)
    fp8_done = stages["fp8"]["status"] == "done"
    if not fp8_done:
        assert "time budget" in data["stages_skipped"]["fp8"], stages["fp8"]
    else:
        fp8 = configs["full+compile+cache2+fp8"]
        assert fp8["graphs_compiled_during_timing"] == 0 and fp8["dynamo"]["graphs_compiled"] > 0
        assert fp8["quantize_report"]["backend"] in ("scaled_mm", "torchao")
        assert fp8["quantize_report"]["linear_layers_fp8"] > 0
    # the guidance interval
    assert stages["guidance"]["status"] == "done", stages["guidance"]
    assert any(name.endswith("+g0-0.6") for name in configs)
    # quality: every configuration timed at the full shape has its distance to stock (or says it
    # had no time for it); VCUT off renders stock's frames
    assert stages["quality"]["status"] == "done", stages["quality"]
    quality = stages["quality"]["configs"]
    timed = {
        n
        for n, c in configs.items()
        if c.get("raw") and not c.get("error") and c["shape"]["height"] == 64 and n != "stock"
    }
    assert set(quality) == timed, (set(quality), timed)
    for name, q in quality.items():
        assert q == {"skipped": "time budget"} or 0 <= q["ssim_mean"] <= 1, (name, q)
    assert quality["off"]["max_abs_diff"] <= 1 and quality["off"]["ssim_mean"] > 0.99
    if fp8_done and isinstance(quality.get("full+compile+cache2+fp8"), dict):
        q8 = quality["full+compile+cache2+fp8"]
        assert not q8["identical"] and q8["psnr_mean_db"] > 0 and q8["ssim_mean"] < 1.0
    assert "| PSNR vs stock (dB) |" in out.with_suffix(".md").read_text()
    counted = data["macs"]["counted"]
    assert counted["full|cache0|64x64x4"]["per_step_macs"] < counted["off|cache0|64x64x4"]["per_step_macs"]
    assert data["mfu"]["off"]["achieved_tflops"] > 0 and data["mfu"]["off"]["mfu"] is None  # no CPU peak
    md = out.with_suffix(".md").read_text()
    assert "| stock |" in md and "| full |" in md
    # copied to $OUT
    assert json.loads((tmp_path / "out" / out.name).read_text())["stages_done"][-1] == "done"
    assert (tmp_path / "out" / md_name(out)).read_text() == md


def md_name(out: Path) -> str:
    return out.with_suffix(".md").name


@pytest.mark.slow
def test_gpu_script_saves_after_each_stage_and_on_interrupt(tmp_path):
    """Interrupted as gpu.sh's timeout does (SIGINT) after the stock stage: what was measured stays."""
    out = tmp_path / "gpu_bench.json"
    copy = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.gpu_bench", "--device", "cpu", "--tiny", "--threads", "1"]
    cmd += ["--steps", "1,2", "--no-compile", "--out", str(out), "--copy-to", str(copy)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        data: dict = {}
        while time.monotonic() < deadline and proc.poll() is None:
            if (copy / out.name).exists():
                data = json.loads((copy / out.name).read_text())  # written atomically
                if "stock" in data["stages_done"]:
                    break
            time.sleep(0.2)
        assert "stock" in data.get("stages_done", []), (
            proc.stdout.read().decode()[-3000:] if proc.poll() else ""
        )
        # the raw measurements (the per-step split can be undefined on a busy CPU: more steps, less time)
        raw = data["configs"]["stock"]["raw"]
        assert raw and all(r["seconds"] > 0 for r in raw) and "build" in data["stages"]
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    final = json.loads(out.read_text())
    if rc == 130:  # interrupted mid-way: says so, keeps the stages before
        assert final["interrupted"].startswith("interrupted")
    else:  # it had finished already (a fast machine)
        assert rc == 0 and final["stages_done"][-1] == "done"
    assert final["stages_done"][:2] == ["build", "stock"]
    assert final["configs"]["stock"]["raw"] == data["configs"]["stock"]["raw"]
    assert json.loads((copy / out.name).read_text()) == final


@pytest.mark.slow  # the benchmark's build and MAC stages, run as the script runs them
def test_gpu_bench_budget_skips_stages_and_says_why(tmp_path):
    from benchmarks import gpu_bench

    out = tmp_path / "b.json"
    rc = gpu_bench.main(["--device", "cpu", "--tiny", "--threads", "1", "--budget-s", "0", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["stages_done"] == ["build", "macs", "done"]
    skipped = data["stages_skipped"]
    for stage in ("stock", "eager:off", "eager:exact", "eager:full", "eager", "compile"):
        assert "time budget" in skipped[stage], stage
    assert skipped["whole_video"] == "no configuration was measured"
    assert skipped["quality"].startswith("stock diffusers was not measured")
    assert skipped["fp8"].startswith("quantize=fp8 needs a CUDA GPU")  # a CPU: refused, one line
    assert skipped["batched"] == "no eager configuration was measured"
    assert data["stages"]["eager"]["status"] == "skipped" and not data["configs"]


def test_time_is_kept_only_for_later_stages_that_will_run():
    from benchmarks import gpu_bench

    bench = gpu_bench.Bench(gpu_bench.parse_args(["--device", "cpu", "--tiny", "--out", "/dev/null"]))
    bench.planned = {"build", "compile", "whole_video", "quality", "batched", "macs"}
    everything = bench.reserve_after("compile")
    bench.planned = {"build", "compile", "whole_video"}  # e.g. --stages compile,whole_video
    assert bench.reserve_after("compile") == pytest.approx(
        everything - bench.est_quality() - bench.est_batched() - bench.est_macs()
    )
    assert bench.reserve_after("macs") == pytest.approx(1.0)  # only the margin


def test_forbid_recompiles_makes_a_recompile_an_error():
    import torch._dynamo

    from benchmarks import gpu_bench

    torch._dynamo.reset()
    f = torch.compile(lambda x: x * 2 + 1, backend="eager")
    f(torch.ones(3))
    rec: dict = {}
    with gpu_bench.forbid_recompiles(rec):
        assert f(torch.ones(3)).tolist() == [3.0, 3.0, 3.0]  # same guards: no compile
    assert rec["graphs_compiled_during_timing"] == 0
    with pytest.raises(torch._dynamo.exc.RecompileError):
        with gpu_bench.forbid_recompiles({}):
            f(torch.ones(3, dtype=torch.float64))  # a guard fails: would recompile
    assert torch._dynamo.config.error_on_recompile is False  # restored
    g = torch.compile(lambda x: x - 1, backend="eager")
    with pytest.raises(gpu_bench.RecompiledDuringTiming):
        with gpu_bench.forbid_recompiles(rec):
            g(torch.ones(2))  # a first compile while timing is caught too
    assert rec["graphs_compiled_during_timing"] == 1
    torch._dynamo.reset()


def test_compile_shim_forces_the_backend_and_drops_keywords_an_older_torch_lacks():
    from benchmarks import gpu_bench

    real = torch.compile
    rec: dict = {}
    with gpu_bench.compile_shim("eager", rec):
        f = torch.compile(lambda x: x + 1, mode="max-autotune")  # no inductor: mode dropped
        assert f(torch.zeros(2)).tolist() == [1.0, 1.0]
    assert torch.compile is real and "compile_kwargs_dropped" not in rec
    # torch 2.11 (the GPU machine) has no recompile_limit / isolate_recompiles keywords
    old = {"model", "fullgraph", "dynamic", "backend", "mode", "options", "disable"}
    with gpu_bench.compile_shim(None, rec, supported=old):
        g = torch.compile(lambda x: x * 3, backend="eager", recompile_limit=4, isolate_recompiles=True)
        assert g(torch.ones(2)).tolist() == [3.0, 3.0]
    assert rec["compile_kwargs_dropped"] == ["isolate_recompiles", "recompile_limit"]
    assert torch.compile is real


def test_hard_limit_stops_a_stage():
    from benchmarks import gpu_bench

    with pytest.raises(gpu_bench.StageTimeout):  # not interrupted: a minute, then no exception
        with gpu_bench.hard_limit(0.05):
            time.sleep(60)
    with gpu_bench.hard_limit(None):
        pass


def test_peak_flops_table_tells_h100_forms_apart():
    from benchmarks.gpu_bench import PEAK_TFLOPS, identify_gpu

    assert identify_gpu("NVIDIA H100 80GB HBM3", 132, 80 * 2**30) == "H100 SXM"
    assert identify_gpu("NVIDIA H100 PCIe", 114, 80 * 2**30) == "H100 PCIe"
    assert identify_gpu("NVIDIA H100 NVL", 132, 94 * 2**30) == "H100 NVL"
    assert identify_gpu("NVIDIA H100", 114, 80 * 2**30) == "H100 PCIe"  # by SM count
    assert identify_gpu("NVIDIA H100", 132, 94 * 2**30) == "H100 NVL"  # by memory
    assert identify_gpu("NVIDIA H100", None, None) is None
    assert identify_gpu("NVIDIA H200", 132, 141 * 2**30) == "H200"
    assert identify_gpu("NVIDIA A100-SXM4-80GB", 108, 80 * 2**30) is None
    names = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL"]
    told_apart = {identify_gpu(name, 132, 94 * 2**30) for name in names}
    assert told_apart <= set(PEAK_TFLOPS) and len(told_apart) == 5  # each form has its peak


def test_per_step_and_fixed_cost_from_two_step_counts():
    from benchmarks.gpu_bench import derive

    d = derive([(2, 3.0 + 2 * 0.5), (6, 3.0 + 6 * 0.5)], 25)
    assert d["per_step_s"] == pytest.approx(0.5) and d["fixed_s"] == pytest.approx(3.0)
    assert d["video_s"] == pytest.approx(3.0 + 25 * 0.5)
    noisy = derive([(2, 4.0), (6, 3.9)], 25)
    assert noisy["video_s"] is None and "per-step" in noisy["invalid"]


@pytest.mark.slow
def test_renderer_imports_without_encoder_or_job_packages():
    """The GPU machine has no ffmpeg-python, omegaconf or ray: the benchmark's import path needs none."""
    code = (
        "import sys, pipeline.renderer, benchmarks.gpu_bench\n"
        "bad = {'ffmpeg', 'omegaconf', 'ray'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
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


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_the_orchestration_drivers_peak_is_its_own_not_its_parents():
    """Linux keeps ``ru_maxrss`` across ``execve``: a subprocess starts with its parent's RSS at
    the fork. The orchestration benchmark's driver peak (``own_peak_rss``: VmHWM) is the
    subprocess's own: a parent holding 256 MiB, a child that holds far less."""
    held = bytearray(256 * 2**20)
    held[:: 2**12] = b"\x01" * len(range(0, len(held), 2**12))  # every page resident
    code = (
        "import resource; from benchmarks.orchestration import own_peak_rss; "
        "print(own_peak_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    own, inherited = map(int, run.stdout.split())
    del held
    assert inherited > 256 * 2**20 > 4 * own
