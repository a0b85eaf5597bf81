"""``Bench``: the run's state, its time budget, how one configuration is timed, and the stage loop."""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import unet_ab
from benchmarks.common import RESULTS_DIR, header, machine_info, write_json
from benchmarks.gpu.machinery import (
    Runner,
    StageTimeout,
    _error,
    _sync,
    derive,
    forbid_recompiles,
    reset_dynamo,
    stop_compile_workers,
)
from benchmarks.gpu.model import DTYPES, SHAPES, Shape, make_image, weight_sharing_pipeline
from benchmarks.gpu.peak import peak_info
from benchmarks.gpu.summary import summary_markdown

#: The stages, in the order they run; each is the module ``benchmarks.gpu.stages.<name>`` with
#: ``run(bench)``. A later stage reuses what an earlier one built (the compiled renderers).
#: The new levers first: two cold compiles of the SVD-XT UNet (FP8's, the plain one) take about
#: 3 minutes each, so on one GPU in 8 minutes the plain compile (after the eager configurations,
#: about a minute) gets what is left.
STAGES = (
    "build",
    "stock",
    "fp8",
    "guidance",
    "whole_video",
    "eager",
    "compile",
    "compile_step_cache",
    "quality",
    "batched",
    "macs",
)


def stage_module(name: str) -> Any:
    return importlib.import_module(f"benchmarks.gpu.stages.{name}")


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
        #: compiled renderers by slot ("plain", "fp8"): (renderer, its step-cache state, first config)
        self.compiled: dict[str, tuple[Any, Any, str]] = {}
        self.fp8_renderer: Any = None  # the eager FP8 renderer (--no-compile)
        self.planned: set[str] = set()  # the stages this run will try (--stages, --no-compile)
        self.reference_frames: dict[int, tuple[int, np.ndarray]] = {}  # stock's (steps, frames)
        self.quality_reference: np.ndarray | None = None  # stock's frames at --quality-steps
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
            guidance_interval=[args.guidance_start, args.guidance_stop],
            quality_steps=args.quality_steps,
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
        n_videos = 2 + len(steps) * self.args.reps  # warm-up, timed, quality
        n_steps = 1 + sum(steps) * self.args.reps + self.args.quality_steps
        return scale * (n_videos * ref["fixed_s"] + n_steps * ref["per_step_s"])

    def est_whole_video(self) -> float:
        best = self.fastest()
        c = self.result["configs"].get(best) if best else None
        return c["video_s"] if c else (5.0 if self.tiny else 40.0)

    def est_batched(self) -> float:
        s, b = self.shape, self.batch_shape
        scale = (b.height * b.width * b.num_frames) / (s.height * s.width * s.num_frames)
        return self.est_config(scale=scale * (1 + self.args.batch_size))

    def est_quality(self) -> float:
        """The quality stage only tabulates (each configuration's video is made when it is measured)."""
        return 0.5

    def est_quality_video(self) -> float:
        """One untimed video at ``--quality-steps`` (stock's per-step cost, an upper bound)."""
        ref = self._known("stock") or self._known("off")
        if ref is None:
            return 2.0 if self.tiny else 10.0
        return ref["fixed_s"] + self.args.quality_steps * ref["per_step_s"]

    def est_macs(self) -> float:
        return 1.0 if self.tiny else 5.0  # counted in a subprocess during the GPU stages

    def reserve_after(self, stage: str) -> float:
        """Seconds kept for the stages that come after ``stage`` and must still run."""
        later = STAGES[STAGES.index(stage) + 1 :] if stage in STAGES else ()
        est = {
            "whole_video": self.est_whole_video,
            "quality": self.est_quality,
            "batched": self.est_batched,
            "macs": self.est_macs,
        }
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
            self._measure(name, call, rec, steps, shape, batch, warmup_steps, compiled)
            if shape == self.shape and batch == 1:  # PSNR/SSIM vs stock, one untimed video
                stage_module("quality").compare(self, name, call, compiled=compiled)
            return rec
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
                self.reference_frames[index] = (steps, frames_to_uint8(frames))  # a few videos (MBs each)
            return {"frames_finite": bool(np.isfinite(frames).all()), "frames_std": float(frames.std())}

        def frames(out: Any) -> np.ndarray:
            return frames_to_uint8(np.asarray(out.frames[0]))

        return Runner(lambda index, shape: make_image(shape, index), run, inspect_, frames)

    def renderer_call(self, renderer, **generation: Any) -> Runner:
        """``renderer.generate`` of one video; ``generation``: extra keywords (e.g. the guidance interval)."""

        def run(steps: int, image: Any, index: int, shape: Shape) -> Any:
            return renderer.generate(
                image,
                seed=index,
                num_frames=shape.num_frames,
                num_inference_steps=steps,
                height=shape.height,
                width=shape.width,
                **generation,
            )

        def inspect_(gen: Any, steps: int, index: int, shape: Shape) -> dict[str, Any]:
            info: dict[str, Any] = {"timings": gen.timings, "frames_std": float(gen.frames.std())}
            if shape == self.shape:
                info.update(self._compare(index, steps, gen.frames))
            return info

        return Runner(lambda index, shape: make_image(shape, index), run, inspect_, lambda gen: gen.frames)

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

    def run(self) -> int:
        self.result["peak_tflops"] = peak_info(self.device, self.dtype_name, self.args.peak_tflops)
        self.save()
        stages = [(name, functools.partial(stage_module(name).run, self)) for name in STAGES]
        if self.args.stages:
            wanted = {"build", *self.args.stages.split(",")}
            unknown = wanted - {name for name, _ in stages}
            if unknown:
                raise SystemExit(f"gpu.bench: unknown --stages {sorted(unknown)}")
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
            stage_module("macs").stop(self)
        self.result["peak_rss_bytes"] = unet_ab._rss_peak_bytes()
        self.result["load_average_at_end"] = machine_info()["load_average_1_5_15min"]
        self.result["stages_done"].append("done")
        self.save()
        print(self.result["summary_markdown"])
        print(f"wrote {self.out} and {self.out.with_suffix('.md')}")
        return 0


def _device_slug(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        return "".join(c if c.isalnum() else "-" for c in name).strip("-")
    return device
