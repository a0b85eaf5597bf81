"""Whole SVD-XT videos on one GPU (random weights): seconds per video for each lever, memory, MFU.

Run it through ``benchmarks/gpu.sh`` (which brings diffusers where the GPU machine lacks
it); directly::

    python -m benchmarks.gpu_bench                      # cuda, SVD-XT at 576x1024, 25 frames, fp16
    python -m benchmarks.gpu_bench --device cpu --tiny  # the same code path, tiny model, CPU

The model is SVD-XT's architecture built from its published configs with random weights,
on the device, with no download: the UNet (diffusers' default config with 25 frames),
the temporal VAE, the ViT-H/14 CLIP image encoder, the CLIP image processor and the Euler
scheduler. fp16 on CUDA (as the Renderer loads a checkpoint), fp32 on a CPU.

Stages, in this order; the JSON (and a Markdown table beside it) is written, and copied to
``--copy-to``, after every stage, so a run cut short keeps what it measured:

0. ``build``: environment, components, the features of the project code found (compile
   modes, ``step_cache``, ``generate_batch``, ``count_macs(step_cache=)``).
1. ``stock``: stock diffusers ``StableVideoDiffusionPipeline.__call__`` (no project code).
2. ``eager``: the Renderer (``Renderer.from_pipe``) with VCUT ``off``, ``exact``, ``full``
   and, where available, ``full`` + step cache.
3. ``compile``: ``full`` + ``torch.compile`` (``--compile-mode``, default "default"); the
   first video (the compilation) is timed apart, then timed videos with recompiles made
   an error and the number of graphs compiled during them recorded (0 expected).
4. ``compile_step_cache``: ``full`` + compile + step cache ``--step-cache`` (default 3).
5. ``whole_video``: one whole ``--steps-per-video`` (25) step video of the fastest
   configuration measured, next to its extrapolated figure.
6. ``batched``: ``--batch-size`` rows (default 4) in one ``generate_batch`` call versus one
   row per call, at 320x512, 14 frames, with the fastest eager Renderer: videos per second.
7. ``macs``: MACs per UNet step of each configuration (``vcut.count_macs``, attention kernels
   counted) and model FLOP utilisation = 2 x MACs / seconds per step / the GPU's dense peak.

How a configuration is timed: one warm-up video, then whole videos (conditioning, denoising,
VAE decode of all frames at once, conversion) at ``S1`` and ``S2`` denoising steps (``--steps``,
default 2,6; a step-cache configuration uses N and 3N, whole cycles of its schedule). Per
step = (t(S2) - t(S1)) / (S2 - S1), fixed = t(S1) - S1 x per step (conditioning + decode),
and a 25-step video = fixed + 25 x per step. The raw seconds are in the JSON. Every video
has its own input image (no embedding-cache hits), and each configuration uses the same
images and seeds, so the frames of the configurations are compared with stock diffusers'.

Budget: ``--budget-s`` (default 430) from the start; a stage starts only if its estimate
fits in what is left after the time kept for the stages after it, and a stage that can
run long (compilation) runs under a hard limit (SIGALRM) that ends it and moves on. Skipped
stages are listed in ``stages_skipped`` with the reason. ``gpu.sh`` kills the process at
``GPU_BENCH_TIMEOUT_S`` (default 470 s).

Weights are RANDOM: these are speed figures, not videos.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import inspect
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import unet_ab
from benchmarks.common import REPO_ROOT, RESULTS_DIR, header, machine_info, write_json
from vcut.modes import MODES

STEPS_PER_VIDEO = 25

#: The VAE of the published SVD / SVD-XT checkpoints (vae/config.json).
SVD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "force_upcast": True,
}

#: The image encoder of the published SVD / SVD-XT checkpoints (image_encoder/config.json):
#: OpenCLIP ViT-H/14's vision tower as transformers' ``CLIPVisionModelWithProjection``.
SVD_IMAGE_ENCODER_CONFIG = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "num_channels": 3,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 1024,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}

#: The feature extractor of the published checkpoints (feature_extractor/preprocessor_config.json).
#: SVD's pipeline resizes the image itself and asks this only to normalise.
SVD_FEATURE_EXTRACTOR_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 224},
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Shape:
    height: int
    width: int
    num_frames: int

    def label(self) -> str:
        return f"{self.width}x{self.height}, {self.num_frames} frames"


SHAPES = {
    "full": Shape(576, 1024, 25),  # SVD-XT as published
    "batched": Shape(320, 512, 14),
    "tiny": Shape(64, 64, 4),  # the tiny test model (its VAE halves the image)
    "tiny-batched": Shape(32, 32, 4),
}


# -- peak FLOP/s ------------------------------------------------------------------------------

#: Dense (no sparsity) fp16/bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s.
PEAK_TFLOPS = {
    "H100 SXM": 989.4,
    "H100 NVL": 835.6,
    "H100 PCIe": 756.0,
    "H200": 989.4,
    "H200 NVL": 835.6,
}


def identify_gpu(
    name: str, multiprocessors: int | None = None, memory_bytes: int | None = None
) -> str | None:
    """Which entry of :data:`PEAK_TFLOPS` a GPU is, from its name, SM count and memory; None if unknown.

    ``torch.cuda.get_device_name()`` says e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100
    PCIe", "NVIDIA H100 NVL", "NVIDIA H200". Where the name does not say the form factor, the
    SM count does (PCIe 114, SXM and NVL 132) and then the memory (NVL 94 GB, SXM 80 GB).
    """
    n = name.upper()
    if "H200" in n:
        return "H200 NVL" if "NVL" in n else "H200"
    if "H100" not in n or "GH100" in n:
        return None
    if "PCIE" in n:
        return "H100 PCIe"
    if "NVL" in n:
        return "H100 NVL"
    if "SXM" in n or "HBM3" in n:
        return "H100 SXM"
    if multiprocessors == 114:
        return "H100 PCIe"
    if multiprocessors == 132 and memory_bytes:
        return "H100 NVL" if memory_bytes > 88 * 2**30 else "H100 SXM"
    return None


def peak_info(device: str, dtype_name: str, override: float | None) -> dict[str, Any]:
    """The dense peak used for MFU, with where it came from."""
    out: dict[str, Any] = {"dtype": dtype_name, "fp16_tflops": None, "tflops": None, "source": None}
    if override:
        out.update(fp16_tflops=override, tflops=override, source="given with --peak-tflops")
        return out
    if not device.startswith("cuda"):
        out["source"] = "no peak on a CPU: MFU not computed"
        return out
    props = torch.cuda.get_device_properties(0)
    gpu = identify_gpu(props.name, props.multi_processor_count, props.total_memory)
    out["gpu"] = props.name
    if gpu is None:
        out["source"] = f"unknown GPU {props.name!r}: no peak known, MFU not computed (use --peak-tflops)"
        return out
    peak = PEAK_TFLOPS[gpu]
    out["fp16_tflops"] = peak
    # Hopper's dense bf16 and fp16 tensor-core peaks are the same; fp32 runs on TF32 or CUDA cores.
    out["tflops"] = peak if dtype_name in ("fp16", "bf16") else None
    out["source"] = f"data-sheet dense fp16/bf16 tensor-core peak of the {gpu}"
    return out


# -- small machinery ---------------------------------------------------------------------------


class StageTimeout(BaseException):
    """A stage ran past its hard limit (a BaseException, so that no library swallows it)."""


@contextlib.contextmanager
def hard_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`StageTimeout` in the main thread after ``seconds`` (SIGALRM); None = no limit."""
    if seconds is None or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise StageTimeout(f"stopped at its hard limit of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(0.5, float(seconds)))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def dynamo_counts() -> dict[str, int]:
    """Graphs compiled so far, frames converted, graph breaks (torch._dynamo's counters)."""
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "frames_ok": int(counters["frames"]["ok"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def graph_break_reasons(limit: int = 5) -> list[str]:
    from torch._dynamo.utils import counters

    items = sorted(counters["graph_break"].items(), key=lambda kv: -kv[1])[:limit]
    return [f"{count}x {reason[:200]}" for reason, count in items]


@dataclass(frozen=True)
class Runner:
    """One configuration's call: ``inputs(index, shape)`` before the clock, ``run(steps, inputs,
    index, shape)`` timed, ``inspect(output, steps, index, shape) -> info`` after it."""

    inputs: Callable[[int, Shape], Any]
    run: Callable[[int, Any, int, Shape], Any]
    inspect: Callable[[Any, int, int, Shape], dict[str, Any]]


class RecompiledDuringTiming(RuntimeError):
    pass


@contextlib.contextmanager
def forbid_recompiles(record: dict[str, Any]) -> Iterator[None]:
    """Timed rounds of a compiled model: a recompile raises, and a new graph is an error too.

    Sets ``torch._dynamo.config.error_on_recompile`` (a guard failure raises
    ``RecompileError`` instead of compiling again) and checks afterwards that no graph was
    compiled at all (a first compile of another frame is no "recompile" but would be timed
    too). Writes ``graphs_compiled_during_timing`` into ``record``.
    """
    import torch._dynamo

    before = dynamo_counts()
    old = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        yield
    finally:
        torch._dynamo.config.error_on_recompile = old
        after = dynamo_counts()
        record["graphs_compiled_during_timing"] = after["unique_graphs"] - before["unique_graphs"]
        record["graph_breaks_during_timing"] = after["graph_breaks"] - before["graph_breaks"]
    if record["graphs_compiled_during_timing"]:
        raise RecompiledDuringTiming(
            f"{record['graphs_compiled_during_timing']} graph(s) compiled during the timed videos"
        )


@contextlib.contextmanager
def compile_shim(
    backend: str | None, record: dict[str, Any], supported: set[str] | None = None
) -> Iterator[None]:
    """``torch.compile`` as the Renderer calls it, made to run on this torch.

    * keywords this torch's ``torch.compile`` lacks are dropped and listed in
      ``record["compile_kwargs_dropped"]`` (``recompile_limit`` and ``isolate_recompiles``
      came with torch 2.13; the GPU machine has 2.11: without them each compiled module
      shares dynamo's per-code-object cache, which the few graphs here fit);
    * ``backend`` (where the Renderer takes none itself) replaces the backend; a backend other
      than inductor gets no ``mode`` or ``options`` (the quick CPU path uses "eager").
    """
    real = torch.compile
    if supported is None:
        supported = set(inspect.signature(real).parameters)

    def patched(model=None, **kwargs):
        dropped = sorted(k for k in kwargs if k not in supported)
        for k in dropped:
            kwargs.pop(k)
        if dropped:
            record["compile_kwargs_dropped"] = sorted(
                set(record.get("compile_kwargs_dropped", [])) | set(dropped)
            )
        if backend is not None:
            kwargs["backend"] = backend
        if kwargs.get("backend", "inductor") != "inductor":
            kwargs.pop("mode", None)
            kwargs.pop("options", None)
        return real(model, **kwargs)

    torch.compile = patched
    try:
        yield
    finally:
        torch.compile = real


def reset_dynamo() -> None:
    import torch._dynamo

    torch._dynamo.reset()


def stop_compile_workers() -> None:
    """End inductor's compile worker processes (after a stopped compile they would run on)."""
    try:
        from torch._inductor.async_compile import shutdown_compile_workers

        shutdown_compile_workers()
    except Exception:  # not in this torch, or nothing to stop
        pass


def derive(points: list[tuple[int, float]], target_steps: int) -> dict[str, Any]:
    """Per-step and fixed seconds from whole videos timed at two (or more) step counts.

    ``points`` are ``(steps, seconds)``; the per-step cost is the median over pairs of
    different step counts, the fixed cost the median of ``seconds - steps x per_step``.
    """
    per_step = [
        (t2 - t1) / (s2 - s1) for i, (s1, t1) in enumerate(points) for s2, t2 in points[i + 1 :] if s2 != s1
    ]
    if not per_step:
        return {"per_step_s": None, "fixed_s": None, "video_s": None}
    step = statistics.median(per_step)
    fixed = statistics.median(t - s * step for s, t in points)
    if step <= 0:  # more steps took less time: noise larger than the steps' cost (a busy CPU)
        return {
            "per_step_s": None,
            "fixed_s": None,
            "video_s": None,
            "invalid": f"per-step cost {step:.3g} s",
        }
    return {"per_step_s": step, "fixed_s": fixed, "video_s": fixed + target_steps * step}


@functools.lru_cache(maxsize=64)
def make_image(shape: Shape, index: int):
    """A deterministic input image per index (smooth gradients plus noise, like a photo's statistics)."""
    from PIL import Image

    rng = np.random.default_rng(1000 + index)
    y = np.linspace(0, 1, shape.height)[:, None, None]
    x = np.linspace(0, 1, shape.width)[None, :, None]
    base = 0.5 + 0.4 * np.sin(6 * x + 4 * y + rng.uniform(0, 6, size=(1, 1, 3)))
    img = np.clip(base + 0.1 * rng.standard_normal((shape.height, shape.width, 3)), 0, 1)
    return Image.fromarray((img * 255).astype(np.uint8))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def mac_key(mode: str, step_cache: int | None, shape: Shape) -> str:
    return f"{mode}|cache{step_cache or 0}|{shape.width}x{shape.height}x{shape.num_frames}"


def macs_job(spec_path: str, out_path: str) -> int:
    """The MAC-count subprocess: every job of the spec, results written after each one."""
    from vcut import count_macs

    torch.set_num_threads(2)
    spec = json.loads(Path(spec_path).read_text())
    steps = spec["steps"]
    results: dict[str, Any] = {}
    for job in spec["jobs"]:
        t0 = time.perf_counter()
        try:
            kw = {"step_cache": job["step_cache"]} if job["step_cache"] else {}
            r = count_macs(
                spec["unet_config"],
                height=job["height"],
                width=job["width"],
                num_frames=job["num_frames"],
                num_inference_steps=steps,
                mode=job["mode"],
                **kw,
            )
            results[job["key"]] = {
                "per_step_macs": r.vcut_macs / steps,
                "per_step_macs_with_attention": r.vcut_macs_with_attention / steps,
                "per_video_macs_with_attention": r.vcut_macs_with_attention,
                "count_s": time.perf_counter() - t0,
            }
        except Exception as exc:  # recorded; the other counts go on
            results[job["key"]] = {"error": _error(exc)}
        write_json(out_path, results)
    return 0


def _error(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[:2000]


# -- the model -------------------------------------------------------------------------------


def _configs(tiny: bool) -> dict[str, Any]:
    """Configs of the five components: SVD-XT's published ones, or the tiny test model's."""
    from vcut import load_unet_config

    if not tiny:
        return {
            "unet": {k: v for k, v in load_unet_config("svd-xt").items() if not k.startswith("_")},
            "vae": dict(SVD_VAE_CONFIG),
            "image_encoder": dict(SVD_IMAGE_ENCODER_CONFIG),
            "feature_extractor": dict(SVD_FEATURE_EXTRACTOR_CONFIG),
        }
    from vcut.tiny import make_tiny_pipeline

    pipe = make_tiny_pipeline()  # small: only read for its configs, the same path builds both
    enc = pipe.image_encoder.config
    return {
        "unet": {k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")},
        "vae": {k: v for k, v in dict(pipe.vae.config).items() if not k.startswith("_")},
        "image_encoder": {k: getattr(enc, k) for k in SVD_IMAGE_ENCODER_CONFIG},
        "feature_extractor": dict(SVD_FEATURE_EXTRACTOR_CONFIG),
    }


def build_components(tiny: bool, device: str, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """The five pipeline components with random weights, initialised on ``device`` (fast on a GPU)."""
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from vcut.tiny import svd_scheduler

    unet_ab._quiet_diffusers()
    cfg = _configs(tiny)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNetSpatioTemporalConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKLTemporalDecoder.from_config(cfg["vae"])
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["image_encoder"]))
    # A few legacy-constructed parameters ignore the default device, hence the .to() after.
    models = {"unet": unet, "vae": vae, "image_encoder": image_encoder}
    for m in models.values():
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return {
        **models,
        "scheduler": svd_scheduler(),
        "feature_extractor": CLIPImageProcessor(**cfg["feature_extractor"]),
    }


def stock_pipeline(components: dict[str, Any]):
    """Stock diffusers' pipeline on the components (its own scheduler object)."""
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline

    comps = dict(components, scheduler=EulerDiscreteScheduler.from_config(components["scheduler"].config))
    pipe = StableVideoDiffusionPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def weight_sharing_pipeline(components: dict[str, Any]):
    """A stock pipeline whose UNet and VAE are structure-only copies sharing every weight.

    ``apply_vcut`` (and a compile or step cache) change a UNet in place and cannot be undone,
    so every Renderer gets its own copies (as ``unet_ab.make_variants``); the weights exist once.
    """
    comps = dict(components)
    comps["unet"] = unet_ab.shared_weight_copy(components["unet"])
    comps["vae"] = unet_ab.shared_weight_copy(components["vae"])
    return stock_pipeline(comps)


# -- features of the project code --------------------------------------------------------------


def detect_features(renderer_cls: Any = None, count_macs: Any = None) -> dict[str, Any]:
    """What the Renderer and the MAC counter offer, with a reason for each missing feature."""
    if renderer_cls is None:
        from pipeline.renderer import Renderer as renderer_cls
    if count_macs is None:
        from vcut import count_macs
    params = inspect.signature(renderer_cls.from_pipe).parameters
    comp = params.get("compile")
    out: dict[str, Any] = {
        "compile": comp is not None,
        "compile_annotation": str(comp.annotation) if comp is not None else None,
        "compile_backend_kw": "compile_backend" in params,
        "compile_vae_kw": "compile_vae" in params,
        "step_cache": "step_cache" in params,
        "generate_batch": callable(getattr(renderer_cls, "generate_batch", None)),
        "count_macs_step_cache": "step_cache" in inspect.signature(count_macs).parameters,
        "missing": {},
    }
    if not out["compile"]:
        out["missing"]["compile"] = "Renderer.from_pipe takes no compile keyword"
    if not out["step_cache"]:
        out["missing"]["step_cache"] = (
            "Renderer.from_pipe takes no step_cache keyword (step cache not merged)"
        )
    if not out["generate_batch"]:
        out["missing"]["generate_batch"] = "Renderer has no generate_batch (batched rendering not merged)"
    if not out["count_macs_step_cache"]:
        out["missing"]["count_macs_step_cache"] = "vcut.count_macs takes no step_cache keyword"
    return out


# -- the benchmark -----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.device = args.device
        self.tiny = args.tiny
        self.dtype_name = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
        self.dtype = DTYPES[self.dtype_name]
        self.shape = SHAPES["tiny" if args.tiny else "full"]
        self.batch_shape = SHAPES["tiny-batched" if args.tiny else "batched"]
        self.steps = tuple(args.steps)
        self.target = args.steps_per_video
        name = "tiny" if args.tiny else "svd-xt-full"
        self.out = args.out or RESULTS_DIR / f"gpu_bench_{name}_{_device_slug(args.device)}.json"
        self.components: dict[str, Any] = {}
        self.runners: dict[str, Runner] = {}  # config -> its call
        self.eager_configs: list[str] = []
        self.compiled: tuple[Any, Any] | None = None  # (compiled renderer, its step-cache state)
        self.planned: set[str] = set()  # the stages this run will try (--stages, --no-compile)
        self.reference_frames: dict[int, tuple[int, np.ndarray]] = {}  # stock's (steps, frames)
        self.result: dict[str, Any] = header("gpu_bench")
        self.result.update(
            model="tiny" if args.tiny else "svd-xt (random weights)",
            shape=asdict(self.shape),
            batched_shape=asdict(self.batch_shape),
            device=args.device,
            dtype=self.dtype_name,
            budget_s=args.budget_s,
            steps_per_video=self.target,
            steps_timed=list(self.steps),
            compile_mode=args.compile_mode,
            compile_backend=args.compile_backend,
            step_cache=args.step_cache,
            stages_done=[],
            stages_skipped={},
            stages={},
            configs={},
        )

    # -- bookkeeping -------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, msg: str) -> None:
        print(f"[gpu_bench {self.device} +{self.elapsed():.0f}s] {msg}", flush=True)

    def save(self) -> None:
        self.result["elapsed_s"] = self.elapsed()
        self.result["summary_markdown"] = summary_markdown(self.result)
        write_json(self.out, self.result)
        md = self.out.with_suffix(".md")
        md.write_text(self.result["summary_markdown"] + "\n")
        if self.args.copy_to:
            from pipeline.storage import put_atomic

            for f in (self.out, md):
                put_atomic(None, str(Path(self.args.copy_to) / f.name), f)

    def skip(self, stage: str, reason: str) -> None:
        self.result["stages_skipped"][stage] = reason
        self.log(f"skipped {stage}: {reason}")
        self.save()

    def reset_peak(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        return int(torch.cuda.max_memory_allocated()) if self.device.startswith("cuda") else None

    def free_memory(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    # -- estimates for the budget --------------------------------------------------------------
    def _known(self, name: str) -> dict[str, Any] | None:
        c = self.result["configs"].get(name)
        return c if c and c.get("per_step_s") else None

    def est_config(self, steps: tuple[int, ...] | None = None, scale: float = 1.0) -> float:
        """Seconds to time one configuration (warm-up + the timed videos), from stock's figures."""
        steps = steps or self.steps
        ref = self._known("stock") or self._known("off")
        if ref is None:
            return 5.0 if self.tiny else 60.0
        n_videos = 1 + len(steps) * self.args.reps
        n_steps = 1 + sum(steps) * self.args.reps
        return scale * (n_videos * ref["fixed_s"] + n_steps * ref["per_step_s"])

    def est_whole_video(self) -> float:
        best = self.fastest()
        c = self.result["configs"].get(best) if best else None
        return c["video_s"] if c else (5.0 if self.tiny else 40.0)

    def est_batched(self) -> float:
        s, b = self.shape, self.batch_shape
        scale = (b.height * b.width * b.num_frames) / (s.height * s.width * s.num_frames)
        return self.est_config(scale=scale * (1 + self.args.batch_size))

    def est_macs(self) -> float:
        return 1.0 if self.tiny else 5.0  # counted in a subprocess during the GPU stages

    def reserve_after(self, stage: str) -> float:
        """Seconds kept for the stages that come after ``stage`` and must still run."""
        order = ["compile", "compile_step_cache", "whole_video", "batched", "macs"]
        later = order[order.index(stage) + 1 :] if stage in order else []
        est = {"whole_video": self.est_whole_video, "batched": self.est_batched, "macs": self.est_macs}
        planned = [s for s in later if s in est and s in self.planned]
        return sum(est[s]() for s in planned) + (1.0 if self.tiny else 10.0)

    def fits(self, stage: str, estimate: float, key: str | None = None) -> bool:
        """Whether ``estimate`` seconds fit before the time kept for later stages; else skip ``key``."""
        left = self.left() - self.reserve_after(stage)
        if estimate <= left:
            return True
        self.skip(
            key or stage, f"time budget: needs about {estimate:.0f} s, {max(0.0, left):.0f} s left for it"
        )
        return False

    def fastest(self, eager_only: bool = False) -> str | None:
        cands = [
            (c["video_s"], name)
            for name, c in self.result["configs"].items()
            if c.get("video_s") and name in self.runners and (not eager_only or name in self.eager_configs)
        ]
        return min(cands)[1] if cands else None

    # -- timing one configuration --------------------------------------------------------------
    def measure(
        self,
        name: str,
        call: Runner,
        *,
        steps: tuple[int, ...],
        shape: Shape,
        batch: int = 1,
        warmup_steps: int = 1,
        compiled: bool = False,
        record: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Warm-up video, then whole videos at each of ``steps`` (``--reps`` times); see the module doc."""
        rec: dict[str, Any] = record if record is not None else {}
        rec.update(config=name, shape=asdict(shape), batch=batch, steps_timed=list(steps), raw=[])
        self.result["configs"][name] = rec
        try:
            return self._measure(name, call, rec, steps, shape, batch, warmup_steps, compiled)
        except BaseException as exc:  # the table marks the configuration; the stage records the error
            rec["error"] = _error(exc)[:1000]
            raise

    def _measure(
        self,
        name: str,
        call: Runner,
        rec: dict[str, Any],
        steps: tuple[int, ...],
        shape: Shape,
        batch: int,
        warmup_steps: int,
        compiled: bool,
    ) -> dict[str, Any]:
        self.reset_peak()
        index = 0
        secs, info = self.timed(call, warmup_steps, index, shape)
        rec["warmup"] = {"steps": warmup_steps, "seconds": secs, **info}
        self.log(f"{name}: warm-up video ({warmup_steps} steps) {rec['warmup']['seconds']:.2f}s")
        self.save()
        points = []
        guard = forbid_recompiles(rec) if compiled else contextlib.nullcontext()
        with guard:
            for _ in range(self.args.reps):
                for s in steps:
                    index += 1
                    secs, info = self.timed(call, s, index, shape)
                    rec["raw"].append({"steps": s, "seconds": secs, "image_index": index, **info})
                    points.append((s, secs))
                    self.log(f"{name}: {s} steps {secs:.3f}s")
        rec.update(derive(points, self.target))
        rec["peak_memory_bytes"] = self.peak()
        if batch > 1 or shape != self.shape:
            rec["videos_per_s"] = batch / rec["video_s"] if rec.get("video_s") else None
        denoise = [r["timings"]["denoise"] / r["steps"] for r in rec["raw"] if r.get("timings")]
        if denoise:
            rec["per_step_s_from_renderer_timings"] = statistics.median(denoise)
        stock = self.result["configs"].get("stock", {})
        if rec.get("video_s") and stock.get("video_s") and shape == self.shape and batch == 1:
            rec["ratio_to_stock"] = rec["video_s"] / stock["video_s"]
            rec["per_step_ratio_to_stock"] = rec["per_step_s"] / stock["per_step_s"]
        if rec.get("video_s"):
            self.log(
                f"{name}: {rec['per_step_s']:.4g} s/step, fixed {rec['fixed_s']:.3g} s, "
                f"{self.target}-step video {rec['video_s']:.3g} s (extrapolated)"
            )
        else:
            self.log(f"{name}: no per-step figure ({rec.get('invalid')})")
        return rec

    # -- calls ---------------------------------------------------------------------------------
    def _compare(self, index: int, steps: int, frames_u8: np.ndarray) -> dict[str, Any]:
        """Frames against stock diffusers' frames of the same image, seed and step count."""
        ref_steps, ref = self.reference_frames.get(index, (None, None))
        if ref is None or ref_steps != steps or ref.shape != frames_u8.shape:
            return {}
        diff = np.abs(ref.astype(np.int16) - frames_u8.astype(np.int16))
        return {
            "max_abs_diff_vs_stock_uint8": int(diff.max()),
            "mean_abs_diff_vs_stock_uint8": float(diff.mean()),
        }

    def stock_call(self, pipe) -> Runner:
        from pipeline.renderer import frames_to_uint8  # a numpy helper: no project code in the model path

        def run(steps: int, image: Any, index: int, shape: Shape) -> Any:
            return pipe(
                image=image,
                height=shape.height,
                width=shape.width,
                num_frames=shape.num_frames,
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(index),
                output_type="np",
            )

        def inspect_(out: Any, steps: int, index: int, shape: Shape) -> dict[str, Any]:
            frames = np.asarray(out.frames[0])
            if shape == self.shape:
                self.reference_frames = {index: (steps, frames_to_uint8(frames))}  # one video only
            return {"frames_finite": bool(np.isfinite(frames).all()), "frames_std": float(frames.std())}

        return Runner(lambda index, shape: make_image(shape, index), run, inspect_)

    def renderer_call(self, renderer) -> Runner:
        def run(steps: int, image: Any, index: int, shape: Shape) -> Any:
            return renderer.generate(
                image,
                seed=index,
                num_frames=shape.num_frames,
                num_inference_steps=steps,
                height=shape.height,
                width=shape.width,
            )

        def inspect_(gen: Any, steps: int, index: int, shape: Shape) -> dict[str, Any]:
            info: dict[str, Any] = {"timings": gen.timings, "frames_std": float(gen.frames.std())}
            if shape == self.shape:
                info.update(self._compare(index, steps, gen.frames))
            return info

        return Runner(lambda index, shape: make_image(shape, index), run, inspect_)

    def batch_call(self, renderer, batch: int) -> Runner:
        def inputs(index: int, shape: Shape) -> list[Any]:
            return [make_image(shape, 100 * (index + 1) + i) for i in range(batch)]

        def run(steps: int, images: list[Any], index: int, shape: Shape) -> Any:
            return renderer.generate_batch(
                images,
                seeds=[100 * (index + 1) + i for i in range(batch)],
                num_frames=shape.num_frames,
                num_inference_steps=steps,
                height=shape.height,
                width=shape.width,
            )

        def inspect_(gens: Any, steps: int, index: int, shape: Shape) -> dict[str, Any]:
            return {"rows": len(gens), "frames_std": float(np.mean([g.frames.std() for g in gens]))}

        return Runner(inputs, run, inspect_)

    def timed(self, runner: Runner, steps: int, index: int, shape: Shape) -> tuple[float, dict[str, Any]]:
        """Seconds of one call (inputs made before, outputs inspected after the clock) and its info."""
        inputs = runner.inputs(index, shape)
        _sync(self.device)
        t0 = time.perf_counter()
        out = runner.run(steps, inputs, index, shape)
        _sync(self.device)
        secs = time.perf_counter() - t0
        return secs, runner.inspect(out, steps, index, shape)

    def make_renderer(self, mode: str, **kw: Any):
        from pipeline.renderer import Renderer

        t0 = time.perf_counter()
        pipe = weight_sharing_pipeline(self.components)
        renderer = Renderer.from_pipe(pipe, vcut=mode, model_id="gpu-bench", **kw)
        return renderer, time.perf_counter() - t0

    # -- stages --------------------------------------------------------------------------------
    def run_stage(self, name: str, fn: Callable[[], None]) -> None:
        """Run one stage; an error or a hard-limit stop is recorded and the next stage runs."""
        stage = self.result["stages"].setdefault(name, {})
        t0 = time.monotonic()
        try:
            fn()
            if name in self.result["stages_skipped"]:
                stage["status"] = "skipped"
            else:
                stage["status"] = "done"
                self.result["stages_done"].append(name)
        except StageTimeout as exc:
            stage.update(status="stopped", error=str(exc))
            self.result["stages_skipped"][name] = f"stopped: {exc}"
            self.log(f"{name} stopped: {exc}")
            stop_compile_workers()
            reset_dynamo()
        except torch.OutOfMemoryError as exc:
            stage.update(status="error", error=f"out of memory: {_error(exc)}")
            self.result["stages_skipped"][name] = "error: out of memory"
            self.log(f"{name}: out of memory")
        except Exception as exc:  # a failing stage is a finding, not a reason to lose the others
            stage.update(status="error", error=_error(exc), traceback=traceback.format_exc()[-4000:])
            self.result["stages_skipped"][name] = f"error: {_error(exc)[:300]}"
            self.log(f"{name} failed: {_error(exc)}")
        finally:
            stage["seconds"] = time.monotonic() - t0
            self.free_memory()
            self.save()

    def stage_build(self) -> None:
        feats = detect_features()
        self.result["features"] = feats
        self.start_macs(_configs(self.tiny)["unet"])
        t0 = time.perf_counter()
        self.components = build_components(self.tiny, self.device, self.dtype, seed=self.args.seed)
        _sync(self.device)
        build_s = time.perf_counter() - t0
        params = {
            k: sum(p.numel() for p in m.parameters())
            for k, m in self.components.items()
            if isinstance(m, torch.nn.Module)
        }
        self.result["stages"]["build"].update(
            build_s=build_s,
            params=params,
            weight_bytes=sum(
                p.numel() * p.element_size()
                for m in self.components.values()
                if isinstance(m, torch.nn.Module)
                for p in m.parameters()
            ),
            unet_num_frames=self.components["unet"].config.get("num_frames"),
            image_encoder_config=SVD_IMAGE_ENCODER_CONFIG if not self.tiny else None,
        )
        if self.device.startswith("cuda"):
            self.result["stages"]["build"]["cudnn_benchmark"] = torch.backends.cudnn.benchmark
            self.result["stages"]["build"]["weights_memory_bytes"] = int(torch.cuda.memory_allocated())
        self.log(
            f"built in {build_s:.1f}s: "
            + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in params.items())
            + f"; features: {feats['missing'] or 'all'}"
        )

    def stage_stock(self) -> None:
        if not self.fits("stock", self.est_config()):
            return
        pipe = stock_pipeline(self.components)
        self.runners["stock"] = self.stock_call(pipe)
        rec = self.measure("stock", self.runners["stock"], steps=self.steps, shape=self.shape)
        rec["frames_finite"] = all(r["frames_finite"] for r in rec["raw"])

    def stage_eager(self) -> None:
        feats = self.result["features"]
        configs: list[tuple[str, str, dict[str, Any], tuple[int, ...]]] = [
            (mode, mode, {}, self.steps) for mode in MODES
        ]
        n = self.args.step_cache
        if n and feats["step_cache"]:
            configs.append((f"full+cache{n}", "full", {"step_cache": n}, (n, 3 * n)))
        elif n:
            self.result["stages"]["eager"][f"full+cache{n}"] = f"skipped: {feats['missing']['step_cache']}"
        for name, mode, kw, steps in configs:
            if not self.fits("eager", self.est_config(steps), key=f"eager:{name}"):
                continue
            renderer, build_s = self.make_renderer(mode, **kw)
            self.runners[name] = self.renderer_call(renderer)
            self.eager_configs.append(name)
            rec = self.measure(name, self.runners[name], steps=steps, shape=self.shape)
            rec["renderer_build_s"] = build_s
            self.save()
        if not self.eager_configs:
            self.skip("eager", "no configuration fitted in the time budget")

    def _compile_kwargs(self, rec: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """The Renderer's compile keywords, and the ``torch.compile`` shim to build it under."""
        feats = self.result["features"]
        ckw: dict[str, Any] = {"compile": self.args.compile_mode}
        if feats["compile_backend_kw"]:  # the Renderer takes the backend itself
            ckw["compile_backend"] = self.args.compile_backend
            shim = compile_shim(None, rec)
        else:
            shim = compile_shim(self.args.compile_backend, rec)
        if self.args.compile_vae != "default":
            if not feats["compile_vae_kw"]:
                raise RuntimeError("--compile-vae: Renderer.from_pipe takes no compile_vae keyword")
            ckw["compile_vae"] = self.args.compile_vae == "on"
        rec["renderer_compile_kwargs"] = ckw
        return ckw, shim

    def interval_call(self, renderer: Any, state: Any, interval: int | None) -> Runner:
        """``renderer_call`` that first sets the step cache's interval (1: every step a full step)."""
        base = self.renderer_call(renderer)
        if state is None:
            return base

        def run(steps: int, image: Any, index: int, shape: Shape) -> Any:
            state.interval = interval
            return base.run(steps, image, index, shape)

        return Runner(base.inputs, run, base.inspect)

    def _compiled(self, name: str, steps: tuple[int, ...], stage: str, interval: int | None) -> None:
        """Time a compiled ``full`` renderer: its first video (compilation) apart, then timed videos.

        One compiled UNet serves both compiled configurations where the step cache exists: it
        is built with ``step_cache=N`` (VCUT, step cache, then compile, as ``from_pipe`` orders
        them) and its cache's interval set per configuration: 1 for ``full+compile`` (every step
        a full step: the full graph variant, plus one copy of the stored feature per step),
        N for ``full+compile+cacheN`` (which then compiles only its second, shallow, variant).
        A cold compile of the SVD-XT UNet takes minutes: once is what the budget allows.
        """
        # what is left after the later stages' time and a margin for stopping and cleaning up
        limit = self.left() - self.reserve_after(stage) - (3.0 if self.tiny else 15.0)
        reuse = self.compiled is not None
        minimum = 5.0 if self.tiny else self.args.min_compile_s / (3 if reuse else 1)
        if limit < minimum:
            self.skip(
                stage, f"time budget: {max(0.0, limit):.0f} s left for it, at least {minimum:.0f} s needed"
            )
            return
        rec: dict[str, Any] = {"hard_limit_s": limit}
        self.result["configs"][name] = rec
        self.log(f"{name}: compiling (hard limit {limit:.0f}s)")
        ckw, shim = self._compile_kwargs(rec)
        with hard_limit(limit), shim:
            before = dynamo_counts()
            if reuse:
                renderer, state = self.compiled
                rec["reuses_compiled_unet_of"] = "full+compile"
            else:
                n = self.args.step_cache if self.result["features"]["step_cache"] else 0
                renderer, build_s = self.make_renderer("full", **ckw, **({"step_cache": n} if n else {}))
                rec["renderer_build_s"] = build_s
                from vcut import step_cache_state

                state = step_cache_state(renderer.pipe) if n else None
                self.compiled = (renderer, state)
            if state is not None:
                rec["step_cache_interval"] = interval
            call = self.interval_call(renderer, state, interval)
            self.measure(
                name, call, steps=steps, shape=self.shape, warmup_steps=steps[0], compiled=True, record=rec
            )
        after = dynamo_counts()
        rec["compile_s"] = rec["warmup"]["seconds"]  # the first video: compilation + one video
        eager = self.result["configs"].get(
            "full" if not interval or interval == 1 else f"full+cache{interval}"
        )
        if eager and eager.get("fixed_s") is not None:
            s = rec["warmup"]["steps"]
            rec["compile_s_net"] = rec["warmup"]["seconds"] - (eager["fixed_s"] + s * eager["per_step_s"])
        report = getattr(renderer, "compile_report", None)
        if report is not None:
            rec["renderer_compile_report"] = asdict(report) if is_dataclass(report) else repr(report)
        timing_compile = rec["warmup"].get("timings", {}).get("compile")
        if timing_compile is not None:
            rec["renderer_timings_compile_s"] = timing_compile
        rec["dynamo"] = {
            "graphs_compiled": after["unique_graphs"] - before["unique_graphs"],
            "graph_breaks": after["graph_breaks"] - before["graph_breaks"],
            "graph_break_reasons": graph_break_reasons(),
        }
        if rec["dynamo"]["graphs_compiled"] == 0:
            raise RuntimeError(f"{name}: torch.compile compiled no graph: its figures would be eager ones")
        self.runners[name] = call

    def stage_compile(self) -> None:
        if not self.result["features"]["compile"]:
            return self.skip("compile", self.result["features"]["missing"]["compile"])
        reset_dynamo()
        self.compiled = None
        self._compiled("full+compile", self.steps, "compile", interval=1)

    def stage_compile_step_cache(self) -> None:
        feats = self.result["features"]
        n = self.args.step_cache
        if not n:
            return self.skip("compile_step_cache", "--step-cache 0")
        if not feats["step_cache"]:
            return self.skip("compile_step_cache", feats["missing"]["step_cache"])
        if "compile" not in self.result["stages_done"] or self.compiled is None:
            return self.skip("compile_step_cache", "the compile stage did not finish")
        # no dynamo reset: the same compiled UNet, whose shallow-step variant compiles now
        self._compiled(f"full+compile+cache{n}", (n, 3 * n), "compile_step_cache", interval=n)

    def stage_whole_video(self) -> None:
        best = self.fastest()
        if best is None:
            return self.skip("whole_video", "no configuration was measured")
        est = self.result["configs"][best]
        if not self.fits("whole_video", est["video_s"]):
            return
        rec: dict[str, Any] = {"config": best, "steps": self.target, "extrapolated_s": est["video_s"]}
        self.result["whole_video"] = rec
        self.reset_peak()
        guard = forbid_recompiles(rec) if "compile" in best else contextlib.nullcontext()
        with hard_limit(max(5.0, self.left() - self.reserve_after("whole_video"))), guard:
            rec["seconds"], info = self.timed(self.runners[best], self.target, 999, self.shape)
        rec.update(info)
        rec["measured_over_extrapolated"] = rec["seconds"] / est["video_s"]
        rec["peak_memory_bytes"] = self.peak()
        self.log(
            f"whole {self.target}-step video, {best}: {rec['seconds']:.2f}s "
            f"(extrapolated {est['video_s']:.2f}s)"
        )

    def stage_batched(self) -> None:
        # compiled models are done: free their graphs before new shapes run eagerly
        for name in list(self.runners):
            if "compile" in name:
                del self.runners[name]
        self.compiled = None
        reset_dynamo()
        self.free_memory()
        base = self.fastest(eager_only=True)
        if base is None:
            return self.skip("batched", "no eager configuration was measured")
        stage = self.result["stages"]["batched"]
        stage["renderer_config"] = base
        mode, kw = ("full", {"step_cache": self.args.step_cache}) if "cache" in base else (base, {})
        if not self.fits("batched", self.est_batched()):
            return
        renderer, _ = self.make_renderer(mode, **kw)
        shape = self.batch_shape
        self.measure(f"batch1:{base}", self.renderer_call(renderer), steps=self.steps, shape=shape)
        feats = self.result["features"]
        b = self.args.batch_size
        if not feats["generate_batch"]:
            stage[f"batch{b}"] = f"skipped: {feats['missing']['generate_batch']}"
            self.result["stages_skipped"][f"batched:batch{b}"] = feats["missing"]["generate_batch"]
            return
        rec = self.measure(
            f"batch{b}:{base}", self.batch_call(renderer, b), steps=self.steps, shape=shape, batch=b
        )
        one = self.result["configs"][f"batch1:{base}"]
        if rec.get("videos_per_s") and one.get("videos_per_s"):
            rec["speedup_vs_batch1"] = rec["videos_per_s"] / one["videos_per_s"]

    def start_macs(self, unet_config: dict[str, Any]) -> None:
        """Count MACs in a CPU subprocess (meta tensors, no GPU) while the GPU stages run."""
        if self.args.no_macs:
            return
        cache = self.args.step_cache if self.result["features"]["count_macs_step_cache"] else None
        variants = [(mode, None) for mode in MODES] + ([("full", cache)] if cache else [])
        factor = self._vae_factor()
        jobs = [
            {
                "key": mac_key(mode, c, shape),
                "mode": mode,
                "step_cache": c,
                "height": shape.height * 8 // factor,  # count_macs takes pixels and divides by 8
                "width": shape.width * 8 // factor,
                "num_frames": shape.num_frames,
            }
            for shape in (self.shape, self.batch_shape)
            for mode, c in variants
        ]
        tmp = Path(tempfile.mkdtemp(prefix="gpu-bench-macs-"))
        spec = tmp / "spec.json"
        self.macs_out = tmp / "macs.json"
        self.macs_log = tmp / "log.txt"
        write_json(spec, {"unet_config": unet_config, "steps": self.target, "jobs": jobs})
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        log = open(self.macs_log, "w")  # noqa: SIM115 (the child writes it; closed with the child)
        self.macs_proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.gpu_bench", "--macs-job", str(spec), str(self.macs_out)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.result["stages"]["build"]["macs_jobs"] = len(jobs)

    def stop_macs(self) -> None:
        proc = getattr(self, "macs_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stage_macs(self) -> None:
        if self.args.no_macs:
            return self.skip("macs", "--no-macs")
        proc = getattr(self, "macs_proc", None)
        if proc is None:
            return self.skip("macs", "the MAC count was not started")
        try:
            proc.wait(timeout=max(1.0, self.left()))
        except subprocess.TimeoutExpired:
            self.stop_macs()
            self.result["stages"]["macs"]["note"] = "time budget: the MAC count was stopped, partial"
        counted = json.loads(self.macs_out.read_text()) if self.macs_out.exists() else {}
        if proc.returncode:
            self.result["stages"]["macs"]["log_tail"] = self.macs_log.read_text()[-2000:]
        peak = self.result["peak_tflops"]["tflops"]
        macs: dict[str, Any] = {
            "convention": "vcut.count_macs on meta tensors (MACs = FLOPs / 2), CFG batch 2, averaged over "
            f"a {self.target}-step video; 'with_attention' counts the attention kernels' matmuls, which a "
            "GPU runs; MFU = 2 x MACs per step (with attention) x batch / seconds per step / peak",
            "counted": counted,
        }
        mfu: dict[str, Any] = {}
        self.result["macs"], self.result["mfu"] = macs, mfu
        for name, rec in self.result["configs"].items():
            if not rec.get("per_step_s"):
                continue
            base = name.split(":")[-1]
            mode = "off" if base in ("stock", "off") else ("full" if base.startswith("full") else base)
            cache = self.args.step_cache if "cache" in base else None
            m = counted.get(mac_key(mode, cache, Shape(**rec["shape"])))
            if not m or "per_step_macs_with_attention" not in m:
                why = self.result["features"]["missing"].get("count_macs_step_cache") if cache else None
                mfu[name] = {"mfu": None, "why": why or (m or {}).get("error", "not counted")}
                continue
            tflops = 2 * m["per_step_macs_with_attention"] * rec.get("batch", 1) / rec["per_step_s"] / 1e12
            mfu[name] = {"achieved_tflops": tflops, "mfu": tflops / peak if peak else None}
            rec["achieved_tflops"] = tflops
            rec["mfu"] = mfu[name]["mfu"]

    def _vae_factor(self) -> int:
        return 2 if self.tiny else 8

    # -- main ----------------------------------------------------------------------------------
    def run(self) -> int:
        self.result["peak_tflops"] = peak_info(self.device, self.dtype_name, self.args.peak_tflops)
        self.save()
        stages = [
            ("build", self.stage_build),
            ("stock", self.stage_stock),
            ("eager", self.stage_eager),
            ("compile", self.stage_compile),
            ("compile_step_cache", self.stage_compile_step_cache),
            ("whole_video", self.stage_whole_video),
            ("batched", self.stage_batched),
            ("macs", self.stage_macs),
        ]
        if self.args.stages:
            wanted = {"build", *self.args.stages.split(",")}
            unknown = wanted - {name for name, _ in stages}
            if unknown:
                raise SystemExit(f"gpu_bench: unknown --stages {sorted(unknown)}")
            for name, _ in stages:
                if name not in wanted:
                    self.result["stages_skipped"][name] = "not in --stages"
            stages = [s for s in stages if s[0] in wanted]
        if self.args.no_compile:
            stages = [s for s in stages if not s[0].startswith("compile")]
            self.result["stages_skipped"]["compile"] = "--no-compile"
            self.result["stages_skipped"]["compile_step_cache"] = "--no-compile"
        self.planned = {name for name, _ in stages}
        try:
            for name, fn in stages:
                if name != "build" and "build" not in self.result["stages_done"]:
                    self.skip(name, "the build failed")
                    continue
                self.log(f"stage {name} ({self.left():.0f}s of the budget left)")
                self.run_stage(name, fn)
        except KeyboardInterrupt:
            self.result["interrupted"] = f"interrupted (SIGINT) after {self.elapsed():.0f} s"
            self.log(self.result["interrupted"])
            self.save()
            return 130
        finally:
            self.stop_macs()
        self.result["peak_rss_bytes"] = unet_ab._rss_peak_bytes()
        self.result["load_average_at_end"] = machine_info()["load_average_1_5_15min"]
        self.result["stages_done"].append("done")
        self.save()
        print(self.result["summary_markdown"])
        print(f"wrote {self.out} and {self.out.with_suffix('.md')}")
        return 0


# -- summary -----------------------------------------------------------------------------------


def _fmt(x: Any, spec: str = ".3g", suffix: str = "") -> str:
    return f"{x:{spec}}{suffix}" if isinstance(x, int | float) and x is not None else "-"


def summary_markdown(result: dict[str, Any]) -> str:
    """The results as a Markdown table (also written beside the JSON)."""
    machine = result.get("machine", {})
    gpu = (machine.get("gpu") or {}).get("name") or machine.get("cpu_model")
    versions = result.get("versions", {})
    shape = result.get("shape", {})
    lines = [
        f"### gpu_bench: {result.get('model')}, {shape.get('width')}x{shape.get('height')}, "
        f"{shape.get('num_frames')} frames, {result.get('dtype')}, CFG",
        "",
        f"{gpu}; torch {versions.get('torch')}, diffusers {versions.get('diffusers')}; {result.get('date')}; "
        f"peak {_fmt(result.get('peak_tflops', {}).get('tflops'), '.1f')} TFLOP/s "
        f"({result.get('peak_tflops', {}).get('source')}). Per step and fixed cost from whole videos at "
        f"{result.get('steps_timed')} steps; s/video = fixed + {result.get('steps_per_video')} x per step.",
        "",
        "| configuration | shape | s/step | fixed s (conditioning + decode) | s/video (extrapolated) "
        "| vs stock | videos/s | peak GiB | MFU | compile s | graphs compiled while timed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in result.get("configs", {}).items():
        if not isinstance(c, dict) or "raw" not in c:
            continue
        sh = c.get("shape", {})
        peak = c.get("peak_memory_bytes")
        vps = c.get("videos_per_s") or (1 / c["video_s"] if c.get("video_s") else None)
        batch = f" (batch {c['batch']})" if c.get("batch", 1) > 1 else ""
        if c.get("error"):
            batch += f" (error: {c['error'].splitlines()[0][:80]})"
        lines.append(
            f"| {name}{batch} | {sh.get('width')}x{sh.get('height')}x{sh.get('num_frames')} "
            f"| {_fmt(c.get('per_step_s'), '.4g')} | {_fmt(c.get('fixed_s'), '.3g')} "
            f"| {_fmt(c.get('video_s'), '.4g')} | {_fmt(c.get('ratio_to_stock'), '.3f')} "
            f"| {_fmt(vps, '.4g')} "
            f"| {_fmt(peak / 2**30 if peak else None, '.1f')} | {_fmt(c.get('mfu'), '.1%')} "
            f"| {_fmt(c.get('compile_s'), '.0f')} | {c.get('graphs_compiled_during_timing', '-')} |"
        )
    wv = result.get("whole_video")
    if wv and wv.get("seconds"):
        lines += [
            "",
            f"Whole {wv['steps']}-step video of the fastest configuration ({wv['config']}): "
            f"{wv['seconds']:.3g} s (extrapolated {wv['extrapolated_s']:.3g} s).",
        ]
    skipped = result.get("stages_skipped") or {}
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------


def _steps(text: str) -> list[int]:
    steps = [int(s) for s in text.split(",")]
    if len(steps) < 2 or len(set(steps)) < 2 or min(steps) < 1:
        raise argparse.ArgumentTypeError("--steps needs two or more different step counts >= 1, e.g. 2,6")
    return steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="the tiny test model instead of SVD-XT's architecture")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument(
        "--steps", type=_steps, default=[2, 6], help="step counts of the timed videos (default 2,6)"
    )
    p.add_argument("--steps-per-video", type=int, default=STEPS_PER_VIDEO, help="a whole video (default 25)")
    p.add_argument("--reps", type=int, default=1, help="timed videos per step count (default 1)")
    p.add_argument("--step-cache", type=int, default=3, help="step-cache interval N (0: none; default 3)")
    p.add_argument("--batch-size", type=int, default=4, help="rows of the batched call (default 4)")
    p.add_argument(
        "--stages",
        default=None,
        help="comma-separated stages to run (build always runs; default: all): stock, eager, compile, "
        "compile_step_cache, whole_video, batched, macs",
    )
    p.add_argument("--no-compile", action="store_true", help="skip both compile stages")
    p.add_argument("--compile-mode", default="default", help="Renderer compile= value (default: default)")
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default: inductor on cuda; on cpu 'eager', dynamo without inductor, "
        "so the CPU path takes seconds)",
    )
    p.add_argument(
        "--compile-vae",
        choices=("default", "on", "off"),
        default="default",
        help="Renderer compile_vae= (default: the Renderer's own default, on CUDA: on)",
    )
    p.add_argument(
        "--min-compile-s",
        type=float,
        default=90.0,
        help="do not start a compile stage with less time than this for it (default 90)",
    )
    p.add_argument(
        "--budget-s", type=float, default=430.0, help="time budget in seconds from the start (default 430)"
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="dense peak for MFU (default: by GPU)")
    p.add_argument("--no-macs", action="store_true", help="skip the MAC count (and MFU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file (default: benchmarks/results/gpu_bench_<model>_<device>.json; .md beside it)",
    )
    p.add_argument(
        "--copy-to", default="", help="also copy the JSON and Markdown files here after each stage"
    )
    args = p.parse_args(argv)
    if args.compile_backend is None:
        args.compile_backend = "inductor" if args.device.startswith("cuda") else "eager"
    if args.steps_per_video < 1 or args.reps < 1 or args.batch_size < 1 or args.step_cache < 0:
        p.error("--steps-per-video, --reps and --batch-size must be >= 1, --step-cache >= 0")
    return args


def _device_slug(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        return "".join(c if c.isalnum() else "-" for c in name).strip("-")
    return device


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--macs-job"]:
        return macs_job(argv[1], argv[2])
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_bench: CUDA is not available; use --device cpu --tiny for the CPU path", file=sys.stderr)
        return 2
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
