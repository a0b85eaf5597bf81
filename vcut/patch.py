"""VCUT model surgery on a diffusers Stable Video Diffusion UNet.

SVD conditions its UNet on a single CLIP image token ``e``. With one key, the softmax of
every cross-attention is exactly 1, so ``attn2(x, e) == to_out(to_v(e))`` whatever ``x``
is (see DESIGN.md). VCUT uses that in two ways:

* ``exact``: every *spatial* cross-attention (``BasicTransformerBlock.attn2``) gets
  :class:`SpatialCrossAttnLinearProcessor`, a diffusers attention processor that returns
  the cached ``to_out(to_v(e))`` as a broadcast residual. ``to_q``, ``to_k``, the attention
  kernel and the block's ``norm2`` are never run, and are removed from the module tree.
* ``full``: ``exact`` plus every *temporal* cross-attention (``attn2`` and ``norm2`` of each
  ``TemporalBasicTransformerBlock``) removed; diffusers' own ``if self.attn2 is not None``
  branch then skips it. This is the paper's approximation: it changes the output.

Only diffusers' extension points are used (attention processors and module replacement);
no diffusers forward function is copied.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from torch import nn

MODES = ("off", "exact", "full")

_REPORT_ATTR = "_vcut_report"


class VCUTError(RuntimeError):
    """A VCUT patch was asked for something it cannot do correctly."""


@dataclass(frozen=True)
class VCUTReport:
    """What :func:`apply_vcut` did to a UNet."""

    mode: str
    params_before: int
    params_after: int
    params_removed: int
    spatial_cross_attentions_replaced: int
    temporal_cross_attentions_removed: int

    def to_dict(self) -> dict:
        return asdict(self)


class SpatialCrossAttnLinearProcessor:
    """Spatial cross-attention as a one-time linear layer: returns ``to_out(to_v(e))``.

    The result depends on the conditioning embedding only, so it is cached by the
    embedding's *content* (exact comparison with ``torch.equal`` against a private copy) and reused at every
    denoising step. Keying on content, not on tensor identity, means the cache cannot leak
    between videos or between the two halves of classifier-free guidance: a different
    embedding is always a miss. ``max_entries`` bounds the cache (LRU).

    The returned tensor has shape ``(batch, 1, dim)``; the block adds it to its hidden
    states (``attn_output + hidden_states``), which broadcasts over the sequence.
    """

    def __init__(self, max_entries: int = 4) -> None:
        self.max_entries = max_entries
        self._cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._next_key = 0
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self._cache.clear()

    def _lookup(self, e: torch.Tensor) -> torch.Tensor | None:
        for key, (cached_e, value) in self._cache.items():
            if e.is_meta or cached_e.is_meta:
                # Meta tensors (MAC counting only) have no content: the same shape counts as the
                # same embedding, so a counted second call sees the cache hit a real one would.
                same = e.is_meta and cached_e.is_meta and cached_e.shape == e.shape
            else:
                same = (
                    cached_e.shape == e.shape
                    and cached_e.dtype == e.dtype
                    and cached_e.device == e.device
                    and torch.equal(cached_e, e)
                )
            if same:
                self._cache.move_to_end(key)
                return value
        return None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        e = encoder_hidden_states
        if e is None:
            raise VCUTError("VCUT spatial cross-attention called without encoder_hidden_states")
        if e.ndim != 3 or e.shape[1] != 1:
            raise VCUTError(
                f"VCUT needs a single conditioning token (shape (batch, 1, dim)), got encoder_hidden_states "
                f"of shape {tuple(e.shape)}; with more than one token, cross-attention is not a linear "
                "function of the embedding and VCUT would compute something wrong. Use mode='off'."
            )
        if attention_mask is not None:
            raise VCUTError("VCUT does not support an encoder attention mask on spatial cross-attention")
        if hidden_states.ndim != 3 or hidden_states.shape[0] != e.shape[0]:
            raise VCUTError(
                f"VCUT: unexpected hidden_states shape {tuple(hidden_states.shape)} for "
                f"conditioning of shape {tuple(e.shape)}"
            )

        value = self._lookup(e)
        if value is None:
            self.misses += 1
            ctx = attn.norm_encoder_hidden_states(e) if attn.norm_cross else e
            value = attn.to_out[1](attn.to_out[0](attn.to_v(ctx)))
            if attn.residual_connection:  # not SVD's case; kept for fidelity to the processor contract
                raise VCUTError("VCUT does not support cross-attention with residual_connection=True")
            value = value / attn.rescale_output_factor
            # Keep a copy of the key: the caller may later reuse its buffer for another image.
            self._cache[self._next_key] = (e if e.is_meta else e.detach().clone(), value)
            self._next_key += 1
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        else:
            self.hits += 1
        return value


def _resolve_unet(obj: object) -> nn.Module:
    from diffusers import UNetSpatioTemporalConditionModel

    unet = getattr(obj, "unet", obj)
    if not isinstance(unet, UNetSpatioTemporalConditionModel):
        raise TypeError(
            "apply_vcut expects a diffusers StableVideoDiffusionPipeline or "
            f"UNetSpatioTemporalConditionModel, got {type(obj).__name__}"
        )
    return unet


def _spatio_temporal_blocks(unet: nn.Module):
    """Yield ``(spatial_block, temporal_block)`` pairs of every TransformerSpatioTemporalModel."""
    from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

    for module in unet.modules():
        if isinstance(module, TransformerSpatioTemporalModel):
            yield from zip(module.transformer_blocks, module.temporal_transformer_blocks, strict=True)


def _count(*modules: nn.Module | None) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def apply_vcut(obj: object, mode: str = "full", *, cache_entries: int = 4) -> VCUTReport:
    """Patch a Stable Video Diffusion pipeline or UNet with VCUT, in place.

    Args that matter:
        obj: a diffusers ``StableVideoDiffusionPipeline`` (its ``unet`` is patched) or a
            ``UNetSpatioTemporalConditionModel``.
        mode: ``"off"`` (nothing changes), ``"exact"`` (spatial cross-attention becomes the
            cached one-time linear layer ``to_out(to_v(e))``: same output up to float
            rounding) or ``"full"`` (``exact`` plus temporal cross-attention removed: the
            paper's VCUT, which changes the output).

    Args to tinker with:
        cache_entries: conditioning embeddings remembered per spatial cross-attention
            (LRU). Two suffice for one video with classifier-free guidance in one batch.

    Returns:
        A :class:`VCUTReport` (``params_removed`` and friends). Applying the same mode
        again is a no-op that returns the first report; a different mode on a patched
        model raises :class:`VCUTError`, since the removed weights cannot come back.
    """
    if mode not in MODES:
        raise ValueError(f"unknown VCUT mode {mode!r}; expected one of {', '.join(MODES)}")
    unet = _resolve_unet(obj)
    previous: VCUTReport | None = getattr(unet, _REPORT_ATTR, None)
    if previous is not None:
        if previous.mode == mode:
            return previous
        raise VCUTError(
            f"this UNet is already patched with VCUT mode {previous.mode!r}; cannot switch to {mode!r} "
            "(the removed weights are gone): load the model again to use another mode"
        )

    params_before = _count(unet)
    if mode == "off":
        return VCUTReport("off", params_before, params_before, 0, 0, 0)

    spatial = temporal = 0
    for block, temporal_block in _spatio_temporal_blocks(unet):
        attn = block.attn2
        if attn is not None and attn.is_cross_attention:
            attn.set_processor(SpatialCrossAttnLinearProcessor(max_entries=cache_entries))
            attn.to_q = None
            attn.to_k = None
            block.norm2 = nn.Identity()
            spatial += 1
        if mode == "full" and temporal_block.attn2 is not None:
            temporal_block.attn2 = None
            temporal_block.norm2 = None
            temporal += 1
    if spatial == 0:
        raise VCUTError("found no spatial cross-attention to patch: is this an SVD UNet?")

    params_after = _count(unet)
    report = VCUTReport(mode, params_before, params_after, params_before - params_after, spatial, temporal)
    setattr(unet, _REPORT_ATTR, report)
    return report


def vcut_mode(obj: object) -> str:
    """The VCUT mode a pipeline or UNet is patched with (``"off"`` when unpatched)."""
    report = getattr(_resolve_unet(obj), _REPORT_ATTR, None)
    return report.mode if report is not None else "off"


def clear_vcut_cache(obj: object) -> None:
    """Forget every cached ``to_out(to_v(e))`` (frees memory; results do not depend on it)."""
    for processor in _resolve_unet(obj).attn_processors.values():
        if isinstance(processor, SpatialCrossAttnLinearProcessor):
            processor.clear()
