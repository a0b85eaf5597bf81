"""One range per generation parameter, used everywhere: the job config (``defaults.*``), the
manifest validation, the renderer and the results schema (``seed`` is ``int64`` there, so its
range is [0, 2**63 - 1]). Torch-free, so ``jobs`` imports it without loading a model.

An integral float (``5.0``, as pandas writes an integer column with a missing value) is
accepted where an integer is expected; ``5.5`` is not.
"""

from __future__ import annotations

import math
import operator
from typing import Any

#: The largest seed: results store seeds as int64 (torch accepts up to 2**64 - 1, Parquet
#: readers and pandas would not).
SEED_MAX = 2**63 - 1

#: Parameter: (kind, lowest, highest). Model-dependent limits (a width the VAE cannot take, ...)
#: are the renderer's to reject.
PARAM_RANGES: dict[str, tuple[str, float, float]] = {
    "seed": ("int", 0, SEED_MAX),
    "num_frames": ("int", 2, 1024),  # SVD needs 2 or more (diffusers fails on 1)
    "fps": ("int", 1, 240),
    "motion_bucket_id": ("int", 0, 1023),
    "noise_aug_strength": ("float", 0.0, 10.0),
    "num_inference_steps": ("int", 1, 1000),
    "min_guidance_scale": ("float", 0.0, 100.0),
    "max_guidance_scale": ("float", 0.0, 100.0),
    "width": ("int", 8, 8192),
    "height": ("int", 8, 8192),
}


def range_text(name: str) -> str:
    kind, low, high = PARAM_RANGES[name]
    return f"an integer in [{low}, {high}]" if kind == "int" else f"a finite number in [{low}, {high}]"


def as_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int within the range (``PARAM_RANGES[name]`` unless given); integral
    floats are accepted. Raises ValueError naming the parameter and the range."""
    if name in PARAM_RANGES and minimum is None and maximum is None:
        _, minimum, maximum = PARAM_RANGES[name]
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
    """``value`` as a finite float within the range (``PARAM_RANGES[name]`` unless given)."""
    if name in PARAM_RANGES and minimum is None and maximum is None:
        _, minimum, maximum = PARAM_RANGES[name]
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
