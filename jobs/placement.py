"""Where a worker process runs and what it was given: its Ray node and IP, the GPUs Ray
assigned it, whether torch can use them (``cuda_refusal``), and its own log file. Imported by
``jobs.worker``; no torch or Ray at import."""

from __future__ import annotations

import logging
import os
import sys

from jobs.text import error_line


def _log_to_file(log_dir: str, label: str) -> str | None:
    """Send this process's log records (INFO and up, warnings included) to
    ``<log_dir>/<label>-<pid>.log``; None when the folder cannot be written."""
    path = os.path.join(log_dir, f"{label}-{os.getpid()}.log")
    try:
        os.makedirs(log_dir, exist_ok=True)
        handler = logging.FileHandler(path)
    except OSError:
        return None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return path


def _ray_placement() -> tuple[str | None, str | None]:
    """(Ray node id hex, node IP) of this process; (None, None) outside a Ray worker. Rows
    carry both: on one host every node has the same hostname."""
    if "ray" not in sys.modules:
        return None, None
    import ray

    if not ray.is_initialized():  # get_runtime_context() would start a local Ray instance
        return None, None
    try:
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
    except Exception:
        return None, None


def _assigned_gpus() -> list[str]:
    """The GPU ids Ray gave this process (empty outside Ray or without ``num_gpus``)."""
    if "ray" not in sys.modules:
        return []
    import ray

    try:
        return [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
    except Exception:
        return []


def cuda_refusal(gpus: list[str]) -> str | None:
    """Why a worker given ``gpus`` by Ray cannot use CUDA (one line), or None when torch sees a
    GPU. A GPU worker that silently rendered on the CPU would be hundreds of times slower."""
    if not gpus:
        return None
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f"Ray gave this worker GPU {','.join(gpus)} (CUDA_VISIBLE_DEVICES={visible!r})"
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)"
    elif torch.cuda.is_available():
        return None
    else:
        try:
            torch.cuda.init()
            detail = f"torch.cuda.device_count() = {torch.cuda.device_count()}"
        except Exception as exc:
            detail = error_line(exc)
        build = f"torch {torch.__version__} (CUDA {torch.version.cuda})"
        reason = f"{build} sees no CUDA device: {detail} (check the NVIDIA driver)"
    return f"{where} but {reason}; set workers.allow_cpu_fallback=true to render on the CPU"
