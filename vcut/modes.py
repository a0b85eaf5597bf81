"""The VCUT modes, in one torch-free place.

The command line, the job schema and the benchmarks list the modes without importing torch
(``import vcut.modes`` imports nothing heavy); :func:`vcut.apply_vcut` checks against the same
tuple.
"""

from __future__ import annotations

#: ``off``: stock diffusers; ``exact``: spatial cross-attention as a cached one-time linear
#: layer (stock output up to float rounding); ``full``: ``exact`` plus temporal cross-attention
#: removed (the paper's VCUT; changes the output).
MODES: tuple[str, ...] = ("off", "exact", "full")
