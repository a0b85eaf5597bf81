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
from omegaconf import OmegaConf
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

    assert load_config().model.compile == "auto"  # issue 18: fast by default where it pays
    assert model_compile_mode("auto") == "auto"
    for value, mode in (("true", "default"), ("false", "off"), ("max-autotune", "max-autotune")):
        cfg = load_config(dotlist=[f"model.compile={value}"])
        check_config(cfg)
        assert model_compile_mode(cfg.model.compile) == mode
    assert model_compile_mode(True) == "default" and model_compile_mode(False) == "off"
    with pytest.raises(ValueError, match="model.compile.*'fast'"):
        check_config(load_config(dotlist=["model.compile=fast"]))


# -- compile=auto ----------------------------------------------------------------------------
def test_compile_pays_on_cuda_only_from_the_measured_break_even() -> None:
    from pipeline.compile import H200_SVD_XT, CompilePayback, compile_pays

    cold, warm = H200_SVD_XT.rows_needed(cached=False), H200_SVD_XT.rows_needed(cached=True)
    assert 1 < warm < cold  # a cache entry makes a compile pay back sooner
    for cached, needed in ((False, cold), (True, warm)):
        assert compile_pays("cuda", needed, cached) and compile_pays("cuda", needed * 10, cached)
        assert not compile_pays("cuda", needed - 1, cached)
        assert not compile_pays("cpu", needed * 1000, cached)  # never on a CPU
        assert not compile_pays("mps", needed * 1000, cached)
    assert compile_pays("cuda", None, False) and not compile_pays("cpu", None, True)
    # the rule is the payback arithmetic, not a constant: 100 s to compile, 2 s saved per video
    fig = CompilePayback(cold_s=100.0, warm_s=10.0, saved_per_video_s=2.0)
    assert fig.rows_needed(False) == 50 and fig.rows_needed(True) == 5
    assert compile_pays("cuda", 50, False, fig) and not compile_pays("cuda", 49, False, fig)


def test_auto_resolves_before_torch_ever_sees_it(tiny_pipe) -> None:
    from pipeline.compile import compile_module, compile_pipeline, resolve_compile

    assert resolve_compile("auto", device_kind="cpu", rows_per_worker_per_shape=10**6) == "off"
    assert resolve_compile("auto", device_kind="cuda", rows_per_worker_per_shape=10**6) == "default"
    assert resolve_compile("auto", device_kind="cuda", rows_per_worker_per_shape=1) == "off"
    assert resolve_compile("max-autotune", device_kind="cpu") == "max-autotune"  # explicit wins
    assert resolve_compile(False, device_kind="cuda") == "off"
    with pytest.raises(ValueError, match="resolve it first"):
        compile_module(torch.nn.Linear(2, 2), "auto")
    with pytest.raises(ValueError, match="resolve it first"):
        compile_pipeline(copy.deepcopy(tiny_pipe), "auto")
    # A renderer resolves it: on this CPU, auto renders eagerly with no compile cache.
    r = Renderer.from_pipe(
        copy.deepcopy(tiny_pipe), vcut="exact", compile="auto", compile_cache="/nonexistent"
    )
    assert r.compile_mode == "off" and r.compile_cache is None and compiled_mode(r.pipe.unet) is None


def _key(**kw):
    from pipeline.compile_cache import cache_key

    base = dict(
        model_id="m",
        vcut_mode="full",
        step_cache=None,
        step_cache_depth=1,
        dtype=torch.float32,
        device="cpu",
        mode="default",
        backend="inductor",
        vae=False,
    )
    return cache_key(**{**base, **kw})


class FakeTorchCache:
    """torch.compiler.save/load_cache_artifacts stand-ins: what was saved, what was loaded."""

    def __init__(self, monkeypatch, payload: bytes = b"artifacts-1", accept: bool = True) -> None:
        self.payload = payload
        self.loaded: list[bytes] = []
        self.accept = accept
        monkeypatch.setattr(torch.compiler, "save_cache_artifacts", self.save)
        monkeypatch.setattr(torch.compiler, "load_cache_artifacts", self.load)

    def save(self):
        return (self.payload, object()) if self.payload is not None else None

    def load(self, data: bytes):
        self.loaded.append(bytes(data))
        return object() if self.accept else None


REAL_LOAD = torch.compiler.load_cache_artifacts
SHAPE_A = (1, 64, 64, 4, None, True)
SHAPE_B = (2, 64, 64, 4, None, True)


def test_first_worker_saves_later_workers_load(tmp_path, monkeypatch) -> None:
    from pipeline.compile_cache import CompileCache

    fake = FakeTorchCache(monkeypatch)
    first = CompileCache(str(tmp_path), _key())
    assert not first.has_entries()
    first.before_call(SHAPE_A)  # nothing there yet: a miss, no warning
    first.after_call(SHAPE_A, compiled=True)
    assert first.stats.saved == 1 and first.has_entries()
    first.after_call(SHAPE_A, compiled=True)  # the shape's entry is written once per process
    first.before_call(SHAPE_B)
    first.after_call(SHAPE_B, compiled=False)  # nothing compiled: nothing to save
    assert first.entries() == [CompileCache.entry_name(SHAPE_A)] and first.stats.saved == 1

    second = CompileCache(str(tmp_path), _key())  # another worker, or a later job
    second.before_call(SHAPE_A)
    assert fake.loaded == [b"artifacts-1"] and second.stats.loaded == 1
    second.before_call(SHAPE_A)  # once per shape
    second.after_call(SHAPE_A, compiled=True)  # loaded: not written again
    assert len(fake.loaded) == 1 and second.stats.saved == 0
    # another setup (here: another VCUT mode) has its own folder: no entry of the first's
    other = CompileCache(str(tmp_path), _key(vcut_mode="exact"))
    assert other.uri != first.uri and not other.has_entries()
    # no half-written file or temporary anywhere
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name.startswith(".")]


def _corrupt(kind: str, data: bytes) -> bytes:
    if kind == "truncated":
        return data[:-3]
    if kind == "flipped":
        return data[:-1] + bytes([data[-1] ^ 0xFF])
    if kind == "foreign":
        return b"PK\x03\x04 a zip, not an entry"
    if kind == "header":
        return data.split(b"\n", 1)[0] + b"\n{not json\n" + b"x"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["truncated", "flipped", "foreign", "header", "other-key", "refused", "raises", "torch-garbage"]
)
def test_a_bad_entry_is_one_warning_and_a_cold_compile(tmp_path, monkeypatch, caplog, kind) -> None:
    from pipeline.compile_cache import CompileCache

    fake = FakeTorchCache(monkeypatch)
    writer = CompileCache(str(tmp_path), _key())
    writer.before_call(SHAPE_A)
    writer.after_call(SHAPE_A, compiled=True)
    entry = next(tmp_path.rglob("*.bin"))
    if kind in ("truncated", "flipped", "foreign", "header"):
        entry.write_bytes(_corrupt(kind, entry.read_bytes()))
    elif kind == "other-key":  # e.g. copied from a machine with another torch
        entry.write_bytes(CompileCache(str(tmp_path), _key(dtype=torch.float16)).encode(SHAPE_A, b"x"))
    elif kind == "refused":
        fake.accept = False
    elif kind == "torch-garbage":  # passes our checks; torch's own deserializer fails on it
        entry.write_bytes(writer.encode(SHAPE_A, b"\x00\x01 not torch's format"))
        monkeypatch.setattr(torch.compiler, "load_cache_artifacts", REAL_LOAD)
    elif kind == "raises":
        monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: 1 / 0)

    reader = CompileCache(str(tmp_path), _key())
    with caplog.at_level(logging.INFO, logger="pipeline.compile_cache"):
        reader.before_call(SHAPE_A)  # never raises
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "compiling cold" in warnings[0].getMessage() and entry.name in warnings[0].getMessage()
    assert reader.stats.ignored == 1 and reader.stats.loaded == 0
    if kind != "refused":
        assert fake.loaded == []  # a corrupt or foreign blob never reaches torch
    reader.after_call(SHAPE_A, compiled=True)  # it compiled cold: its own good entry replaces it
    assert reader.stats.saved == 1
    third = CompileCache(str(tmp_path), _key())
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", fake.load)
    fake.accept = True
    third.before_call(SHAPE_A)
    assert third.stats.loaded == 1


def test_an_unusable_cache_location_never_fails(tmp_path, monkeypatch, caplog) -> None:
    from pipeline.compile_cache import CompileCache

    FakeTorchCache(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    cache = CompileCache(str(blocker), _key())
    with caplog.at_level(logging.WARNING, logger="pipeline.compile_cache"):
        assert not cache.has_entries()
        cache.before_call(SHAPE_A)
        cache.after_call(SHAPE_A, compiled=True)
    assert cache.stats.saved == 0
    assert [r.getMessage() for r in caplog.records if "could not save" in r.getMessage()]
    assert all("\n" not in r.getMessage() for r in caplog.records)
    unknown = CompileCache("nosuchprotocol://bucket/cache", _key())  # fsspec has no such filesystem
    with caplog.at_level(logging.WARNING, logger="pipeline.compile_cache"):
        assert not unknown.has_entries()
        unknown.before_call(SHAPE_A)
        unknown.after_call(SHAPE_A, compiled=True)
    assert unknown.stats.ignored == 1 and unknown.stats.saved == 0


def test_concurrent_writers_leave_one_whole_entry(tmp_path, monkeypatch) -> None:
    import threading

    from pipeline.compile_cache import CompileCache

    payloads = [bytes([i]) * (1 << 20) for i in range(6)]  # 1 MiB each: writes overlap
    barrier = threading.Barrier(len(payloads))
    encoded = {}

    def write(i: int) -> None:
        cache = CompileCache(str(tmp_path), _key())
        data = cache.encode(SHAPE_A, payloads[i])
        encoded[i] = data
        barrier.wait()
        from pipeline.storage import put_atomic

        put_atomic(None, cache._join(CompileCache.entry_name(SHAPE_A)), data)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].read_bytes() in encoded.values()  # whole, one writer's
    fake = FakeTorchCache(monkeypatch)
    CompileCache(str(tmp_path), _key()).before_call(SHAPE_A)
    assert fake.loaded and fake.loaded[0] in payloads


def test_compile_cache_on_object_storage(monkeypatch) -> None:
    from conftest import moto_s3

    from pipeline.compile_cache import CompileCache

    fake = FakeTorchCache(monkeypatch, payload=b"s3-artifacts")
    with moto_s3(monkeypatch) as fs:
        fs.mkdir("cache-bucket")
        first = CompileCache("s3://cache-bucket/job/compile-cache", _key())
        assert not first.has_entries()
        first.before_call(SHAPE_A)
        first.after_call(SHAPE_A, compiled=True)
        fs.invalidate_cache()
        second = CompileCache("s3://cache-bucket/job/compile-cache", _key())
        assert second.has_entries()
        second.before_call(SHAPE_A)
        assert fake.loaded == [b"s3-artifacts"] and second.stats.loaded == 1


def test_auto_counts_a_cache_entry_as_a_warm_compile(tmp_path, monkeypatch) -> None:
    import pipeline.compile_cache as cc
    from pipeline.compile import H200_SVD_XT

    FakeTorchCache(monkeypatch)
    monkeypatch.setattr(cc, "device_tag", lambda device: "cuda-sm90-test")  # no GPU here
    cuda = torch.device("cuda")
    key = dict(model_id="m", vcut_mode="full", step_cache=None, step_cache_depth=1, dtype=torch.float16)
    rows = H200_SVD_XT.rows_needed(cached=True)  # enough with an entry, not without
    plan = dict(cache_uri=str(tmp_path), device=cuda, backend="inductor", vae=None, **key)
    mode, cache = cc.plan_compile("auto", rows_per_worker_per_shape=rows, **plan)
    assert mode == "off" and cache is None
    mode, cache = cc.plan_compile("default", rows_per_worker_per_shape=1, **plan)  # explicit: compiles
    assert mode == "default" and cache is not None and cache.key["vae"] is True  # VAE compiled on CUDA
    cache.before_call(SHAPE_A)
    cache.after_call(SHAPE_A, compiled=True)
    mode, cache = cc.plan_compile("auto", rows_per_worker_per_shape=rows, **plan)
    assert mode == "default" and cache is not None and cache.key["compile"] == "default"
    mode, _ = cc.plan_compile("auto", rows_per_worker_per_shape=rows - 1, **plan)
    assert mode == "off"
    mode, cache = cc.plan_compile("auto", rows_per_worker_per_shape=None, **{**plan, "cache_uri": None})
    assert mode == "default" and cache is None  # unknown rows (a renderer used directly): compiles


def test_job_config_compile_cache(tmp_path, monkeypatch) -> None:
    from jobs.config import check_config, compile_cache_uri, load_config

    default = str(tmp_path / "out" / "compile-cache")
    assert load_config().model.compile_cache is None
    assert compile_cache_uri(load_config().model.compile_cache, default) == default
    for off in ("off", "false", "OFF"):
        cfg = load_config(dotlist=[f"model.compile_cache={off}"])
        check_config(cfg)
        assert compile_cache_uri(cfg.model.compile_cache, default) is None
    assert compile_cache_uri("s3://b/cc", default) == "s3://b/cc"
    monkeypatch.chdir(tmp_path)
    assert compile_cache_uri("cc", default) == str(tmp_path / "cc")  # workers have another cwd
    assert compile_cache_uri("file://" + str(tmp_path / "x"), default) == str(tmp_path / "x")


def test_worker_reports_startup_and_compile_seconds(tiny_model_dir, tmp_path) -> None:
    from jobs.config import load_config
    from jobs.worker import RenderWorker

    class Gen:
        frames = np.zeros((4, 64, 64, 3), dtype=np.uint8)
        timings = {"total": 2.0, "denoise": 1.5, "compile": 1.25}
        num_inference_steps = 2
        fps = 7
        cache_hit = False

    class Fake:
        compile_mode = "default"
        device = "cpu"

        def generate(self, image, **kw):
            return Gen()

    cfg = OmegaConf.to_container(load_config(dotlist=[f"model.id={tiny_model_dir}"]), enum_to_str=True)
    worker = RenderWorker(cfg, "w0", renderer_factory=lambda m, c: Fake(), encoder=lambda *a, **k: 0.0)
    info = worker.info()
    assert info["startup_seconds"] >= 0 and info["compile"] == "default"
    from jobs.planner import RowTask

    image = tmp_path / "x.png"
    _image(0).save(image)  # the worker loads a task's image before rendering it
    row = {"id": "a", "image": str(image), "seed": 1}
    task = RowTask.from_row(row, cfg["defaults"], output=str(tmp_path / "a.mp4"))
    (result,) = worker.render_batch([task])
    assert result["status"] == "ok" and result["compile_seconds"] == 1.25
    from jobs.results import RESULT_SCHEMA

    assert RESULT_SCHEMA.field("compile_seconds").type == "double"


@pytest.mark.slow
def test_a_renderer_loads_the_entry_before_its_first_call_and_saves_after(tiny_pipe, tmp_path, monkeypatch):
    fake = FakeTorchCache(monkeypatch, payload=b"renderer-artifacts")
    first_backend = CountingBackend()
    first = _renderer(tiny_pipe, "full", first_backend, compile_cache=str(tmp_path))
    first.generate(_image(0), seed=0, **SHAPE)
    assert first_backend.graphs == 1 and first.compile_cache.stats.saved == 1 and fake.loaded == []
    (entry,) = tmp_path.rglob("*.bin")
    assert f"{SHAPE['height']}-{SHAPE['width']}-{SHAPE['num_frames']}" in entry.name

    second_backend = CountingBackend()
    graphs_at_load: list[int] = []
    real_load = fake.load
    monkeypatch.setattr(
        torch.compiler,
        "load_cache_artifacts",
        lambda data: (graphs_at_load.append(second_backend.graphs), real_load(data))[1],
    )
    second = _renderer(tiny_pipe, "full", second_backend, compile_cache=str(tmp_path))
    second.generate(_image(1), seed=1, **SHAPE)
    second.generate(_image(2), seed=2, **SHAPE)
    assert fake.loaded == [b"renderer-artifacts"] and graphs_at_load == [0]  # before its compile
    assert second.compile_cache.stats.saved == 0  # it loaded: nothing written again
    other = _renderer(tiny_pipe, "exact", CountingBackend(), compile_cache=str(tmp_path))
    assert other.compile_cache.uri != first.compile_cache.uri  # another VCUT mode: another key


_REAL_WORKER = """
import json, sys, torch
from torch._dynamo.utils import counters
from pipeline.compile import compile_module
from pipeline.compile_cache import CompileCache, cache_key
key = cache_key(model_id="mlp", vcut_mode="off", step_cache=None, step_cache_depth=1,
                dtype=torch.float32, device="cpu", mode="default", backend="inductor", vae=False)
cache = CompileCache(sys.argv[1], key)
torch.manual_seed(0)
m = compile_module(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 2)))
shape = (2, 8)
cache.before_call(shape)
with torch.inference_mode():
    m(torch.randn(*shape))
cache.after_call(shape, compiled=True)
print(json.dumps({"stats": vars(cache.stats), "inductor": dict(counters["inductor"]),
                  "aot": dict(counters["aot_autograd"])}))
"""


@pytest.mark.slow
def test_real_artifacts_make_a_fresh_process_hit_torchs_caches(tmp_path) -> None:
    """torch's own save/load through the cache: a second process with an empty inductor cache
    gets AOTAutograd and FX-graph cache hits (a small MLP: inductor on CPU is slow)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "worker.py"
    script.write_text(_REAL_WORKER)
    runs = []
    for i in range(2):
        env = dict(
            os.environ,
            PYTHONPATH=str(root),
            TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"inductor-{i}"),  # each its own, empty
            TORCHINDUCTOR_COMPILE_THREADS="1",
        )
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "cache")], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    assert cold["stats"]["saved"] == 1 and cold["inductor"].get("fxgraph_cache_miss", 0) >= 1
    assert warm["stats"]["loaded"] == 1 and warm["stats"]["saved"] == 0
    assert warm["inductor"].get("fxgraph_cache_hit", 0) >= 1 and not warm["inductor"].get(
        "fxgraph_cache_miss"
    )
    assert warm["aot"].get("autograd_cache_hit", 0) >= 1


def test_the_driver_gives_workers_the_jobs_compile_cache(tmp_path) -> None:
    from jobs.config import load_config
    from jobs.runner import Runner

    out = tmp_path / "out"
    runner = Runner(load_config(), str(tmp_path / "m.csv"), str(out))
    assert runner.cfg_dict["model"]["compile_cache"] == str(out / "compile-cache")
    off = Runner(load_config(dotlist=["model.compile_cache=off"]), str(tmp_path / "m.csv"), str(out))
    assert off.cfg_dict["model"]["compile_cache"] is None
    shared = Runner(load_config(dotlist=["model.compile_cache=s3://b/cc"]), str(tmp_path / "m.csv"), str(out))
    assert shared.cfg_dict["model"]["compile_cache"] == "s3://b/cc"
