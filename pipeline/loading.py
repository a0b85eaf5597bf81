"""Loading SVD checkpoints: hub ids or local folders, safetensors only by default.

``load_svd_pipeline`` resolves the device and dtype (fp16 on CUDA, fp32 on CPU), loads
the five components with diffusers' ``from_pretrained`` and returns a stock
``StableVideoDiffusionPipeline`` on the device. Policies:

- **safetensors only.** ``use_safetensors=True`` is passed to diffusers; a local folder is
  scanned first so that a pickle-only checkpoint (``.bin``, ``.ckpt``, ``.pt``, ``.pth``) is
  refused with a message naming the folder and files. ``allow_pickle=True`` is the
  explicit opt-in (loading a pickle runs code from the file's author).
- **fp16 variant.** With ``variant=None`` and an fp16 dtype, the ``fp16`` variant is used
  when the checkpoint offers it (local: ``*.fp16.safetensors`` files exist; hub: tried
  first, then the default weights).
- **Hub and cache.** Nothing is passed that would override huggingface_hub's own
  settings: ``HF_HOME`` / ``HF_HUB_CACHE`` pick the cache. ``local_files_only=None``
  follows ``HF_HUB_OFFLINE`` *at call time* (huggingface_hub reads it at import).
- **Attention.** UNet and VAE attention use PyTorch's scaled-dot-product attention
  (diffusers' ``AttnProcessor2_0``), enforced before VCUT replaces any processor.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch

from .errors import ModelLoadError
from .model_files import (  # noqa: F401  (re-exported: the torch-free checks live there)
    PICKLE_SUFFIXES,
    _check_local_folder,
    _local_has_variant,
    is_local_model,
    local_model_folder,
    offline_from_env,
    pickle_only_components,
    strip_file_scheme,
)
from .notices import quiet_notices

if TYPE_CHECKING:
    from diffusers import StableVideoDiffusionPipeline

logger = logging.getLogger(__name__)

_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` means float16 on CUDA and float32 elsewhere (CPU fp16 kernels are slow or missing)."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
    return _DTYPES[key]


def load_svd_pipeline(
    model: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    variant: str | None = None,
    local_files_only: bool | None = None,
) -> tuple[StableVideoDiffusionPipeline, torch.device, torch.dtype]:
    """Load a stock ``StableVideoDiffusionPipeline`` from a hub id or a local folder.

    Returns ``(pipe, device, dtype)`` with the pipeline moved to ``device`` in ``dtype``.
    Raises :class:`ModelLoadError` with a message naming ``model`` on every failure.
    """
    quiet_notices()  # the feature extractor's torchvision notice (pipeline.notices says why)
    from diffusers import StableVideoDiffusionPipeline

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    name = strip_file_scheme(model)
    if local_files_only is None:
        local_files_only = offline_from_env()

    local = local_model_folder(name)
    is_local = local is not None
    if is_local:
        _check_local_folder(local, allow_pickle)
        name = str(local)
    elif name.count("/") != 1 or not all(name.split("/")):
        raise ModelLoadError(
            f"model {name!r} is neither an existing local folder nor a Hugging Face hub id (owner/name)"
        )

    kwargs = {
        "dtype": torch_dtype,
        "use_safetensors": None if allow_pickle else True,
        "local_files_only": bool(local_files_only),
    }
    variants: list[str | None] = [variant]
    if variant is None and torch_dtype == torch.float16:
        if is_local:
            variants = ["fp16"] if _local_has_variant(local, "fp16") else [None]
        else:
            variants = ["fp16", None]  # the hub repo may or may not offer it

    pipe = None
    for i, var in enumerate(variants):
        try:
            pipe = StableVideoDiffusionPipeline.from_pretrained(name, variant=var, **kwargs)
            break
        except ValueError as exc:
            if var is not None and "variant" in str(exc) and i + 1 < len(variants):
                logger.info("model %s offers no %s variant; loading the default weights", name, var)
                continue
            raise ModelLoadError(f"cannot load model {name!r}: {exc}") from exc
        except OSError as exc:
            msg = str(exc)
            if var is not None and "variant" in msg and i + 1 < len(variants):
                continue
            if "safetensors" in msg and not allow_pickle:
                raise ModelLoadError(
                    f"model {name!r} offers no safetensors weights ({msg}). Pickle weights are refused; "
                    "pass allow_pickle=True if you trust this checkpoint"
                ) from exc
            hint = ""
            if local_files_only and not is_local:
                hint = (
                    " (offline: HF_HUB_OFFLINE or local_files_only is set, and the model is not in the "
                    f"Hugging Face cache under HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')})"
                )
            raise ModelLoadError(f"cannot load model {name!r}{hint}: {msg}") from exc
    assert pipe is not None
    components = ("vae", "image_encoder", "unet", "scheduler", "feature_extractor")
    missing = [c for c in components if pipe.components.get(c) is None]
    if missing:
        raise ModelLoadError(f"model {name!r} is missing pipeline components: {', '.join(missing)}")
    use_sdpa(pipe)
    pipe.to(dev)
    return pipe, dev, torch_dtype


def use_sdpa(pipe: StableVideoDiffusionPipeline) -> None:
    """Make UNet and VAE attention use ``torch.nn.functional.scaled_dot_product_attention``."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    for model in (pipe.unet, pipe.vae):
        procs = model.attn_processors
        if procs and not all(isinstance(p, AttnProcessor2_0) for p in procs.values()):
            model.set_attn_processor(AttnProcessor2_0())
