"""``vcut run MANIFEST --out DIR --dry-run``: what a job would do, without Ray or a model.

Validates the manifest, reads DIR's committed results (the resume state: ``results/`` for the
``files`` layout, published shards for ``webdataset``; nothing is written or removed) and
prints the rows to render (and how many rows already ok changed: ``jobs.fingerprint``),
distinct images, shapes with counts, MACs per lever (``vcut.count_macs``: the model's UNet
config only) and an estimate of hours (GPU-hours; CPU-hours when DIR's timed rows ran on CPUs,
which record no GPU memory peak):

1. from per-shape timings in DIR's earlier results (mean ``seconds`` of ``ok`` rows per
   height x width x frames x steps; shapes without a timing are scaled by MACs from the
   measured ones), else
2. from the H100 benchmark figures (``benchmarks/results/gpu_bench_svd-xt-full_*.json`` of a
   source checkout: seconds per video of the job's VCUT / step-cache configuration at
   1024x576x25, 25 steps) scaled by MACs, else
3. none ("no timing source"): an installed package does not ship the benchmarks folder.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow.compute as pc

from jobs import results
from jobs.manifest import hash_ids, id_hash, iter_manifest, validate_manifest
from jobs.output import OutputDir

BENCH_FILE = (
    Path(__file__).resolve().parents[1]
    / "benchmarks"
    / "results"
    / "gpu_bench_svd-xt-full_nvidia-h100-80gb-hbm3.json"
)
#: The benchmark's whole-video shape (height, width, frames, steps).
BENCH_SHAPE = (576, 1024, 25, 25)


def _macs_model(model_id: str) -> str:
    """What ``count_macs`` reads: a local folder or a published name as is; a hub id that is
    not in the local cache is counted with the published config it names (no network)."""
    if Path(model_id).expanduser().is_dir() or model_id in ("svd", "svd-xt"):
        return model_id
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(model_id, "unet/config.json"), str):
            return model_id
    except Exception:
        pass
    return "svd-xt" if "xt" in model_id.lower() else "svd"


def _count(model: str, shape: tuple[int, int, int, int], guidance: bool, cfg: Any):
    from vcut import count_macs

    h, w, f, steps = shape
    return count_macs(
        model,
        height=h,
        width=w,
        num_frames=f,
        num_inference_steps=steps,
        mode=str(cfg.model.vcut.value if hasattr(cfg.model.vcut, "value") else cfg.model.vcut),
        guidance=guidance,
        step_cache=cfg.model.step_cache,
        step_cache_depth=int(cfg.model.step_cache_depth),
    )


def _earlier_device(out: OutputDir) -> str:
    """What DIR's timed ``ok`` rows ran on, for the estimate's unit: ``GPU`` when every one
    recorded a GPU memory peak (only CUDA rows do), ``CPU`` when none did, else ``worker``."""
    if not results._parts(out):
        return "GPU"
    table = results.read_results(out, ["status", "seconds", "gpu_memory_bytes"])
    table = table.filter(
        pc.and_(pc.equal(table.column("status"), "ok"), pc.is_valid(table.column("seconds")))
    )
    on_gpu = int(pc.sum(pc.is_valid(table.column("gpu_memory_bytes"))).as_py() or 0)
    return "GPU" if on_gpu == table.num_rows else "CPU" if on_gpu == 0 else "worker"


def _earlier_timings(out: OutputDir) -> dict[tuple[int, int, int, int], tuple[float, int, float]]:
    """Per shape of DIR's committed ``ok`` rows: (mean seconds, rows, mean MACs or nan)."""
    if not results._parts(out):
        return {}
    cols = ["status", "height", "width", "num_frames", "frames", "num_inference_steps", "seconds", "macs"]
    table = results.read_results(out, cols)
    table = table.filter(
        pc.and_(pc.equal(table.column("status"), "ok"), pc.is_valid(table.column("seconds")))
    )
    found: dict[tuple[int, int, int, int], list[tuple[float, float]]] = {}
    for r in table.to_pylist():
        frames = r["num_frames"] if r["num_frames"] is not None else r["frames"]
        if None in (r["height"], r["width"], frames, r["num_inference_steps"]):
            continue
        key = (int(r["height"]), int(r["width"]), int(frames), int(r["num_inference_steps"]))
        found.setdefault(key, []).append((float(r["seconds"]), float(r["macs"] or np.nan)))
    timings = {}
    for key, v in found.items():
        known = [m for _, m in v if np.isfinite(m)]
        timings[key] = (float(np.mean([s for s, _ in v])), len(v), float(np.mean(known)) if known else np.nan)
    return timings


def _bench_seconds_per_mac(cfg: Any) -> tuple[float, str] | None:
    """Seconds per MAC of the benchmark's configuration closest to the job's, or None."""
    if not BENCH_FILE.is_file():
        return None
    try:
        data = json.loads(BENCH_FILE.read_text())
        mode = str(cfg.model.vcut.value if hasattr(cfg.model.vcut, "value") else cfg.model.vcut)
        cache = int(cfg.model.step_cache or 1)
        name = f"{mode}+cache{cache}" if cache > 1 and f"{mode}+cache{cache}" in data["configs"] else mode
        counted = data["macs"]["counted"][f"{mode}|cache{cache if name != mode else 0}|1024x576x25"]
        video_s = float(data["configs"][name]["video_s"])
        macs = float(counted["per_step_macs"]) * BENCH_SHAPE[3]
        gpu = data["machine"]["gpu"]["name"]
        return (
            video_s / macs,
            f"{gpu} benchmark ({name}: {video_s:.1f} s per 1024x576x25 video), scaled by MACs",
        )
    except (KeyError, TypeError, ValueError, OSError):
        return None


def _fmt_macs(value: float) -> str:
    for unit, scale in (("PMAC", 1e15), ("TMAC", 1e12), ("GMAC", 1e9), ("MMAC", 1e6)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} MAC"


def dry_run(cfg: Any, manifest: str, out: OutputDir, stream: TextIO) -> int:
    """Print what ``vcut run`` would do; 0, or ManifestError for an invalid manifest."""
    from jobs.runner import resolve_params
    from jobs.shards import check_layout, scan

    info = validate_manifest(manifest, reserved=results.RESERVED_COLUMNS)
    check_layout(cfg, info)
    layout = str(cfg.output.layout.value if hasattr(cfg.output.layout, "value") else cfg.output.layout)
    if cfg.output.overwrite:
        done = np.zeros(0, dtype=np.uint64)
    elif layout == "webdataset":
        done = scan(out, clean=False).done
    else:
        done = results.done_ids(out)

    from omegaconf import OmegaConf

    from jobs.fingerprint import Changes

    cfg_dict = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    changes = Changes(out, cfg_dict, resolve_params, rerender=cfg.output.rerender == "changed")
    model = _macs_model(str(cfg.model.id))
    frames_default = cfg.defaults.num_frames
    if frames_default is None:
        from vcut.macs import load_unet_config

        try:
            frames_default = int(load_unet_config(model).get("num_frames", 25))
        except Exception:
            frames_default = 25
    defaults = dict(cfg.defaults)
    rows = skipped = 0
    images: set[int] = set()
    shapes: Counter[tuple[int, int, int, int, bool]] = Counter()
    for chunk in iter_manifest(manifest, int(cfg.workers.window_rows)):
        skip = changes.check(chunk, results.is_done(hash_ids([r["id"] for r in chunk]), done))
        skipped += int(skip.sum())
        for row, skipped_row in zip(chunk, skip, strict=True):
            if skipped_row:
                continue
            rows += 1
            images.add(id_hash(row["_image"]))
            p = resolve_params(row, defaults)
            frames = int(p["num_frames"] if p["num_frames"] is not None else frames_default)
            key = (int(p["height"]), int(p["width"]), frames, int(p["num_inference_steps"]))
            shapes[(*key, float(p["max_guidance_scale"]) > 1.0)] += 1

    def say(line: str = "") -> None:
        print(line, file=stream)

    mode = str(cfg.model.vcut.value if hasattr(cfg.model.vcut, "value") else cfg.model.vcut)
    say("vcut run --dry-run: nothing is rendered, Ray is not started")
    say(f"manifest: {manifest}: {info.num_rows} rows, valid")
    where = f"published shards in {out.uri_of('shards')}" if layout == "webdataset" else out.uri_of("results")
    say(f"to render: {rows} rows ({skipped} already ok in {where})")
    if changes.changed and changes.rerender:
        say(f"changed: {changes.changed} rows already ok whose inputs changed render again (--rerender)")
    elif changes.changed:
        say(
            f"changed: {changes.changed} rows already ok whose inputs changed are kept "
            "(--rerender changed renders them again)"
        )
    if layout == "webdataset" and rows:
        size = int(cfg.output.shard_size)
        say(f"layout: webdataset, {-(-rows // size)} new shard(s) of up to {size} samples")
    say(f"distinct images: {len(images)}")
    macs: dict[tuple, Any] = {}
    mac_error = None
    if shapes:
        say("shapes (HxWxF, steps): rows")
        for (h, w, f, steps, guidance), n in sorted(shapes.items(), key=lambda kv: -kv[1]):
            cfg_note = "" if guidance else ", no guidance"
            say(f"  {h}x{w}x{f}, {steps} steps{cfg_note}: {n}")
            try:
                macs[(h, w, f, steps, guidance)] = _count(model, (h, w, f, steps), guidance, cfg)
            except Exception as exc:  # a shape the model cannot take: say so, go on
                mac_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    cache = cfg.model.step_cache if (cfg.model.step_cache or 1) > 1 else None
    lever = f"vcut {mode}, step cache {'every ' + str(cache) if cache else 'off'}"
    if macs:
        tot = {
            k: sum(getattr(r, k) * shapes[s] for s, r in macs.items())
            for k in ("vcut_macs", "baseline_macs", "macs_saved_vcut", "macs_saved_step_cache")
        }
        note = "" if model == str(cfg.model.id) else f" (UNet config of {model!r})"
        say(f"MACs ({lever}){note}:")
        say(f"  spent {_fmt_macs(tot['vcut_macs'])} of {_fmt_macs(tot['baseline_macs'])} stock")
        say(
            f"  saved by VCUT {_fmt_macs(tot['macs_saved_vcut'])}, "
            f"by step caching {_fmt_macs(tot['macs_saved_step_cache'])}"
        )
    if mac_error:
        say(f"MACs: not counted for every shape ({mac_error})")

    seconds, source = _estimate(cfg, out, shapes, macs)
    # earlier rows' timings are in their own device's hours (a CPU test job's are no GPU-hours)
    unit = _earlier_device(out) if source.startswith("per-shape timings") else "GPU"
    if not rows:
        say("estimate: 0 hours (nothing to render)")
    elif seconds is None:
        say(f"estimate: none ({source})")
    else:
        say(f"estimate: {seconds / 3600:.4g} {unit}-hours ({source})")
    return 0


def _estimate(cfg: Any, out: OutputDir, shapes: Counter, macs: dict) -> tuple[float | None, str]:
    """Seconds for the rows to render, and which source gave them."""
    earlier = _earlier_timings(out)
    if earlier:
        rate_rows = [(s, m) for s, _, m in earlier.values() if np.isfinite(m) and m > 0]
        rate = sum(s for s, _ in rate_rows) / sum(m for _, m in rate_rows) if rate_rows else None
        total, measured, scaled = 0.0, 0, 0
        for (h, w, f, steps, guidance), n in shapes.items():
            if (h, w, f, steps) in earlier:
                total += earlier[(h, w, f, steps)][0] * n
                measured += n
            elif rate is not None and (h, w, f, steps, guidance) in macs:
                total += macs[(h, w, f, steps, guidance)].vcut_macs * rate * n
                scaled += n
            else:
                break  # a shape neither measured nor scalable: the benchmark figures, if any
        else:
            timed = sum(n for _, n, _ in earlier.values())
            return total, (
                f"per-shape timings of {timed} earlier ok rows in {out.uri_of('results')}: "
                f"{measured} rows by their shape's mean seconds, {scaled} scaled by MACs"
            )
    bench = _bench_seconds_per_mac(cfg)
    if bench is None:
        return None, "no timing source: no earlier results in DIR, no benchmark figures"
    rate, source = bench
    if len(macs) < len(shapes):
        return None, "no timing source: MACs unknown for some shapes"
    return sum(r.vcut_macs * rate * shapes[s] for s, r in macs.items()), source
