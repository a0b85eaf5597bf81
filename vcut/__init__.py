"""VCUT: training-free cross-attention surgery for Stable Video Diffusion.

``apply_vcut`` patches a diffusers SVD pipeline or UNet in place; ``apply_step_cache`` adds
opt-in step caching (reused deep features; changes the output); ``count_macs`` measures what
both save on any shape without loading weights.
"""

from vcut.macs import MacReport, count_macs, load_unet_config
from vcut.patch import (
    MODES,
    ConditioningKeys,
    SpatialCrossAttnLinearProcessor,
    VCUTError,
    VCUTReport,
    apply_vcut,
    clear_vcut_cache,
    shared_weight_copy,
    vcut_mode,
)
from vcut.step_cache import (
    StepCacheReport,
    apply_step_cache,
    remove_step_cache,
    reset_step_cache,
    step_cache_state,
)

__all__ = [
    "MODES",
    "MacReport",
    "ConditioningKeys",
    "SpatialCrossAttnLinearProcessor",
    "StepCacheReport",
    "VCUTError",
    "VCUTReport",
    "apply_step_cache",
    "apply_vcut",
    "clear_vcut_cache",
    "count_macs",
    "load_unet_config",
    "remove_step_cache",
    "reset_step_cache",
    "step_cache_state",
    "shared_weight_copy",
    "vcut_mode",
]
