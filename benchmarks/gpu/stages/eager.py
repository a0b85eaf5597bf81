"""Stage 2, ``eager``: the Renderer with VCUT off, exact, full and full + step cache."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vcut.modes import MODES

if TYPE_CHECKING:
    from benchmarks.gpu.bench import Bench


def run(bench: Bench) -> None:
    configs: list[tuple[str, str, dict[str, Any], tuple[int, ...]]] = [
        (mode, mode, {}, bench.steps) for mode in MODES
    ]
    n = bench.args.step_cache
    if n:
        configs.append((f"full+cache{n}", "full", {"step_cache": n}, (n, 3 * n)))
    for name, mode, kw, steps in configs:
        if not bench.fits("eager", bench.est_config(steps), key=f"eager:{name}"):
            continue
        renderer, build_s = bench.make_renderer(mode, **kw)
        bench.runners[name] = bench.renderer_call(renderer)
        bench.eager_configs.append(name)
        rec = bench.measure(name, bench.runners[name], steps=steps, shape=bench.shape)
        rec["renderer_build_s"] = build_s
        bench.save()
    if not bench.eager_configs:
        bench.skip("eager", "no configuration fitted in the time budget")
