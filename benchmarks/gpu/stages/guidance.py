"""Stage ``guidance``: classifier-free guidance on part of the schedule only (``guidance_start`` /
``guidance_stop``, fractions of the schedule: the UNet runs the conditional half alone outside
``[start, stop)``), on the fastest renderer built so far: the compiled FP8 one, else the compiled
one, else an eager ``full`` (+ step cache). The values go through the renderer's own
generation keywords.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from benchmarks.gpu.stages import fp8
from benchmarks.gpu.stages.compile import time_compiled

if TYPE_CHECKING:
    from benchmarks.gpu.bench import Bench


def run(bench: Bench) -> None:
    start, stop = bench.args.guidance_start, bench.args.guidance_stop
    generation = {"guidance_start": start, "guidance_stop": stop}
    label = f"+g{start:g}-{stop:g}"
    n = bench.args.step_cache
    steps = (n, 3 * n) if n else bench.steps
    bench.result["stages"]["guidance"]["generation"] = generation
    for slot in ("fp8", "plain"):
        if slot in bench.compiled:
            base = (
                fp8.config_name(bench, True)
                if slot == "fp8"
                else "full+compile" + (f"+cache{n}" if n else "")
            )
            return time_compiled(
                bench, base + label, steps, "guidance", interval=n or 1, slot=slot, generation=generation
            )
    name = "full" + (f"+cache{n}" if n else "") + label
    if not bench.fits("guidance", bench.est_config(steps)):
        return
    renderer, build_s = bench.make_renderer("full", **({"step_cache": n} if n else {}))
    bench.runners[name] = bench.renderer_call(renderer, **generation)
    bench.eager_configs.append(name)
    rec = bench.measure(name, bench.runners[name], steps=steps, shape=bench.shape)
    rec["renderer_build_s"] = build_s
