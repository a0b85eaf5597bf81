"""FP8 for the UNet's Linear layers (``Renderer(quantize="fp8")``, ``model.quantize=fp8``).

What it does: every ``nn.Linear`` of the UNet whose two dimensions are multiples of 16 (what
FP8 matrix kernels take) computes ``x @ W.T + b`` with ``x`` and ``W`` in ``float8_e4m3fn``:

* ``W`` is quantized once, with one scale per output row (``amax(row) / 448``);
* ``x`` is quantized on every call with one scale per row (token) of the activation, from its
  own ``amax`` (dynamic activation scaling: no calibration, nothing to store);
* the product runs in ``torch._scaled_mm`` with both scales (per-row scaling), its output in
  bf16 (the only per-row output type some CUDA builds take), then cast to the input's dtype,
  plus the bias.

It CHANGES the frames (the inputs of every such Linear are rounded to 3 mantissa bits):
opt-in, and the GPU script reports PSNR/SSIM against stock for it. Layers whose dimensions are
no multiple of 16 (and everything that is no ``nn.Linear``: convolutions, attention) stay in
the model's dtype.

Two implementations, the same arithmetic:

* ``torchao``'s float8 inference path (``Float8DynamicActivationFloat8WeightConfig``, torchao
  0.18.0, which needs torch >= 2.11) when it imports: a kept library with fused kernels under
  ``torch.compile``. An optional extra (``pip install 'vcut-render[fp8]'``); it refuses to
  quantize on a CPU. Its per-row scales need bf16 weights: on an fp16 model (the Renderer's
  default on CUDA) it is given per-tensor scales (one for the weight, one per activation call)
  instead, a coarser rounding than the direct path's; ``QuantizeReport.granularity`` says which.
* :class:`Float8Linear`, a small module replacement calling ``torch._scaled_mm`` directly,
  when torchao is absent (or fails to quantize). It also runs on a CPU (torch >= 2.13 has a CPU
  ``_scaled_mm``), which is how its numerics are tested here.

Where FP8 is refused: :func:`fp8_refusal` says, in one line, why a device cannot run FP8
matrix products (a CPU; a GPU of compute capability below 8.9, i.e. before Ada/Hopper). The
Renderer raises it as ``ValueError`` and ``vcut run`` checks it before any worker starts
(``jobs.preflight``), exit status 2.

This module imports torch lazily: the job config reads :data:`QUANTIZE_MODES` without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

#: ``Renderer(quantize=...)`` and ``model.quantize`` values.
QUANTIZE_MODES = ("off", "fp8")
#: The smallest CUDA compute capability with FP8 tensor cores (Ada Lovelace; Hopper is 9.0).
FP8_MIN_CAPABILITY = (8, 9)
#: The largest finite float8_e4m3fn value.
E4M3_MAX = 448.0
#: torchao's version this was written and tested against (its float8 API moves between releases).
TORCHAO_VERSION = "0.18.0"


def check_quantize(value: str | None) -> str:
    """Normalise a ``quantize`` setting (``None`` -> ``"off"``); ``ValueError`` naming it otherwise."""
    mode = "off" if value is None else str(value).strip().lower()
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}; got {value!r}")
    return mode


def fp8_refusal(device: str | torch.device | None) -> str | None:
    """Why ``device`` cannot run FP8 matrix products, in one line; None when it can.

    ``None`` means this process's default CUDA device (a CPU when there is none)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return (
            f"quantize=fp8 needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper); "
            f"this renders on {device.type}: set quantize=off"
        )
    if not torch.cuda.is_available():
        return "quantize=fp8 needs a CUDA GPU of compute capability >= 8.9, and torch sees no CUDA device"
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    if tuple(capability) < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        return (
            f"quantize=fp8 needs compute capability >= 8.9 (Ada, Hopper); {name} (cuda:{index}) has "
            f"{capability[0]}.{capability[1]}: set quantize=off"
        )
    return None


def _float8_module():
    """The torch ``nn.Module`` subclass, built on first use (this module imports torch lazily)."""
    import torch
    from torch import nn

    class _Float8Linear(nn.Module):
        """``y = x @ W.T + b`` with ``x`` and ``W`` in float8_e4m3fn, per-row scales, through
        ``torch._scaled_mm``. Built from an ``nn.Linear`` by :meth:`from_linear`."""

        def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
            super().__init__()
            self.out_features, self.in_features = weight_fp8.shape
            # (in, out) column-major, as _scaled_mm wants its second operand
            self.register_buffer("weight_t", weight_fp8.t())
            self.register_buffer("weight_scale", weight_scale.reshape(1, -1).float())
            self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

        @classmethod
        def from_linear(cls, linear: nn.Linear) -> nn.Module:
            w = linear.weight.detach().float()
            amax = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
            scale = amax / E4M3_MAX
            w8 = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
            return cls(w8, scale, linear.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            amax = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
            scale = amax / E4M3_MAX
            x8 = (x2.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
            y = torch._scaled_mm(
                x8, self.weight_t, scale_a=scale, scale_b=self.weight_scale, out_dtype=torch.bfloat16
            )
            y = y.to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*shape[:-1], self.out_features)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 per-row"

    return _Float8Linear


_FLOAT8_LINEAR: Any = None


def float8_linear(linear: nn.Linear) -> nn.Module:
    """An FP8 replacement of ``linear`` (:class:`Float8Linear`): same inputs, outputs, device."""
    global _FLOAT8_LINEAR
    if _FLOAT8_LINEAR is None:
        _FLOAT8_LINEAR = _float8_module()
    return _FLOAT8_LINEAR.from_linear(linear)


def is_float8_linear(module: Any) -> bool:
    return _FLOAT8_LINEAR is not None and isinstance(module, _FLOAT8_LINEAR)


def fp8_eligible(linear: nn.Linear) -> bool:
    """FP8 kernels take matrices whose inner and outer dimensions are multiples of 16."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


@dataclass(frozen=True)
class QuantizeReport:
    """What :func:`quantize_unet` did: ``backend`` is ``"torchao"`` or ``"scaled_mm"``,
    ``granularity`` ``"row"`` or ``"tensor"`` (the scales)."""

    mode: str
    backend: str
    layers: int  # Linear layers in FP8
    kept: int  # Linear layers left in the model's dtype (dimensions no multiple of 16)
    params: int  # weights now stored in FP8
    granularity: str = "row"


def _torchao_quantize(unet: nn.Module, eligible: set[str]) -> str | None:
    """torchao's float8 inference path on the ``eligible`` Linear layers: the granularity used,
    or None when torchao is unavailable. Per-row scales on bf16 weights, per-tensor otherwise."""
    import torch

    try:
        import torchao  # noqa: F401
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            PerTensor,
            quantize_,
        )
    except Exception:  # not installed, or not this API: the direct path
        return None
    row = next(unet.parameters()).dtype == torch.bfloat16
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow() if row else PerTensor())
    quantize_(unet, config, filter_fn=lambda module, fqn: fqn in eligible)
    return "row" if row else "tensor"


def quantize_unet(
    unet: nn.Module, mode: str = "fp8", *, backend: str = "auto", check_device: bool = True
) -> QuantizeReport:
    """Put ``unet``'s eligible Linear layers in FP8, in place (see the module doc).

    ``backend``: ``"auto"`` (torchao when it imports and quantizes, else ``"scaled_mm"``),
    ``"torchao"`` or ``"scaled_mm"``. ``check_device=False`` skips :func:`fp8_refusal` (the
    CPU tests of the arithmetic); otherwise a device without FP8 raises ``ValueError`` with
    its one line. Apply it after VCUT and before the step cache and ``torch.compile``.
    """
    from torch import nn

    mode = check_quantize(mode)
    if backend not in ("auto", "torchao", "scaled_mm"):
        raise ValueError(f"backend must be auto, torchao or scaled_mm; got {backend!r}")
    linears = {name: m for name, m in unet.named_modules() if type(m) is nn.Linear}
    if mode == "off":
        return QuantizeReport("off", "none", 0, len(linears), 0)
    if check_device:
        device = next(unet.parameters()).device
        refusal = fp8_refusal(device)
        if refusal:
            raise ValueError(refusal)
    eligible = {name for name, m in linears.items() if fp8_eligible(m)}
    params = sum(linears[name].weight.numel() for name in eligible)
    used, granularity = None, "row"
    if backend in ("auto", "torchao"):
        try:
            torchao_granularity = _torchao_quantize(unet, eligible)
            if torchao_granularity is not None:
                used, granularity = "torchao", torchao_granularity
            elif backend == "torchao":
                raise ValueError(f"quantize backend torchao: torchao {TORCHAO_VERSION} does not import")
        except ValueError:
            raise
        except Exception as exc:  # torchao present but refusing: the direct path
            if backend == "torchao":
                raise
            logger.warning("torchao could not quantize the UNet (%s); using torch._scaled_mm directly", exc)
    if used is None:
        for name in sorted(eligible):
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, child, float8_linear(linears[name]))
        used = "scaled_mm"
    return QuantizeReport("fp8", used, len(eligible), len(linears) - len(eligible), params, granularity)


def quantize_refusal(quantize: str | None, device: str | None, *, cluster: bool = False) -> str | None:
    """The pre-flight check of ``model.quantize`` (``vcut run``, before any worker starts).

    One line saying why the job cannot render with ``quantize`` on ``device`` (``model.device``;
    None: the workers' default, CUDA where there is a GPU), or None. On a ``cluster`` (``--address``)
    whose GPUs this machine does not have, a CUDA device is checked by each worker instead
    (the Renderer refuses with the same line); a CPU device is refused here all the same.
    """
    if check_quantize(quantize) == "off":
        return None
    if device is not None and not str(device).startswith("cuda"):
        return fp8_refusal(device)
    import torch

    if cluster and not torch.cuda.is_available():
        return None
    if device is None and not torch.cuda.is_available():
        return fp8_refusal("cpu")
    return fp8_refusal(device)
