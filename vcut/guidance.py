"""Classifier-free guidance on part of the schedule: the conditional half of the UNet only, elsewhere.

SVD runs classifier-free guidance (CFG) as one UNet call on a batch of two halves,
``torch.cat([unconditional, conditional])``, and mixes the two predictions with the guidance
scale. Guidance limited to an interval of the schedule (Kynkaanniemi et al. 2024, "Applying
guidance in a limited interval improves sample and distribution quality") keeps that on the
steps inside ``[guidance_start, guidance_stop)`` (fractions of the schedule) and runs the
conditional half alone elsewhere: guidance scale 1 there, at half the UNet work.

Which steps: step ``i`` of ``n`` is guided when ``start <= i / n < stop`` (:func:`guided`), so
``(0, 1)`` guides every step (stock) and ``(0, 0.6)`` of 25 steps guides steps 0-14. The same
function decides in the pipeline and in the MAC count (:mod:`vcut.macs`).

How (no diffusers code copied): :class:`CondOnlyHook` is a pair of torch module hooks on the
UNet. When its ``decide()`` says "this call is outside the interval", the forward pre-hook
hands the UNet the second (conditional) half of ``sample``, ``encoder_hidden_states`` and
``added_time_ids`` (diffusers' order: unconditional first), and the forward hook returns the
conditional prediction twice, so the pipeline's own guidance step
``uncond + scale * (cond - uncond)`` yields ``cond`` exactly. The halves of the embedding and
time ids are made once per tensor (the pipeline passes the same tensors at every step), so
VCUT's constant cache and the step cache recognise them by identity, with no device sync.
The pre-hook is registered first (``prepend=True``): VCUT and the step cache, whose hooks run
after it, see the batch of one. The hooks run eagerly outside a compiled ``forward``, which
sees one more input shape: one more graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

_HOOK_ATTR = "_vcut_cond_only"
#: positions of the UNet forward's tensor arguments that carry the CFG batch (after ``timestep``)
_BATCHED = {"sample": 0, "encoder_hidden_states": 2, "added_time_ids": 3}


def check_guidance_interval(start: Any, stop: Any) -> tuple[float, float]:
    """``(start, stop)`` as floats with ``0 <= start < stop <= 1``; ValueError naming the bad one."""
    values = []
    for name, value in (("guidance_start", start), ("guidance_stop", stop)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
        values.append(float(value))
    if values[0] >= values[1]:
        raise ValueError(f"guidance_start must be < guidance_stop, got {values[0]} >= {values[1]}")
    return values[0], values[1]


def is_stock(start: float, stop: float) -> bool:
    """The interval guides every step: the stock pipeline."""
    return start <= 0.0 and stop >= 1.0


def guided(step: int, steps: int, start: float, stop: float) -> bool:
    """Whether step ``step`` (0-based) of ``steps`` runs classifier-free guidance:
    ``start <= step / steps < stop``."""
    position = step / steps
    return start <= position < stop


def guided_steps(steps: int, start: float, stop: float) -> tuple[bool, ...]:
    """:func:`guided` for every step of a video."""
    return tuple(guided(i, steps, start, stop) for i in range(steps))


class CondOnlyHook:
    """Runs the conditional half of a CFG batch when ``decide()`` returns True (see module doc).

    ``decide`` is set by whoever drives the denoising loop (``pipeline.svd.RenderPipeline``)
    for the duration of a call, and is None otherwise: the hooks then change nothing.
    """

    def __init__(self) -> None:
        self.decide: Callable[[], bool] | None = None
        self.cond_only_calls = 0  # counters over the UNet's life (tests, logs)
        self.guided_calls = 0
        self.handles: list[RemovableHandle] = []
        self._halves: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._sliced = False

    def clear(self) -> None:
        """Forget the halves made for the last video (call when a pipeline call ends)."""
        self._halves.clear()
        self._sliced = False

    def _half(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The conditional (second) half of ``x``: the same tensor object while ``x`` is unchanged."""
        seen = self._halves.get(name)
        if seen is not None and seen[0] is x:
            return seen[1]  # a view: it always shows x's current content
        half = x[x.shape[0] // 2 :]
        self._halves[name] = (x, half)
        return half

    @torch.compiler.disable
    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._sliced = False
        if self.decide is None:
            return None
        sample = kwargs.get("sample", args[0] if args else None)
        if not isinstance(sample, torch.Tensor) or sample.shape[0] % 2:
            return None
        if not self.decide():
            self.guided_calls += 1
            return None
        args, kwargs = list(args), dict(kwargs)
        for name, position in _BATCHED.items():
            if name in kwargs:
                x = kwargs[name]
            elif position < len(args):
                x = args[position]
            else:
                continue
            if not isinstance(x, torch.Tensor) or x.shape[0] != sample.shape[0]:
                continue
            # ``sample`` is new at every step: a plain view; the others are made once per tensor.
            half = x[x.shape[0] // 2 :] if name == "sample" else self._half(name, x)
            if name in kwargs:
                kwargs[name] = half
            else:
                args[position] = half
        self._sliced = True
        self.cond_only_calls += 1
        return tuple(args), kwargs

    @torch.compiler.disable
    def after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self._sliced:
            return None
        self._sliced = False
        # The conditional prediction for both halves: the pipeline's CFG step then gives cond.
        if isinstance(output, tuple):
            return (torch.cat([output[0], output[0]]), *output[1:])
        return type(output)(sample=torch.cat([output.sample, output.sample]))


def install_cond_only_hook(unet: nn.Module) -> CondOnlyHook:
    """The UNet's :class:`CondOnlyHook`, registered on first use (never two on one UNet)."""
    hook = getattr(unet, _HOOK_ATTR, None)
    if hook is not None:
        return hook
    hook = CondOnlyHook()
    hook.handles = [
        unet.register_forward_pre_hook(hook.before_forward, with_kwargs=True, prepend=True),
        unet.register_forward_hook(hook.after_forward, with_kwargs=True),
    ]
    setattr(unet, _HOOK_ATTR, hook)
    return hook


def cond_only_hook(unet: nn.Module) -> CondOnlyHook | None:
    """The UNet's :class:`CondOnlyHook`, or None."""
    return getattr(getattr(unet, "_orig_mod", unet), _HOOK_ATTR, None)
