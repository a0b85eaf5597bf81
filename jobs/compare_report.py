"""The files ``vcut compare`` writes: ``compare.json``, ``compare.md``, ``contact_sheet.png`` and
``psnr_per_frame.png``, each written atomically (hidden temporary name, then rename; see
:meth:`jobs.output.OutputDir.write_bytes`).

Contact sheet layout: one row per configuration (``off`` on top), and per image a block of
three columns (first, middle and last frame), blocks left to right in image order. A label
column of ``LABEL_W`` pixels on the left, a header of ``HEADER_H`` pixels on top and ``GAP``
pixels between image blocks. Frames are shown at ``thumb_height`` pixels high (aspect kept;
``None``: their own size).
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np

from jobs.text import si

LABEL_W = 112
HEADER_H = 30
GAP = 8
REFERENCE = "off"


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _pool(values: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(values) if values else np.empty(0)


def quality_summary(distances: list[Any]) -> dict[str, Any]:
    """Over all frames of all images: mean and worst PSNR (of the frames that differ), SSIM, LPIPS."""
    psnr = _pool([d.psnr for d in distances])
    ssim = _pool([d.ssim for d in distances])
    finite = psnr[np.isfinite(psnr)]
    out: dict[str, Any] = {
        "identical": bool(np.all(np.isinf(psnr))),
        "identical_frames": int(np.isinf(psnr).sum()),
        "frames": int(psnr.size),
        "max_abs_diff": max(d.max_abs_diff for d in distances),
        "psnr_mean": float(finite.mean()) if finite.size else None,
        "psnr_worst": _finite(float(psnr.min())),
        "ssim_mean": float(ssim.mean()),
        "ssim_worst": float(ssim.min()),
        "lpips_mean": None,
        "lpips_worst": None,
    }
    if all(d.lpips is not None for d in distances):
        lp = _pool([d.lpips for d in distances])
        out.update(lpips_mean=float(lp.mean()), lpips_worst=float(lp.max()))
    return out


def build_json(meta: dict[str, Any], results: list[Any]) -> dict[str, Any]:
    ref_report = results[0].mac_report
    ref_macs = int(ref_report.baseline_macs - ref_report.macs_saved)
    configs = []
    for res in results:
        c = res.config
        report = res.mac_report
        macs = int(report.baseline_macs - report.macs_saved)
        images = []
        for i, d in enumerate(res.distances):
            images.append(
                {
                    "image": meta["images"][i],
                    "label": meta["image_labels"][i],
                    "seed": meta["seeds"][i],
                    "seconds": res.seconds[i],
                    "timings": res.timings[i],
                    **d.to_dict(),
                }
            )
        timing_keys = res.timings[0].keys() if res.timings else []
        configs.append(
            {
                "name": c.name,
                "mode": c.mode,
                "step_cache": c.step_cache,
                "quantize": c.quantize,
                "compile": c.compile,
                "guidance_start": c.guidance_start,  # null: the command's --guidance-start/-stop
                "guidance_stop": c.guidance_stop,
                "reference": c.name == REFERENCE,
                "seconds_per_video_mean": float(np.mean(res.seconds)),
                "seconds_per_video": res.seconds,
                "timings_mean": {k: float(np.mean([t[k] for t in res.timings])) for k in timing_keys},
                "macs_per_video": macs,
                "macs_saved_vs_off": ref_macs - macs,
                "macs_saved_fraction_vs_off": (ref_macs - macs) / ref_macs if ref_macs else 0.0,
                "mac_report": report.to_dict(),
                "vcut_report": res.vcut_report,
                "quality": quality_summary(res.distances),
                "images": images,
                "videos": res.videos,
            }
        )
    return {
        "reference": REFERENCE,
        "notes": [
            "Distances are to 'off' (stock SVD) rendered from the same images with the same seeds: "
            "they measure how far a lever moves the frames from stock, not whether a video looks good.",
            "PSNR (dB, data range 255) and SSIM (RGB) per frame from scikit-image; a bit-identical "
            "frame has infinite PSNR, written as null and counted in identical_frames.",
            "psnr_mean averages the frames that differ; psnr_worst is the lowest frame "
            "(null: all identical).",
            "macs_* come from vcut.count_macs for this shape (the UNet only; per video).",
        ],
        "meta": meta,
        "configs": configs,
    }


# -- Markdown ----------------------------------------------------------------------------------


def _num(x: float | None, fmt: str, none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def build_markdown(data: dict[str, Any]) -> str:
    meta = data["meta"]
    g = meta["generate"]
    lines = [
        "# vcut compare",
        "",
        f"Model `{meta['model']}` on {meta['device_name']} ({meta['dtype']}): {g['width']}x{g['height']}, "
        f"{g['num_frames']} frames, {g['num_inference_steps']} steps; "
        f"{len(meta['images'])} image(s), seeds {', '.join(map(str, meta['seeds']))}. Seconds per video: "
        f"the renderer's total (image load to uint8 frames), after {meta['warmup_videos_per_config']} "
        "untimed warm-up video(s) per configuration.",
        "",
        "Distance to `off` (stock SVD, same images and seeds): PSNR and SSIM per frame (scikit-image); "
        "*mean* over the frames of all images (PSNR: of the frames that differ), *worst* the lowest frame. "
        "*identical*: every frame bit-identical to `off`. "
        f"{meta['lpips']}.",
        "",
        "| config | s / video | MACs / video | saved vs off | PSNR mean (dB) | PSNR worst (dB) "
        "| SSIM mean | SSIM worst | LPIPS mean |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in data["configs"]:
        q = c["quality"]
        if c["reference"]:
            psnr_mean = psnr_worst = "reference"
        elif q["identical"]:
            psnr_mean = psnr_worst = "identical"
        else:
            psnr_mean = _num(q["psnr_mean"], ".2f")
            psnr_worst = _num(q["psnr_worst"], ".2f", "identical")
        saved = f"{si(c['macs_saved_vs_off'])} ({100 * c['macs_saved_fraction_vs_off']:.1f} %)"
        lines.append(
            f"| `{c['name']}` | {c['seconds_per_video_mean']:.2f} "
            f"| {si(c['macs_per_video'])} | {saved} "
            f"| {psnr_mean} | {psnr_worst} | {q['ssim_mean']:.4f} | {q['ssim_worst']:.4f} "
            f"| {_num(q['lpips_mean'], '.4f')} |"
        )
    labels = meta["image_labels"]
    lines += [
        "",
        "Per image: worst-frame PSNR (dB) / worst-frame SSIM.",
        "",
        "| config | " + " | ".join(f"`{lb}`" for lb in labels) + " |",
        "|---|" + "--:|" * len(labels),
    ]
    for c in data["configs"]:
        if c["reference"]:
            continue
        cells = []
        for im in c["images"]:
            p = "identical" if im["psnr_worst"] is None else f"{im['psnr_worst']:.2f}"
            cells.append(f"{p} / {im['ssim_worst']:.4f}")
        lines.append(f"| `{c['name']}` | " + " | ".join(cells) + " |")
    lines += ["", "Files: `compare.json`, `contact_sheet.png`, `psnr_per_frame.png`.", ""]
    return "\n".join(lines)


# -- pictures ----------------------------------------------------------------------------------


def thumb_size(frame_hw: tuple[int, int], thumb_height: int | None) -> tuple[int, int]:
    """(height, width) of a frame on the contact sheet."""
    h, w = frame_hw
    if not thumb_height or thumb_height >= h:
        return h, w
    return thumb_height, max(1, round(w * thumb_height / h))


def contact_sheet_size(
    n_configs: int, n_images: int, frame_hw: tuple[int, int], thumb_height: int | None
) -> tuple[int, int]:
    """(width, height) in pixels of the contact sheet."""
    th, tw = thumb_size(frame_hw, thumb_height)
    return LABEL_W + n_images * 3 * tw + (n_images - 1) * GAP, HEADER_H + n_configs * th


def contact_sheet(
    names: list[str],
    thumbs: list[list[list[np.ndarray]]],
    image_labels: list[str],
    frame_indices: list[int],
    thumb_height: int | None = None,
) -> Any:
    """A PIL image: ``thumbs[config][image]`` is the (first, middle, last) frame list."""
    from PIL import Image, ImageDraw

    frame_hw = thumbs[0][0][0].shape[:2]
    th, tw = thumb_size(frame_hw, thumb_height)
    size = contact_sheet_size(len(names), len(image_labels), frame_hw, thumb_height)
    sheet = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, label in enumerate(image_labels):
        x0 = LABEL_W + i * (3 * tw + GAP)
        draw.text((x0 + 2, 2), label[:40], fill=(0, 0, 0))
        for j, f in enumerate(frame_indices):
            draw.text((x0 + j * tw + 2, 16), f"frame {f}", fill=(80, 80, 80))
    for r, name in enumerate(names):
        y = HEADER_H + r * th
        draw.text((4, y + th // 2 - 6), name[:18], fill=(0, 0, 0))
        for i, frames in enumerate(thumbs[r]):
            x0 = LABEL_W + i * (3 * tw + GAP)
            for j, frame in enumerate(frames):
                img = Image.fromarray(frame)
                if img.size != (tw, th):
                    img = img.resize((tw, th), Image.Resampling.LANCZOS)
                sheet.paste(img, (x0 + j * tw, y))
    return sheet


def psnr_plot(data: dict[str, Any]) -> bytes:
    """PNG bytes: PSNR per frame against ``off``, one line per configuration and image.

    Identical frames (infinite PSNR) are drawn on a dashed line above the highest finite value.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = [c for c in data["configs"] if not c["reference"]]
    finite = [v for c in rows for im in c["images"] for v in im["psnr"] if v is not None]
    ceiling = (max(finite) if finite else 50.0) + 10.0
    colors = [f"C{i}" for i in range(10)]
    any_identical = False
    for k, c in enumerate(rows):
        for n, im in enumerate(c["images"]):
            ys = [ceiling if v is None else v for v in im["psnr"]]
            any_identical |= any(v is None for v in im["psnr"])
            ax.plot(
                range(len(ys)),
                ys,
                marker="o",
                color=colors[k % 10],
                alpha=0.9 if n == 0 else 0.5,
                label=c["name"] if n == 0 else None,
            )
    if any_identical:
        ax.axhline(ceiling, color="grey", linestyle="--", linewidth=0.8)
        ax.text(0, ceiling, " identical to off", va="bottom", fontsize=8, color="grey")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("frame")
    ax.set_ylabel("PSNR vs off (dB)")
    g = data["meta"]["generate"]
    ax.set_title(
        f"PSNR per frame vs off: {g['width']}x{g['height']}, {g['num_inference_steps']} steps "
        f"({len(data['meta']['images'])} image(s), one line each)",
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    if rows:
        ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_reports(
    out: Any, meta: dict[str, Any], results: list[Any], thumb_height: int | None = None
) -> dict:
    """Write the four files into ``out`` (an :class:`jobs.output.OutputDir`); return the JSON dict."""
    data = build_json(meta, results)
    out.makedirs()
    out.write_bytes(out.path("compare.json"), (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())
    out.write_bytes(out.path("compare.md"), build_markdown(data).encode())
    sheet = contact_sheet(
        [r.config.name for r in results],
        [r.thumbs for r in results],
        meta["image_labels"],
        meta["key_frames"],
        thumb_height,
    )
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    out.write_bytes(out.path("contact_sheet.png"), buf.getvalue())
    out.write_bytes(out.path("psnr_per_frame.png"), psnr_plot(data))
    return data
