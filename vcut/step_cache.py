"""Step caching for the SVD UNet (DeepCache's idea): reuse the deep features between steps.

The deep features of a diffusion UNet change slowly from one denoising step to the next.
With ``interval=N``, steps ``0, N, 2N, ...`` of a video run the whole UNet (*full steps*);
the steps between (*shallow steps*) run only ``conv_in``, the outer ``depth`` down blocks,
the outer ``depth`` up blocks and ``conv_out``, and reuse the output of the deepest up block
they skip (``up_blocks[-depth - 1]``, or the mid block for the deepest setting), stored at
the last full step. This changes the output (it is an approximation, as in DeepCache).

How (no diffusers forward function is copied): the ``forward`` of each deep block is wrapped
on the instance (``block.forward = ...``, the mechanism diffusers' own ``diffusers.hooks``
use), so the module tree, ``state_dict`` keys and parameters are unchanged. In diffusers'
``UNetSpatioTemporalConditionModel.forward`` the outputs of the skipped down blocks, of the
mid block and of the skipped up blocks only feed skipped blocks, except the output of
``up_blocks[-depth - 1]``, which feeds the kept up blocks. On a shallow step a skipped block
therefore returns a placeholder of the right structure at no cost (its input, and for a down
block a residual tuple of the right length, since the up blocks pop residuals by count) and
``up_blocks[-depth - 1]`` returns the stored feature. The downsampler of
``down_blocks[depth - 1]`` only feeds skipped blocks too, and is skipped the same way. The
kept up blocks consume the residuals of ``conv_in`` and of ``down_blocks[:depth]``, which run.

Which step is it? A forward pre-hook on the UNet (which runs eagerly, outside any
``torch.compile``-traced code) decides, per UNet call, whether this call continues the video
of the previous call, and sets a plain Python bool on the shared state; the wrapped blocks
read it, so a compiled UNet has two graph variants (full and shallow). A call starts a NEW
video (a full step, the stored feature dropped) when any of these holds:

* :func:`reset_step_cache` was called since the last UNet call (the ``Renderer`` calls it at
  the start of every generation);
* ``sample`` has another shape (but for its batch), dtype or device than in the last call;
* ``encoder_hidden_states`` is not the same tensor region (the same base tensor, version
  counter, offset and shape) as in the last call (the SVD pipeline passes one embedding
  tensor at every step of a video), nor the conditional half of it or the tensor it is the
  conditional half of (guidance on part of the schedule, :mod:`vcut.guidance`, runs the
  conditional half of the CFG batch on some steps);
* the timestep does not continue the last call's schedule. The SVD pipeline passes elements
  of ``scheduler.timesteps`` (a new tensor at every pipeline call), which are views of that
  tensor: a view continues the schedule when it views the same tensor at a later position
  (both read from tensor metadata: no device synchronisation). Any other timestep continues
  the schedule when its value is strictly below the last one (SVD's timesteps strictly
  decrease within a video); reading a CUDA tensor's value costs one small device-to-host
  copy per UNet call, a Python number costs nothing.

When the batch changes within a video (a CFG step, then a conditional-only one), a shallow
step reuses the conditional half of the stored feature; the other way round there is no stored
feature for the unconditional half, so that step runs the whole UNet (:func:`reuses_feature`,
:func:`shallow_steps`).

Nothing is kept between videos: a new video starts with a full step and drops the stored
feature before it runs.

Removal: the state records the handles of its two UNet hooks and the blocks it wrapped
(``step_cache_state(unet).handles`` / ``.wrapped``); :func:`remove_step_cache` removes exactly
those, and applying the same settings twice installs nothing new.

Compile: compile ``unet.forward`` (the hooks then run eagerly around it), after this patch.
A forward hook copies the stored feature out of the compiled call after each full step (one
copy per full step), so CUDA graphs (``mode="reduce-overhead"``) cannot overwrite it.
"""

from __future__ import annotations

import types
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vcut.patch import VCUTError, tensor_version
from vcut.unet import count_parameters, resolve_unet

_STATE_ATTR = "_vcut_step_cache"


@dataclass(frozen=True)
class StepCacheReport:
    """What :func:`apply_step_cache` did to a UNet."""

    interval: int  # 1: off
    depth: int
    enabled: bool
    skipped_blocks: tuple[str, ...]  # module names whose forward is skipped on shallow steps
    cached_block: str | None  # the block whose output is stored at full steps and reused
    params_in_skipped_blocks: int

    def to_dict(self) -> dict:
        return asdict(self)


class StepCacheState:
    """The step decision and the stored deep feature of one UNet (shared by its wrapped blocks)."""

    def __init__(self, interval: int, depth: int) -> None:
        self.interval = interval
        self.depth = depth
        self.shallow = False  # read by the wrapped blocks: a plain bool, set eagerly per UNet call
        self.deep: torch.Tensor | None = None  # the cached block's output at the last full step
        self.step = 0  # index of the current UNet call within its video
        self.full_steps = 0  # counters over the UNet's life (tests, logs)
        self.shallow_steps = 0
        self.videos = 0
        self._last: tuple | None = None  # what identifies the last call's video
        self.report: StepCacheReport | None = None
        #: what apply_step_cache installed, for remove_step_cache: the UNet hooks' handles and
        #: the modules whose ``forward`` is wrapped on the instance
        self.handles: list[RemovableHandle] = []
        self.wrapped: list[nn.Module] = []

    def reset(self) -> None:
        """Forget the current video: the next UNet call is a full step of a new video."""
        self._last = None
        self.deep = None
        self.shallow = False

    @staticmethod
    def _timestep_key(t: Any) -> tuple:
        if isinstance(t, torch.Tensor):
            if t._base is not None and t.numel() == 1:
                return ("view", t._base, tensor_version(t._base), t.storage_offset())
            if t.is_meta:  # no value to read (MAC counting): never continues a schedule
                return ("meta", object())
            return ("value", float(t.reshape(-1)[0]))  # one device->host copy on CUDA
        return ("value", float(t))

    @staticmethod
    def _continues(last_t: tuple, t: tuple) -> bool:
        if last_t[0] == t[0] == "view":
            return last_t[1] is t[1] and last_t[2] == t[2] and t[3] > last_t[3]
        if last_t[0] == t[0] == "value":
            return t[1] < last_t[1]
        return False

    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = kwargs.get("sample", args[0] if args else None)
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        e = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if not isinstance(sample, torch.Tensor) or t is None:
            self.reset()
            return
        sample_key = (tuple(sample.shape[1:]), sample.dtype, sample.device)  # the batch may halve
        e_key = _embedding_key(e)
        t_key = self._timestep_key(t)
        last = self._last
        same_video = (
            last is not None
            and last[0] == sample_key
            and _same_embedding(last[1], e_key)
            and self._continues(last[2], t_key)
        )
        if same_video:
            self.step += 1
        else:
            self.step = 0
            self.deep = None  # never reuse another video's features
            self.videos += 1
        self._last = (sample_key, e_key, t_key)
        wants_shallow = self.step % self.interval != 0
        rows = sample.shape[0] * sample.shape[1] if sample.ndim >= 2 else sample.shape[0]
        if wants_shallow and self.deep is not None and self.deep.shape[0] != rows:
            # The batch changed within the video (guidance on part of the schedule, vcut.guidance):
            # the conditional half of a CFG step's feature serves a conditional-only step.
            self.deep = self.deep[rows:] if reuses_feature(self.deep.shape[0], rows) else None
        self.shallow = wants_shallow and self.deep is not None
        if self.shallow:
            self.shallow_steps += 1
        else:
            self.deep = None  # a full step stores a fresh one (dropped if the step fails)
            self.full_steps += 1

    def after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if not self.shallow and self.deep is not None:
            # Own the stored feature, outside any compiled code: under CUDA graphs
            # (torch.compile mode="reduce-overhead") the full step's tensors live in the graph's
            # memory pool and are overwritten by the next replay. One copy per full step.
            self.deep = self.deep.clone()


def reuses_feature(stored: int, needed: int) -> bool:
    """Whether a deep feature stored for ``stored`` batch rows serves a shallow step of ``needed``
    rows: the same batch, or the conditional half of a classifier-free-guidance batch (its second
    half, diffusers' order) for a step that runs the conditional half only."""
    return stored in (needed, 2 * needed)


def shallow_steps(interval: int, batches: list[int] | tuple[int, ...]) -> list[bool]:
    """Which steps of a video are shallow, given each step's UNet batch: what
    :meth:`StepCacheState.before_forward` decides step by step (used by :mod:`vcut.macs`)."""
    out, stored = [], None
    for step, batch in enumerate(batches):
        wants = interval > 1 and step % interval != 0
        shallow = wants and stored is not None and reuses_feature(stored, batch)
        stored = batch
        out.append(shallow)
    return out


def _embedding_key(e: Any) -> tuple | None:
    """What identifies a conditioning tensor without reading it: its storage's base tensor (and
    version), and its offset, shape and batch stride there."""
    if not isinstance(e, torch.Tensor):
        return None
    root = e._base if e._base is not None else e
    return (root, tensor_version(root), e.storage_offset(), tuple(e.shape), e.stride(0) if e.ndim else 0)


def _same_embedding(a: tuple | None, b: tuple | None) -> bool:
    """``b`` conditions the video of ``a``: the same tensor region, or the conditional (second)
    half of the other's classifier-free-guidance batch (:mod:`vcut.guidance`)."""
    if a is None or b is None:
        return a is b
    if a[0] is not b[0] or a[1] != b[1]:
        return False
    if a[2:] == b[2:]:
        return True
    small, big = (a, b) if a[3] and b[3] and a[3][0] < b[3][0] else (b, a)
    if not small[3] or 2 * small[3][0] != big[3][0] or small[3][1:] != big[3][1:]:
        return False
    return small[2] == big[2] + small[3][0] * big[4]


# -- the wrapped forwards (bound on the block instance; they call the class's own forward) ------


def _skipped_down_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
    state: StepCacheState = getattr(self, _STATE_ATTR)
    if state.shallow:
        # Only skipped blocks consume these: a placeholder tuple of the right length.
        return hidden_states, (hidden_states,) * self._vcut_step_cache_residuals
    return type(self).forward(self, hidden_states, *args, **kwargs)


def _skipped_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
    state: StepCacheState = getattr(self, _STATE_ATTR)
    if state.shallow:
        return hidden_states  # consumed by skipped blocks only
    return type(self).forward(self, hidden_states, *args, **kwargs)


def _cached_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
    state: StepCacheState = getattr(self, _STATE_ATTR)
    if state.shallow:
        return state.deep
    out = type(self).forward(self, hidden_states, *args, **kwargs)
    state.deep = out
    return out


def check_step_cache_args(interval: Any, depth: Any, levels: int | None = None) -> tuple[int, int]:
    """Validate ``interval`` (None or an int >= 1) and ``depth`` (an int >= 1, <= ``levels``).

    Returns ``(interval, depth)`` with None mapped to 1; raises ``ValueError`` naming the argument.
    """
    if interval is None:
        interval = 1
    if isinstance(interval, bool) or not isinstance(interval, int):
        raise ValueError(f"step_cache must be None or an integer >= 1 (the interval), got {interval!r}")
    if interval < 1:
        raise ValueError(f"step_cache must be >= 1 (1 or None: off), got {interval}")
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise ValueError(f"step_cache_depth must be an integer >= 1, got {depth!r}")
    if depth < 1 or (levels is not None and depth > levels):
        bound = ">= 1" if levels is None else f"in [1, {levels}] for this UNet"
        raise ValueError(f"step_cache_depth must be {bound}, got {depth}")
    return int(interval), int(depth)


def apply_step_cache(obj: object, interval: int | None, depth: int = 1) -> StepCacheReport:
    """Cache the deep UNet features between denoising steps, in place (changes the output).

    Args that matter:
        obj: a diffusers ``StableVideoDiffusionPipeline`` (its ``unet`` is patched) or a
            ``UNetSpatioTemporalConditionModel``. Apply it after :func:`vcut.apply_vcut` and
            before ``torch.compile``.
        interval: ``N``: steps ``0, N, 2N, ...`` of each video run the whole UNet, the others
            only the shallow path. ``1`` or ``None``: off (nothing is patched; the frames are
            those of the unpatched model). Larger saves more and changes the video more.

    Args to tinker with:
        depth: how many outer down/up levels always run (default 1, the shallowest branch,
            as DeepCache). Deeper keeps more of the UNet per shallow step: closer to the
            uncached output, less saved. At most ``len(unet.up_blocks)`` (4 for SVD), where
            only the mid block is cached.

    Returns:
        A :class:`StepCacheReport`. Applying the same settings again is a no-op that returns
        the first report; other settings on a cached UNet raise :class:`VCUTError` (call
        :func:`remove_step_cache` first).
    """
    unet = resolve_unet(obj, "step caching")
    levels = len(unet.up_blocks)
    interval, depth = check_step_cache_args(interval, depth, levels)
    state: StepCacheState | None = getattr(unet, _STATE_ATTR, None)
    if state is not None:
        if (state.interval, state.depth) == (interval, depth):
            return state.report
        raise VCUTError(
            f"this UNet already has step caching with interval {state.interval} and depth {state.depth}; "
            f"cannot switch to interval {interval}, depth {depth}: call vcut.remove_step_cache first"
        )
    if interval == 1:
        return StepCacheReport(1, depth, False, (), None, 0)
    if len(unet.down_blocks) != levels:
        raise VCUTError("step caching needs as many down blocks as up blocks (an SVD UNet)")

    state = StepCacheState(interval, depth)
    wrapped: list[tuple[str, nn.Module, Any]] = []
    for i, block in enumerate(unet.down_blocks):
        if i >= depth:
            block._vcut_step_cache_residuals = len(block.resnets) + (block.downsamplers is not None)
            wrapped.append((f"down_blocks.{i}", block, _skipped_down_forward))
    edge = unet.down_blocks[depth - 1]
    if edge.downsamplers is not None:  # its output feeds down_blocks[depth] and up_blocks[-depth - 1] only
        for j, downsampler in enumerate(edge.downsamplers):
            wrapped.append((f"down_blocks.{depth - 1}.downsamplers.{j}", downsampler, _skipped_forward))
    cached = levels - depth - 1  # index of the up block whose output is reused; -1: the mid block
    wrapped.append(("mid_block", unet.mid_block, _cached_forward if cached < 0 else _skipped_forward))
    for i in range(cached + 1):
        forward = _cached_forward if i == cached else _skipped_forward
        wrapped.append((f"up_blocks.{i}", unet.up_blocks[i], forward))

    for _, module, _ in wrapped:
        if "forward" in vars(module):
            raise VCUTError(
                f"{type(module).__name__} already has a patched forward (another hook or cache?): "
                "cannot add step caching"
            )
    for _, module, forward in wrapped:
        setattr(module, _STATE_ATTR, state)
        module.forward = types.MethodType(forward, module)
        state.wrapped.append(module)

    state.handles = [
        unet.register_forward_pre_hook(state.before_forward, with_kwargs=True),
        unet.register_forward_hook(state.after_forward, with_kwargs=True),
    ]
    setattr(unet, _STATE_ATTR, state)
    names = tuple(name for name, _, _ in wrapped)
    state.report = StepCacheReport(
        interval=interval,
        depth=depth,
        enabled=True,
        skipped_blocks=names,
        cached_block="mid_block" if cached < 0 else f"up_blocks.{cached}",
        params_in_skipped_blocks=count_parameters(*(m for _, m, _ in wrapped)),
    )
    return state.report


def remove_step_cache(obj: object) -> None:
    """Undo :func:`apply_step_cache` in place: the UNet hooks go (by their handles) and the
    wrapped blocks get their class's ``forward`` back (a no-op on a UNet without it)."""
    unet = resolve_unet(obj, "step caching")
    state: StepCacheState | None = getattr(unet, _STATE_ATTR, None)
    if state is None:
        return
    for handle in state.handles:
        handle.remove()
    for module in state.wrapped:
        del module.forward
        delattr(module, _STATE_ATTR)
        if hasattr(module, "_vcut_step_cache_residuals"):
            del module._vcut_step_cache_residuals
    delattr(unet, _STATE_ATTR)
    state.reset()


def reset_step_cache(obj: object) -> None:
    """Start a new video at the next UNet call (drops the stored feature). No-op without a cache."""
    state = step_cache_state(obj)
    if state is not None:
        state.reset()


def step_cache_state(obj: object) -> StepCacheState | None:
    """The :class:`StepCacheState` of a pipeline's or UNet's step cache (None when off)."""
    return getattr(resolve_unet(obj, "step caching"), _STATE_ATTR, None)
