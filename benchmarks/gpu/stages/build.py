"""Stage 0, ``build``: environment, the components."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from benchmarks.gpu.machinery import _sync
from benchmarks.gpu.model import SVD_IMAGE_ENCODER_CONFIG, _configs, build_components
from benchmarks.gpu.stages import macs

if TYPE_CHECKING:
    from benchmarks.gpu.bench import Bench


def run(bench: Bench) -> None:
    macs.start(bench, _configs(bench.tiny)["unet"])
    t0 = time.perf_counter()
    bench.components = build_components(bench.tiny, bench.device, bench.dtype, seed=bench.args.seed)
    _sync(bench.device)
    build_s = time.perf_counter() - t0
    params = {
        k: sum(p.numel() for p in m.parameters())
        for k, m in bench.components.items()
        if isinstance(m, torch.nn.Module)
    }
    bench.result["stages"]["build"].update(
        build_s=build_s,
        params=params,
        weight_bytes=sum(
            p.numel() * p.element_size()
            for m in bench.components.values()
            if isinstance(m, torch.nn.Module)
            for p in m.parameters()
        ),
        unet_num_frames=bench.components["unet"].config.get("num_frames"),
        image_encoder_config=SVD_IMAGE_ENCODER_CONFIG if not bench.tiny else None,
        torchao=_version("torchao"),  # FP8's library where present (else torch._scaled_mm directly)
    )
    if bench.device.startswith("cuda"):
        bench.result["stages"]["build"]["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        bench.result["stages"]["build"]["weights_memory_bytes"] = int(torch.cuda.memory_allocated())
    bench.log(f"built in {build_s:.1f}s: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in params.items()))


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
