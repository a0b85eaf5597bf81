"""The results as a Markdown table (written beside the JSON after every stage)."""

from __future__ import annotations

from typing import Any


def _fmt(x: Any, spec: str = ".3g", suffix: str = "") -> str:
    return f"{x:{spec}}{suffix}" if isinstance(x, int | float) and x is not None else "-"


def _psnr(q: dict[str, Any]) -> str:
    if q.get("identical"):
        return "identical"
    return _fmt(q.get("psnr_mean_db"), ".1f")


def summary_markdown(result: dict[str, Any]) -> str:
    """The results as a Markdown table (also written beside the JSON)."""
    machine = result.get("machine", {})
    gpu = (machine.get("gpu") or {}).get("name") or machine.get("cpu_model")
    versions = result.get("versions", {})
    shape = result.get("shape", {})
    lines = [
        f"### gpu_bench: {result.get('model')}, {shape.get('width')}x{shape.get('height')}, "
        f"{shape.get('num_frames')} frames, {result.get('dtype')}, CFG",
        "",
        f"{gpu}; torch {versions.get('torch')}, diffusers {versions.get('diffusers')}; {result.get('date')}; "
        f"peak {_fmt(result.get('peak_tflops', {}).get('tflops'), '.1f')} TFLOP/s "
        f"({result.get('peak_tflops', {}).get('source')}). Per step and fixed cost from whole videos at "
        f"{result.get('steps_timed')} steps; s/video = fixed + {result.get('steps_per_video')} x per step.",
        "",
        "| configuration | shape | s/step | fixed s (conditioning + decode) | s/video (extrapolated) "
        "| vs stock | videos/s | peak GiB | MFU | compile s | graphs compiled while timed "
        "| PSNR vs stock (dB) | SSIM vs stock |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in result.get("configs", {}).items():
        if not isinstance(c, dict) or "raw" not in c:
            continue
        sh = c.get("shape", {})
        q = c.get("quality_vs_stock") or {}
        peak = c.get("peak_memory_bytes")
        vps = c.get("videos_per_s") or (1 / c["video_s"] if c.get("video_s") else None)
        batch = f" (batch {c['batch']})" if c.get("batch", 1) > 1 else ""
        if c.get("error"):
            batch += f" (error: {c['error'].splitlines()[0][:80]})"
        lines.append(
            f"| {name}{batch} | {sh.get('width')}x{sh.get('height')}x{sh.get('num_frames')} "
            f"| {_fmt(c.get('per_step_s'), '.4g')} | {_fmt(c.get('fixed_s'), '.3g')} "
            f"| {_fmt(c.get('video_s'), '.4g')} | {_fmt(c.get('ratio_to_stock'), '.3f')} "
            f"| {_fmt(vps, '.4g')} "
            f"| {_fmt(peak / 2**30 if peak else None, '.1f')} | {_fmt(c.get('mfu'), '.1%')} "
            f"| {_fmt(c.get('compile_s'), '.0f')} | {c.get('graphs_compiled_during_timing', '-')} "
            f"| {_psnr(q)} | {_fmt(q.get('ssim_mean'), '.4f')} |"
        )
    if result.get("stages", {}).get("quality", {}).get("steps"):
        lines += [
            "",
            f"PSNR/SSIM: each configuration's frames against stock diffusers' for the same image and seed at "
            f"{result['stages']['quality']['steps']} steps, random weights: how far a lever moves the output "
            "(not whether a video looks good; 'identical': bit-identical frames).",
        ]
    wv = result.get("whole_video")
    if wv and wv.get("seconds"):
        lines += [
            "",
            f"Whole {wv['steps']}-step video of the fastest configuration ({wv['config']}): "
            f"{wv['seconds']:.3g} s (extrapolated {wv['extrapolated_s']:.3g} s).",
        ]
    skipped = result.get("stages_skipped") or {}
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    return "\n".join(lines)
