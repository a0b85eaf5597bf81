"""Stage 3, ``compile``: ``full`` + torch.compile; and the machinery of every compiled configuration
(``compile_step_cache``, ``fp8``, ``guidance`` time theirs with :func:`time_compiled`)."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any

from benchmarks.gpu.machinery import (
    Runner,
    compile_shim,
    dynamo_counts,
    graph_break_reasons,
    hard_limit,
    reset_dynamo,
)
from benchmarks.gpu.model import Shape

if TYPE_CHECKING:
    from benchmarks.gpu.bench import Bench


def compile_kwargs(bench: Bench, rec: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The Renderer's compile keywords, and the ``torch.compile`` shim to build it under."""
    ckw: dict[str, Any] = {"compile": bench.args.compile_mode, "compile_backend": bench.args.compile_backend}
    shim = compile_shim(None, rec)  # the Renderer takes the backend itself
    if bench.args.compile_vae != "default":
        ckw["compile_vae"] = bench.args.compile_vae == "on"
    rec["renderer_compile_kwargs"] = ckw
    return ckw, shim


def interval_call(
    bench: Bench, renderer: Any, state: Any, interval: int | None, generation: dict[str, Any] | None = None
) -> Runner:
    """``renderer_call`` (with extra generation keywords ``generation``) that first sets the step
    cache's interval (1: every step a full step)."""
    base = bench.renderer_call(renderer, **(generation or {}))
    if state is None:
        return base

    def run(steps: int, image: Any, index: int, shape: Shape) -> Any:
        state.interval = interval
        return base.run(steps, image, index, shape)

    return Runner(base.inputs, run, base.inspect, base.frames)


def time_compiled(
    bench: Bench,
    name: str,
    steps: tuple[int, ...],
    stage: str,
    interval: int | None,
    *,
    slot: str = "plain",
    build: dict[str, Any] | None = None,
    generation: dict[str, Any] | None = None,
) -> None:
    """Time a compiled ``full`` renderer: its first video (compilation) apart, then timed videos.

    One compiled UNet serves both compiled configurations where the step cache exists: it
    is built with ``step_cache=N`` (VCUT, step cache, then compile, as ``from_pipe`` orders
    them) and its cache's interval set per configuration: 1 for ``full+compile`` (every step
    a full step: the full graph variant, plus one copy of the stored feature per step),
    N for ``full+compile+cacheN`` (which then compiles only its second, shallow, variant).
    A cold compile of the SVD-XT UNet takes minutes: once is what the budget allows.

    ``slot`` names the compiled renderer (``bench.compiled[slot]``, built on first use with the
    extra ``build`` keywords, e.g. ``quantize="fp8"``); ``generation`` are extra keywords of
    every ``generate`` call (e.g. the guidance interval).
    """
    # what is left after the later stages' time and a margin for stopping and cleaning up
    limit = bench.left() - bench.reserve_after(stage) - (3.0 if bench.tiny else 15.0)
    reuse = slot in bench.compiled
    minimum = 5.0 if bench.tiny else bench.args.min_compile_s / (3 if reuse else 1)
    if limit < minimum:
        bench.skip(
            stage, f"time budget: {max(0.0, limit):.0f} s left for it, at least {minimum:.0f} s needed"
        )
        return
    rec: dict[str, Any] = {"hard_limit_s": limit}
    bench.result["configs"][name] = rec
    bench.log(f"{name}: compiling (hard limit {limit:.0f}s)")
    ckw, shim = compile_kwargs(bench, rec)
    ckw.update(build or {})
    with hard_limit(limit), shim:
        before = dynamo_counts()
        if reuse:
            renderer, state, first = bench.compiled[slot]
            rec["reuses_compiled_unet_of"] = first
        else:
            n = bench.args.step_cache
            renderer, build_s = bench.make_renderer("full", **ckw, **({"step_cache": n} if n else {}))
            rec["renderer_build_s"] = build_s
            from vcut import step_cache_state

            state = step_cache_state(renderer.pipe) if n else None
            bench.compiled[slot] = (renderer, state, name)
        if state is not None:
            rec["step_cache_interval"] = interval
        call = interval_call(bench, renderer, state, interval, generation)
        # A guidance interval's conditional-half variant appears only in a schedule long enough
        # to leave the interval (2 steps of 0-0.6 are both guided): warm up on the longest one.
        warmup = steps[-1] if generation else steps[0]
        bench.measure(
            name, call, steps=steps, shape=bench.shape, warmup_steps=warmup, compiled=True, record=rec
        )
    after = dynamo_counts()
    rec["compile_s"] = rec["warmup"]["seconds"]  # the first video: compilation + one video
    eager = bench.result["configs"].get("full" if not interval or interval == 1 else f"full+cache{interval}")
    if build or generation:  # no eager twin measured
        eager = None
    if eager and eager.get("fixed_s") is not None:
        s = rec["warmup"]["steps"]
        rec["compile_s_net"] = rec["warmup"]["seconds"] - (eager["fixed_s"] + s * eager["per_step_s"])
    report = getattr(renderer, "compile_report", None)
    if report is not None:
        rec["renderer_compile_report"] = asdict(report) if is_dataclass(report) else repr(report)
    timing_compile = rec["warmup"].get("timings", {}).get("compile")
    if timing_compile is not None:
        rec["renderer_timings_compile_s"] = timing_compile
    rec["dynamo"] = {
        "graphs_compiled": after["unique_graphs"] - before["unique_graphs"],
        "graph_breaks": after["graph_breaks"] - before["graph_breaks"],
        "graph_break_reasons": graph_break_reasons(),
    }
    if rec["dynamo"]["graphs_compiled"] == 0:
        raise RuntimeError(f"{name}: torch.compile compiled no graph: its figures would be eager ones")
    bench.runners[name] = call


def run(bench: Bench) -> None:
    reset_dynamo()
    bench.compiled.clear()
    time_compiled(bench, "full+compile", bench.steps, "compile", interval=1)
