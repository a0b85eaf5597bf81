"""Small machinery of the GPU script: hard time limits, recompile guards, the torch.compile shim,
the per-step / fixed split of whole-video timings."""

from __future__ import annotations

import contextlib
import inspect
import signal
import statistics
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from benchmarks.gpu.model import Shape

# -- small machinery ---------------------------------------------------------------------------


class StageTimeout(BaseException):
    """A stage ran past its hard limit (a BaseException, so that no library swallows it)."""


@contextlib.contextmanager
def hard_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`StageTimeout` in the main thread after ``seconds`` (SIGALRM); None = no limit."""
    if seconds is None or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise StageTimeout(f"stopped at its hard limit of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(0.5, float(seconds)))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def dynamo_counts() -> dict[str, int]:
    """Graphs compiled so far, frames converted, graph breaks (torch._dynamo's counters)."""
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "frames_ok": int(counters["frames"]["ok"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def graph_break_reasons(limit: int = 5) -> list[str]:
    from torch._dynamo.utils import counters

    items = sorted(counters["graph_break"].items(), key=lambda kv: -kv[1])[:limit]
    return [f"{count}x {reason[:200]}" for reason, count in items]


@dataclass(frozen=True)
class Runner:
    """One configuration's call: ``inputs(index, shape)`` before the clock, ``run(steps, inputs,
    index, shape)`` timed, ``inspect(output, steps, index, shape) -> info`` after it, ``frames(output)``."""

    inputs: Callable[[int, Shape], Any]
    run: Callable[[int, Any, int, Shape], Any]
    inspect: Callable[[Any, int, int, Shape], dict[str, Any]]
    #: the uint8 frames (F, H, W, 3) of one ``run``'s output (None: not compared with stock)
    frames: Callable[[Any], Any] | None = None


class RecompiledDuringTiming(RuntimeError):
    pass


@contextlib.contextmanager
def forbid_recompiles(record: dict[str, Any]) -> Iterator[None]:
    """Timed rounds of a compiled model: a recompile raises, and a new graph is an error too.

    Sets ``torch._dynamo.config.error_on_recompile`` (a guard failure raises
    ``RecompileError`` instead of compiling again) and checks afterwards that no graph was
    compiled at all (a first compile of another frame is no "recompile" but would be timed
    too). Writes ``graphs_compiled_during_timing`` into ``record``.
    """
    import torch._dynamo

    before = dynamo_counts()
    old = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        yield
    finally:
        torch._dynamo.config.error_on_recompile = old
        after = dynamo_counts()
        record["graphs_compiled_during_timing"] = after["unique_graphs"] - before["unique_graphs"]
        record["graph_breaks_during_timing"] = after["graph_breaks"] - before["graph_breaks"]
    if record["graphs_compiled_during_timing"]:
        raise RecompiledDuringTiming(
            f"{record['graphs_compiled_during_timing']} graph(s) compiled during the timed videos"
        )


@contextlib.contextmanager
def compile_shim(
    backend: str | None, record: dict[str, Any], supported: set[str] | None = None
) -> Iterator[None]:
    """``torch.compile`` as the Renderer calls it, made to run on this torch.

    * keywords this torch's ``torch.compile`` lacks are dropped and listed in
      ``record["compile_kwargs_dropped"]`` (``recompile_limit`` and ``isolate_recompiles``
      came with torch 2.13; the GPU machine has 2.11: without them each compiled module
      shares dynamo's per-code-object cache, which the few graphs here fit);
    * ``backend`` (where the Renderer takes none itself) replaces the backend; a backend other
      than inductor gets no ``mode`` or ``options`` (the quick CPU path uses "eager").
    """
    real = torch.compile
    if supported is None:
        supported = set(inspect.signature(real).parameters)

    def patched(model=None, **kwargs):
        dropped = sorted(k for k in kwargs if k not in supported)
        for k in dropped:
            kwargs.pop(k)
        if dropped:
            record["compile_kwargs_dropped"] = sorted(
                set(record.get("compile_kwargs_dropped", [])) | set(dropped)
            )
        if backend is not None:
            kwargs["backend"] = backend
        if kwargs.get("backend", "inductor") != "inductor":
            kwargs.pop("mode", None)
            kwargs.pop("options", None)
        return real(model, **kwargs)

    torch.compile = patched
    try:
        yield
    finally:
        torch.compile = real


def reset_dynamo() -> None:
    import torch._dynamo

    torch._dynamo.reset()


def stop_compile_workers() -> None:
    """End inductor's compile worker processes (after a stopped compile they would run on)."""
    try:
        from torch._inductor.async_compile import shutdown_compile_workers

        shutdown_compile_workers()
    except Exception:  # not in this torch, or nothing to stop
        pass


def derive(points: list[tuple[int, float]], target_steps: int) -> dict[str, Any]:
    """Per-step and fixed seconds from whole videos timed at two (or more) step counts.

    ``points`` are ``(steps, seconds)``; the per-step cost is the median over pairs of
    different step counts, the fixed cost the median of ``seconds - steps x per_step``.
    """
    per_step = [
        (t2 - t1) / (s2 - s1) for i, (s1, t1) in enumerate(points) for s2, t2 in points[i + 1 :] if s2 != s1
    ]
    if not per_step:
        return {"per_step_s": None, "fixed_s": None, "video_s": None}
    step = statistics.median(per_step)
    fixed = statistics.median(t - s * step for s, t in points)
    if step <= 0:  # more steps took less time: noise larger than the steps' cost (a busy CPU)
        return {
            "per_step_s": None,
            "fixed_s": None,
            "video_s": None,
            "invalid": f"per-step cost {step:.3g} s",
        }
    return {"per_step_s": step, "fixed_s": fixed, "video_s": fixed + target_steps * step}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _error(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[:2000]
