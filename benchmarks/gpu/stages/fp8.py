"""Stage ``fp8``: the fastest compiled configuration with the UNet's Linear layers in FP8
(``Renderer(quantize="fp8")``, :mod:`pipeline.quantize`): ``full`` + compile + step cache N + fp8,
on a UNet of its own (a second cold compile). Without compile (``--no-compile``): eager.

FP8 needs compute capability >= 8.9: elsewhere the stage is skipped with the renderer's own
one-line refusal. ``--fp8-on-cpu`` (the CPU test of this script) bypasses that check so the
stage runs through torch's CPU ``_scaled_mm``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from benchmarks.gpu.stages.compile import time_compiled

if TYPE_CHECKING:
    from benchmarks.gpu.bench import Bench


def fp8_refusal(bench: Bench) -> str | None:
    from pipeline.quantize import fp8_refusal as refusal

    if bench.args.fp8_on_cpu and not bench.device.startswith("cuda"):
        return None
    return refusal(bench.device)


def allow_fp8_on_cpu() -> None:
    """``--fp8-on-cpu``: the Renderer's device check answers "fine" (a test seam of this script)."""
    import pipeline.quantize
    import pipeline.renderer

    pipeline.renderer.fp8_refusal = lambda device: None
    pipeline.quantize.fp8_refusal = lambda device: None


def config_name(bench: Bench, compiled: bool) -> str:
    n = bench.args.step_cache
    return "full" + ("+compile" if compiled else "") + (f"+cache{n}" if n else "") + "+fp8"


def run(bench: Bench) -> None:
    refusal = fp8_refusal(bench)
    if refusal:
        return bench.skip("fp8", refusal)
    if bench.args.fp8_on_cpu:
        allow_fp8_on_cpu()
    n = bench.args.step_cache
    steps = (n, 3 * n) if n else bench.steps
    compiled = not bench.args.no_compile
    name = config_name(bench, compiled)
    if compiled:
        time_compiled(bench, name, steps, "fp8", interval=n or 1, slot="fp8", build={"quantize": "fp8"})
    else:
        if not bench.fits("fp8", bench.est_config(steps)):
            return
        renderer, build_s = bench.make_renderer("full", quantize="fp8", **({"step_cache": n} if n else {}))
        bench.runners[name] = bench.renderer_call(renderer)
        bench.eager_configs.append(name)
        rec = bench.measure(name, bench.runners[name], steps=steps, shape=bench.shape)
        rec["renderer_build_s"] = build_s
        bench.fp8_renderer = renderer
    renderer = bench.compiled["fp8"][0] if compiled and "fp8" in bench.compiled else bench.fp8_renderer
    report = getattr(renderer, "quantize_report", None)
    if report is not None and name in bench.result["configs"]:
        bench.result["configs"][name]["quantize_report"] = {
            "backend": report.backend,
            "granularity": getattr(report, "granularity", None),
            "linear_layers_fp8": report.layers,
            "linear_layers_kept": report.kept,
            "params_fp8": report.params,
        }
