"""VCUT model surgery on a diffusers Stable Video Diffusion UNet.

SVD conditions its UNet on a single CLIP image token ``e``. With one key, the softmax of
every cross-attention is exactly 1, so ``attn2(x, e) == to_out(to_v(e))`` whatever ``x``
is. VCUT uses that in two ways:

* ``exact``: every *spatial* cross-attention (``BasicTransformerBlock.attn2``) gets
  :class:`SpatialCrossAttnLinearProcessor`, a diffusers attention processor that returns
  the cached ``to_out(to_v(e))`` as a broadcast residual. ``to_q``, ``to_k``, the attention
  kernel and the block's ``norm2`` are never run, and are removed from the module tree.
* ``full``: ``exact`` plus every *temporal* cross-attention (``attn2`` and ``norm2`` of each
  ``TemporalBasicTransformerBlock``) removed; diffusers' own ``if self.attn2 is not None``
  branch then skips it. This is the paper's approximation: it changes the output.

Only diffusers' extension points are used (attention processors and module replacement);
no diffusers forward function is copied.

Everything :func:`apply_vcut` changes is recorded in one :class:`VCUTState` on the UNet
(:func:`vcut_state`): the two UNet hooks' ``RemovableHandle`` objects, the original processors and
the modules taken out of the tree. :func:`remove_vcut` puts them all back (tomesd's
``remove_patch``), after which the UNet computes exactly what stock diffusers computes.

Why torch's own hooks and not diffusers' ``HookRegistry``: the registry installs its hooks by
replacing ``unet.forward`` on the instance, but the renderer compiles ``unet.forward`` in place
(:func:`pipeline.compile.compile_module`) so that these hooks, which take Python-side
decisions, run eagerly around the compiled graph; ``nn.Module`` hooks stay outside
``forward`` by construction, and their handles remove them by id.
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vcut.modes import MODES
from vcut.unet import count_parameters, resolve_unet

#: the one attribute apply_vcut sets on a UNet: its VCUTState (see vcut_state)
_STATE_ATTR = "_vcut_state"


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


def tensor_version(t: torch.Tensor) -> int | None:
    """``t``'s in-place version counter, or None for an inference tensor (made under
    ``torch.inference_mode()``), which has none: such a tensor is never recognised by
    identity alone, only by content."""
    return None if t.is_inference() else t._version


class ConditioningKeys:
    """Names the conditioning embedding of the current UNet call and prepares the constants.

    A forward pre-hook on the UNet sees its ``encoder_hidden_states`` ``(batch, 1, dim)``
    once per call, before the UNet repeats it per frame. The token is chosen so that the
    cache can never leak between videos or between the two halves of classifier-free
    guidance, and so that the denoising loop costs no GPU synchronisation:

    * the same live tensor object with the same version counter (the pipeline passes one
      embedding tensor at every step) keeps its token without reading its data: the entry
      holds a reference, so the object cannot be freed and its ``id`` reused, and any
      in-place change bumps the version;
    * any other tensor is compared by content (``torch.equal``, one sync per UNet call)
      with private copies of the remembered embeddings: a repeated image gets its old token,
      anything else a new one.

    ``max_entries`` embeddings are remembered (LRU); processors drop constants of forgotten
    tokens.

    All Python-state decisions (tokens, which constants exist, hit/miss counters) are taken
    here, in the hooks, and the hooks are excluded from ``torch.compile`` tracing: inside a
    compiled UNet forward each processor only reads the tensor it was handed (dynamo guards
    a tensor on its shape, dtype and device, not on its identity), so a new image or seed
    never causes a recompile.
    """

    def __init__(self, max_entries: int = 4) -> None:
        self.max_entries = max_entries
        # token -> (the tensor seen, its version then, a private copy of its content)
        self._entries: OrderedDict[int, tuple[torch.Tensor, int | None, torch.Tensor]] = OrderedDict()
        self._next = 0
        self.current: int | None = None
        # (attention module, its processor) for every patched spatial cross-attention
        self._attentions: list[tuple[nn.Module, SpatialCrossAttnLinearProcessor]] = []

    def live(self, token: int) -> bool:
        return token in self._entries

    def clear(self) -> None:
        self._entries.clear()
        self.current = None

    def register(self, attn: nn.Module, processor: SpatialCrossAttnLinearProcessor) -> None:
        self._attentions.append((attn, processor))

    def _token_for(self, e: torch.Tensor) -> int:
        for token, (seen, version, _) in self._entries.items():
            if seen is e and version is not None and version == tensor_version(e):
                self._entries.move_to_end(token)
                return token
        if not e.is_meta:  # meta tensors (MAC counting) have no content to compare
            for token, (_, _, copy) in self._entries.items():
                if copy.shape == e.shape and copy.dtype == e.dtype and copy.device == e.device:
                    if torch.equal(copy, e):
                        self._entries[token] = (e, tensor_version(e), copy)
                        self._entries.move_to_end(token)
                        return token
        token, self._next = self._next, self._next + 1
        self._entries[token] = (e, tensor_version(e), e if e.is_meta else e.detach().clone())
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return token

    def check_processors(self, unet: nn.Module) -> None:
        """Raise :class:`VCUTError` when a patched attention no longer has VCUT's processor.

        ``unet.set_attn_processor(...)`` after :func:`apply_vcut` would hand diffusers' own
        processor a cross-attention without ``to_q``/``to_k`` (``TypeError: 'NoneType' object
        is not callable`` deep in the attention); this says what happened and what to do.
        """
        for attn, processor in self._attentions:
            if attn.processor is not processor:
                name = next((n for n, m in unet.named_modules() if m is attn), "a spatial cross-attention")
                state = vcut_state(unet)
                mode = state.report.mode if state is not None else "exact"
                raise VCUTError(
                    f"the attention processor of {name} was replaced after apply_vcut (it is now "
                    f"{type(attn.processor).__name__}); VCUT removed that cross-attention's to_q and to_k, "
                    "so another processor cannot run it. Call vcut.apply_vcut(unet, "
                    f"{mode!r}) again to put VCUT's processors back, or call vcut.remove_vcut(unet) "
                    "before changing attention processors (it restores the original modules)."
                )

    @torch.compiler.disable
    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.current = None
        self.check_processors(module)
        for _, processor in self._attentions:
            processor.value = None
        e = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        sample = kwargs.get("sample", args[0] if args else None)
        if not isinstance(e, torch.Tensor):
            return
        self.current = self._token_for(e)
        if not isinstance(sample, torch.Tensor) or sample.ndim != 5 or e.ndim != 3 or e.shape[1] != 1:
            return  # not SVD's call signature: the processors compute (or raise) themselves
        # The UNet repeats the embedding per frame before its blocks see it: so do we.
        e_frames = e.repeat_interleave(sample.shape[1], dim=0)
        for attn, processor in self._attentions:
            processor.prepare(attn, self.current, e_frames, self.live)

    @torch.compiler.disable
    def after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        self.current = None
        for _, processor in self._attentions:
            processor.value = None


class SpatialCrossAttnLinearProcessor:
    """Spatial cross-attention as a one-time linear layer: returns ``to_out(to_v(e))``.

    The result depends on the conditioning embedding only, so it is computed once per
    embedding (per :class:`ConditioningKeys` token) and reused at every denoising step.
    The UNet's forward pre-hook hands it the value for the current call (``self.value``,
    see :meth:`prepare`); called without one (outside a patched UNet's forward), it
    computes without caching.

    The returned tensor has shape ``(batch, 1, dim)``; the block adds it to its hidden
    states (``attn_output + hidden_states``), which broadcasts over the sequence.
    """

    def __init__(self, keys: ConditioningKeys | None = None) -> None:
        self.keys = keys
        self._values: dict[int, torch.Tensor] = {}
        #: the constant for the current UNet call, set by the pre-hook (None outside a call)
        self.value: torch.Tensor | None = None
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self._values.clear()
        self.value = None

    @staticmethod
    def _compute(attn: nn.Module, e: torch.Tensor) -> torch.Tensor:
        ctx = attn.norm_encoder_hidden_states(e) if attn.norm_cross else e
        return attn.to_out[1](attn.to_out[0](attn.to_v(ctx))) / attn.rescale_output_factor

    def prepare(self, attn: nn.Module, token: int, e: torch.Tensor, live=None) -> None:
        """Set ``self.value`` to ``to_out(to_v(e))`` for ``token``: cached, else computed now.

        ``e`` is the per-frame conditioning ``(batch * frames, 1, dim)`` that the
        cross-attention will see. Runs eagerly (in the UNet's forward pre-hook).
        """
        value = self._values.get(token)
        # The same token with another frame count, device or dtype needs new constants.
        if value is not None and (value.shape[0], value.device, value.dtype) == (
            e.shape[0],
            e.device,
            e.dtype,
        ):
            self.hits += 1
        else:
            self.misses += 1
            value = self._compute(attn, e)
            if live is not None:
                self._values = {t: v for t, v in self._values.items() if live(t)}
            self._values[token] = value
        self.value = value

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Traced by torch.compile: read tensors and static attributes only, no bookkeeping.
        e = encoder_hidden_states
        if e is None:
            raise VCUTError("VCUT spatial cross-attention called without encoder_hidden_states")
        if e.ndim != 3 or e.shape[1] != 1:
            raise VCUTError(
                f"VCUT needs a single conditioning token (shape (batch, 1, dim)), got "
                f"encoder_hidden_states of shape {tuple(e.shape)}; with more than one token, "
                "cross-attention is not a linear function of the embedding and VCUT would compute "
                "something wrong. Use mode='off'."
            )
        if attention_mask is not None:
            raise VCUTError("VCUT does not support an encoder attention mask on spatial cross-attention")
        if hidden_states.ndim != 3 or hidden_states.shape[0] != e.shape[0]:
            raise VCUTError(
                f"VCUT: unexpected hidden_states shape {tuple(hidden_states.shape)} for "
                f"conditioning of shape {tuple(e.shape)}"
            )
        if attn.residual_connection:  # not SVD's case
            raise VCUTError("VCUT does not support cross-attention with residual_connection=True")
        value = self.value
        if (
            value is not None
            and value.shape[0] == e.shape[0]
            and value.dtype == hidden_states.dtype
            and value.device == hidden_states.device
        ):
            return value
        return self._compute(attn, e)


def _spatio_temporal_blocks(unet: nn.Module):
    """Yield ``(spatial_block, temporal_block)`` pairs of every TransformerSpatioTemporalModel."""
    from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

    for module in unet.modules():
        if isinstance(module, TransformerSpatioTemporalModel):
            yield from zip(module.transformer_blocks, module.temporal_transformer_blocks, strict=True)


@dataclass
class VCUTState:
    """Everything :func:`apply_vcut` changed on one UNet, so that it can be found and undone.

    ``handles`` are the ``RemovableHandle`` objects of the UNet's forward pre-hook and forward hook
    (``keys.before_forward`` / ``keys.after_forward``); ``processors`` pairs every patched
    attention with the processor it had before; ``removed`` lists ``(parent, name, module)``
    for every submodule taken out of the tree (``to_q``, ``to_k``, ``norm2``, temporal
    ``attn2``), or is None when they were released (``keep_removed=False``).
    """

    report: VCUTReport
    keys: ConditioningKeys
    handles: list[RemovableHandle]
    processors: list[tuple[nn.Module, object]]
    removed: list[tuple[nn.Module, str, nn.Module | None]] | None

    def removed_parameters(self) -> list[nn.Parameter]:
        """The parameters of the modules kept for :func:`remove_vcut` (not in the UNet's tree)."""
        mods = [m for _, _, m in self.removed or () if m is not None]
        return [p for m in mods for p in itertools.chain(m.parameters(), m.buffers())]


def apply_vcut(
    obj: object, mode: str = "full", *, cache_entries: int = 4, keep_removed: bool = True
) -> VCUTReport:
    """Patch a Stable Video Diffusion pipeline or UNet with VCUT, in place.

    Args that matter:
        obj: a diffusers ``StableVideoDiffusionPipeline`` (its ``unet`` is patched) or a
            ``UNetSpatioTemporalConditionModel``.
        mode: ``"off"`` (nothing changes), ``"exact"`` (spatial cross-attention becomes the
            cached one-time linear layer ``to_out(to_v(e))``: same output up to float
            rounding) or ``"full"`` (``exact`` plus temporal cross-attention removed: the
            paper's VCUT, which changes the output).

    Args to tinker with:
        cache_entries: conditioning embeddings whose constants are remembered (LRU). One
            suffices for one video at a time (both halves of classifier-free guidance travel
            in one batch); more keep the constants of recently repeated images.
        keep_removed: keep the modules taken out of the UNet (outside its module tree:
            ``parameters()`` and ``state_dict()`` no longer list them) so that
            :func:`remove_vcut` can put them back. ``False`` drops them, which frees their
            memory (``params_removed``) when nothing else holds them; the patch is then final.

    Returns:
        A :class:`VCUTReport` (``params_removed`` and friends). Applying the same mode
        again returns the first report and adds no hook; it also puts back VCUT's processors
        where something replaced them. A different mode on a patched model raises
        :class:`VCUTError`: call :func:`remove_vcut` first.
    """
    if mode not in MODES:
        raise ValueError(f"unknown VCUT mode {mode!r}; expected one of {', '.join(MODES)}")
    unet = resolve_unet(obj, "apply_vcut")
    previous = vcut_state(unet)
    if previous is not None:
        if previous.report.mode == mode:
            for attn, processor in previous.keys._attentions:
                if attn.processor is not processor:
                    attn.set_processor(processor)
            return previous.report
        how = (
            "call vcut.remove_vcut first"
            if previous.removed is not None
            else "the removed weights are gone (keep_removed=False): load the model again"
        )
        raise VCUTError(
            f"this UNet is already patched with VCUT mode {previous.report.mode!r}; "
            f"cannot switch to {mode!r}: {how}"
        )

    params_before = count_parameters(unet)
    if mode == "off":
        return VCUTReport("off", params_before, params_before, 0, 0, 0)

    spatial = temporal = 0
    keys = ConditioningKeys(max_entries=cache_entries)
    processors: list[tuple[nn.Module, object]] = []
    removed: list[tuple[nn.Module, str, nn.Module | None]] = []
    for block, temporal_block in _spatio_temporal_blocks(unet):
        attn = block.attn2
        if attn is not None and attn.is_cross_attention:
            processors.append((attn, attn.processor))
            removed += [(attn, "to_q", attn.to_q), (attn, "to_k", attn.to_k), (block, "norm2", block.norm2)]
            processor = SpatialCrossAttnLinearProcessor(keys)
            attn.set_processor(processor)
            keys.register(attn, processor)
            attn.to_q = None
            attn.to_k = None
            block.norm2 = nn.Identity()
            spatial += 1
        if mode == "full" and temporal_block.attn2 is not None:
            removed += [
                (temporal_block, "attn2", temporal_block.attn2),
                (temporal_block, "norm2", temporal_block.norm2),
            ]
            temporal_block.attn2 = None
            temporal_block.norm2 = None
            temporal += 1
    if spatial == 0:
        raise VCUTError("found no spatial cross-attention to patch: is this an SVD UNet?")

    handles = [
        unet.register_forward_pre_hook(keys.before_forward, with_kwargs=True),
        unet.register_forward_hook(keys.after_forward, with_kwargs=True, always_call=True),
    ]
    params_after = count_parameters(unet)
    report = VCUTReport(mode, params_before, params_after, params_before - params_after, spatial, temporal)
    state = VCUTState(report, keys, handles, processors, removed if keep_removed else None)
    setattr(unet, _STATE_ATTR, state)
    return report


def remove_vcut(obj: object) -> None:
    """Undo :func:`apply_vcut` in place: the original modules and processors come back and
    VCUT's hooks go (a no-op on an unpatched UNet).

    The UNet then computes exactly what it computed before the patch. Remove before compiling
    (a compiled ``forward`` keeps the graph it traced). Raises :class:`VCUTError` when the
    patch was applied with ``keep_removed=False`` (the weights are gone).
    """
    unet = resolve_unet(obj, "apply_vcut")
    state = vcut_state(unet)
    if state is None:
        return
    if state.removed is None:
        raise VCUTError(
            "this UNet was patched with apply_vcut(..., keep_removed=False): the removed weights are "
            "gone, so VCUT cannot be removed; load the model again"
        )
    for handle in state.handles:
        handle.remove()
    for attn, processor in state.processors:
        attn.set_processor(processor)
    for parent, name, module in state.removed:
        setattr(parent, name, module)
    state.keys.clear()
    delattr(unet, _STATE_ATTR)


def vcut_state(obj: object) -> VCUTState | None:
    """The :class:`VCUTState` of a patched pipeline or UNet (None when unpatched or ``"off"``)."""
    return getattr(resolve_unet(obj, "apply_vcut"), _STATE_ATTR, None)


def shared_weight_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure that shares every parameter and buffer with it.

    :func:`apply_vcut` (and step caching, compilation) change a module in place and cannot be
    undone: patch such a copy to compare modes in one process without a second set of weights.
    """
    tensors = itertools.chain(module.parameters(), module.buffers())
    kept = (s.removed_parameters() for m in module.modules() if (s := getattr(m, _STATE_ATTR, None)))
    memo = {id(t): t for t in itertools.chain(tensors, *kept)}  # also what remove_vcut would put back
    return copy.deepcopy(module, memo)


def vcut_mode(obj: object) -> str:
    """The VCUT mode a pipeline or UNet is patched with (``"off"`` when unpatched)."""
    state = vcut_state(obj)
    return state.report.mode if state is not None else "off"


def clear_vcut_cache(obj: object) -> None:
    """Forget every cached ``to_out(to_v(e))`` (frees memory; results do not depend on it)."""
    unet = resolve_unet(obj, "apply_vcut")
    state = vcut_state(unet)
    if state is not None:
        state.keys.clear()
    for processor in unet.attn_processors.values():
        if isinstance(processor, SpatialCrossAttnLinearProcessor):
            processor.clear()
