"""UNet introspection shared by the VCUT patch and step caching: which module to patch, and
how many parameters a set of modules holds."""

from __future__ import annotations

from torch import nn


def resolve_unet(obj: object, user: str) -> nn.Module:
    """The ``UNetSpatioTemporalConditionModel`` of ``obj``: a diffusers SVD pipeline (its
    ``unet``), the UNet itself, or either compiled with ``torch.compile`` (its original
    module, whose attributes the patches set). ``user`` names the caller in the ``TypeError``
    raised for anything else."""
    from diffusers import UNetSpatioTemporalConditionModel

    unet = getattr(obj, "unet", obj)
    unet = getattr(unet, "_orig_mod", unet)  # a torch.compile'd module
    if not isinstance(unet, UNetSpatioTemporalConditionModel):
        raise TypeError(
            f"{user} expects a diffusers StableVideoDiffusionPipeline or "
            f"UNetSpatioTemporalConditionModel, got {type(obj).__name__}"
        )
    return unet


def count_parameters(*modules: nn.Module | None) -> int:
    """The number of parameter elements in ``modules`` (None entries count 0)."""
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())
