"""``vcut run MANIFEST --out DIR --dry-run``: what a job would do, without Ray or a model.

Validates the manifest, reads DIR's committed results (the resume state: ``results/`` for the
``files`` layout, published shards for ``webdataset``; nothing is written or removed) and
prints the rows to render (and how many rows already ok changed: ``jobs.fingerprint``),
distinct images, shapes with counts, MACs per lever (``vcut.count_macs``: the model's UNet
config only) and an estimate of hours (GPU-hours; CPU-hours when DIR's timed rows ran on CPUs,
which record no GPU memory peak) from the first of these timing sources that covers every
shape to render:

1. DIR's own earlier results: the mean ``seconds`` of ``ok`` rows per height x width x frames
   x steps; shapes without a timing are scaled by MACs from the measured ones;
2. ``--timing FILE``: another job's results the same way (its ``--out`` folder, or a results
   Parquet file), or a ``benchmarks/gpu_bench.py`` JSON (seconds per video of the job's VCUT /
   step-cache configuration at 1024x576x25, 25 steps, scaled by MACs);
3. none ("no timing source"): the line says to give ``--timing``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import generation, results
from jobs.macs import MAC_FIELDS, Levers, VideoShape, count_video_macs
from jobs.manifest import hash_ids, id_hash, iter_manifest, validate_manifest
from jobs.output import OutputDir, open_output
from jobs.text import error_line, si

#: The benchmark's whole-video shape (height, width, frames, steps).
BENCH_SHAPE = (576, 1024, 25, 25)
#: Per shape (height, width, frames, steps): (mean seconds, rows, mean MACs or nan).
Timings = dict[tuple[int, int, int, int], tuple[float, int, float]]
_TIMING_COLUMNS = ["status", "height", "width", "num_frames", "frames", "num_inference_steps",
                   "seconds", "macs"]  # fmt: skip


class TimingError(ValueError):
    """``--timing FILE`` cannot be read as a timing source (one line, exit status 2)."""


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


def _timings(table: pa.Table) -> Timings:
    """Per shape of a results table's ``ok`` rows with seconds: (mean seconds, rows, mean MACs)."""
    for name in _TIMING_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows))
    table = table.filter(
        pc.and_(pc.equal(table.column("status"), "ok"), pc.is_valid(table.column("seconds")))
    )
    found: dict[tuple[int, int, int, int], list[tuple[float, float]]] = {}
    for r in table.select(_TIMING_COLUMNS).to_pylist():
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


def _out_timings(out: OutputDir) -> Timings:
    """Per-shape timings of a job folder's committed results (empty: none yet)."""
    if not results._parts(out):
        return {}
    schema = results.committed_schema(out)  # a damaged part: CorruptPartError
    return _timings(results.read_results(out, [c for c in _TIMING_COLUMNS if c in schema.names]))


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


def _bench_seconds_per_mac(data: dict, levers: Levers) -> tuple[float, str]:
    """Seconds per MAC of a ``gpu_bench.py`` result's configuration closest to ``levers``."""
    mode, cache = levers.mode, int(levers.step_cache or 1)
    name = f"{mode}+cache{cache}" if cache > 1 and f"{mode}+cache{cache}" in data["configs"] else mode
    counted = data["macs"]["counted"][f"{mode}|cache{cache if name != mode else 0}|1024x576x25"]
    video_s = float(data["configs"][name]["video_s"])
    macs = float(counted["per_step_macs"]) * BENCH_SHAPE[3]
    gpu = data["machine"]["gpu"]["name"]
    return video_s / macs, f"{gpu} benchmark ({name}: {video_s:.1f} s per 1024x576x25 video), scaled by MACs"


def read_timing(path: str, levers: Levers) -> tuple[Timings, tuple[float, str] | None]:
    """``--timing FILE``: (per-shape timings, None) from another job's ``--out`` folder or a
    results Parquet file; ({}, (seconds per MAC, source)) from a ``gpu_bench.py`` JSON.
    Raises TimingError naming the file when it is neither."""
    try:
        if path.endswith(".json"):
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                return {}, _bench_seconds_per_mac(json.load(f), levers)
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            return _timings(pq.read_table(os.path.expanduser(path))), None
        out = open_output(path)
        if not results._parts(out):
            raise ValueError("no results/ part files (not the --out of a vcut run?)")
        return _out_timings(out), None
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        raise TimingError(
            f"--timing {path!r}: {error_line(exc)}; give a job's --out folder, a results .parquet "
            "file or a benchmarks/gpu_bench.py .json"
        ) from exc


def _count(model: str, key: tuple[int, int, int, int, tuple[float, float] | None], levers: Levers) -> Any:
    """``key``'s last item: the rows' guidance interval (guidance_start, guidance_stop), None
    without classifier-free guidance."""
    h, w, f, steps, guidance = key
    start, stop = guidance or (0.0, 1.0)
    return count_video_macs(model, VideoShape(h, w, f, steps, guidance is not None, start, stop), levers)


def dry_run(cfg: Any, manifest: str, out: OutputDir, stream: TextIO, *, timing: str | None = None) -> int:
    """Print what ``vcut run`` would do; 0. Raises ManifestError for an invalid manifest,
    TimingError for an unreadable ``timing`` file (:func:`read_timing`)."""
    from jobs.planner import resolve_params
    from jobs.shards import check_layout, scan

    info = validate_manifest(manifest, reserved=results.RESERVED_COLUMNS)
    check_layout(cfg, info)
    levers = Levers.of_model(cfg.model)
    other = read_timing(timing, levers) if timing else None
    layout = str(getattr(cfg.output.layout, "value", cfg.output.layout))
    gen = generation.begin(out, bool(cfg.output.overwrite), write=False)  # an open overwrite resumes
    if layout == "webdataset":
        done = scan(out, clean=False, gen=gen).done
    else:
        done = generation.done_ids(out, gen)

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
    shapes: Counter[tuple[int, int, int, int, tuple[float, float] | None]] = Counter()
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
            interval = (float(p["guidance_start"]), float(p["guidance_stop"]))
            shapes[(*key, interval if float(p["max_guidance_scale"]) > 1.0 else None)] += 1

    def say(line: str = "") -> None:
        print(line, file=stream)

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
            if guidance and guidance != (0.0, 1.0):
                cfg_note = f", guidance on [{guidance[0]:g}, {guidance[1]:g})"
            say(f"  {h}x{w}x{f}, {steps} steps{cfg_note}: {n}")
            try:
                macs[(h, w, f, steps, guidance)] = _count(model, (h, w, f, steps, guidance), levers)
            except Exception as exc:  # a shape the model cannot take: say so, go on
                mac_error = error_line(exc)
    cache = levers.step_cache if (levers.step_cache or 1) > 1 else None
    lever = f"vcut {levers.mode}, step cache {'every ' + str(cache) if cache else 'off'}"
    if macs:
        tot = {
            k: sum(getattr(r, k) * shapes[s] for s, r in macs.items())
            for k in ("vcut_macs", "baseline_macs", *MAC_FIELDS[2:])
        }
        note = "" if model == str(cfg.model.id) else f" (UNet config of {model!r})"
        say(f"MACs ({lever}){note}:")
        say(f"  spent {si(tot['vcut_macs'], 'MAC')} of {si(tot['baseline_macs'], 'MAC')} stock")
        say(
            f"  saved by VCUT {si(tot['macs_saved_vcut'], 'MAC')}, "
            f"by step caching {si(tot['macs_saved_step_cache'], 'MAC')}, "
            f"by the guidance interval {si(tot['macs_saved_guidance'], 'MAC')}"
        )
    if mac_error:
        say(f"MACs: not counted for every shape ({mac_error})")

    seconds, source = _estimate(out, shapes, macs, other, timing)
    # DIR's earlier rows' timings are in their own device's hours (a CPU test job's are no GPU-hours)
    unit = _earlier_device(out) if "earlier ok rows in" in source else "GPU"
    if not rows:
        say("estimate: 0 hours (nothing to render)")
    elif seconds is None:
        say(f"estimate: none ({source})")
    else:
        say(f"estimate: {seconds / 3600:.4g} {unit}-hours ({source})")
    return 0


def _by_shape(timings: Timings, shapes: Counter, macs: dict) -> tuple[float, int, int] | None:
    """(seconds, rows by their shape's mean, rows scaled by MACs) for ``shapes`` from per-shape
    ``timings``, or None when a shape is neither measured nor scalable."""
    rate_rows = [(s, m) for s, _, m in timings.values() if np.isfinite(m) and m > 0]
    rate = sum(s for s, _ in rate_rows) / sum(m for _, m in rate_rows) if rate_rows else None
    total, measured, scaled = 0.0, 0, 0
    for (h, w, f, steps, guidance), n in shapes.items():
        if (h, w, f, steps) in timings:
            total += timings[(h, w, f, steps)][0] * n
            measured += n
        elif rate is not None and (h, w, f, steps, guidance) in macs:
            total += macs[(h, w, f, steps, guidance)].vcut_macs * rate * n
            scaled += n
        else:
            return None
    return total, measured, scaled


def _estimate(
    out: OutputDir,
    shapes: Counter,
    macs: dict,
    other: tuple[Timings, tuple[float, str] | None] | None,
    timing: str | None,
) -> tuple[float | None, str]:
    """Seconds for the rows to render, and which source gave them (the module docstring's order)."""
    sources = [(_out_timings(out), f"earlier ok rows in {out.uri_of('results')}")]
    if other is not None and other[0]:
        sources.append((other[0], f"ok rows in --timing {timing}"))
    for timings, where in sources:
        found = _by_shape(timings, shapes, macs) if timings else None
        if found is not None:
            total, measured, scaled = found
            timed = sum(n for _, n, _ in timings.values())
            return total, (
                f"per-shape timings of {timed} {where}: "
                f"{measured} rows by their shape's mean seconds, {scaled} scaled by MACs"
            )
    bench = other[1] if other is not None else None
    if bench is None:
        if timing:
            return None, "no timing source: no timings for these shapes in DIR or --timing"
        return None, (
            "no timing source: no timings for these shapes in DIR "
            "(give --timing FILE: a job's --out folder or a benchmarks/gpu_bench.py JSON)"
        )
    rate, source = bench
    if len(macs) < len(shapes):
        return None, "no timing source: MACs unknown for some shapes"
    return sum(r.vcut_macs * rate * shapes[s] for s, r in macs.items()), source
