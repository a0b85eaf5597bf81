"""Full-size SVD-XT on one GPU (random weights): seconds per UNet step, VAE decode, memory, MFU.

Run it through ``benchmarks/gpu.sh`` (which brings diffusers where the GPU machine lacks
it); directly::

    python -m benchmarks.gpu_bench                      # cuda, svd-xt-full, bf16
    python -m benchmarks.gpu_bench --device cpu --tiny  # the same code path, tiny model, CPU

What it measures, in this order (results are written after every stage, so a run cut
short by ``--budget-s`` or a timeout still leaves what it measured):

1. ``eager``: the UNet A/B of ``benchmarks.unet_ab`` (one process, three UNets sharing one
   set of random weights, ``off``/``exact``/``full`` in rotating order; one UNet step =
   one call on the classifier-free-guidance batch of 2), seconds per step.
2. ``peak_memory``: peak GPU memory of one step per mode (weights included), and of the
   VAE decode.
3. ``vae_decode``: SVD-XT's VAE (``AutoencoderKLTemporalDecoder`` with the published
   config, random weights) decoding the video's latents, ``--decode-chunk-size`` frames at
   a time (default: all at once, as the project's Renderer does).
4. ``compiled``: the same A/B with each UNet wrapped in ``torch.compile``; the first call's
   time (compilation) is reported apart. Skipped, and said so, when the budget runs out.
5. ``mfu``: model FLOP utilisation = (2 x MACs of one step, from ``vcut.count_macs`` with
   the attention kernels' matmuls counted, since a GPU runs them) / seconds per step /
   the GPU's dense peak (``--peak-tflops``; default: the spec-sheet dense bf16/fp16 figure
   for H100/H200, 989.4 TFLOP/s; none on CPU). Both MAC conventions are in the file.
6. ``per_video_estimate``: 25 UNet steps plus one VAE decode, per mode: how much of the
   UNet saving is left for the model part of a video (image encoding, CLIP and video
   encoding not included).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks import unet_ab
from benchmarks.common import RESULTS_DIR, header, machine_info, summarize, write_json

#: Dense (no sparsity) bf16/fp16 tensor-core peak of the SXM parts, from NVIDIA's data sheets.
SPEC_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4}

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

STEPS_PER_VIDEO = 25


def _peak_tflops(device: str, override: float | None) -> tuple[float | None, str | None]:
    if override:
        return override, "given with --peak-tflops"
    if not device.startswith("cuda"):
        return None, None
    name = torch.cuda.get_device_name()
    for key, value in SPEC_PEAK_TFLOPS.items():
        if key in name:
            return value, f"spec-sheet dense bf16/fp16 peak of {key} SXM"
    return None, None


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def build_vae(tiny: bool, device: str, dtype: torch.dtype, seed: int = 0):
    from diffusers import AutoencoderKLTemporalDecoder

    if tiny:
        from vcut.tiny import make_tiny_pipeline

        vae = make_tiny_pipeline(seed=seed).vae
    else:
        torch.manual_seed(seed)
        with torch.device(device):
            vae = AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def time_vae_decode(
    vae, size: unet_ab.Size, device: str, dtype: torch.dtype, chunk: int | None, reps: int, deadline: float
) -> dict[str, Any]:
    """Decode one video's latents as the SVD pipeline's ``decode_latents`` does, ``chunk`` frames a time."""
    frames = size.num_frames
    chunk = chunk or frames
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(frames, vae.config.latent_channels, size.latent_h, size.latent_w, generator=g)
    latents = (latents / vae.config.scaling_factor).to(device, dtype)

    def decode() -> None:
        for i in range(0, frames, chunk):
            part = latents[i : i + chunk]
            vae.decode(part, num_frames=part.shape[0])

    times = []
    with torch.inference_mode():
        _reset_peak(device)
        t0 = time.perf_counter()
        decode()  # warm-up
        unet_ab.sync(device)
        warm = time.perf_counter() - t0
        peak = _peak(device)
        for _ in range(reps):
            if times and time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            decode()
            unet_ab.sync(device)
            times.append(time.perf_counter() - t0)
    return {
        "frames": frames,
        "chunk": chunk,
        "warmup_s": warm,
        "seconds": summarize(times),
        "raw_s": times,
        "peak_memory_bytes": peak,
    }


def _mfu(summary: dict[str, Any], macs: dict[str, Any] | None, peak_tflops: float | None) -> dict[str, Any]:
    out = {}
    for mode, entry in summary.items():
        s = entry["seconds_per_call"]["median"]
        m = (macs or {}).get(mode)
        if not m:
            continue
        tflops = 2 * m["call_macs_with_attention"] / s / 1e12
        tflops_no_attn = 2 * m["call_macs"] / s / 1e12
        out[mode] = {
            "achieved_tflops": tflops,
            "achieved_tflops_without_attention_kernels": tflops_no_attn,
            "mfu": tflops / peak_tflops if peak_tflops else None,
            "mfu_without_attention_kernels": tflops_no_attn / peak_tflops if peak_tflops else None,
        }
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="the tiny test model instead of full-size SVD-XT")
    p.add_argument(
        "--dtype", choices=sorted(unet_ab.DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu"
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="A/B rounds (default: 10 eager, 6 compiled; tiny: 3)"
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--vae-reps", type=int, default=3)
    p.add_argument("--decode-chunk-size", type=int, default=None, help="default: all frames at once")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile stage")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument(
        "--budget-s",
        type=float,
        default=400.0,
        help="stop starting new work after this many seconds (default 400)",
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="dense peak for MFU (default: by GPU name)"
    )
    p.add_argument("--no-macs", action="store_true", help="skip the MAC count (and MFU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file (default: benchmarks/results/gpu_bench_<size>_<device>.json)",
    )
    p.add_argument("--copy-to", default="", help="also copy the JSON file into this folder (e.g. $OUT)")
    return p.parse_args(argv)


def _device_slug(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        return "".join(c if c.isalnum() else "-" for c in name).strip("-")
    return device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_bench: CUDA is not available; use --device cpu --tiny for the CPU path", file=sys.stderr)
        return 2
    size = unet_ab.SIZES["tiny" if args.tiny else "svd-xt-full"]
    dtype_name = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    dtype = unet_ab.DTYPES[dtype_name]
    rounds = args.rounds or (3 if args.tiny else 10)
    compiled_rounds = args.rounds or (3 if args.tiny else 6)
    out = args.out or RESULTS_DIR / f"gpu_bench_{size.name}_{_device_slug(args.device)}.json"
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    result: dict[str, Any] = header("gpu_bench")
    peak_tflops, peak_source = _peak_tflops(args.device, args.peak_tflops)
    result.update(
        size=asdict(size),
        device=args.device,
        dtype=dtype_name,
        budget_s=args.budget_s,
        steps_per_video=STEPS_PER_VIDEO,
        peak_tflops=peak_tflops,
        peak_tflops_source=peak_source,
        stages_done=[],
        stages_skipped={},
    )

    def log(msg: str) -> None:
        print(f"[gpu_bench {size.name} {args.device} +{time.monotonic() - start:.0f}s] {msg}", flush=True)

    def save(stage: str | None = None) -> None:
        if stage:
            result["stages_done"].append(stage)
        result["elapsed_s"] = time.monotonic() - start
        write_json(out, result)

    # 1. build, check, eager A/B
    t0 = time.perf_counter()
    stock = unet_ab.build_stock_unet(size, args.device, dtype)
    models, reports = unet_ab.make_variants(stock)
    inputs = unet_ab.make_inputs(stock, size, args.device, dtype)
    weights_bytes = sum(p.numel() * p.element_size() for p in stock.parameters())
    result["setup"] = {
        "build_s": time.perf_counter() - t0,
        "vcut_reports": reports,
        "unet_weight_bytes": weights_bytes,
    }
    log(
        f"built UNets in {result['setup']['build_s']:.1f}s "
        f"({weights_bytes / 2**30:.2f} GiB of weights, shared)"
    )
    result["check"] = unet_ab.check_outputs(models, inputs)
    log(f"check: {result['check']}")
    save("build")
    timing = unet_ab.time_ab(
        models,
        inputs,
        device=args.device,
        rounds=rounds,
        warmup=args.warmup,
        min_measure_s=0.0 if not args.tiny else 0.05,
        deadline=deadline,
        log=log,
    )
    result["eager"] = {"timing": timing, "summary": unet_ab.summarize_ab(timing["rounds"])}
    save("eager")

    # 2. peak memory per mode (one step each)
    peaks = {}
    with torch.inference_mode():
        for mode, model in models.items():
            _reset_peak(args.device)
            unet_ab.unet_call(model, inputs)
            unet_ab.sync(args.device)
            peaks[f"unet_step_{mode}"] = _peak(args.device)
    result["peak_memory_bytes"] = peaks

    # MACs (meta tensors, CPU: seconds) and MFU of the eager run
    if not args.no_macs:
        result["macs"] = unet_ab.mac_prediction(dict(stock.config), size)
        result["mfu"] = {"eager": _mfu(result["eager"]["summary"], result["macs"], peak_tflops)}
    save("peak_memory_and_macs")

    # 3. VAE decode
    if time.monotonic() < deadline:
        vae = build_vae(args.tiny, args.device, dtype)
        try:
            result["vae_decode"] = time_vae_decode(
                vae, size, args.device, dtype, args.decode_chunk_size, args.vae_reps, deadline
            )
            peaks["vae_decode"] = result["vae_decode"]["peak_memory_bytes"]
            log(f"VAE decode of {size.num_frames} frames: {result['vae_decode']['seconds']['median']:.4g}s")
        except torch.OutOfMemoryError as exc:  # only with a chunk too big for the card
            result["stages_skipped"]["vae_decode"] = f"out of memory: {exc}"
        del vae
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        save("vae_decode")
    else:
        result["stages_skipped"]["vae_decode"] = "time budget"

    # 4. torch.compile
    if args.no_compile:
        result["stages_skipped"]["compiled"] = "--no-compile"
    else:
        compiled: dict[str, Any] = {}
        compile_s: dict[str, float] = {}
        result["compiled"] = {
            "backend": args.compile_backend,
            "mode": args.compile_mode,
            "compile_s": compile_s,
        }
        try:
            for mode in ("off", "full", "exact"):  # off vs full first: the paper's comparison
                model = models[mode]
                spent = max(compile_s.values(), default=0.0)
                if time.monotonic() + max(spent, 10.0) > deadline:
                    result["stages_skipped"]["compiled"] = f"time budget (compiled: {sorted(compile_s)})"
                    break
                fn = torch.compile(model, backend=args.compile_backend, mode=args.compile_mode)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    unet_ab.unet_call(fn, inputs)
                unet_ab.sync(args.device)
                compile_s[mode] = time.perf_counter() - t0
                compiled[mode] = fn
                log(f"compiled {mode} in {compile_s[mode]:.1f}s")
                save()
            if compiled and time.monotonic() < deadline:
                timing = unet_ab.time_ab(
                    compiled,
                    inputs,
                    device=args.device,
                    rounds=compiled_rounds,
                    warmup=1,
                    min_measure_s=0.0 if not args.tiny else 0.05,
                    deadline=deadline,
                    log=log,
                )
                result["compiled"].update(timing=timing, summary=unet_ab.summarize_ab(timing["rounds"]))
                if "macs" in result:
                    result["mfu"]["compiled"] = _mfu(
                        result["compiled"]["summary"], result["macs"], peak_tflops
                    )
        except Exception as exc:  # a compiler failure is a finding, not a reason to lose the rest
            result["compiled"]["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            log(f"torch.compile failed: {result['compiled']['error']}")
        save("compiled")

    # 6. per-video estimate: 25 UNet steps + one decode
    if "vae_decode" in result:
        decode_s = result["vae_decode"]["seconds"]["median"]
        est = {}
        for variant in ("eager", "compiled"):
            summary = result.get(variant, {}).get("summary")
            if not summary:
                continue
            per_mode = {
                m: STEPS_PER_VIDEO * e["seconds_per_call"]["median"] + decode_s for m, e in summary.items()
            }
            est[variant] = {
                m: {"seconds": s, "ratio_to_off": s / per_mode["off"]} for m, s in per_mode.items()
            }
        result["per_video_estimate"] = est
    result["peak_rss_bytes"] = unet_ab._rss_peak_bytes()
    result["load_average_at_end"] = machine_info()["load_average_1_5_15min"]
    save("done")
    print(unet_ab.format_summary(result["eager"]["summary"], result.get("macs")))
    if result.get("compiled", {}).get("summary"):
        print("compiled:")
        print(unet_ab.format_summary(result["compiled"]["summary"], result.get("macs")))
    if args.copy_to:
        dest = Path(args.copy_to)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out, dest / out.name)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
