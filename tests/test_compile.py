"""torch.compile that stays compiled: dynamo's counters over many renders on the tiny model (CPU).

Most tests compile with a counting wrapper around dynamo's ``eager`` backend: what is under
test is dynamo's guards (does a new image, seed or UNet recompile?), not code generation,
and the wrapper also proves that the compiled graph is what runs. One test uses the real
default backend (inductor) and compares its frames with eager ones.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import numpy as np
import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from PIL import Image
from torch._dynamo.utils import counters

from pipeline import Renderer
from pipeline.compile import (
    COMPILE_MODES,
    CompileWatch,
    RecompileError,
    compile_count,
    compile_mode,
    compiled_mode,
    no_recompiles,
)
from vcut.tiny import make_tiny_pipeline

SHAPE = dict(height=64, width=64, num_frames=4, num_inference_steps=2)
NEW_IMAGES = 10


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (64, 64, 3), dtype=np.uint8))


class CountingBackend:
    """dynamo backend: runs the captured graph eagerly and counts graphs and graph runs."""

    def __init__(self) -> None:
        self.graphs = 0
        self.runs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1

        def run(*args):
            self.runs += 1
            return gm.forward(*args)

        return run


@pytest.fixture(scope="module")
def tiny_pipe():
    return make_tiny_pipeline()


def _renderer(tiny_pipe, mode: str, backend: CountingBackend, **kw) -> Renderer:
    return Renderer.from_pipe(
        copy.deepcopy(tiny_pipe), vcut=mode, compile=True, compile_backend=backend, **kw
    )


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def test_compile_values() -> None:
    assert compile_mode(False) == compile_mode(None) == compile_mode("off") == "off"
    assert compile_mode(True) == "default"
    for mode in COMPILE_MODES:
        assert compile_mode(mode) == mode
    for bad in ("fast", "max_autotune", 1, "True"):
        with pytest.raises(ValueError, match=repr(bad)):
            compile_mode(bad)


def test_bad_compile_value_raises_before_loading(tiny_model_dir, tiny_pipe) -> None:
    with pytest.raises(ValueError, match="'fast'"):
        Renderer.from_pretrained(tiny_model_dir / "does-not-exist", compile="fast")
    with pytest.raises(ValueError, match="'reduce_overhead'"):
        Renderer.from_pipe(copy.deepcopy(tiny_pipe), vcut="exact", compile="reduce_overhead")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["off", "exact", "full"])
def test_no_recompile_for_new_images_and_seeds(tiny_pipe, mode: str, caplog) -> None:
    backend = CountingBackend()
    r = _renderer(tiny_pipe, mode, backend)
    unet = r.pipe.unet
    assert isinstance(unet, UNetSpatioTemporalConditionModel) and compiled_mode(unet) == "default"
    breaks = _graph_breaks()

    first = r.generate(_image(0), seed=0, **SHAPE)
    assert backend.graphs == 1  # the whole UNet forward is one graph ...
    assert _graph_breaks() == breaks  # ... without a graph break
    assert backend.runs == SHAPE["num_inference_steps"]
    assert first.timings["compile"] > 0 and r.compile_seconds == first.timings["compile"]

    before = compile_count()
    with caplog.at_level(logging.WARNING, logger="pipeline.renderer"):
        for i in range(1, NEW_IMAGES + 1):
            gen = r.generate(_image(100 + i), seed=i, **SHAPE)
            assert gen.timings["compile"] == 0.0
    assert compile_count() - before == 0, "recompiled for a new image or seed"
    assert backend.graphs == 1
    # Every UNet call of every video ran the compiled graph: nothing fell back to eager.
    assert backend.runs == (NEW_IMAGES + 1) * SHAPE["num_inference_steps"]
    assert not [rec for rec in caplog.records if "recompiled" in rec.getMessage()]


@pytest.mark.slow
@torch._dynamo.config.patch(recompile_limit=1)
def test_differently_patched_unets_each_stay_compiled(tiny_pipe) -> None:
    # One entry per UNet allowed: with a limit shared per code object (every UNet forward
    # has the same one) the second UNet's first compile would be over it and run eagerly.
    backends = {mode: CountingBackend() for mode in ("off", "exact", "full")}
    renderers = {
        mode: _renderer(tiny_pipe, mode, backends[mode], compile_vae=mode == "full") for mode in backends
    }
    assert compiled_mode(renderers["full"].pipe.vae.decoder) == "default"
    assert compiled_mode(renderers["exact"].pipe.vae.decoder) is None  # compile_vae=None: not on CPU
    for r in renderers.values():
        r.generate(_image(0), seed=0, **SHAPE)
    graphs = {mode: b.graphs for mode, b in backends.items()}
    assert graphs == {"off": 1, "exact": 1, "full": 2}  # full: UNet and VAE decoder

    before = compile_count()
    runs = {mode: b.runs for mode, b in backends.items()}
    rounds = 3
    for i in range(1, rounds + 1):  # interleaved: each UNet's cache must keep its own entry
        for r in renderers.values():
            r.generate(_image(200 + i), seed=i, **SHAPE)
    assert compile_count() == before
    steps = SHAPE["num_inference_steps"]
    for mode, b in backends.items():
        calls_per_video = steps + (1 if mode == "full" else 0)  # + one VAE decode of all frames
        assert b.runs - runs[mode] == rounds * calls_per_video, mode
        assert b.graphs == graphs[mode], mode


@pytest.mark.slow
def test_a_recompile_is_detected_and_logged(tiny_pipe, caplog) -> None:
    backend = CountingBackend()
    r = _renderer(tiny_pipe, "exact", backend)
    r.generate(_image(0), seed=0, **SHAPE)
    with no_recompiles("warm renders") as watch:
        r.generate(_image(1), seed=1, **SHAPE)
    assert watch.compiles == 0
    # Changing global state that dynamo guards forces a recompile: it must not be silent.
    torch.use_deterministic_algorithms(True)
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.renderer"):
            r.generate(_image(2), seed=2, **SHAPE)
    finally:
        torch.use_deterministic_algorithms(False)  # back to the first entry
    assert any("recompiled" in rec.getMessage() for rec in caplog.records)
    with pytest.raises(RecompileError, match="first render"):
        with no_recompiles("first render"):
            _renderer(tiny_pipe, "exact", CountingBackend()).generate(_image(0), seed=0, **SHAPE)
    with CompileWatch() as watch:
        r.generate(_image(3), seed=3, **SHAPE)
    assert watch.compiles == 0 and watch.seconds == 0.0


@pytest.mark.slow
def test_user_compiled_unet_stays_compiled(tiny_pipe) -> None:
    """``torch.compile(pipe.unet)`` and ``pipe.unet.compile()`` also survive new images (documented)."""
    import vcut

    backends = [CountingBackend(), CountingBackend()]
    pipes = []
    for how, backend in zip(("wrap", "method"), backends, strict=True):
        pipe = copy.deepcopy(tiny_pipe)
        pipe.set_progress_bar_config(disable=True)
        vcut.apply_vcut(pipe, "exact" if how == "wrap" else "full")
        if how == "wrap":
            pipe.unet = torch.compile(pipe.unet, backend=backend)
        else:
            pipe.unet.compile(backend=backend)
        pipes.append(pipe)
    kw = dict(SHAPE, output_type="np")
    for pipe in pipes:
        pipe(_image(0), generator=torch.Generator().manual_seed(0), **kw)
    before = compile_count()
    for i in range(1, 4):
        for pipe in pipes:
            pipe(_image(300 + i), generator=torch.Generator().manual_seed(i), **kw)
    assert compile_count() == before
    assert [b.graphs for b in backends] == [1, 1]
    assert [b.runs for b in backends] == [4 * SHAPE["num_inference_steps"]] * 2


@pytest.mark.slow
def test_inductor_frames_equal_eager_frames(tiny_pipe) -> None:
    """The real default backend (inductor, C++ on CPU): frames within 1 uint8 level of eager."""
    eager = Renderer.from_pipe(copy.deepcopy(tiny_pipe), vcut="exact")
    compiled = Renderer.from_pipe(copy.deepcopy(tiny_pipe), vcut="exact", compile="default")
    for i, seed in ((0, 0), (1, 5)):
        got = compiled.generate(_image(400 + i), seed=seed, **SHAPE)
        want = eager.generate(_image(400 + i), seed=seed, **SHAPE)
        assert np.abs(got.frames.astype(int) - want.frames.astype(int)).max() <= 1
        assert (got.timings["compile"] > 0) == (i == 0)
    assert compiled.compile_seconds > 0


def test_job_config_compile() -> None:
    from jobs.config import check_config, load_config, model_compile_mode

    assert load_config().model.compile == "off"
    for value, mode in (("true", "default"), ("false", "off"), ("max-autotune", "max-autotune")):
        cfg = load_config(dotlist=[f"model.compile={value}"])
        check_config(cfg)
        assert model_compile_mode(cfg.model.compile) == mode
    assert model_compile_mode(True) == "default" and model_compile_mode(False) == "off"
    with pytest.raises(ValueError, match="model.compile.*'fast'"):
        check_config(load_config(dotlist=["model.compile=fast"]))
