"""The one declaration of the generation parameters (``pipeline.params``) and every place
derived from it: the config schema and its check, the manifest checks, the renderer's checks
and signatures, the worker's call, the results schema, ``vcut compare``'s flags and the
configuration grammar shared with ``benchmarks.levers``."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from jobs import manifest, results
from jobs.config import GenerationConfig, check_config, load_config
from jobs.main import build_parser
from jobs.planner import render_key, resolve_params
from pipeline.params import (
    BATCH_PARAMS,
    GENERATION_PARAMS,
    ROW_PARAMS,
    SEED_MAX,
    STRICTLY_ORDERED_PAIRS,
    check_generation,
    check_value,
    defaults,
)
from pipeline.renderer import Renderer

ROOT = Path(__file__).resolve().parents[1]


def _outside(name: str) -> tuple[object, object]:
    """A value just below and just above the declared range."""
    p = GENERATION_PARAMS[name]
    step = 1 if p.kind == "int" else 0.5
    return p.low - step, p.high + step


def _message(name: str, value: object, label: str | None = None) -> str:
    p = GENERATION_PARAMS[name]
    noun = "" if p.kind == "int" else "a finite number "
    return f"{label or name} must be {noun}in [{p.low}, {p.high}], got {value}"


# -- the declaration ----------------------------------------------------------------------------


def test_declaration_is_consistent() -> None:
    for name, p in GENERATION_PARAMS.items():
        assert p.name == name and p.kind in ("int", "float") and p.description
        assert p.low <= p.high
        if p.default is None:
            assert p.optional, name
        else:
            assert check_value(name, p.default) == p.default and isinstance(p.default, p.type)
            assert check_generation({name: p.default}) == {name: p.default}
    assert GENERATION_PARAMS["seed"].high == SEED_MAX == 2**63 - 1  # int64 in the results
    assert ROW_PARAMS == tuple(n for n in GENERATION_PARAMS if n != "decode_chunk_size")
    assert BATCH_PARAMS == tuple(n for n in ROW_PARAMS if n != "seed")


def test_check_generation_names_the_parameter_and_refuses_unknown_names() -> None:
    assert check_generation(fps=7.0, noise_aug_strength=1) == {"fps": 7, "noise_aug_strength": 1.0}
    with pytest.raises(ValueError, match="unknown generation parameter"):
        check_generation(steps=3)
    with pytest.raises(ValueError, match=re.escape("--fps must be in [1, 240], got 0")):
        check_generation(fps=0, label=lambda n: "--" + n)
    with pytest.raises(ValueError, match="min_guidance_scale must be <= max_guidance_scale, got 4.0 > 3.0"):
        check_generation(min_guidance_scale=4, max_guidance_scale=3)


# -- config -------------------------------------------------------------------------------------


def test_config_types_and_docs_of_each_parameter() -> None:
    """What omegaconf makes of the declared types (the schema is built from the declaration,
    so comparing the two could not fail: its behaviour can)."""
    for name, p in GENERATION_PARAMS.items():
        assert f"{name}: " in GenerationConfig.__doc__, name  # descriptions for the config docs
        if p.optional:  # null: the renderer's own choice
            assert getattr(load_config(dotlist=[f"defaults.{name}=null"]).defaults, name) is None
        else:
            with pytest.raises(Exception, match=f"(?s)Incompatible value .None.*full_key: defaults.{name}\n"):
                load_config(dotlist=[f"defaults.{name}=null"])
    with pytest.raises(Exception, match="could not be converted to Integer"):
        load_config(dotlist=["defaults.fps=1.5"])
    with pytest.raises(Exception, match="could not be converted to Float"):
        load_config(dotlist=["defaults.noise_aug_strength=strong"])
    assert load_config(dotlist=["defaults.noise_aug_strength=1"]).defaults.noise_aug_strength == 1.0


@pytest.mark.parametrize("name", list(GENERATION_PARAMS))
def test_config_refuses_each_value_outside_its_range(name: str) -> None:
    low, high = _outside(name)
    top = [f"defaults.{n}={GENERATION_PARAMS[n].high}" for n in (name, "max_guidance_scale")]
    if name in {a for a, _ in STRICTLY_ORDERED_PAIRS}:  # its highest value is its partner's highest
        with pytest.raises(ValueError, match=f"defaults.{name} must be < "):
            check_config(load_config(dotlist=top))
    else:
        check_config(load_config(dotlist=top))  # the highest value is accepted
    with pytest.raises(ValueError, match=re.escape(_message(name, high, f"defaults.{name}"))):
        check_config(load_config(dotlist=[f"defaults.{name}={high}"]))


@pytest.mark.parametrize(
    "setting, message",
    [
        # Bugs: the config passed these and then every row failed in the renderer.
        ("defaults.decode_chunk_size=0", "defaults.decode_chunk_size must be in [1, 1024], got 0"),
        ("defaults.width=1001", "defaults.width must be a multiple of 8, got 1001"),
        ("defaults.height=100", "defaults.height must be a multiple of 8, got 100"),
    ],
)
def test_config_refuses_what_the_renderer_would(setting: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check_config(load_config(dotlist=[setting]))


# -- manifest -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ROW_PARAMS)
def test_manifest_limits_are_the_declared_ones(name: str, tmp_path: Path) -> None:
    p = GENERATION_PARAMS[name]
    path = tmp_path / "m.parquet"
    typ = pa.int64() if p.kind == "int" else pa.float64()
    pq.write_table(pa.table({"image": ["a.png", "b.png"], name: pa.array([p.low, p.high], typ)}), path)
    manifest.validate_manifest(str(path))
    for bad in _outside(name):
        bad_type = pa.uint64() if p.kind == "int" and bad > 2**63 - 1 else typ
        pq.write_table(pa.table({"image": ["a.png", "b.png"], name: pa.array([p.low, bad], bad_type)}), path)
        with pytest.raises(
            manifest.ManifestError, match=re.escape(f"out of range [{p.low}, {p.high}]: {bad} at row 1")
        ):
            manifest.validate_manifest(str(path))
    assert name in manifest.KNOWN_COLUMNS
    assert "decode_chunk_size" not in manifest.KNOWN_COLUMNS  # a job setting: such a column is carried


# -- results ------------------------------------------------------------------------------------


def test_results_schema_has_each_row_parameter_with_its_type() -> None:
    schema = results.RESULT_SCHEMA
    for name in ROW_PARAMS:
        assert name in schema.names and name not in results.RESERVED_COLUMNS, name  # a manifest may set it
    assert schema.field("seed").type == pa.int64() and schema.field("num_frames").type == pa.int64()
    assert schema.field("noise_aug_strength").type == pa.float64()
    assert "decode_chunk_size" not in schema.names


# -- renderer -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bare_renderer() -> Renderer:
    """A renderer without a model: the checks run before the pipeline is touched."""
    return Renderer(
        None,
        model_id="none",
        vcut_mode="off",
        device=torch.device("cpu"),
        dtype=torch.float32,
        unet_config={"num_frames": 4},
    )


@pytest.mark.parametrize("name", list(GENERATION_PARAMS))
def test_renderer_rejects_with_the_declared_range(bare_renderer: Renderer, name: str) -> None:
    image = Image.new("RGB", (8, 8))
    for bad in _outside(name):
        kw = {"seed": 0, name: bad}
        with pytest.raises(ValueError, match=re.escape(_message(name, bad))):
            bare_renderer.generate(image, **kw)
        if name == "seed":
            with pytest.raises(ValueError, match=re.escape(_message(name, bad))):
                bare_renderer.generate_batch([image], seeds=[bad])


def test_renderer_refuses_min_guidance_above_max_as_the_job_does(bare_renderer: Renderer) -> None:
    # Bug: the config and the manifest refused this; the renderer (and vcut compare) rendered it.
    with pytest.raises(ValueError, match="min_guidance_scale must be <= max_guidance_scale"):
        bare_renderer.generate(
            Image.new("RGB", (8, 8)), seed=0, min_guidance_scale=4.0, max_guidance_scale=3.0
        )


@pytest.mark.parametrize("method, seed_name", [("generate", "seed"), ("generate_batch", "seeds")])
def test_renderer_signatures_list_the_declared_parameters(method: str, seed_name: str) -> None:
    """The keyword lists stay explicit (IDE help, type hints) and cannot drift from the declaration."""
    params = inspect.signature(getattr(Renderer, method)).parameters
    own = {"self", "image", "images", "fit", "filesystem"}
    names = [n for n in params if n not in own]
    assert names[0] == seed_name and params[seed_name].default is inspect.Parameter.empty
    assert set(names[1:]) == set(GENERATION_PARAMS) - {"seed"}
    for name in names[1:]:
        assert params[name].default == GENERATION_PARAMS[name].default, (method, name)


# -- worker, runner ---------------------------------------------------------------------------


def test_the_job_resolves_and_groups_by_the_declared_names() -> None:
    generation = defaults()
    params = resolve_params({"seed": 5, "fps": None, "note": "x"}, generation)
    assert params["seed"] == 5 and params["fps"] == generation["fps"]  # a null takes the default
    assert params["num_frames"] == generation["num_frames"] and "note" not in params
    assert "decode_chunk_size" not in params  # a job setting, not a row's
    key = render_key({"seed": 5}, generation)
    assert render_key({"seed": 6}, generation) == key  # rows differing in seed only render together
    assert render_key({"seed": 5, "fps": generation["fps"] + 1}, generation) != key


# -- vcut compare, benchmarks.levers ----------------------------------------------------------


def test_compare_flags_reach_the_declared_names() -> None:
    args = build_parser().parse_args(["compare", "a.png", "--steps", "3", "--noise-aug-strength", "0.5"])
    assert args.num_inference_steps == 3 and args.noise_aug_strength == 0.5


def test_levers_use_compares_grammar() -> None:
    from benchmarks.levers import parse_config as levers_config
    from jobs.compare import CompareError, parse_config
    from jobs.levers import LeverError

    config = levers_config("full+cache3+compile")
    assert config.renderer_kwargs() == {"vcut": "full", "step_cache": 3, "compile": "default"}
    assert parse_config("full+compile+cache3") == levers_config("full+compile+cache3")
    assert levers_config("exact").renderer_kwargs() == {"vcut": "exact"}
    # Bugs: the benchmark's own copy of the grammar took these and failed later (or not at all).
    for bad in ("fulll", "full+cache1", "full+cache3+cache2"):
        with pytest.raises(LeverError):
            levers_config(bad)
        with pytest.raises(CompareError):
            parse_config(bad)


def test_the_guidance_interval_is_checked_as_a_pair_everywhere(
    bare_renderer: Renderer, tmp_path: Path
) -> None:
    message = "guidance_start must be < guidance_stop, got 0.6 >= 0.6"
    with pytest.raises(ValueError, match=message):
        check_generation(guidance_start=0.6, guidance_stop=0.6)
    with pytest.raises(ValueError, match="defaults." + message.replace("< ", "< defaults.")):
        check_config(load_config(dotlist=["defaults.guidance_start=0.6", "defaults.guidance_stop=0.6"]))
    with pytest.raises(ValueError, match=message):
        bare_renderer.generate(Image.new("RGB", (8, 8)), seed=0, guidance_start=0.6, guidance_stop=0.6)
    path = tmp_path / "m.parquet"
    pq.write_table(
        pa.table({"image": ["a", "b"], "guidance_start": [0.0, 0.7], "guidance_stop": [0.6, 0.7]}), path
    )
    with pytest.raises(
        manifest.ManifestError, match="'guidance_start' is not below 'guidance_stop' at row 1"
    ):
        manifest.validate_manifest(str(path))
    assert {"guidance_start", "guidance_stop"} <= set(BATCH_PARAMS)  # rows in one call share it
    args = build_parser().parse_args(
        ["compare", "a.png", "--guidance-start", "0.1", "--guidance-stop", "0.5"]
    )
    assert (args.guidance_start, args.guidance_stop) == (0.1, 0.5)


@pytest.mark.slow
def test_the_declaration_and_the_job_config_import_without_torch() -> None:
    code = "import sys, pipeline.params, jobs.config, jobs.manifest; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize(
    "option, value, message",
    [
        # Bug: `vcut manifest --seeds 9223372036854775808` crashed with an OverflowError traceback.
        ("seeds", 2**63, f"seed must be in [0, {SEED_MAX}], got {2**63}"),
        # Bug: written, then refused by `vcut run`.
        ("fps", 0, "fps must be in [1, 240], got 0"),
        ("num_frames", 1, "num_frames must be in [2, 1024], got 1"),
    ],
)
def test_build_manifest_refuses_values_the_run_would(option: str, value: int, message: str, tmp_path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    out = tmp_path / "m.parquet"
    with pytest.raises(manifest.ManifestError, match=re.escape(message)):
        manifest.build_manifest(str(tmp_path), str(out), **{option: [0 if option == "seeds" else 7, value]})
    assert not out.exists()
    manifest.build_manifest(str(tmp_path), str(out), seeds=[SEED_MAX], fps=[7], num_frames=[2])
    manifest.validate_manifest(str(out))
    assert pq.read_table(out).column("seed").to_pylist() == [SEED_MAX]


def test_the_worker_passes_job_parameters_to_every_call():
    """``decode_chunk_size`` (a job setting, not a column) reaches generate and generate_batch."""

    from jobs.config import load_config
    from jobs.worker import RenderWorker
    from pipeline.params import JOB_PARAMS

    assert JOB_PARAMS == ("decode_chunk_size",)
    calls: list[dict] = []

    class Recorder:
        def generate(self, image, **kw):
            calls.append(kw)
            raise RuntimeError("recorded")

    cfg = OmegaConf.to_container(load_config(dotlist=["defaults.decode_chunk_size=4"]))
    worker = RenderWorker(cfg, "w0", renderer_factory=lambda m, c: Recorder(), encoder=lambda *a, **k: 0.0)
    from jobs.planner import RowTask

    result, frames = worker._render(RowTask.from_row({"id": "x", "image": "x.png"}, cfg["defaults"]))
    assert frames is None and "recorded" in result["error"]
    assert calls and calls[0]["decode_chunk_size"] == 4
