"""Dense tensor-core peaks of the GPUs the script knows, for model FLOP utilisation (MFU)."""

from __future__ import annotations

from typing import Any

import torch

# -- peak FLOP/s ------------------------------------------------------------------------------

#: Dense (no sparsity) fp16/bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s.
PEAK_TFLOPS = {
    "H100 SXM": 989.4,
    "H100 NVL": 835.6,
    "H100 PCIe": 756.0,
    "H200": 989.4,
    "H200 NVL": 835.6,
}


def identify_gpu(
    name: str, multiprocessors: int | None = None, memory_bytes: int | None = None
) -> str | None:
    """Which entry of :data:`PEAK_TFLOPS` a GPU is, from its name, SM count and memory; None if unknown.

    ``torch.cuda.get_device_name()`` says e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100
    PCIe", "NVIDIA H100 NVL", "NVIDIA H200". Where the name does not say the form factor, the
    SM count does (PCIe 114, SXM and NVL 132) and then the memory (NVL 94 GB, SXM 80 GB).
    """
    n = name.upper()
    if "H200" in n:
        return "H200 NVL" if "NVL" in n else "H200"
    if "H100" not in n or "GH100" in n:
        return None
    if "PCIE" in n:
        return "H100 PCIe"
    if "NVL" in n:
        return "H100 NVL"
    if "SXM" in n or "HBM3" in n:
        return "H100 SXM"
    if multiprocessors == 114:
        return "H100 PCIe"
    if multiprocessors == 132 and memory_bytes:
        return "H100 NVL" if memory_bytes > 88 * 2**30 else "H100 SXM"
    return None


def peak_info(device: str, dtype_name: str, override: float | None) -> dict[str, Any]:
    """The dense peak used for MFU, with where it came from."""
    out: dict[str, Any] = {"dtype": dtype_name, "fp16_tflops": None, "tflops": None, "source": None}
    if override:
        out.update(fp16_tflops=override, tflops=override, source="given with --peak-tflops")
        return out
    if not device.startswith("cuda"):
        out["source"] = "no peak on a CPU: MFU not computed"
        return out
    props = torch.cuda.get_device_properties(0)
    gpu = identify_gpu(props.name, props.multi_processor_count, props.total_memory)
    out["gpu"] = props.name
    if gpu is None:
        out["source"] = f"unknown GPU {props.name!r}: no peak known, MFU not computed (use --peak-tflops)"
        return out
    peak = PEAK_TFLOPS[gpu]
    out["fp16_tflops"] = peak
    # Hopper's dense bf16 and fp16 tensor-core peaks are the same; fp32 runs on TF32 or CUDA cores.
    out["tflops"] = peak if dtype_name in ("fp16", "bf16") else None
    out["source"] = f"data-sheet dense fp16/bf16 tensor-core peak of the {gpu}"
    return out
