"""Plots (PNG, matplotlib) and a Markdown table of the results under ``benchmarks/results/``.

Usage (from the repository root)::

    python -m benchmarks.plot                 # reads benchmarks/results/*.json, writes PNGs there
    python -m benchmarks.plot --table         # also prints the README table

* ``ab_ratios.png``: per UNet A/B result (``unet_ab`` files), the time of one
  UNet call with ``exact`` and ``full`` relative to ``off``: every round's paired ratio as a
  dot, the median as a bar with its p25-p75 range, the ratio the MAC count predicts as a
  black tick, and the paper's "about 20 % lower latency" (0.80) as a dashed line.
* ``e2e_breakdown.png``: per end-to-end run (``e2e`` files), where each worker's wall time
  went (model, image loading, video encoding and writing, the rest: scheduling and Ray).
* ``levers.png``: seconds per whole video of each speed lever relative to the baseline: the CPU
  whole-video A/B (``levers`` files: median of paired ratios to ``off`` with p25-p75) and the GPU
  script (``gpu_bench`` files: ratio to stock diffusers), with the ratio the MAC count predicts
  for the denoising loop as a black tick.
* ``orchestration.png``: per orchestration run, rows per second and the driver's peak memory
  against the manifest's size.

Each figure names the machine each figure was measured on. Nothing is plotted that is not
in a result file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR
from vcut.modes import MODES

#: the modes compared with stock (``off`` is the reference)
PATCHED_MODES = tuple(m for m in MODES if m != "off")

PAPER_LATENCY_RATIO = 0.80  # "about 20% faster latency" (paper abstract); stated, not measured here


def load_results(folder: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and "benchmark" in data:
            data["_file"] = path.name
            out.append(data)
    return out


def machine_label(result: dict[str, Any]) -> str:
    m = result.get("machine", {})
    gpu = m.get("gpu")
    if gpu and str(result.get("device", "")).startswith("cuda"):
        return f"{gpu['name']}"
    cores = m.get("usable_cores") or m.get("logical_cores")
    mem = m.get("memory_bytes")
    mem_s = f", {mem / 2**30:.0f} GiB" if mem else ""
    return f"{m.get('cpu_model', '?')}, {cores} cores{mem_s}, VM"


def ab_entries(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (result, eager/compiled) with paired ratios per mode."""
    entries = []
    for r in results:
        if r["benchmark"] != "unet_ab":  # gpu_bench files carry their own Markdown table (.md beside them)
            continue
        variants = [("compiled" if r.get("compile") else "eager", r.get("timing"), r.get("summary"))]
        for variant, timing, summary in variants:
            if not timing or not summary or not timing.get("rounds"):
                continue
            size = r["size"]
            label = (
                f"{size['name']}\n{size['num_frames']}f {size['width']}x{size['height']}\n"
                f"{r['device']} {r['dtype']} {variant}"
            )
            ratios = {}
            for mode in PATCHED_MODES:
                if mode not in summary:
                    continue
                paired = [
                    x["seconds_per_call"][mode] / x["seconds_per_call"]["off"] for x in timing["rounds"]
                ]
                ratios[mode] = {
                    "paired": paired,
                    "summary": summary[mode]["ratio_to_off_paired"],
                    "predicted": (r.get("macs") or {}).get(mode, {}).get("predicted_ratio"),
                }
            entries.append(
                {
                    "label": label,
                    "machine": machine_label(r),
                    "ratios": ratios,
                    "off_s": summary["off"]["seconds_per_call"]["median"],
                    "file": r["_file"],
                }
            )
    return entries


def plot_ab(results: list[dict[str, Any]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = ab_entries(results)
    if not entries:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 2.6 * len(entries)), 5.2))
    colors = {"exact": "#4c72b0", "full": "#dd8452"}
    width = 0.36
    lo_all, hi_all = [PAPER_LATENCY_RATIO], [1.0]
    for i, e in enumerate(entries):
        for j, mode in enumerate(PATCHED_MODES):
            if mode not in e["ratios"]:
                continue
            d = e["ratios"][mode]
            x = i + (j - 0.5) * width
            s = d["summary"]
            ax.bar(
                x,
                s["median"],
                width * 0.9,
                color=colors[mode],
                alpha=0.75,
                label=f"{mode}: median of per-round paired ratios" if i == 0 else None,
            )
            ax.errorbar(
                x,
                s["median"],
                yerr=[[s["median"] - s["p25"]], [s["p75"] - s["median"]]],
                fmt="none",
                ecolor="black",
                capsize=4,
                lw=1.2,
                label="p25-p75" if i == 0 and j == 0 else None,
            )
            ax.scatter(
                [x] * len(d["paired"]),
                d["paired"],
                s=9,
                color="black",
                alpha=0.35,
                zorder=3,
                label="one round" if i == 0 and j == 0 else None,
            )
            if d["predicted"]:
                ax.hlines(
                    d["predicted"],
                    x - width * 0.45,
                    x + width * 0.45,
                    colors="black",
                    lw=2.5,
                    zorder=4,
                    label="predicted by MAC count" if i == 0 and j == 0 else None,
                )
            lo_all += [min(d["paired"]), s["p25"]]
            hi_all += [max(d["paired"]), s["p75"]]
    ax.axhline(1.0, color="gray", lw=1)
    ax.axhline(
        PAPER_LATENCY_RATIO, color="red", ls="--", lw=1.2, label="paper: about 20% lower latency (0.80)"
    )
    ax.set_xticks(range(len(entries)))
    ax.set_xticklabels([e["label"] + f"\n(off: {e['off_s']:.3g} s/call)" for e in entries], fontsize=8)
    ax.set_ylabel("time per UNet call, relative to VCUT off")
    lo, hi = min(lo_all), max(hi_all)
    ax.set_ylim(max(0.0, lo - 0.05), hi + 0.05)
    machines = sorted({e["machine"] for e in entries})
    ax.set_title(
        "SVD UNet: VCUT exact / full vs off (random weights, CFG batch 2)\nmeasured on: "
        + "; ".join(machines),
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


BREAKDOWN_PARTS = (
    ("model_s", "model (CLIP, VAE, UNet loop, decode)", "#4c72b0"),
    ("image_load_s", "image loading", "#55a868"),
    ("encode_s", "video encoding + writing", "#dd8452"),
    ("other_s", "scheduling, Ray, results (rest of wall time)", "#8c8c8c"),
)


def plot_e2e(results: list[dict[str, Any]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if r["benchmark"] == "e2e" and r.get("runs")]
    bars = [(r, run) for r in runs for run in r["runs"] if run.get("breakdown")]
    if not bars:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    labels = []
    for i, (_r, run) in enumerate(bars):
        bottom = 0.0
        b = run["breakdown"]["fraction_of_worker_wall"]
        for key, name, color in BREAKDOWN_PARTS:
            v = b.get(key, 0.0)
            ax.bar(i, v, bottom=bottom, color=color, label=name if i == 0 else None)
            if v > 0.04:
                ax.text(
                    i, bottom + v / 2, f"{100 * v:.0f}%", ha="center", va="center", fontsize=8, color="white"
                )
            bottom += v
        labels.append(f"{run['workers']} worker(s)\nvcut {run['vcut']}")
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("fraction of worker wall time")
    ax.set_ylim(0, 1.0)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    ax.set_title("where each worker's time goes", fontsize=9)
    vps = [run["videos_per_s"] for _r, run in bars]
    ax2.bar(range(len(bars)), vps, color="#4c72b0")
    for i, v in enumerate(vps):
        ax2.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(range(len(bars)))
    ax2.set_xticklabels(labels, fontsize=8)
    ax2.set_ylabel("videos per second (whole job)")
    ax2.set_title("throughput", fontsize=9)
    r0 = bars[0][0]
    fig.suptitle(
        f"vcut run, tiny random-weight model, {r0.get('rows')} rows, "
        f"{r0.get('settings', {}).get('label', '')}\nmeasured on: {machine_label(r0)}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_orchestration(results: list[dict[str, Any]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(r, run) for r in results if r["benchmark"] == "orchestration" for run in r.get("runs", [])]
    runs = [(r, run) for r, run in runs if run.get("rows_per_s")]
    if not runs:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({run["path"] for _r, run in runs}):
        pts = sorted((run["rows"], run) for _r, run in runs if run["path"] == key)
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1]["rows_per_s"] for p in pts], marker="o", label=key)
        ax2.plot(xs, [p[1]["driver_peak_rss_bytes"] / 2**20 for p in pts], marker="o", label=key)
    ax.set_yscale("log")
    ax.set_xlabel("manifest rows")
    ax.set_ylabel("rows per second through the driver (log)")
    ax2.set_xlabel("manifest rows")
    ax2.set_ylabel("driver peak RSS (MiB)")
    ax2.set_ylim(bottom=0)
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(
        f"orchestration at scale (tiny model, smallest settings)\nmeasured on: {machine_label(runs[0][0])}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The UNet A/B rows of the README's performance table."""
    lines = [
        "| measurement | machine | off s/call | exact / off | full / off | full / off predicted by MACs |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for e in ab_entries(results):

        def cell(mode: str, e=e) -> str:
            d = e["ratios"].get(mode)
            if not d:
                return "-"
            s = d["summary"]
            return f"{s['median']:.3f} ({s['p25']:.3f}-{s['p75']:.3f}, n={s['n']})"

        pred = e["ratios"].get("full", {}).get("predicted")
        pred_s = f"{pred:.3f}" if pred else "-"
        label = e["label"].replace("\n", ", ")
        lines.append(
            f"| {label} | {e['machine']} | {e['off_s']:.4g} | {cell('exact')} | {cell('full')} | {pred_s} |"
        )
    return "\n".join(lines)


def lever_entries(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per result file of ``levers`` or ``gpu_bench``: ``{config: (ratio, lo, hi, predicted)}``."""
    entries = []
    for r in results:
        bars: dict[str, tuple[float, float, float, float | None]] = {}
        if r.get("benchmark") == "levers" and r.get("summary"):
            for name, e in r["summary"].items():
                if "total_ratio_to_off_paired" in e:
                    t = e["total_ratio_to_off_paired"]
                    bars[name] = (t["median"], t["p25"], t["p75"], e.get("predicted_denoise_ratio"))
            label = f"CPU, {r.get('size')}, {r.get('steps')} steps\nvs off, whole video"
        elif r.get("benchmark") == "gpu_bench" and r.get("configs"):
            counted = (r.get("macs") or {}).get("counted", {})
            shape = r.get("shape", {})
            key = f"{shape.get('width')}x{shape.get('height')}x{shape.get('num_frames')}"
            base = counted.get(f"off|cache0|{key}", {}).get("per_video_macs_with_attention")
            for name, e in r["configs"].items():
                ratio = e.get("ratio_to_stock") if isinstance(e, dict) else None
                if ratio is None or name == "stock":
                    continue
                mode = name.split("+")[0]
                cache = next((p[5:] for p in name.split("+") if p.startswith("cache")), "0")
                mine = counted.get(f"{mode}|cache{cache}|{key}", {}).get("per_video_macs_with_attention")
                bars[name] = (ratio, ratio, ratio, mine / base if mine and base else None)
            label = f"{machine_label(r)}, {key}\nvs stock diffusers, whole video"
        if bars:
            entries.append({"label": label, "bars": bars})
    return entries


def plot_levers(results: list[dict[str, Any]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = lever_entries(results)
    if not entries:
        return None
    fig, axes = plt.subplots(1, len(entries), figsize=(4.2 * len(entries), 4.6), squeeze=False)
    for ax, e in zip(axes[0], entries, strict=True):
        names = list(e["bars"])
        for i, name in enumerate(names):
            ratio, lo, hi, pred = e["bars"][name]
            ax.bar(i, ratio, 0.7, color="#4c72b0", alpha=0.75)
            if hi > lo:
                err = [[ratio - lo], [hi - ratio]]
                ax.errorbar(i, ratio, yerr=err, fmt="none", ecolor="black", capsize=3)
            if pred is not None:
                ax.scatter(i, pred, marker="_", s=400, color="black", zorder=3)
            ax.text(i, ratio + 0.02, f"{ratio:.2f}", ha="center", fontsize=8)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.25)
        ax.set_title(e["label"], fontsize=9)
        ax.set_ylabel("seconds per video, relative")
    fig.suptitle("Speed levers: bars measured, black ticks = MAC count of the denoising loop", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of result JSON files")
    p.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: --results)")
    p.add_argument("--table", action="store_true", help="print the Markdown table of the A/B results")
    args = p.parse_args(argv)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    results = load_results(args.results)
    for fn, name in (
        (plot_ab, "ab_ratios.png"),
        (plot_e2e, "e2e_breakdown.png"),
        (plot_orchestration, "orchestration.png"),
        (plot_levers, "levers.png"),
    ):
        written = fn(results, out / name)
        print(f"wrote {written}" if written else f"{name}: no results to plot")
    if args.table:
        print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
