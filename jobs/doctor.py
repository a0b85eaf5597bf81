"""``vcut doctor``: what this machine (and cluster) offers, and whether a job would run.

One row per thing a job needs, each ``OK``, ``WARN`` (a job runs, but look) or ``FAIL`` (a job
would stop), with what was found or the fix. The checks that ``vcut run`` also does are the
functions of :mod:`jobs.preflight`, so the two never disagree. Exit status: 0 when no row
failed (a job would run), 1 otherwise.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobs import preflight

OK, WARN, FAIL = "OK", "WARN", "FAIL"


@dataclass
class Row:
    check: str
    status: str
    detail: str


def _run(check: str, fn: Callable[[], str]) -> Row:
    """A pre-flight check as a row: OK with what it found, FAIL with its one-line message."""
    try:
        return Row(check, OK, fn())
    except preflight.PreflightError as exc:
        return Row(check, FAIL, str(exc))
    except Exception as exc:
        return Row(check, FAIL, preflight.first_line(exc))


def _python() -> Row:
    return Row("python", OK, f"{platform.python_version()} ({sys.executable})")


def _torch() -> tuple[Row, Row]:
    try:
        import torch
    except Exception as exc:
        fix = "pip install torch (see README: Development)"
        failed = Row("torch", FAIL, f"{preflight.first_line(exc)}: {fix}")
        return failed, Row("GPUs (torch)", FAIL, "no torch")
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    row = Row("torch", OK, f"{torch.__version__}, {build}")
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as exc:  # a broken driver
        return row, Row("GPUs (torch)", WARN, f"{preflight.first_line(exc)}: check the NVIDIA driver")
    if count:
        names = ", ".join(sorted({torch.cuda.get_device_name(i) for i in range(count)}))
        return row, Row("GPUs (torch)", OK, f"{count}: {names}")
    fix = (
        "install a CUDA build of torch"
        if not torch.version.cuda
        else "no GPU visible: check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"
    )
    return row, Row("GPUs (torch)", WARN, f"none: workers render on CPUs (slow); {fix}")


def _ray_rows(address: str | None) -> list[Row]:
    try:
        import ray
    except Exception as exc:
        return [Row("Ray", FAIL, f"{preflight.first_line(exc)}: pip install 'ray[default]'")]
    mode = preflight.auth_mode()
    if not address:
        gpus = _local_ray_gpus()
        status = OK if gpus else WARN
        detail = f"{gpus} on this node" if gpus else "none on this node: workers render on CPUs"
        return [
            Row("Ray", OK, f"{ray.__version__}; no --address: `vcut run` starts a local one; auth: {mode}"),
            Row("GPUs (Ray)", status, detail),
        ]
    try:
        preflight.check_address(address)
        preflight.connect_ray(address)
    except preflight.PreflightError as exc:
        return [Row("Ray", FAIL, f"{exc} (auth: {mode})"), Row("GPUs (Ray)", FAIL, "cluster not reached")]
    try:
        resources = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    finally:
        ray.shutdown()
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    found = f"{address} reached: {nodes} node(s), {cpus:g} CPU(s)"
    rows = [Row("Ray", OK, f"{ray.__version__}; {found}; auth: {mode}")]
    if gpus:
        rows.append(Row("GPUs (Ray)", OK, f"{gpus:g} in the cluster"))
    else:
        rows.append(Row("GPUs (Ray)", WARN, "none in the cluster: workers render on CPUs; add GPU nodes"))
    return rows


def _local_ray_gpus() -> int:
    try:
        from ray._private.accelerators import NvidiaGPUAcceleratorManager

        return int(NvidiaGPUAcceleratorManager.get_current_node_num_accelerators())
    except Exception:
        return 0


def _ffmpeg_row() -> Row:
    row = _run("ffmpeg", lambda: preflight.check_ffmpeg("mp4"))
    if row.status != OK:
        return row
    from pipeline.ffmpeg_bin import ffmpeg_exe

    encoders = preflight.ffmpeg_encoders(ffmpeg_exe())
    have = [f"{fmt}: {enc}" for fmt, enc in preflight.ENCODERS.items() if enc in encoders]
    lacking = [f"{fmt} ({enc})" for fmt, enc in preflight.ENCODERS.items() if enc not in encoders]
    detail = f"{ffmpeg_exe()}; {', '.join(have)}"
    if lacking:
        return Row("ffmpeg", WARN, f"{detail}; no encoder for {', '.join(lacking)}")
    return Row("ffmpeg", OK, detail)


def _hf_row(model: str | None) -> Row:
    import os

    from huggingface_hub.utils import get_token

    from pipeline.model_files import local_model_folder, offline_from_env

    cache = preflight.hf_cache_dir()
    parts = [f"cache {cache}" + ("" if os.path.isdir(cache) else " (empty)")]
    if offline_from_env():
        parts.append("HF_HUB_OFFLINE set")
    token = get_token()
    parts.append("token set" if token else "no token")
    hub_model = model is None or local_model_folder(model) is None
    if not token and hub_model:
        parts.append("gated models such as SVD-XT need one: `hf auth login` or HF_TOKEN")
        return Row("HF cache, token", WARN, "; ".join(parts))
    return Row("HF cache, token", OK, "; ".join(parts))


def _leftovers_row() -> Row:
    """Ray processes of local instances whose vcut driver was killed (``jobs.leftovers``)."""
    from jobs import leftovers

    found = leftovers.find()
    if not found:
        return Row("Ray leftovers", OK, "none (no Ray process of a killed vcut driver)")
    names = ", ".join(f"{p.pid} {p.name}" for p in found)
    sessions = ", ".join(sorted({p.session for p in found}))
    return Row(
        "Ray leftovers",
        WARN,
        f"{len(found)} process(es) of a vcut driver that was killed ({names}; {sessions}): "
        f"`{leftovers.kill_command(found)}` ends them (the next `vcut run` does too)",
    )


def diagnose(model: str | None = None, address: str | None = None, out: str | None = None) -> list[Row]:
    rows = [_python(), *_torch(), _ffmpeg_row(), *_ray_rows(preflight.ray_address(address)), _leftovers_row()]
    if model:
        rows.append(_run("model", lambda: preflight.check_model({"id": model})))
    else:
        rows.append(Row("model", WARN, "not checked: pass --model (a local folder or a hub id)"))
    rows.append(_hf_row(model))
    if out:
        rows.append(_run("output", lambda: preflight.check_output(out)))
    else:
        rows.append(Row("output", WARN, "not checked: pass --out DIR (or s3://bucket/prefix)"))
    return rows


def format_table(rows: list[Row]) -> str:
    width = max(len(r.check) for r in rows)
    lines = [f"{'check'.ljust(width)}  status  found / fix", f"{'-' * width}  ------  {'-' * 11}"]
    lines += [f"{r.check.ljust(width)}  {r.status.ljust(6)}  {r.detail}" for r in rows]
    failed = sum(r.status == FAIL for r in rows)
    warned = sum(r.status == WARN for r in rows)
    verdict = "a job would run" if not failed else "a job would NOT run: fix the FAIL rows"
    lines.append(f"\n{verdict} ({failed} FAIL, {warned} WARN)")
    return "\n".join(lines)


def exit_status(rows: list[Row]) -> int:
    return 1 if any(r.status == FAIL for r in rows) else 0


def main(args: Any) -> int:
    rows = diagnose(args.model, args.address, args.out)
    print(format_table(rows))
    return exit_status(rows)
