"""Whole-video A/B per speed lever on the CPU: seconds per video with the Renderer, paired rounds.

Usage (from the repository root)::

    python -m benchmarks.levers --size tiny --threads 2
    python -m benchmarks.levers --size svd-xt-small --threads 2 --rounds 5

Each configuration is a lever on top of ``off`` (the stock UNet through the Renderer), named in
the lever grammar of :mod:`jobs.levers` (the one ``vcut compare --configs`` takes):
``exact`` and ``full`` (VCUT), ``full+cache3`` (VCUT plus the step cache, interval 3),
``full+g0-0.6`` (VCUT plus classifier-free guidance on the first 60 % of the schedule only),
``full+compile`` (VCUT plus ``torch.compile``, its first video, the compile, reported apart).
All configurations share one set of random weights (the UNet is copied with its parameters
shared, as in ``benchmarks.unet_ab``), render the same image with the same seed, and run in
rotating order round after round, so a slow spell of a shared machine hits all alike. The
ratio to ``off`` is taken per round (paired) and reported as median and p25-p75, next to the
ratio that the MAC count (``vcut.count_macs``, step cache included) predicts for the whole
denoising loop. Batched rows are measured by ``benchmarks.batched``.

Sizes: ``tiny`` is the tiny test pipeline (64x64, 4 frames); ``svd-xt-small`` swaps in a
random-weight UNet of SVD-XT's architecture at 8 frames with a 16x16 latent (what a 128x128
video gives the real VAE), with the tiny VAE and a tiny CLIP encoder projecting to SVD-XT's
1024-wide embedding: the UNet, which the levers change, is the real one.

Weights are RANDOM: these are speed figures, not videos.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
from PIL import Image

from benchmarks.common import RESULTS_DIR, header, machine_info, rotated, summarize, write_json
from jobs import levers
from jobs.levers import LeverConfig
from vcut import shared_weight_copy
from vcut.modes import MODES

CONFIGS = (*MODES, "full+cache3", "full+g0-0.6", "full+compile")

SIZES: dict[str, dict[str, int]] = {
    # pixels of the video, frames, and the default number of denoising steps
    "tiny": {"height": 64, "width": 64, "num_frames": 4, "steps": 9},
    "svd-xt-small": {"height": 32, "width": 32, "num_frames": 8, "steps": 6},
}


def build_pipeline(size: str, dtype: torch.dtype, seed: int = 0):
    """The stock pipeline of ``size`` with random weights, on the CPU."""
    from diffusers import StableVideoDiffusionPipeline
    from diffusers.utils import logging as dlogging

    from vcut.tiny import make_tiny_pipeline

    dlogging.set_verbosity_error()
    pipe = make_tiny_pipeline(seed=seed)
    if size == "svd-xt-small":
        from diffusers import UNetSpatioTemporalConditionModel
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        from vcut import load_unet_config

        config = {k: v for k, v in load_unet_config("svd-xt").items() if not k.startswith("_")}
        torch.manual_seed(seed)
        unet = UNetSpatioTemporalConditionModel.from_config(config)
        enc_cfg = CLIPVisionConfig(**{**pipe.image_encoder.config.to_dict(), "projection_dim": 1024})
        encoder = CLIPVisionModelWithProjection(enc_cfg)
        pipe = StableVideoDiffusionPipeline(
            vae=pipe.vae,
            image_encoder=encoder,
            unet=unet,
            scheduler=pipe.scheduler,
            feature_extractor=pipe.feature_extractor,
        )
    pipe.to(dtype=dtype)
    for module in (pipe.unet, pipe.vae, pipe.image_encoder):
        module.eval().requires_grad_(False)
    return pipe


def parse_config(name: str) -> LeverConfig:
    """A configuration in the lever grammar (:func:`jobs.levers.parse_config`)."""
    return levers.parse_config(name)


def make_renderers(pipe, configs: tuple[str, ...]) -> dict[str, Any]:
    """One Renderer per configuration, every UNet sharing ``pipe.unet``'s weights."""
    from diffusers import StableVideoDiffusionPipeline

    from pipeline import Renderer

    renderers = {}
    for name in configs:
        components = dict(pipe.components, unet=shared_weight_copy(pipe.unet))
        copy = StableVideoDiffusionPipeline(**components)
        renderers[name] = Renderer.from_pipe(copy, model_id="bench", **parse_config(name).renderer_kwargs())
    return renderers


def predicted_ratios(unet_config: dict, configs, steps: int, height: int, width: int, frames: int):
    """The denoising loop's MACs per configuration over ``off``'s (``vcut.count_macs``)."""
    from jobs.macs import VideoShape, count_video_macs

    out = {}
    for name in configs:
        if name == "off":
            continue
        config = parse_config(name)
        interval = VideoShape(height, width, frames, steps, **config.generate_kwargs())
        report = count_video_macs(unet_config, interval, config.levers())
        out[name] = {
            "baseline_macs": report.baseline_macs,
            "macs": report.baseline_macs - report.macs_saved,
            "macs_saved_vcut": report.macs_saved_vcut,
            "macs_saved_step_cache": report.macs_saved_step_cache,
            "macs_saved_guidance": report.macs_saved_guidance,
            "predicted_ratio": 1 - report.macs_saved / report.baseline_macs,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.levers", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated (default {CONFIGS})")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=None, help="denoising steps per video (default: by size)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file (default: results/levers_<size>_cpu.json)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    steps = args.steps or size["steps"]
    configs = tuple(c.strip() for c in args.configs.split(",") if c.strip())
    if "off" not in configs:
        configs = ("off", *configs)
    for name in configs:  # every name checked before anything is built: one line naming the token
        try:
            parse_config(name)
        except levers.LeverError as exc:
            p.error(str(exc))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    out = args.out or RESULTS_DIR / f"levers_{args.size}_cpu.json"

    pipe = build_pipeline(args.size, dtype)
    unet_config = dict(pipe.unet.config)
    renderers = make_renderers(pipe, configs)
    config_kw = {name: parse_config(name).generate_kwargs() for name in configs}  # gA-B
    image = Image.new("RGB", (size["width"], size["height"]), (200, 120, 40))
    gen_kw = dict(
        seed=0,
        height=size["height"],
        width=size["width"],
        num_frames=size["num_frames"],
        num_inference_steps=steps,
    )
    result: dict[str, Any] = header("levers")
    result.update(size=args.size, shape=size, steps=steps, dtype=args.dtype, threads=args.threads)
    latent = 2  # the tiny VAE halves the image; count_macs takes pixels of an 8x VAE
    result["macs"] = predicted_ratios(
        unet_config,
        configs,
        steps,
        size["height"] // latent * 8,
        size["width"] // latent * 8,
        size["num_frames"],
    )

    first: dict[str, float] = {}
    frames0: dict[str, Any] = {}
    with torch.inference_mode():
        for name in configs:  # first video of each (compile happens here), then one warm video
            t0 = time.perf_counter()
            frames0[name] = renderers[name].generate(image, **gen_kw, **config_kw[name]).frames
            first[name] = time.perf_counter() - t0
            renderers[name].generate(image, **gen_kw, **config_kw[name])
            print(f"[levers] first video {name}: {first[name]:.3f}s", flush=True)
        ref = frames0["off"].astype("int16")
        result["first_video_s"] = first
        result["max_abs_uint8_vs_off"] = {
            n: int(abs(f.astype("int16") - ref).max()) for n, f in frames0.items() if n != "off"
        }
        rounds = []
        for r in range(args.rounds):
            per = {}
            for name in rotated(list(configs), r):
                gen = renderers[name].generate(image, **gen_kw, **config_kw[name])
                per[name] = {"total": gen.timings["total"], "denoise": gen.timings["denoise"]}
            rounds.append(per)
            print(
                f"[levers] round {r + 1}/{args.rounds}: "
                + ", ".join(f"{n} {per[n]['total']:.3f}s" for n in configs),
                flush=True,
            )
            result["rounds"] = rounds
            write_json(out, result)

    summary = {}
    for name in configs:
        entry: dict[str, Any] = {key: summarize(r[name][key] for r in rounds) for key in ("total", "denoise")}
        if name != "off":
            for key in ("total", "denoise"):
                entry[f"{key}_ratio_to_off_paired"] = summarize(r[name][key] / r["off"][key] for r in rounds)
            entry["predicted_denoise_ratio"] = result["macs"][name]["predicted_ratio"]
        summary[name] = entry
    result["summary"] = summary
    result["load_average_at_end"] = machine_info()["load_average_1_5_15min"]
    write_json(out, result)
    print(f"{'config':14} {'s/video':>9} {'ratio (paired, p25-p75)':>26} {'denoise ratio':>14} {'MACs':>7}")
    for name, e in summary.items():
        line = f"{name:14} {e['total']['median']:9.4f}"
        if name != "off":
            t, d = e["total_ratio_to_off_paired"], e["denoise_ratio_to_off_paired"]
            line += f" {t['median']:10.3f} ({t['p25']:.3f}-{t['p75']:.3f}) {d['median']:14.3f}"
            line += f" {e['predicted_denoise_ratio']:7.3f}"
        print(line)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
