"""``torch.compile`` for the renderer's UNet (and VAE decoder) that stays compiled.

What keeps a compiled VCUT UNet compiled:

* :func:`compile_module` compiles the module's ``forward`` in place, not its ``__call__``:
  forward hooks (VCUT's :class:`~vcut.patch.ConditioningKeys`, which names the embedding
  and prepares the constants ``to_out(to_v(e))``) run eagerly in ``nn.Module._call_impl``,
  so the compiled graph only reads tensors, and dynamo guards a tensor on its shape,
  dtype and device, never on its identity. A new image or seed is a cache hit.
* Every UNet ``forward`` shares one code object, and dynamo's recompile limit
  (``torch._dynamo.config.recompile_limit``, 8) counts compiled entries per code object.
  Each :func:`compile_module` call uses ``torch.compile(..., isolate_recompiles=True)``
  (torch >= 2.13): every module gets its own set of entries and its own limit, so an
  ``off``, an ``exact`` and a ``full`` UNet in one process do not crowd each other out.
* A small fixed number of variants per shape is fine (e.g. a step cache's full and
  shallow steps): after the first video of a shape, later videos of that shape compile
  nothing. :class:`CompileWatch` / :func:`compile_count` make a compile during rendering
  detectable, and the renderer logs a warning when a shape it has already rendered
  compiles again.

The hooks are also wrapped in ``torch.compiler.disable``, so ``torch.compile(pipe.unet)``
and ``pipe.unet.compile()`` (which trace ``__call__`` and its hooks) work too: the hooks
run eagerly behind a graph break at the start and end of the call and the forward is one
graph. Those share the per-code-object limit with every other module compiled that way,
though: prefer :func:`compile_module` (or ``Renderer(compile=...)``).

Two things make compiling pay in a fleet:

* ``compile="auto"`` (:func:`resolve_compile`, :func:`compile_pays`): compile on CUDA when a
  worker renders enough videos of a shape to pay the compile back (measured figures in
  :data:`H200_SVD_XT`), never on a CPU.
* :class:`pipeline.compile_cache.CompileCache`: torch's compile artifacts ("mega-cache",
  ``torch.compiler.save_cache_artifacts``) in a folder or URI that a fleet shares. The first
  worker to compile a shape saves them after its first compiled call of that shape; a later
  worker (or job) loads them before its first call of that shape, and its compile becomes
  a cache hit for AOTAutograd and inductor (on CUDA with the Triton kernels, which inductor
  bundles; on a CPU inductor's C++ kernels are still built by the compiler).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.compile_modes import COMPILE_MODES, compile_mode  # noqa: F401 (the public names of this module too)

logger = logging.getLogger(__name__)


_COMPILED_ATTR = "_vcut_compiled"


class RecompileError(RuntimeError):
    """``torch.compile`` compiled inside a block that must not compile (see :class:`CompileWatch`)."""


def _concrete(mode: str) -> str:
    if mode == "auto":
        raise ValueError(
            "compile='auto' is decided per job: resolve it first (pipeline.compile.resolve_compile)"
        )
    return mode


def compiled_mode(module: nn.Module) -> str | None:
    """The mode :func:`compile_module` compiled ``module`` with (``None``: not compiled by it)."""
    info = getattr(module, _COMPILED_ATTR, None)
    return info[0] if info else None


#: ``torch.compile(..., isolate_recompiles=True, recompile_limit=...)`` exists (torch >= 2.13).
_ISOLATES_RECOMPILES = "isolate_recompiles" in inspect.signature(torch.compile).parameters

#: The shared per-code-object limit used where recompile regions cannot be isolated: room for
#: a handful of compiled UNets (a few graph variants each) in one process.
SHARED_RECOMPILE_LIMIT = 64


def _raise_shared_recompile_limit(wanted: int | None) -> None:
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    limit = max(getattr(dynamo_config, name), wanted or SHARED_RECOMPILE_LIMIT)
    setattr(dynamo_config, name, limit)


def compile_module(
    module: nn.Module,
    mode: str = "default",
    *,
    backend: str | Callable = "inductor",
    recompile_limit: int | None = None,
    dynamic: bool | None = None,
) -> nn.Module:
    """Compile ``module.forward`` in place with ``torch.compile`` (lazily: on the first call).

    The module stays what it was (same class, ``config``, parameters, hooks); only its
    instance gets a compiled ``forward``. Hooks run eagerly around it. Each call makes an
    isolated recompile region (``isolate_recompiles=True``) with ``recompile_limit``
    entries (``None``: ``torch._dynamo.config.recompile_limit``). Compiling an already
    compiled module again is a no-op with the same mode and a ``ValueError`` with another.
    Returns ``module``.
    """
    mode = _concrete(compile_mode(mode))
    if mode == "off":
        return module
    previous = compiled_mode(module)
    if previous is not None:
        if previous == mode:
            return module
        raise ValueError(f"{type(module).__name__} is already compiled with mode {previous!r}, not {mode!r}")
    if "forward" in vars(module):
        raise ValueError(f"{type(module).__name__} already has an instance-level forward; not compiling it")
    kwargs: dict[str, Any] = {}
    if _ISOLATES_RECOMPILES:
        kwargs.update(recompile_limit=recompile_limit, isolate_recompiles=True)
    else:
        # torch < 2.13 (e.g. 2.11 on GPU images): one recompile limit per code object, shared by
        # every module of a class. Raise it so that several compiled UNets fit side by side.
        _raise_shared_recompile_limit(recompile_limit)
    module.forward = torch.compile(module.forward, mode=mode, backend=backend, dynamic=dynamic, **kwargs)
    object.__setattr__(module, _COMPILED_ATTR, (mode, backend))
    return module


def compile_vae_by_default(device: torch.device) -> bool:
    """Whether ``compile_vae=None`` compiles the VAE decoder: on CUDA yes, elsewhere no.

    On a GPU the temporal VAE decoder is a few percent of a video and compiles in about
    a minute; on a CPU inductor takes minutes for it and gains little.
    """
    return torch.device(device).type == "cuda"


@dataclass(frozen=True)
class CompileReport:
    """What :func:`compile_pipeline` compiled."""

    mode: str
    backend: str
    unet: bool
    vae_decoder: bool


def compile_pipeline(
    pipe: Any,
    mode: bool | str,
    *,
    vae: bool | None = None,
    backend: str | Callable = "inductor",
    recompile_limit: int | None = None,
) -> CompileReport:
    """Compile an SVD pipeline's UNet (and, if ``vae``, its VAE decoder) in place.

    ``vae=None`` decides by the UNet's device (:func:`compile_vae_by_default`). Apply VCUT
    (and any other model surgery) first. Raises ``ValueError`` for a bad ``mode``.
    """
    mode = _concrete(compile_mode(mode))
    backend_name = backend if isinstance(backend, str) else getattr(backend, "__name__", repr(backend))
    if mode == "off":
        return CompileReport("off", backend_name, False, False)
    unet = pipe.unet
    if isinstance(unet, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError("the pipeline's UNet is already wrapped in torch.compile; pass the plain UNet")
    compile_module(unet, mode, backend=backend, recompile_limit=recompile_limit)
    if vae is None:
        vae = compile_vae_by_default(unet.device)
    decoder = getattr(getattr(pipe, "vae", None), "decoder", None)
    if vae and decoder is not None:
        compile_module(decoder, mode, backend=backend, recompile_limit=recompile_limit)
    return CompileReport(mode, backend_name, True, bool(vae and decoder is not None))


# -- observing dynamo ----------------------------------------------------------------------
def compile_count() -> int:
    """Frames dynamo has compiled (or tried to) in this process: first compiles and recompiles.

    It does not move while compiled code runs from its cache, so a difference of 0 across
    a render means nothing was (re)compiled and nothing fell back to eager for a new reason.
    """
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])


def compile_seconds() -> float:
    """Seconds dynamo and its backend have spent compiling in this process (dynamo's own timer)."""
    try:
        from torch._dynamo.utils import calculate_time_spent

        return float(calculate_time_spent().get("entire_frame_compile", 0.0))
    except Exception:  # an internal API: never fail a render over a statistic
        return 0.0


class CompileWatch:
    """Counts ``torch.compile`` work inside a ``with`` block: ``compiles`` and ``seconds``.

    ``strict=True`` makes any compile inside the block an error (e.g. timed benchmark
    rounds after a warm-up): the block runs under ``torch.compiler.set_stance(
    "fail_on_recompile")``, so dynamo refuses to compile right where it would, and
    :class:`RecompileError` is raised (with dynamo's guard-failure reasons as its
    ``__cause__``). Usable as ``with CompileWatch(strict=True) as w: ...``.
    """

    def __init__(self, *, strict: bool = False, what: str = "this block") -> None:
        self.strict = strict
        self.what = what
        self.compiles = 0
        self.seconds = 0.0
        self._start: tuple[int, float] | None = None
        self._stance: Any = None

    def __enter__(self) -> CompileWatch:
        self._start = (compile_count(), compile_seconds())
        if self.strict:
            self._stance = torch.compiler.set_stance("fail_on_recompile")
            self._stance.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._stance is not None:
            self._stance.__exit__(exc_type, exc, tb)
            self._stance = None
        self.update()
        if not self.strict:
            return
        if exc is not None and "fail_on_recompile" in str(exc):
            raise RecompileError(
                f"torch.compile had to compile during {self.what}; the reasons are in the cause"
            ) from exc
        if exc_type is None and self.compiles:
            raise RecompileError(
                f"torch.compile compiled {self.compiles} frame(s) ({self.seconds:.1f}s) during "
                f'{self.what}; run with TORCH_LOGS="recompiles" to see why'
            )

    def update(self) -> None:
        """Refresh ``compiles`` and ``seconds`` (also inside the block)."""
        if self._start is not None:
            self.compiles = compile_count() - self._start[0]
            self.seconds = max(0.0, compile_seconds() - self._start[1])


@contextlib.contextmanager
def no_recompiles(what: str = "this block") -> Iterator[CompileWatch]:
    """``with no_recompiles("timed rounds"): ...``: raise :class:`RecompileError` on any compile inside."""
    with CompileWatch(strict=True, what=what) as watch:
        yield watch


# -- compile="auto": compile where it pays ---------------------------------------------------
@dataclass(frozen=True)
class CompilePayback:
    """What a compile costs and what it saves per video, in seconds (one GPU, one shape)."""

    cold_s: float  # a first compile with no cache
    warm_s: float  # a compile whose artifacts come from a cache
    saved_per_video_s: float  # eager video minus compiled video

    def rows_needed(self, cached: bool) -> int:
        """Videos of one shape a worker must render for the compile to pay back."""
        return math.ceil((self.warm_s if cached else self.cold_s) / self.saved_per_video_s)


#: Measured on one H200 (torch 2.11, SVD-XT architecture, 1024x576, 25 frames, 25 steps, fp16,
#: CFG; issue 17's table from ``benchmarks/gpu.sh``): a cold compile of the UNet 181 s plus 33 s
#: for the step cache's shallow variant, 26 s with inductor's cache warm; a video with ``full`` +
#: step cache 3 takes 12.44 s eager and 8.91 s compiled (3.53 s saved; ``full`` alone, 17.37 vs
#: 12.24 s, saves more). The larger compile and the smaller saving: a conservative rule, 61
#: videos per worker and shape cold, 8 with a cache entry. (The committed H100 run,
#: ``benchmarks/results/gpu_bench_svd-xt-full_*``, stopped its compile at an 84 s limit: no
#: compiled figure there.)
H200_SVD_XT = CompilePayback(cold_s=181.0 + 33.0, warm_s=26.0, saved_per_video_s=12.44 - 8.91)


def compile_pays(
    device_kind: str,
    rows_per_worker_per_shape: float | None,
    cached: bool,
    payback: CompilePayback = H200_SVD_XT,
) -> bool:
    """Whether ``compile="auto"`` compiles: on CUDA only, when a worker renders at least
    ``payback.rows_needed(cached)`` videos of a shape (``cached``: a compile-cache entry
    exists, so the compile is a warm one). ``rows_per_worker_per_shape=None`` (unknown: a
    renderer used directly, not by a job) counts as enough. On a CPU inductor takes minutes
    at full size and the figures above do not apply: never."""
    if device_kind != "cuda":
        return False
    if rows_per_worker_per_shape is None:
        return True
    return rows_per_worker_per_shape >= payback.rows_needed(cached)


def resolve_compile(
    value: bool | str | None,
    *,
    device_kind: str,
    rows_per_worker_per_shape: float | None = None,
    cached: bool = False,
) -> str:
    """A ``compile`` setting as the mode to compile with: ``auto`` becomes ``default`` where
    :func:`compile_pays`, else ``off``; any other value is :func:`compile_mode`'s."""
    mode = compile_mode(value)
    if mode != "auto":
        return mode
    return "default" if compile_pays(device_kind, rows_per_worker_per_shape, cached) else "off"
