"""The lever grammar: one configuration of every speed lever as one short name.

Used by ``vcut compare --configs`` and ``benchmarks.levers``; parsed here only.

A configuration is a VCUT mode followed by lever tokens, joined by ``+``, each token at
most once, in any order::

    MODE[+cacheN][+fp8][+gA-B][+compile]

- ``MODE``: ``off`` (stock UNet), ``exact`` or ``full`` (VCUT);
- ``cacheN``: the step cache, the whole UNet every N-th step (N >= 2; :mod:`vcut.step_cache`);
- ``fp8``: the UNet in FP8 (``Renderer(..., quantize="fp8")``; Hopper-class GPUs only, the
  renderer refuses it elsewhere);
- ``gA-B``: classifier-free guidance on the part ``[A, B)`` of the schedule only, with
  ``0 <= A < B <= 1`` (generation parameters ``guidance_start=A``, ``guidance_stop=B``;
  :mod:`vcut.guidance`), e.g. ``g0-0.6``;
- ``compile``: ``torch.compile`` (mode ``default``) of the UNet.

Examples: ``full``, ``full+cache3``, ``full+cache3+fp8+g0-0.6``, ``exact+g0.2-0.8+compile``.
A configuration maps to three sets of keywords: the renderer's
(:meth:`LeverConfig.renderer_kwargs`), the generation's (:meth:`LeverConfig.generate_kwargs`)
and ``jobs.macs``' (:meth:`LeverConfig.levers`, with the interval in ``VideoShape``). A bad name raises
:class:`LeverError` in one line naming the token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from jobs.macs import Levers
from vcut.modes import MODES as VCUT_MODES

#: One line for ``--help``.
GRAMMAR_HELP = (
    "MODE[+cacheN][+fp8][+gA-B][+compile]: MODE one of "
    + ", ".join(VCUT_MODES)
    + "; cacheN the step cache every N >= 2 steps; fp8 the UNet in FP8 (Hopper GPUs); gA-B "
    "classifier-free guidance on [A, B) of the schedule only (0 <= A < B <= 1); compile torch.compile"
)

_CACHE = re.compile(r"cache(\d+)")
_GUIDANCE = re.compile(r"g(\d+(?:\.\d*)?|\.\d+)-(\d+(?:\.\d*)?|\.\d+)")


class LeverError(ValueError):
    """A configuration name that does not follow the grammar (one line, naming the token)."""


@dataclass(frozen=True)
class LeverConfig:
    """One configuration: the VCUT mode and every lever's setting (None / False: not used)."""

    name: str
    mode: str
    step_cache: int | None = None
    compile: bool = False
    quantize: str | None = None
    guidance_start: float | None = None
    guidance_stop: float | None = None

    @property
    def key(self) -> tuple:
        """What the configuration does, whatever the order of its tokens (duplicates)."""
        guidance = (self.guidance_start, self.guidance_stop)
        return (self.mode, self.step_cache, self.compile, self.quantize, guidance)

    def renderer_kwargs(self) -> dict[str, Any]:
        """The keywords of :meth:`pipeline.Renderer.from_pipe` this configuration sets (only
        those of the levers it uses)."""
        kwargs: dict[str, Any] = {"vcut": self.mode}
        if self.step_cache is not None:
            kwargs["step_cache"] = self.step_cache
        if self.compile:
            kwargs["compile"] = "default"
        if self.quantize is not None:
            kwargs["quantize"] = self.quantize
        return kwargs

    def generate_kwargs(self) -> dict[str, Any]:
        """The generation parameters this configuration sets (over the command's own)."""
        if self.guidance_start is None:
            return {}
        return {"guidance_start": self.guidance_start, "guidance_stop": self.guidance_stop}

    def levers(self, step_cache_depth: int = 1) -> Levers:
        """Its MAC levers (:mod:`jobs.macs`; FP8 and compile change the cost of a MAC, not their
        number; the guidance interval is a generation value: :meth:`generate_kwargs`)."""
        return Levers(self.mode, self.step_cache, step_cache_depth)


def parse_config(text: str, *, allow_compile: bool = True) -> LeverConfig:
    """Parse one configuration name (see the module doc); ``allow_compile=False`` refuses
    ``+compile``. Raises :class:`LeverError` naming the bad token."""
    name = text.strip()
    tokens = name.split("+")
    mode = tokens[0]
    if mode not in VCUT_MODES:
        raise LeverError(
            f"configuration {name!r}: {mode!r} is not a VCUT mode (expected one of {', '.join(VCUT_MODES)} "
            "first, then +cacheN, +fp8, +gA-B, +compile)"
        )
    fields: dict[str, Any] = {}
    seen: set[str] = set()
    for token in tokens[1:]:
        kind, value = _token(name, token, allow_compile)
        if kind in seen:
            raise LeverError(f"configuration {name!r}: token {token!r} sets {kind} a second time")
        seen.add(kind)
        fields.update(value)
    return LeverConfig(name=name, mode=mode, **fields)


def _token(name: str, token: str, allow_compile: bool) -> tuple[str, dict[str, Any]]:
    """(which lever, the LeverConfig fields) of one token."""
    if m := _CACHE.fullmatch(token):
        interval = int(m[1])
        if interval < 2:
            raise LeverError(
                f"configuration {name!r}: token {token!r}: the step-cache interval must be >= 2 "
                "(interval 1 would be no cache: leave it out)"
            )
        return "the step cache", {"step_cache": interval}
    if token == "fp8":
        return "quantize", {"quantize": "fp8"}
    if token == "compile":
        if not allow_compile:
            raise LeverError(f"configuration {name!r}: token 'compile' is not available here")
        return "compile", {"compile": True}
    if m := _GUIDANCE.fullmatch(token):
        start, stop = float(m[1]), float(m[2])
        if not 0.0 <= start < stop <= 1.0:
            raise LeverError(
                f"configuration {name!r}: token {token!r}: the guidance interval needs "
                f"0 <= A < B <= 1, got A={start:g}, B={stop:g}"
            )
        return "the guidance interval", {"guidance_start": start, "guidance_stop": stop}
    raise LeverError(
        f"configuration {name!r}: unknown token {token!r} (expected cacheN, fp8, gA-B or compile after "
        "the mode, e.g. full+cache3+fp8+g0-0.6)"
    )
