"""``vcut compare`` on the tiny model: exact is identical to off, full and the step cache are not;
the report files; the CLI's one-line errors; the metric functions on known inputs."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.compare import CompareConfig, CompareError, parse_config, parse_configs
from jobs.compare_report import GAP, HEADER_H, LABEL_W, contact_sheet_size
from jobs.macs import Levers
from jobs.main import main
from pipeline import probe_video
from pipeline.quality import LpipsMetric, frame_psnr, frame_ssim, video_distance

SHAPE = ["--height", "64", "--width", "64", "--num-frames", "4", "--warmup", "0"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("compare-images")
    paths = []
    for i in range(2):
        path = folder / f"img{i}.png"
        Image.fromarray(np.random.RandomState(i).randint(0, 255, (72, 80, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, images: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``vcut compare`` of off, exact and full: 2 images, 4 frames, 2 steps, seeds 3 and 4."""
    out = tmp_path_factory.mktemp("compare-out") / "report"
    argv = ["compare", *images, "--model", str(tiny_model_dir), "--configs", "off,exact,full"]
    assert main([*argv, "--out", str(out), *SHAPE, "--steps", "2", "--seed", "3"]) == 0
    return out


def _configs(out: Path) -> dict[str, dict]:
    data = json.loads((out / "compare.json").read_text())
    return {c["name"]: c for c in data["configs"]}


def test_exact_is_identical_to_off_and_full_is_not(run: Path) -> None:
    c = _configs(run)
    assert list(c) == ["off", "exact", "full"]
    for im in c["exact"]["images"]:  # same output up to rounding: >= 50 dB (null = identical)
        assert im["identical"] or im["psnr_worst"] >= 50.0, im["psnr"]
        assert im["ssim_worst"] > 0.999
    q = c["full"]["quality"]
    assert not q["identical"] and q["psnr_worst"] is not None and q["psnr_worst"] < 50.0
    for im in c["full"]["images"]:
        assert len(im["psnr"]) == 4 and all(
            v is not None and math.isfinite(v) and v < 50.0 for v in im["psnr"]
        )
        assert im["ssim_worst"] < 1.0
    assert c["off"]["reference"] and c["off"]["quality"]["identical"]


def test_json_has_seconds_macs_and_seeds(run: Path) -> None:
    data = json.loads((run / "compare.json").read_text())
    assert data["meta"]["seeds"] == [3, 4] and data["meta"]["key_frames"] == [0, 1, 3]
    c = _configs(run)
    for cfg in c.values():
        assert len(cfg["seconds_per_video"]) == 2 and all(s > 0 for s in cfg["seconds_per_video"])
        assert cfg["seconds_per_video_mean"] == pytest.approx(np.mean(cfg["seconds_per_video"]))
        assert [im["seed"] for im in cfg["images"]] == [3, 4]
    assert c["off"]["macs_saved_vs_off"] == 0
    assert 0 < c["exact"]["macs_saved_vs_off"] < c["full"]["macs_saved_vs_off"]
    assert c["full"]["macs_per_video"] == c["off"]["macs_per_video"] - c["full"]["macs_saved_vs_off"]
    assert c["full"]["vcut_report"]["temporal_cross_attentions_removed"] > 0
    md = (run / "compare.md").read_text()
    assert "| `full` |" in md and "| `exact` | " in md and "identical" in md


def test_contact_sheet_layout_and_plot(run: Path) -> None:
    sheet = np.asarray(Image.open(run / "contact_sheet.png").convert("RGB"))
    width, height = contact_sheet_size(3, 2, (64, 64), 288)
    assert (width, height) == (LABEL_W + 2 * 3 * 64 + GAP, HEADER_H + 3 * 64)
    assert contact_sheet_size(2, 1, (576, 1024), 288) == (LABEL_W + 3 * 512, HEADER_H + 2 * 288)
    assert sheet.shape == (height, width, 3)

    def cell(row: int, image: int, col: int) -> np.ndarray:
        x, y = LABEL_W + image * (3 * 64 + GAP) + col * 64, HEADER_H + row * 64
        return sheet[y : y + 64, x : x + 64]

    for image in range(2):
        for col in range(3):
            assert np.abs(cell(0, image, col).astype(int) - cell(1, image, col)).max() <= 1  # off vs exact
        assert not np.array_equal(cell(0, image, 2), cell(2, image, 2))  # off vs full, last frame
    with Image.open(run / "psnr_per_frame.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 300 and plot.size[1] > 200


def test_step_cache_config_differs_from_off(
    tiny_model_dir: Path, images: list[str], tmp_path, capsys
) -> None:
    """Needs the step cache (Renderer.from_pipe(step_cache=...), count_macs(step_cache=...))."""
    out = tmp_path / "cache"
    argv = [
        "compare",
        images[0],
        "--model",
        str(tiny_model_dir),
        "--configs",
        "full+cache3",
        "--out",
        str(out),
    ]
    assert main([*argv, *SHAPE, "--steps", "4"]) == 0
    assert "'off' added" in capsys.readouterr().err
    c = _configs(out)
    assert list(c) == ["off", "full+cache3"]
    cached = c["full+cache3"]
    assert cached["step_cache"] == 3 and cached["mode"] == "full"
    assert not cached["quality"]["identical"] and cached["quality"]["psnr_worst"] < 50.0
    assert cached["mac_report"]["macs_saved_step_cache"] > 0
    assert cached["macs_saved_vs_off"] > cached["mac_report"]["macs_saved_vcut"] > 0


def test_guidance_interval_config_differs_from_off_and_counts_its_macs(
    tiny_model_dir: Path, images: list[str], tmp_path
) -> None:
    out = tmp_path / "guidance"
    argv = ["compare", images[0], "--model", str(tiny_model_dir), "--configs", "off,off+g0-0.5"]
    assert main([*argv, "--out", str(out), *SHAPE, "--steps", "4"]) == 0
    c = _configs(out)
    g = c["off+g0-0.5"]
    assert (g["guidance_start"], g["guidance_stop"]) == (0.0, 0.5) and c["off"]["guidance_start"] is None
    assert not g["quality"]["identical"] and g["quality"]["psnr_worst"] < 50.0
    assert (g["mac_report"]["guided_calls"], g["mac_report"]["unguided_calls"]) == (2, 2)
    assert g["macs_saved_vs_off"] == g["mac_report"]["macs_saved_guidance"] > 0


def test_cache_configs_reach_the_renderer_factory(
    tiny_model_dir: Path, images, tmp_path, monkeypatch
) -> None:
    """The +cacheN plumbing, with the factory and the MAC count replaced (no step cache needed)."""
    import jobs.compare as compare

    real_factory, real_macs = compare.make_renderer, compare.config_macs
    seen: list[tuple[CompareConfig, int]] = []

    def factory(stock, config, *, model_id, step_cache_depth=1):
        seen.append((config, step_cache_depth))
        renderer = real_factory(stock, CompareConfig(config.mode, config.mode), model_id=model_id)
        if config.step_cache is not None:  # stand-in for the step cache: a visible change
            generate = renderer.generate

            def perturbed(*args, **kwargs):
                gen = generate(*args, **kwargs)
                gen.frames = np.clip(gen.frames.astype(int) + 4, 0, 255).astype(np.uint8)
                return gen

            renderer.generate = perturbed
        return renderer

    def macs(unet_config, config, **kw):
        kw.pop("step_cache_depth")
        return real_macs(unet_config, CompareConfig(config.mode, config.mode), **kw)

    monkeypatch.setattr(compare, "make_renderer", factory)
    monkeypatch.setattr(compare, "config_macs", macs)
    argv = ["compare", images[1], "--model", str(tiny_model_dir), "--configs", "off,exact+cache2"]
    flags = ["--steps", "1", "--step-cache-depth", "2", "--seeds", "7", "--save-videos"]
    assert main([*argv, "--out", str(tmp_path), *SHAPE, *flags]) == 0
    assert seen == [(CompareConfig("off", "off"), 2), (CompareConfig("exact+cache2", "exact", 2), 2)]
    c = _configs(tmp_path)
    q = c["exact+cache2"]["quality"]
    assert not q["identical"] and q["max_abs_diff"] >= 1 and q["psnr_worst"] < 50.0
    videos = c["off"]["videos"] + c["exact+cache2"]["videos"]
    assert [Path(v).name for v in videos] == ["off__img1_s7.mp4", "exact+cache2__img1_s7.mp4"]
    assert all(probe_video(v).frames == 4 for v in videos)


# -- CLI errors: one line, exit 2, nothing loaded ---------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--configs": "off,fulll"}, "configuration 'fulll': 'fulll' is not a VCUT mode"),
        ({"--configs": "off,full+g0.7-0.7"}, "token 'g0.7-0.7': the guidance interval needs 0 <= A < B <= 1"),
        ({"--guidance-start": "0.7", "--guidance-stop": "0.5"}, "--guidance-start must be < --guidance-stop"),
        ({"--configs": "full+cache0"}, "step-cache interval must be >= 2"),
        ({"--configs": "exact,exact"}, "listed twice"),
        ({"image": "missing.png"}, "image"),
        ({"--model": "no/such/folder"}, "does not exist"),
        ({"--model": None}, "--model is required"),
        ({"--height": "60"}, "--height must be a multiple of 8, got 60"),
        ({"--height": "0"}, "--height must be in [8, 8192], got 0"),
        ({"--steps": "0"}, "--num-inference-steps must be in [1, 1000], got 0"),
        ({"--seeds": "1,2,3"}, "3 seeds for 1 images"),
        # Bugs: compare checked these only after loading the model (or not at all).
        ({"--seeds": str(2**63)}, f"seed must be in [0, {2**63 - 1}], got {2**63}"),
        ({"--seed": "-1"}, "seed must be in [0, "),
        ({"--fps": "0"}, "--fps must be in [1, 240], got 0"),
        ({"--decode-chunk-size": "0"}, "--decode-chunk-size must be in [1, 1024], got 0"),
        ({"--min-guidance-scale": "5"}, "--min-guidance-scale must be <= --max-guidance-scale, got 5.0"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(
    change, message, tiny_model_dir, images, tmp_path, capsys, monkeypatch
) -> None:
    import pipeline.loading

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipeline.loading, "load_svd_pipeline", no_load)
    change = dict(change)
    opts = {"--model": str(tiny_model_dir), "--configs": "off,full", "--out": str(tmp_path / "o")}
    image = str(tmp_path / change.pop("image")) if "image" in change else images[0]
    opts.update(change)
    argv = ["compare", image] + [a for k, v in opts.items() if v is not None for a in (k, v)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vcut: error: ") and "\n" not in err, err
    assert message in err
    assert not (tmp_path / "o").exists()


def test_parse_configs() -> None:
    assert parse_config("full+cache3") == CompareConfig("full+cache3", "full", 3)
    assert parse_config("exact") == CompareConfig("exact", "exact", None)
    configs, added = parse_configs("full, exact+cache2")
    assert [c.name for c in configs] == ["off", "full", "exact+cache2"] and added
    configs, added = parse_configs("full,off")
    assert [c.name for c in configs] == ["off", "full"] and not added
    for bad in ("fulll", "full+cache1", "full+cachex", "full+", "FULL", ""):
        with pytest.raises(CompareError):
            parse_configs(bad)


@pytest.mark.parametrize(
    "name, renderer, generate",
    [
        (
            "full+cache3+g0-0.6",
            {"vcut": "full", "step_cache": 3},
            {"guidance_start": 0.0, "guidance_stop": 0.6},
        ),
        (
            "exact+g.2-1+compile",
            {"vcut": "exact", "compile": "default"},
            {"guidance_start": 0.2, "guidance_stop": 1.0},
        ),
        ("off+fp8", {"vcut": "off", "quantize": "fp8"}, {}),
    ],
)
def test_the_lever_grammar(name: str, renderer: dict, generate: dict) -> None:
    config = parse_config(name)
    assert (config.renderer_kwargs(), config.generate_kwargs()) == (renderer, generate)
    assert config.levers() == Levers(renderer["vcut"], 3 if "cache3" in name else None)


@pytest.mark.parametrize(
    "name, message",
    [
        ("full+cach3", "configuration 'full+cach3': unknown token 'cach3'"),
        ("full+g0.6-0.2", "token 'g0.6-0.2': the guidance interval needs 0 <= A < B <= 1, got A=0.6, B=0.2"),
        ("full+g0-1.5", "token 'g0-1.5'"),
        ("full+fp8+fp8", "token 'fp8' sets quantize a second time"),
        ("fast+cache3", "'fast' is not a VCUT mode"),
    ],
)
def test_grammar_errors_are_one_line_naming_the_token(name: str, message: str) -> None:
    with pytest.raises(CompareError) as err:
        parse_configs(name)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_same_levers_in_another_order_are_listed_twice() -> None:
    with pytest.raises(CompareError, match="listed twice"):
        parse_configs("full+cache3+g0-0.6,full+g0-0.6+cache3")


def test_fp8_is_passed_to_the_renderer_or_refused_before_loading(monkeypatch) -> None:
    import inspect

    from pipeline.renderer import Renderer

    if "quantize" in inspect.signature(Renderer.from_pipe).parameters:
        configs, _ = parse_configs("full+fp8")  # the renderer decides (and refuses without FP8)
        assert configs[1].renderer_kwargs()["quantize"] == "fp8"
    else:
        with pytest.raises(CompareError, match="token 'fp8' needs Renderer"):
            parse_configs("full+fp8")


# -- metrics on known inputs ----------------------------------------------------------------


def test_metrics_identical_and_known_offset() -> None:
    a = np.full((2, 16, 16, 3), 100, dtype=np.uint8)
    b = a.copy()
    b[1] += 5  # MSE 25 -> PSNR = 10 log10(255^2 / 25) = 20 log10(51)
    psnr = frame_psnr(a, b)
    assert psnr[0] == math.inf and psnr[1] == pytest.approx(20 * math.log10(51))
    ssim = frame_ssim(a, b)
    assert ssim[0] == 1.0 and ssim[1] < 1.0
    d = video_distance(a, b)
    assert not d.identical and d.identical_frames == 1 and d.max_abs_diff == 5
    assert d.psnr_mean == d.psnr_worst == pytest.approx(34.151, abs=1e-3)
    out = d.to_dict()
    json.dumps(out, allow_nan=False)  # JSON-safe: the infinite PSNR is null
    assert out["psnr"][0] is None and out["lpips"] is None
    same = video_distance(a, a)
    assert same.identical and same.to_dict()["psnr_worst"] is None and same.ssim_worst == 1.0
    with pytest.raises(ValueError):
        frame_psnr(a, b[:1])


def test_lpips_plumbing_with_a_stand_in_module(monkeypatch) -> None:
    """The real lpips package is not installed here (it downloads weights): check only that frames
    reach it as (F, 3, H, W) in [-1, 1] and that one value per frame comes back."""
    import torch

    class FakeLPIPS(torch.nn.Module):
        def __init__(self, net, verbose):
            super().__init__()

        def forward(self, x, y):
            assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
            return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    a = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    b = a.copy()
    b[1] = 51
    d = video_distance(a, b, lpips=LpipsMetric())
    assert d.lpips == pytest.approx([0.0, 51 / 127.5])
    assert d.to_dict()["lpips_worst"] == pytest.approx(0.4)
