"""The manifest's checks: its schema, and one chunk of rows column by column (kind, range,
non-empty ``image``/``id``) and the declared order of parameter pairs. Each check returns the
first problem it finds as one line that names the column and the row (rows count from
``offset``, the chunk's first row); ``jobs.manifest.validate_manifest`` runs them while it
streams the manifest."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.params import GENERATION_PARAMS, ORDERED_PAIRS, ROW_PARAMS, STRICTLY_ORDERED_PAIRS

#: Optional generation columns: the row parameters of ``pipeline.params.GENERATION_PARAMS``,
#: checked against their declared kind and range (the config, the renderer and the results
#: schema use the same declaration). Model rules (a width that is no multiple of 8, ...) are
#: the renderer's to reject; they become ``failed`` rows.
KNOWN_COLUMNS = {"image", "id", *ROW_PARAMS}
#: Keys the driver adds to each row dict (never results columns): a manifest column may not
#: have these names; every other column, ``_``-prefixed ones included, is carried.
PRIVATE_KEYS = frozenset({"_image", "_row"})


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _is_num(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def check_schema(schema: pa.Schema, reserved: set[str]) -> list[str]:
    problems = []
    if "image" not in schema.names:
        problems.append(f"missing required column 'image' (columns: {', '.join(schema.names) or 'none'})")
    for name in schema.names:
        if (name in reserved and name not in KNOWN_COLUMNS) or name in PRIVATE_KEYS:
            problems.append(f"column {name!r} is reserved for the results; rename it")
    return problems


def _first_bad(mask: pa.Array) -> int | None:
    """Index of the first True in a boolean array (nulls count as False)."""
    idx = pc.index(pc.fill_null(mask, False), True).as_py()
    return None if idx < 0 else idx


def check_column(name: str, col: pa.ChunkedArray | pa.Array, offset: int) -> str | None:
    """One problem with a column chunk (the first bad row), or None."""
    t = col.type
    if pa.types.is_null(t):
        return None
    if name in ("image", "id"):
        ok = pa.types.is_string(t) or pa.types.is_large_string(t) or (name == "id" and _is_int(t))
        if not ok:
            return f"column {name!r} has type {t}, expected string (row {offset})"
        if name == "image":
            bad = _first_bad(pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_length(col), 0)))
            if bad is not None:
                return f"column 'image' is empty at row {offset + bad}"
        elif not _is_int(t):
            bad = _first_bad(pc.equal(pc.utf8_length(col), 0))
            if bad is not None:
                return f"column 'id' is empty at row {offset + bad}"
        return None
    param = GENERATION_PARAMS[name]
    kind, low, high = param.kind, param.low, param.high
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        for i, value in enumerate(col.to_pylist()):
            if value is None or value == "":
                continue
            try:
                int(value) if kind == "int" else float(value)
            except ValueError:
                return f"column {name!r} has type {t}, expected {kind}: {value!r} at row {offset + i}"
        return f"column {name!r} has type {t}, expected {kind} (row {offset})"
    if not _is_num(t):
        return f"column {name!r} has type {t}, expected {kind} (row {offset})"
    if not _is_int(t):
        col = pc.cast(col, pa.float64())
        bad = _first_bad(pc.invert(pc.is_finite(col)))
        if bad is not None:
            return f"column {name!r} is not finite at row {offset + bad}"
        if kind == "int":
            bad = _first_bad(pc.not_equal(col, pc.floor(col)))
            if bad is not None:
                return f"column {name!r} expects an integer, got {col[bad].as_py()} at row {offset + bad}"
    elif kind == "float":
        col = pc.cast(col, pa.float64())
    if pa.types.is_floating(col.type):  # compare as floats: 2**63 - 1 is no float64, 2**63 is
        above = pc.greater_equal(col, float(high) + 1) if kind == "int" else pc.greater(col, float(high))
        bad = _first_bad(pc.or_(pc.less(col, float(low)), above))
    else:
        bad = _first_bad(_outside_ints(col, int(low), int(high)))
    if bad is not None:
        value = col[bad].as_py()
        if kind == "int":
            value = int(value)
        return f"column {name!r} is out of range [{low}, {high}]: {value} at row {offset + bad}"
    return None


def _outside_ints(col: pa.Array | pa.ChunkedArray, low: int, high: int) -> pa.Array:
    """Where an integer column is outside [low, high], comparing in the column's own type (a
    uint64 column holds values int64 cannot, so arrow's implicit int64 cast would raise)."""
    info = np.iinfo(col.type.to_pandas_dtype())
    masks = []
    if low > info.max or high < info.min:
        return pc.is_valid(col)
    if low > info.min:
        masks.append(pc.less(col, pa.scalar(low, col.type)))
    if high < info.max:
        masks.append(pc.greater(col, pa.scalar(high, col.type)))
    if not masks:
        return pa.array(np.zeros(len(col), dtype=bool))
    return masks[0] if len(masks) == 1 else pc.or_(masks[0], masks[1])


def check_order(batch: pa.RecordBatch, offset: int) -> str | None:
    """The declared order of parameter pairs (``min_guidance_scale`` <= ``max_guidance_scale``,
    ``guidance_start`` < ``guidance_stop``)."""
    pairs = [(a, b, pc.greater, "above") for a, b in ORDERED_PAIRS]
    pairs += [(a, b, pc.greater_equal, "not below") for a, b in STRICTLY_ORDERED_PAIRS]
    for a, b, wrong, text in pairs:
        if a not in batch.schema.names or b not in batch.schema.names:
            continue
        lo, hi = batch.column(a), batch.column(b)
        if not (_is_num(lo.type) and _is_num(hi.type)):
            continue
        bad = _first_bad(wrong(pc.cast(lo, pa.float64()), pc.cast(hi, pa.float64())))
        if bad is not None:
            return f"column {a!r} is {text} {b!r} at row {offset + bad}"
    return None
