"""VCUT: training-free cross-attention surgery for Stable Video Diffusion.

``apply_vcut`` patches a diffusers SVD pipeline or UNet in place; ``count_macs`` measures
what it saves on any shape without loading weights.
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
    vcut_mode,
)

__all__ = [
    "MODES",
    "MacReport",
    "ConditioningKeys",
    "SpatialCrossAttnLinearProcessor",
    "VCUTError",
    "VCUTReport",
    "apply_vcut",
    "clear_vcut_cache",
    "count_macs",
    "load_unet_config",
    "vcut_mode",
]
