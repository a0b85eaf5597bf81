"""VCUT: training-free cross-attention surgery for Stable Video Diffusion.

``apply_vcut`` patches a diffusers SVD pipeline or UNet in place and ``remove_vcut`` undoes
it; ``apply_step_cache`` / ``remove_step_cache`` add and remove opt-in step caching (reused
deep features; changes the output); :mod:`vcut.guidance` runs classifier-free guidance on part
of the schedule only (``guided_steps``; opt-in, changes the output); ``count_macs`` measures
what each saves on any shape without loading weights.

``vcut.MODES`` (from :mod:`vcut.modes`) needs no torch: the names below are imported on first
use (PEP 562), so ``import vcut.modes`` or ``from vcut import MODES`` stays light while
``from vcut import apply_vcut`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vcut.modes import MODES

# name -> submodule that defines it (imported lazily: they import torch and diffusers)
_LAZY = {
    "check_guidance_interval": "vcut.guidance",
    "guided_steps": "vcut.guidance",
    "MacReport": "vcut.macs",
    "count_macs": "vcut.macs",
    "load_unet_config": "vcut.macs",
    "ConditioningKeys": "vcut.patch",
    "SpatialCrossAttnLinearProcessor": "vcut.patch",
    "VCUTError": "vcut.patch",
    "VCUTReport": "vcut.patch",
    "VCUTState": "vcut.patch",
    "apply_vcut": "vcut.patch",
    "clear_vcut_cache": "vcut.patch",
    "remove_vcut": "vcut.patch",
    "shared_weight_copy": "vcut.patch",
    "vcut_mode": "vcut.patch",
    "vcut_state": "vcut.patch",
    "StepCacheReport": "vcut.step_cache",
    "apply_step_cache": "vcut.step_cache",
    "remove_step_cache": "vcut.step_cache",
    "reset_step_cache": "vcut.step_cache",
    "step_cache_state": "vcut.step_cache",
}

__all__ = ["MODES", *_LAZY]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from vcut.guidance import check_guidance_interval, guided_steps  # noqa: F401
    from vcut.macs import MacReport, count_macs, load_unet_config  # noqa: F401
    from vcut.patch import (  # noqa: F401
        ConditioningKeys,
        SpatialCrossAttnLinearProcessor,
        VCUTError,
        VCUTReport,
        VCUTState,
        apply_vcut,
        clear_vcut_cache,
        remove_vcut,
        shared_weight_copy,
        vcut_mode,
        vcut_state,
    )
    from vcut.step_cache import (  # noqa: F401
        StepCacheReport,
        apply_step_cache,
        remove_step_cache,
        reset_step_cache,
        step_cache_state,
    )


_SUBMODULES = ("guidance", "macs", "modes", "patch", "step_cache", "tiny", "unet")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # ``import vcut; vcut.patch`` works as when they were imported eagerly
        return importlib.import_module(f"vcut.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vcut' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, *_SUBMODULES])
