"""The generation parameters, declared once: :data:`GENERATION_PARAMS`.

Each parameter (seed, frame count, fps, motion bucket, noise augmentation, steps, guidance
scales, guidance interval, size, decode chunk) has one :class:`GenerationParam`: name, kind,
range, default and description. Everything else is derived from it, so no two places can disagree:

- the job config's ``defaults.*`` section (``jobs.config.GenerationConfig`` is built from it,
  and ``check_config`` checks it with :func:`check_generation`);
- the manifest's optional columns and their checks (:data:`ROW_PARAMS`, ``jobs.manifest``);
- the renderer's checks (``Renderer.generate``/``generate_batch`` call :func:`check_generation`;
  a test keeps their keyword lists equal to the declaration);
- the worker's call and the rows that may share one pipeline call (:data:`ROW_PARAMS`,
  :data:`BATCH_PARAMS`);
- the results schema's generation columns (``jobs.results.param_type``; ``seed`` is ``int64``
  there, so its range is [0, 2**63 - 1]);
- ``vcut compare``'s generation flags (``jobs.cli.flags.add_param_flags``).

Torch-free, so ``jobs`` imports it without loading a model. An integral float (``5.0``, as
pandas writes an integer column with a missing value) is accepted where an integer is
expected; ``5.5`` is not.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: The largest seed: results store seeds as int64 (torch accepts up to 2**64 - 1, Parquet
#: readers and pandas would not).
SEED_MAX = 2**63 - 1


@dataclass(frozen=True)
class GenerationParam:
    """One generation parameter.

    ``kind`` is ``"int"`` or ``"float"``; values lie in [``low``, ``high``]. ``default`` is the
    job config's (``None`` only where ``optional``: the model's own frame count, one decode
    chunk). ``per_row``: a manifest column and a results column (``decode_chunk_size`` is a
    job setting only: it trades memory, not what a row asks for). ``multiple_of``: a rule of
    the model (SVD's VAE works on multiples of 8 pixels) that :func:`check_generation` enforces
    for a whole call (config defaults, the renderer, ``vcut compare``); a manifest row that
    breaks it is not refused up front but fails alone, as any row the model cannot render.
    """

    name: str
    kind: str
    low: int | float
    high: int | float
    default: int | float | None
    description: str
    optional: bool = False
    per_row: bool = True
    multiple_of: int = 1

    @property
    def type(self) -> type:
        """``int`` or ``float``: the Python type of a value (and of the config field)."""
        return int if self.kind == "int" else float

    def range_text(self) -> str:
        noun = "an integer" if self.kind == "int" else "a finite number"
        text = f"{noun} in [{self.low}, {self.high}]"
        return text + (f", a multiple of {self.multiple_of}" if self.multiple_of > 1 else "")

    def help(self) -> str:
        """One line for ``--help`` and the config docs: the description, range and default."""
        default = "null" if self.default is None else self.default
        return f"{self.description}; {self.range_text()}, default {default}"


_P = GenerationParam
#: The declaration, in the order of the config section and of the results' generation columns.
GENERATION_PARAMS: dict[str, GenerationParam] = {
    p.name: p
    for p in (
        _P("seed", "int", 0, SEED_MAX, 0, "seed of the CPU noise generator: the same seed, the same video"),
        _P(
            "num_frames",
            "int",
            2,  # SVD needs 2 or more (diffusers fails on 1)
            1024,
            None,
            "frames per video, null: the model's own (25 for SVD-XT, 14 for SVD)",
            optional=True,
        ),
        _P("fps", "int", 1, 240, 7, "frame rate: SVD's fps conditioning and the encoded video's rate"),
        _P("motion_bucket_id", "int", 0, 1023, 127, "motion conditioning: higher moves more"),
        _P(
            "noise_aug_strength",
            "float",
            0.0,
            10.0,
            0.02,
            "noise added to the conditioning image: higher departs more from it",
        ),
        _P("num_inference_steps", "int", 1, 1000, 25, "denoising steps per video"),
        _P(
            "min_guidance_scale",
            "float",
            0.0,
            100.0,
            1.0,
            "classifier-free guidance of the first frame, at most max_guidance_scale",
        ),
        _P(
            "max_guidance_scale",
            "float",
            0.0,
            100.0,
            3.0,
            "classifier-free guidance of the last frame; <= 1: no guidance (half the UNet work)",
        ),
        _P(
            "guidance_start",
            "float",
            0.0,
            1.0,
            0.0,
            "fraction of the schedule where classifier-free guidance starts (steps before it run the "
            "conditional half only: half the UNet work), below guidance_stop",
        ),
        _P(
            "guidance_stop",
            "float",
            0.0,
            1.0,
            1.0,
            "fraction of the schedule where classifier-free guidance stops (later steps run the "
            "conditional half only); 0 and 1: every step guided, as stock SVD",
        ),
        _P("width", "int", 8, 8192, 1024, "video width in pixels", multiple_of=8),
        _P("height", "int", 8, 8192, 576, "video height in pixels", multiple_of=8),
        _P(
            "decode_chunk_size",
            "int",
            1,
            1024,
            None,
            "frames the VAE decodes at once, null: all (halved on CUDA out-of-memory)",
            optional=True,
            per_row=False,
        ),
    )
}

#: Pairs (a, b) of parameters whose values must satisfy a <= b.
ORDERED_PAIRS: tuple[tuple[str, str], ...] = (("min_guidance_scale", "max_guidance_scale"),)
#: Pairs (a, b) of parameters whose values must satisfy a < b.
STRICTLY_ORDERED_PAIRS: tuple[tuple[str, str], ...] = (("guidance_start", "guidance_stop"),)
#: Parameters a manifest row may set (its optional columns; also results columns), in order.
ROW_PARAMS: tuple[str, ...] = tuple(n for n, p in GENERATION_PARAMS.items() if p.per_row)
#: What rows must share to render in one pipeline call: every row parameter but the seed.
BATCH_PARAMS: tuple[str, ...] = tuple(n for n in ROW_PARAMS if n != "seed")
#: Parameters only the job config sets (``defaults.*``), the same for every row of a job.
JOB_PARAMS: tuple[str, ...] = tuple(n for n, p in GENERATION_PARAMS.items() if not p.per_row)


def defaults() -> dict[str, Any]:
    """Every parameter's default (the job config's ``defaults`` section), in declaration order."""
    return {n: p.default for n, p in GENERATION_PARAMS.items()}


def check_value(name: str, value: Any, label: str | None = None) -> int | float | None:
    """``value`` as the parameter's type within its declared range (None where optional).

    Raises ValueError naming ``label`` (default: the parameter's name) and the range.
    """
    p = GENERATION_PARAMS[name]
    label = label or name
    if value is None:
        if p.optional:
            return None
        raise ValueError(f"{label} must be {p.range_text()}, got None")
    if p.kind == "int":
        return as_int(label, value, p.low, p.high)
    return as_float(label, value, p.low, p.high)


def check_generation(
    values: Mapping[str, Any] | None = None, *, label: Callable[[str], str] | None = None, **kw: Any
) -> dict[str, Any]:
    """A whole call's generation values, checked and normalized (ints as int, floats as float).

    The one check of the config defaults, the renderer and ``vcut compare``: each value in its
    declared range, ``width``/``height`` a multiple of their ``multiple_of``, and
    ``min_guidance_scale`` <= ``max_guidance_scale`` (:data:`ORDERED_PAIRS`), ``guidance_start``
    < ``guidance_stop`` (:data:`STRICTLY_ORDERED_PAIRS`). Only the names
    given are checked (a name not declared raises). Messages name a parameter as
    ``label(name)`` (``defaults.fps``, ``--fps``; default: the name). Raises ValueError.
    """
    given = {**(values or {}), **kw}
    unknown = [n for n in given if n not in GENERATION_PARAMS]
    if unknown:
        raise ValueError(f"unknown generation parameter(s): {', '.join(unknown)}")
    label = label or str
    out: dict[str, Any] = {}
    for name, value in given.items():
        p = GENERATION_PARAMS[name]
        value = check_value(name, value, label(name))
        if value is not None and p.multiple_of > 1 and value % p.multiple_of:
            raise ValueError(f"{label(name)} must be a multiple of {p.multiple_of}, got {value}")
        out[name] = value
    for a, b in ORDERED_PAIRS:
        lo, hi = out.get(a), out.get(b)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"{label(a)} must be <= {label(b)}, got {lo} > {hi}")
    for a, b in STRICTLY_ORDERED_PAIRS:
        lo, hi = out.get(a), out.get(b)
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(f"{label(a)} must be < {label(b)}, got {lo} >= {hi}")
    return out


def as_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int within [minimum, maximum] (the declared range of a parameter named
    ``name`` unless given); integral floats are accepted. Raises ValueError naming the
    parameter and the range."""
    if name in GENERATION_PARAMS and minimum is None and maximum is None:
        minimum, maximum = GENERATION_PARAMS[name].low, GENERATION_PARAMS[name].high
    if isinstance(value, bool | str | bytes):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)  # int, numpy integers: exact, whatever their size
    except TypeError:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
        if not (math.isfinite(number) and number.is_integer()):
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
        value = int(number)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if maximum is None:
            bound = f">= {minimum}"
        elif minimum is None:
            bound = f"<= {maximum}"
        else:
            bound = f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def as_float(name: str, value: Any, minimum: float | None = None, maximum: float | None = None) -> float:
    """``value`` as a finite float within [minimum, maximum] (the declared range of a parameter
    named ``name`` unless given)."""
    if name in GENERATION_PARAMS and minimum is None and maximum is None:
        minimum, maximum = GENERATION_PARAMS[name].low, GENERATION_PARAMS[name].high
    if isinstance(value, bool | str | bytes):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    low = -math.inf if minimum is None else minimum
    high = math.inf if maximum is None else maximum
    if not math.isfinite(number) or not low <= number <= high:
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return number
