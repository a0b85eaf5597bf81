"""MAC and parameter accounting for the SVD UNet, stock versus VCUT.

The UNet is built on the ``meta`` device (no weights, no memory) and run under
``torch.utils.flop_counter.FlopCounterMode``, so the full-size SVD-XT architecture is
measured on a CPU in seconds for any shape. Conventions:

* MACs = FLOPs / 2 (FlopCounterMode counts a multiply-add as 2 FLOPs).
* Per video = ``num_inference_steps`` UNet calls on the classifier-free-guidance batch
  (batch 2; batch 1 with ``guidance=False``).
* VCUT per video = one call that computes the one-time linear constants plus
  ``num_inference_steps - 1`` calls that reuse them, both measured.
* Step caching with interval ``N`` (:mod:`vcut.step_cache`): steps ``0, N, 2N, ...`` are full
  calls, the others shallow calls; both kinds are measured on the (VCUT-patched) UNet. The
  first step is a full call that also computes VCUT's constants.
* Guidance on part of the schedule (``guidance_start``/``guidance_stop``, :mod:`vcut.guidance`):
  the steps outside the interval are UNet calls on the conditional half only (batch 1),
  measured as such. VCUT computes its constants once per conditioning tensor, so a video that
  has both kinds of steps computes them once for the CFG batch and once for its conditional
  half (each measured as the extra MACs of a first call). With the step cache, a shallow
  step after a change of batch is counted as the step cache decides it
  (:func:`vcut.step_cache.shallow_steps`): the conditional half of a stored CFG feature serves a
  conditional-only shallow step; the other way round the step runs the whole UNet.
* Savings are attributed lever by lever: ``macs_saved_vcut`` = stock minus VCUT without
  step caching; ``macs_saved_step_cache`` = VCUT without step caching minus VCUT with it;
  ``macs_saved_guidance`` = that minus the same with the guidance interval; ``macs_saved`` is
  their sum (stock minus what runs).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from vcut.guidance import check_guidance_interval, guided_steps
from vcut.modes import MODES
from vcut.patch import apply_vcut
from vcut.step_cache import apply_step_cache, check_step_cache_args, shallow_steps

#: The published SVD UNets share one architecture, which is diffusers' default config
#: for ``UNetSpatioTemporalConditionModel``; they differ in their frame count only.
PUBLISHED_FRAMES = {"svd": 14, "svd-xt": 25}


def load_unet_config(model: str | Path | dict | Any) -> dict:
    """Resolve ``model`` to a UNet config dict.

    ``model`` may be ``"svd"``, ``"svd-xt"``, a local pipeline or UNet folder (its
    ``config.json`` only is read), a hub id (config only is fetched, honouring the usual
    Hugging Face cache and offline settings), a config mapping, or a UNet module.
    """
    from diffusers import UNetSpatioTemporalConditionModel

    if hasattr(model, "config") and not isinstance(model, (str, Path, dict)):
        return dict(model.config)
    if isinstance(model, dict):
        return dict(model)
    name = str(model)
    if name in PUBLISHED_FRAMES:
        signature = inspect.signature(UNetSpatioTemporalConditionModel.__init__)
        config = {k: v.default for k, v in signature.parameters.items() if k != "self"}
        config["num_frames"] = PUBLISHED_FRAMES[name]
        return config
    path = Path(name).expanduser()
    if path.is_dir():
        for candidate in (path / "unet" / "config.json", path / "config.json"):
            if candidate.is_file():
                return json.loads(candidate.read_text())
        raise FileNotFoundError(f"{path}: no unet/config.json or config.json: not an SVD model folder")
    if path.exists() or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name}: not a model folder")
    try:
        return dict(UNetSpatioTemporalConditionModel.load_config(name, subfolder="unet"))
    except Exception as exc:  # hub errors are many types; name the input in one message
        raise FileNotFoundError(
            f"{name!r} is neither 'svd', 'svd-xt', a local model folder, nor a reachable hub id: {exc}"
        ) from exc


@dataclass(frozen=True)
class MacReport:
    """Measured MACs (per video) and parameters, stock versus one VCUT mode."""

    mode: str
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance: bool
    unet_call_macs: int  # one stock UNet call on the (CFG) batch
    vcut_first_call_macs: int  # one VCUT call that also computes the one-time linear
    vcut_call_macs: int  # one VCUT call reusing the cached constants
    baseline_macs: int
    vcut_macs: int
    macs_saved: int
    # The same per-video figures with the attention kernels' matmuls (Q.K^T and A.V) counted.
    baseline_macs_with_attention: int
    vcut_macs_with_attention: int
    macs_saved_with_attention: int
    params_baseline: int
    params_vcut: int
    params_removed: int
    # Step caching (interval 1: off). ``vcut_macs`` and ``macs_saved`` above include it.
    step_cache: int = 1
    step_cache_depth: int = 1
    full_calls: int = 0  # UNet calls per video that run the whole UNet
    shallow_calls: int = 0  # UNet calls per video that run the shallow path only
    shallow_call_macs: int = 0  # one shallow call (VCUT-patched) on the (CFG) batch
    macs_saved_vcut: int = 0  # stock minus VCUT without step caching
    macs_saved_step_cache: int = 0  # VCUT without step caching minus VCUT with it
    # Guidance on part of the schedule (0 and 1: every step guided, stock).
    guidance_start: float = 0.0
    guidance_stop: float = 1.0
    guided_calls: int = 0  # UNet calls per video on the CFG batch (0 without guidance)
    unguided_calls: int = 0  # UNet calls per video on the conditional half only
    unguided_call_macs: int = 0  # one such call (VCUT-patched, whole UNet)
    macs_saved_guidance: int = 0  # VCUT (+ step cache) with CFG on every step minus with the interval

    @property
    def saved_fraction(self) -> float:
        return self.macs_saved / self.baseline_macs if self.baseline_macs else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "saved_fraction": self.saved_fraction}

    def format_table(self) -> str:
        def t(x: int) -> str:
            return f"{x / 1e12:,.2f} T"

        def m(x: int) -> str:
            return f"{x / 1e6:,.2f} M"

        def pct(x: int) -> str:
            return f"{100 * x / self.baseline_macs:.2f} %" if self.baseline_macs else "0 %"

        cfg = "with CFG (batch 2)" if self.guidance else "no CFG (batch 1)"
        if self.guidance and (self.guidance_start, self.guidance_stop) != (0.0, 1.0):
            cfg = (
                f"CFG on [{self.guidance_start:g}, {self.guidance_stop:g}) of the schedule: "
                f"{self.guided_calls} calls on batch 2, {self.unguided_calls} on batch 1"
            )
        cache, with_cache = "", ""
        if self.step_cache > 1:
            cache = f", step cache every {self.step_cache} steps at depth {self.step_cache_depth}"
            with_cache = f" (+ step cache: {self.full_calls} full, {self.shallow_calls} shallow calls)"
        rows = [
            f"SVD UNet, {self.width}x{self.height}, {self.num_frames} frames, "
            f"{self.num_inference_steps} steps, {cfg}; VCUT mode {self.mode!r}{cache}",
            f"  MACs per video, stock : {t(self.baseline_macs)}",
            f"  MACs per video, VCUT  : {t(self.vcut_macs)}{with_cache}",
            f"  MACs saved per video  : {t(self.macs_saved)} ({100 * self.saved_fraction:.2f} %)",
            f"    by VCUT             : {t(self.macs_saved_vcut)} ({pct(self.macs_saved_vcut)})",
            f"    by step caching     : {t(self.macs_saved_step_cache)} ({pct(self.macs_saved_step_cache)})",
            f"    by guidance interval: {t(self.macs_saved_guidance)} ({pct(self.macs_saved_guidance)})",
            f"  with attention kernels: stock {t(self.baseline_macs_with_attention)}, "
            f"VCUT {t(self.vcut_macs_with_attention)}, saved {t(self.macs_saved_with_attention)}",
            f"  UNet parameters, stock: {m(self.params_baseline)}",
            f"  UNet parameters, VCUT : {m(self.params_vcut)}",
            f"  parameters removed    : {m(self.params_removed)}",
            "  (torch.utils.flop_counter.FlopCounterMode on meta tensors, MACs = FLOPs / 2; the first",
            "   figures leave out the attention kernels' matmuls, as a count on CPU tensors does)",
        ]
        return "\n".join(rows)


def _macs(fn) -> tuple[int, int]:
    """Run ``fn`` under FlopCounterMode; return (MACs without, MACs of) the attention kernel.

    On meta tensors scaled-dot-product attention runs its math path, whose two batched
    matmuls (``aten.bmm``: scores and weighted values; no other layer of this UNet uses
    bmm) are counted. FlopCounterMode has no formula for the fused CPU attention kernel, so
    a count on CPU tensors, the convention of the reference figures, leaves them out:
    both are reported.
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    total = int(counter.get_total_flops())
    attention = int(counter.get_flop_counts().get("Global", {}).get(torch.ops.aten.bmm, 0))
    return (total - attention) // 2, attention // 2


def _meta_unet(config: dict):
    from diffusers import UNetSpatioTemporalConditionModel

    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel.from_config(config)
    # A few parameters are made with the legacy ``torch.Tensor([...])`` constructor, which
    # ignores the default device: move everything to meta.
    return unet.to("meta")


@dataclass(frozen=True)
class _CallMacs:
    """Per-call figures: (MACs without, MACs of) the attention kernels, per kind of UNet call."""

    stock: tuple[int, int]
    first: tuple[int, int]  # VCUT call that computes the constants (stock when mode is off)
    again: tuple[int, int]  # VCUT call that reuses them
    full: tuple[int, int]  # full step-cached call (reusing VCUT constants)
    shallow: tuple[int, int]  # shallow step-cached call
    params_baseline: int
    params_vcut: int


@lru_cache(maxsize=256)
def _count_calls(
    config_json: str, height: int, width: int, num_frames: int, mode: str, batch: int, depth: int | None
) -> _CallMacs:
    """Per-call MACs on a UNet batch of ``batch`` (2: a CFG call, 1: the conditional half)."""
    config = json.loads(config_json)
    unet = _meta_unet(config)
    latent_h, latent_w = height // 8, width // 8
    in_channels = config.get("in_channels", 8)
    sample = torch.empty(batch, num_frames, in_channels, latent_h, latent_w, device="meta")
    emb = torch.empty(batch, 1, config.get("cross_attention_dim", 1024), device="meta")
    n_time_ids = config.get("projection_class_embeddings_input_dim", 768) // config.get(
        "addition_time_embed_dim", 256
    )
    time_ids = torch.empty(batch, n_time_ids, device="meta")

    def call(timestep: torch.Tensor):
        def run() -> None:
            # Some diffusers blocks create helper tensors without a device: keep them on meta too.
            with torch.device("meta"):
                unet(sample, timestep, encoder_hidden_states=emb, added_time_ids=time_ids, return_dict=False)

        return run

    # A video's timesteps as the SVD pipeline passes them: views of one schedule tensor.
    schedule = torch.empty(2, device="meta")
    with torch.no_grad():
        params_baseline = sum(p.numel() for p in unet.parameters())
        stock = _macs(call(schedule[0]))
        if mode == "off":
            first = again = stock
            params_vcut = params_baseline
        else:
            apply_vcut(unet, mode)
            first = _macs(call(schedule[0]))  # computes and caches to_out(to_v(e))
            again = _macs(call(schedule[0]))  # reuses it, as every later denoising step does
            params_vcut = sum(p.numel() for p in unet.parameters())
        full = shallow = again
        if depth is not None:
            apply_step_cache(unet, 2, depth)
            video = torch.empty(2, device="meta")  # a new video: its step 0 is full, step 1 shallow
            full = _macs(call(video[0]))
            shallow = _macs(call(video[1]))
    return _CallMacs(stock, first, again, full, shallow, params_baseline, params_vcut)


def _video(calls: dict[int, _CallMacs], batches: list[int], interval: int, k: int) -> int:
    """MACs of one video whose step ``i`` runs the UNet on batch ``batches[i]``, with the step
    cache's interval (1: off); ``k`` = 0 without, 1 of the attention kernels' matmuls.

    VCUT computes its constants at the first call of each batch (each conditioning tensor):
    the extra MACs of a first call over a reusing one.
    """
    total, seen = 0, set()
    for batch, shallow in zip(batches, shallow_steps(interval, batches), strict=True):
        c = calls[batch]
        total += c.shallow[k] if shallow else c.full[k]
        if batch not in seen:
            seen.add(batch)
            total += c.first[k] - c.again[k]
    return total


def _report(
    calls: dict[int, _CallMacs],
    height: int,
    width: int,
    num_frames: int,
    steps: int,
    mode: str,
    guidance: bool,
    interval: int,
    depth: int,
    start: float,
    stop: float,
) -> MacReport:
    cfg = 2 if guidance else 1
    every = [cfg] * steps  # CFG (if any) on every step: stock
    plan = [2 if g else 1 for g in guided_steps(steps, start, stop)] if guidance else every
    shallow = shallow_steps(interval, plan)
    main = calls[cfg]

    def per_video(k: int) -> tuple[int, int, int, int]:
        """(stock, VCUT, + step cache, + guidance interval) per video."""
        return (
            steps * main.stock[k],
            _video(calls, every, 1, k),
            _video(calls, every, interval, k),
            _video(calls, plan, interval, k),
        )

    baseline, vcut_only, cached, final = per_video(0)
    attention = per_video(1)
    baseline_attn, vcut_attn = baseline + attention[0], final + attention[3]
    return MacReport(
        mode=mode,
        height=height,
        width=width,
        num_frames=num_frames,
        num_inference_steps=steps,
        guidance=guidance,
        unet_call_macs=main.stock[0],
        vcut_first_call_macs=main.first[0],
        vcut_call_macs=main.again[0],
        baseline_macs=baseline,
        vcut_macs=final,
        macs_saved=baseline - final,
        baseline_macs_with_attention=baseline_attn,
        vcut_macs_with_attention=vcut_attn,
        macs_saved_with_attention=baseline_attn - vcut_attn,
        params_baseline=main.params_baseline,
        params_vcut=main.params_vcut,
        params_removed=main.params_baseline - main.params_vcut,
        step_cache=interval,
        step_cache_depth=depth,
        full_calls=shallow.count(False),
        shallow_calls=shallow.count(True),
        shallow_call_macs=main.shallow[0] if any(shallow_steps(interval, every)) else 0,
        macs_saved_vcut=baseline - vcut_only,
        macs_saved_step_cache=vcut_only - cached,
        guidance_start=start,
        guidance_stop=stop,
        guided_calls=plan.count(2),
        unguided_calls=plan.count(1),
        unguided_call_macs=calls[1].again[0] if 1 in calls else 0,
        macs_saved_guidance=cached - final,
    )


def count_macs(
    model: str | Path | dict | Any = "svd-xt",
    *,
    height: int = 576,
    width: int = 1024,
    num_frames: int | None = None,
    num_inference_steps: int = 25,
    mode: str = "full",
    guidance: bool = True,
    step_cache: int | None = None,
    step_cache_depth: int = 1,
    guidance_start: float = 0.0,
    guidance_stop: float = 1.0,
) -> MacReport:
    """Measure MACs per video and parameters of the SVD UNet, stock versus VCUT ``mode``.

    Args:
        model: ``"svd"``, ``"svd-xt"``, a local model folder, a hub id, a UNet config
            mapping or a UNet (see :func:`load_unet_config`). No weights are loaded.
        height, width: output video size in pixels (multiples of 8).
        num_frames: frames per video; defaults to the model config's ``num_frames``.
        num_inference_steps: denoising steps per video.
        mode: ``"off"``, ``"exact"`` or ``"full"``.
        guidance: count classifier-free guidance (UNet batch of 2), as SVD's pipeline
            does whenever ``max_guidance_scale > 1``.
        step_cache: step-caching interval (see :func:`vcut.apply_step_cache`); None or 1: off.
        step_cache_depth: outer down/up levels that always run (step caching's ``depth``).
        guidance_start, guidance_stop: guidance on that part of the schedule only
            (:mod:`vcut.guidance`); the other steps are counted on the conditional half (batch 1).
            Defaults 0 and 1: every step guided (no effect without ``guidance``).

    Per-call counts are cached per (config, shape, mode, batch, depth) in this process.
    """
    if mode not in MODES:
        raise ValueError(f"unknown VCUT mode {mode!r}; expected one of {', '.join(MODES)}")
    if height <= 0 or width <= 0 or height % 8 or width % 8:
        raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    start, stop = check_guidance_interval(guidance_start, guidance_stop)
    config = load_unet_config(model)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    frames = int(num_frames if num_frames is not None else config.get("num_frames", 25))
    if frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {frames}")
    levels = len(config.get("up_block_types", (None,) * 4))
    interval, depth = check_step_cache_args(step_cache, step_cache_depth, levels)
    key = json.dumps(config, sort_keys=True, default=str)
    h, w, steps, guidance = int(height), int(width), int(num_inference_steps), bool(guidance)
    batches = {2 if g and guidance else 1 for g in guided_steps(steps, start, stop)} | {2 if guidance else 1}
    calls = {
        b: _count_calls(key, h, w, frames, mode, b, depth if interval > 1 else None) for b in sorted(batches)
    }
    return _report(calls, h, w, frames, steps, mode, guidance, interval, depth, start, stop)
