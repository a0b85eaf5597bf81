"""UNet A/B: seconds per SVD UNet call with VCUT ``off``, ``exact`` and ``full``, in one process.

Usage (from the repository root)::

    python -m benchmarks.unet_ab --size tiny
    python -m benchmarks.unet_ab --size svd-xt-small --dtype bf16
    python -m benchmarks.unet_ab --size svd-xt-full --device cuda --dtype bf16   # needs a GPU

How it measures, and why:

* One process, one set of weights, three UNets. ``apply_vcut`` patches in place and cannot
  be undone, so one random-weight UNet is built (``off``) and ``copy.deepcopy``-ed twice
  with a memo that maps every parameter and buffer to itself: only the module structure is
  copied, all weights are shared (the SVD-XT UNet is 1.5 B parameters; three real copies
  would not fit a 24 GB machine). The copies are then patched with ``exact`` and ``full``,
  which only drop or re-route modules of the copy, so the shared weights stay as they are.
* One UNet call = one denoising step of the SVD pipeline: a batch of 2 (classifier-free
  guidance: the unconditional half has a zero embedding, as diffusers does), fixed random
  inputs, ``torch.inference_mode()``.
* Warm-up calls for every mode first (VCUT's first call also computes and caches its
  one-time linear constants; later calls reuse them, as denoising steps 2..N do), then
  ``--rounds`` rounds of [off, exact, full] in rotating order (round k starts with mode
  k mod 3), so that a slow spell of a shared machine hits every mode alike. Each
  measurement is ``calls_per_measurement`` back-to-back calls (chosen so one measurement
  lasts at least ``--min-measure-s``), divided by the number of calls.
* Reported: per mode the median seconds per call with its spread (p25-p75, min-max), and
  the ratio to ``off`` both as the median of the per-round paired ratios and as the ratio
  of medians; next to it the ratio that the ``vcut`` MAC count predicts for the same shape.
  The raw per-round timings go into the JSON file.
* A correctness check runs once: ``exact`` must match ``off`` up to rounding, ``full``
  differs (it drops temporal cross-attention).

Weights are RANDOM: these are speed figures, not videos.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, header, machine_info, rotated, summarize, write_json
from vcut import MODES, shared_weight_copy


@dataclass(frozen=True)
class Size:
    name: str
    model: str  # "tiny" or a name load_unet_config understands
    num_frames: int
    height: int  # pixels of the video
    width: int
    vae_factor: int  # pixels per latent
    default_rounds: int

    @property
    def latent_h(self) -> int:
        return self.height // self.vae_factor

    @property
    def latent_w(self) -> int:
        return self.width // self.vae_factor


SIZES = {
    # The tiny random-weight test model (vcut.tiny): its VAE halves the image.
    "tiny": Size("tiny", "tiny", 4, 64, 64, 2, 25),
    # The real SVD-XT UNet architecture at a shape that a 2-core CPU can run.
    "svd-xt-small": Size("svd-xt-small", "svd-xt", 8, 128, 128, 8, 7),
    # SVD-XT as published: 25 frames at 576x1024 (GPU).
    "svd-xt-full": Size("svd-xt-full", "svd-xt", 25, 576, 1024, 8, 10),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _quiet_diffusers() -> None:
    try:
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()
    except ImportError:
        pass


def build_stock_unet(size: Size, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A random-weight stock SVD UNet of ``size``'s architecture, in eval mode on ``device``."""
    _quiet_diffusers()
    if size.model == "tiny":
        from vcut.tiny import make_tiny_pipeline

        unet = make_tiny_pipeline(seed=seed).unet
    else:
        from diffusers import UNetSpatioTemporalConditionModel

        from vcut import load_unet_config

        config = {k: v for k, v in load_unet_config(size.model).items() if not k.startswith("_")}
        torch.manual_seed(seed)
        # Initialise straight on the device (fast on a GPU); a few legacy-constructed
        # parameters ignore the default device, hence the .to() after.
        with torch.device(device):
            unet = UNetSpatioTemporalConditionModel.from_config(config)
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def make_variants(stock: torch.nn.Module, modes=MODES) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    """``{mode: unet}`` sharing ``stock``'s weights, plus the ``apply_vcut`` report of each."""
    from vcut import apply_vcut, vcut_mode

    models: dict[str, torch.nn.Module] = {}
    reports: dict[str, Any] = {}
    for mode in modes:
        model = stock if mode == "off" else shared_weight_copy(stock)
        reports[mode] = apply_vcut(model, mode).to_dict()
        models[mode] = model
    if vcut_mode(stock) != "off":  # the copies must never touch the original
        raise RuntimeError("patching a copy changed the stock UNet")
    return models, reports


def make_inputs(
    unet: torch.nn.Module, size: Size, device: str, dtype: torch.dtype, batch: int = 2, seed: int = 1
) -> dict[str, torch.Tensor]:
    """Fixed inputs of one denoising step (batch 2 = classifier-free guidance, as the pipeline does)."""
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, size.num_frames, cfg.in_channels, size.latent_h, size.latent_w, generator=g)
    e = torch.randn(1, 1, cfg.cross_attention_dim, generator=g)
    emb = torch.cat([torch.zeros_like(e), e]) if batch == 2 else e.expand(batch, 1, -1).clone()
    n_ids = cfg.projection_class_embeddings_input_dim // cfg.addition_time_embed_dim
    # fps - 1, motion bucket, noise augmentation: SVD's added time ids
    ids = torch.tensor([6.0, 127.0, 0.02] + [0.0] * max(0, n_ids - 3))[:n_ids].repeat(batch, 1)
    return {
        "sample": sample.to(device, dtype),
        "timestep": torch.tensor(1.5, device=device),
        "encoder_hidden_states": emb.to(device, dtype),
        "added_time_ids": ids.to(device, dtype),
    }


def unet_call(model: Callable, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(
        inputs["sample"],
        inputs["timestep"],
        encoder_hidden_states=inputs["encoder_hidden_states"],
        added_time_ids=inputs["added_time_ids"],
        return_dict=False,
    )[0]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_outputs(models: dict[str, Callable], inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``exact`` must equal ``off`` up to rounding; ``full`` is the paper's approximation."""
    with torch.inference_mode():
        outs = {mode: unet_call(model, inputs).float() for mode, model in models.items()}
    ref = outs["off"]
    scale = float(ref.abs().max())
    result: dict[str, Any] = {
        "off_max_abs": scale,
        "all_finite": all(bool(o.isfinite().all()) for o in outs.values()),
    }
    for mode, out in outs.items():
        if mode != "off":
            diff = float((out - ref).abs().max())
            result[f"{mode}_max_abs_diff_vs_off"] = diff
            result[f"{mode}_rel_diff_vs_off"] = diff / scale if scale else None
    return result


def time_ab(
    models: dict[str, Callable],
    inputs: dict[str, torch.Tensor],
    *,
    device: str,
    rounds: int,
    warmup: int = 2,
    calls_per_measurement: int | None = None,
    min_measure_s: float = 0.2,
    deadline: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Warm up every mode, then ``rounds`` rounds of all modes in rotating order.

    Returns ``{"warmup_s": {...}, "calls_per_measurement": k, "rounds": [{"order", "seconds_per_call"}]}``.
    Stops early (fewer rounds, recorded) once ``time.monotonic()`` passes ``deadline``.
    """
    modes = list(models)
    warmup_s: dict[str, list[float]] = {m: [] for m in modes}
    with torch.inference_mode():
        for mode in modes:
            for _ in range(max(1, warmup)):
                t0 = time.perf_counter()
                unet_call(models[mode], inputs)
                sync(device)
                warmup_s[mode].append(time.perf_counter() - t0)
        if calls_per_measurement is None:
            fastest = min(min(v) for v in warmup_s.values())
            calls_per_measurement = max(1, min(1000, math.ceil(min_measure_s / max(fastest, 1e-6))))
        log(
            f"warm-up done ({', '.join(f'{m} {min(v):.4g}s' for m, v in warmup_s.items())}); "
            f"{calls_per_measurement} call(s) per measurement"
        )
        records = []
        for r in range(rounds):
            if deadline is not None and time.monotonic() > deadline and records:
                log(f"time budget reached after {len(records)} rounds")
                break
            order = rotated(modes, r)
            per_call = {}
            for mode in order:
                sync(device)
                t0 = time.perf_counter()
                for _ in range(calls_per_measurement):
                    unet_call(models[mode], inputs)
                sync(device)
                per_call[mode] = (time.perf_counter() - t0) / calls_per_measurement
            records.append({"order": order, "seconds_per_call": per_call})
            log(f"round {r + 1}/{rounds}: " + ", ".join(f"{m} {per_call[m]:.4g}s" for m in modes))
    return {"warmup_s": warmup_s, "calls_per_measurement": calls_per_measurement, "rounds": records}


def summarize_ab(records: list[dict[str, Any]], modes=MODES) -> dict[str, Any]:
    """Per mode: seconds per call (median and spread), paired ratio to ``off`` and ratio of medians."""
    out: dict[str, Any] = {}
    modes = [m for m in modes if records and m in records[0]["seconds_per_call"]]
    secs = {m: [r["seconds_per_call"][m] for r in records] for m in modes}
    for mode in modes:
        entry: dict[str, Any] = {"seconds_per_call": summarize(secs[mode])}
        if "off" in secs and mode != "off":
            paired = [r["seconds_per_call"][mode] / r["seconds_per_call"]["off"] for r in records]
            entry["ratio_to_off_paired"] = summarize(paired)
            entry["ratio_of_medians"] = (
                entry["seconds_per_call"]["median"] / out["off"]["seconds_per_call"]["median"]
            )
        out[mode] = entry
    return out


def mac_prediction(config: dict, size: Size, batch: int = 2, modes=MODES, steps: int = 25) -> dict[str, Any]:
    """MACs of one UNet call per mode (``vcut.count_macs``) and the time ratio they predict.

    A VCUT call here is a *later* call, one that reuses the cached constants, since that is
    what the timed calls are. One ``count_macs`` per mode, with 2 steps: the per-call
    figures come out of its report (the one-time linear layer has no attention matmul, so a
    VCUT call's attention kernels are the same at the first step as later). ``per_video``
    is for ``steps`` denoising steps. ``count_macs`` takes pixel sizes and divides by 8, so it
    is given latent * 8 (the tiny model's VAE only halves).
    """
    from vcut import count_macs

    kw = dict(
        height=size.latent_h * 8, width=size.latent_w * 8, num_frames=size.num_frames, guidance=batch == 2
    )
    out: dict[str, Any] = {
        "convention": "torch FlopCounterMode on meta tensors, MACs = FLOPs/2, classifier-free guidance "
        "batch; 'with_attention' adds the attention kernels' Q.K^T and A.V matmuls, "
        "which a CPU count leaves out",
        "steps_per_video": steps,
    }
    for mode in modes:
        if mode == "off":
            continue
        two = count_macs(config, num_inference_steps=2, mode=mode, **kw)
        stock = two.unet_call_macs
        stock_attn = two.baseline_macs_with_attention // 2 - stock
        vcut_attn = (two.vcut_macs_with_attention - two.vcut_macs) // 2
        again = two.vcut_call_macs
        out.setdefault(
            "off",
            {
                "call_macs": stock,
                "call_macs_with_attention": stock + stock_attn,
                "params": two.params_baseline,
                "per_video_macs": steps * stock,
                "per_video_macs_with_attention": steps * (stock + stock_attn),
            },
        )
        per_video = two.vcut_first_call_macs + (steps - 1) * again
        out[mode] = {
            "call_macs": again,
            "call_macs_with_attention": again + vcut_attn,
            "params": two.params_vcut,
            "params_removed": two.params_removed,
            "per_video_macs": per_video,
            "per_video_macs_saved": steps * stock - per_video,
            "per_video_macs_with_attention": per_video + steps * vcut_attn,
            "predicted_ratio": again / stock,
            "predicted_ratio_with_attention": (again + vcut_attn) / (stock + stock_attn),
        }
    return out


def _rss_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def format_summary(summary: dict[str, Any], macs: dict[str, Any] | None = None) -> str:
    lines = [
        f"{'mode':6} {'median s/call':>14} {'p25-p75':>21} {'ratio to off (paired median, p25-p75)':>40}"
        + ("  MAC-predicted ratio" if macs else "")
    ]
    for mode, entry in summary.items():
        s = entry["seconds_per_call"]
        line = f"{mode:6} {s['median']:14.5g} {s['p25']:10.4g}-{s['p75']:<10.4g}"
        if "ratio_to_off_paired" in entry:
            r = entry["ratio_to_off_paired"]
            line += f" {r['median']:>22.4f} ({r['p25']:.4f}-{r['p75']:.4f})"
            if macs and mode in macs:
                line += f"  {macs[mode]['predicted_ratio']:.4f}"
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.unet_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on cpu, bf16 on cuda")
    p.add_argument(
        "--rounds", type=int, default=None, help="rounds of [off, exact, full] (default: per size)"
    )
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls per mode")
    p.add_argument(
        "--min-measure-s",
        type=float,
        default=0.2,
        help="repeat calls within one measurement until it lasts this long",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each of the three UNets")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-macs", action="store_true", help="skip the MAC count")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file (default: benchmarks/results/unet_ab_<size>_<device>_<dtype>[_compiled].json)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = SIZES[args.size]
    dtype_name = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    dtype = DTYPES[dtype_name]
    rounds = args.rounds or size.default_rounds
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or RESULTS_DIR / (
        f"unet_ab_{size.name}_{args.device}_{dtype_name}{'_compiled' if args.compile else ''}.json"
    )
    result: dict[str, Any] = header("unet_ab")
    result.update(
        size=asdict(size),
        device=args.device,
        dtype=dtype_name,
        compile=args.compile,
        batch=2,
        shape={
            "batch": 2,
            "frames": size.num_frames,
            "latent_h": size.latent_h,
            "latent_w": size.latent_w,
            "height": size.height,
            "width": size.width,
        },
    )

    def log(msg: str) -> None:
        print(f"[unet_ab {size.name}] {msg}", flush=True)

    t0 = time.perf_counter()
    stock = build_stock_unet(size, args.device, dtype, seed=args.seed)
    models, reports = make_variants(stock)
    build_s = time.perf_counter() - t0
    inputs = make_inputs(stock, size, args.device, dtype)
    log(
        f"built 3 UNets sharing weights in {build_s:.1f}s; params: "
        + ", ".join(f"{m} {r['params_after'] / 1e6:.2f}M" for m, r in reports.items())
    )
    result["setup"] = {"build_s": build_s, "vcut_reports": reports}
    result["check"] = check_outputs(models, inputs)
    log(f"check: {result['check']}")
    callables: dict[str, Callable] = dict(models)
    if args.compile:
        callables = {m: torch.compile(model) for m, model in models.items()}
    timing = time_ab(
        callables,
        inputs,
        device=args.device,
        rounds=rounds,
        warmup=args.warmup,
        min_measure_s=args.min_measure_s,
        log=log,
    )
    result["timing"] = timing
    result["summary"] = summarize_ab(timing["rounds"])
    if not args.no_macs:
        result["macs"] = mac_prediction(dict(stock.config), size)
    result["peak_rss_bytes"] = _rss_peak_bytes()
    if args.device.startswith("cuda"):
        result["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    result["load_average_at_end"] = machine_info()["load_average_1_5_15min"]
    write_json(out, result)
    print(format_summary(result["summary"], result.get("macs")))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
