"""Stage ``macs``: MACs per UNet step of each configuration (``vcut.count_macs`` on meta tensors, in
a CPU subprocess started at the build so that it runs while the GPU stages do) and model FLOP
utilisation = 2 x MACs / seconds per step / the GPU's dense peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from benchmarks.common import REPO_ROOT, write_json
from benchmarks.gpu.machinery import _error
from benchmarks.gpu.model import Shape
from vcut.modes import MODES

if TYPE_CHECKING:
    from benchmarks.gpu.bench import Bench


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


def start(bench: Bench, unet_config: dict[str, Any]) -> None:
    """Count MACs in a CPU subprocess (meta tensors, no GPU) while the GPU stages run."""
    if bench.args.no_macs:
        return
    cache = bench.args.step_cache or None
    variants = [(mode, None) for mode in MODES] + ([("full", cache)] if cache else [])
    factor = _vae_factor(bench)
    jobs = [
        {
            "key": mac_key(mode, c, shape),
            "mode": mode,
            "step_cache": c,
            "height": shape.height * 8 // factor,  # count_macs takes pixels and divides by 8
            "width": shape.width * 8 // factor,
            "num_frames": shape.num_frames,
        }
        for shape in (bench.shape, bench.batch_shape)
        for mode, c in variants
    ]
    tmp = Path(tempfile.mkdtemp(prefix="gpu-bench-macs-"))
    spec = tmp / "spec.json"
    bench.macs_out = tmp / "macs.json"
    bench.macs_log = tmp / "log.txt"
    write_json(spec, {"unet_config": unet_config, "steps": bench.target, "jobs": jobs})
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    log = open(bench.macs_log, "w")  # noqa: SIM115 (the child writes it; closed with the child)
    bench.macs_proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.gpu", "--macs-job", str(spec), str(bench.macs_out)],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    bench.result["stages"]["build"]["macs_jobs"] = len(jobs)


def stop(bench: Bench) -> None:
    proc = getattr(bench, "macs_proc", None)
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def run(bench: Bench) -> None:
    if bench.args.no_macs:
        return bench.skip("macs", "--no-macs")
    proc = getattr(bench, "macs_proc", None)
    if proc is None:
        return bench.skip("macs", "the MAC count was not started")
    try:
        proc.wait(timeout=max(1.0, bench.left()))
    except subprocess.TimeoutExpired:
        stop(bench)
        bench.result["stages"]["macs"]["note"] = "time budget: the MAC count was stopped, partial"
    counted = json.loads(bench.macs_out.read_text()) if bench.macs_out.exists() else {}
    if proc.returncode:
        bench.result["stages"]["macs"]["log_tail"] = bench.macs_log.read_text()[-2000:]
    peak = bench.result["peak_tflops"]["tflops"]
    macs: dict[str, Any] = {
        "convention": "vcut.count_macs on meta tensors (MACs = FLOPs / 2), CFG batch 2, averaged over "
        f"a {bench.target}-step video; 'with_attention' counts the attention kernels' matmuls, which a "
        "GPU runs; MFU = 2 x MACs per step (with attention) x batch / seconds per step / peak",
        "counted": counted,
    }
    mfu: dict[str, Any] = {}
    bench.result["macs"], bench.result["mfu"] = macs, mfu
    for name, rec in bench.result["configs"].items():
        if not rec.get("per_step_s"):
            continue
        base = name.split(":")[-1]
        mode = "off" if base in ("stock", "off") else ("full" if base.startswith("full") else base)
        cache = bench.args.step_cache if "cache" in base else None
        m = counted.get(mac_key(mode, cache, Shape(**rec["shape"])))
        if not m or "per_step_macs_with_attention" not in m:
            mfu[name] = {"mfu": None, "why": (m or {}).get("error", "not counted")}
            continue
        tflops = 2 * m["per_step_macs_with_attention"] * rec.get("batch", 1) / rec["per_step_s"] / 1e12
        mfu[name] = {"achieved_tflops": tflops, "mfu": tflops / peak if peak else None}
        rec["achieved_tflops"] = tflops
        rec["mfu"] = mfu[name]["mfu"]


def _vae_factor(bench: Bench) -> int:
    return 2 if bench.tiny else 8
