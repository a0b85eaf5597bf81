"""How far one rendered video is from another: PSNR and SSIM per frame (and LPIPS when available).

The metrics come from scikit-image (``skimage.metrics``), installed with the ``compare``
extra (``pip install 'vcut-render[compare]'``). Both videos are uint8 ``(F, H, W, 3)`` arrays
of the same shape, such as :attr:`pipeline.RenderedVideo.frames`; frame ``i`` of one is compared
with frame ``i`` of the other.

- **PSNR** (dB, ``data_range=255``): ``inf`` for a frame that is bit-identical. In JSON
  (:meth:`VideoDistance.to_dict`) ``inf`` is written as ``null`` and the frame is listed as
  identical. ``psnr_mean`` is the mean over the frames that differ (identical frames have no
  finite PSNR to average); ``psnr_worst`` the lowest frame. Both are ``inf`` (``null``)
  when the videos are identical.
- **SSIM** (scikit-image's ``structural_similarity`` on the RGB frame, ``channel_axis=-1``,
  its default 7x7 window): 1.0 for identical frames.
- **LPIPS** (lower is closer): only when the ``lpips`` package is importable; it fetches its
  network's weights on first use. Otherwise it is ``None``, never estimated.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

MISSING_SKIMAGE = "comparing videos needs scikit-image: pip install 'vcut-render[compare]' (or scikit-image)"


def require_skimage() -> None:
    """Raise ImportError with an install hint when scikit-image is missing."""
    if importlib.util.find_spec("skimage") is None:
        raise ImportError(MISSING_SKIMAGE)


def lpips_available() -> bool:
    return importlib.util.find_spec("lpips") is not None


def _check_pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {a.dtype} and {b.dtype}")
    if a.ndim != 4 or a.shape[-1] != 3 or a.shape != b.shape:
        raise ValueError(
            f"expected two (frames, height, width, 3) arrays of one shape, got {a.shape} and {b.shape}"
        )
    return a, b


def frame_psnr(a: Any, b: Any) -> np.ndarray:
    """PSNR in dB of each frame of ``b`` against the same frame of ``a`` (``inf`` where identical)."""
    from skimage.metrics import peak_signal_noise_ratio

    a, b = _check_pair(a, b)
    out = np.empty(a.shape[0], dtype=np.float64)
    for i, (fa, fb) in enumerate(zip(a, b, strict=True)):
        # skimage divides by the MSE: answer identical frames without the division warning.
        out[i] = math.inf if np.array_equal(fa, fb) else peak_signal_noise_ratio(fa, fb, data_range=255)
    return out


def frame_ssim(a: Any, b: Any) -> np.ndarray:
    """SSIM of each frame of ``b`` against the same frame of ``a`` (RGB, 1.0 where identical)."""
    from skimage.metrics import structural_similarity

    a, b = _check_pair(a, b)
    return np.array(
        [structural_similarity(fa, fb, channel_axis=-1, data_range=255) for fa, fb in zip(a, b, strict=True)],
        dtype=np.float64,
    )


class LpipsMetric:
    """LPIPS per frame with the ``lpips`` package (AlexNet features, the package's default).

    Built once (it loads a network and its weights); call it with two uint8 videos.
    """

    def __init__(self, net: str = "alex", device: str = "cpu") -> None:
        import lpips

        self.device = device
        self.model = lpips.LPIPS(net=net, verbose=False).to(device).eval()

    def __call__(self, a: Any, b: Any) -> np.ndarray:
        import torch

        a, b = _check_pair(a, b)

        def tensor(v: np.ndarray) -> torch.Tensor:  # (F, H, W, 3) uint8 -> (F, 3, H, W) in [-1, 1]
            t = torch.from_numpy(np.ascontiguousarray(v)).permute(0, 3, 1, 2).float()
            return (t / 127.5 - 1.0).to(self.device)

        with torch.no_grad():
            d = self.model(tensor(a), tensor(b))
        return d.reshape(a.shape[0]).double().cpu().numpy()


def _json_float(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


@dataclass(frozen=True)
class VideoDistance:
    """Per-frame distance of a video to a reference video (see the module docstring)."""

    psnr: np.ndarray  # dB per frame, inf where identical
    ssim: np.ndarray
    max_abs_diff: int  # largest difference of one uint8 channel value
    lpips: np.ndarray | None = None

    @property
    def identical(self) -> bool:
        return bool(np.all(np.isinf(self.psnr)))

    @property
    def identical_frames(self) -> int:
        return int(np.isinf(self.psnr).sum())

    @property
    def psnr_mean(self) -> float:
        finite = self.psnr[np.isfinite(self.psnr)]
        return float(finite.mean()) if finite.size else math.inf

    @property
    def psnr_worst(self) -> float:
        return float(self.psnr.min())

    @property
    def ssim_mean(self) -> float:
        return float(self.ssim.mean())

    @property
    def ssim_worst(self) -> float:
        return float(self.ssim.min())

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: an infinite PSNR (identical) is ``None``."""
        out: dict[str, Any] = {
            "identical": self.identical,
            "identical_frames": self.identical_frames,
            "max_abs_diff": self.max_abs_diff,
            "psnr": [_json_float(v) for v in self.psnr],
            "psnr_mean": _json_float(self.psnr_mean),
            "psnr_worst": _json_float(self.psnr_worst),
            "ssim": [float(v) for v in self.ssim],
            "ssim_mean": self.ssim_mean,
            "ssim_worst": self.ssim_worst,
            "lpips": None,
            "lpips_mean": None,
            "lpips_worst": None,
        }
        if self.lpips is not None:
            out.update(
                lpips=[float(v) for v in self.lpips],
                lpips_mean=float(self.lpips.mean()),
                lpips_worst=float(self.lpips.max()),
            )
        return out


def video_distance(reference: Any, test: Any, *, lpips: LpipsMetric | None = None) -> VideoDistance:
    """PSNR, SSIM (and LPIPS with an :class:`LpipsMetric`) of each frame of ``test`` against ``reference``."""
    a, b = _check_pair(reference, test)
    return VideoDistance(
        psnr=frame_psnr(a, b),
        ssim=frame_ssim(a, b),
        max_abs_diff=int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()),
        lpips=lpips(a, b) if lpips is not None else None,
    )
