"""The manifest: open, validate (before any worker starts), stream rows in bounded chunks, build.

A manifest is a Parquet file or folder (CSV and JSONL work too) with one row per video, a
local path or an fsspec URI (``s3://``, ``gs://``, ``file://`` ...; read with
``pyarrow.dataset`` over the fsspec filesystem). A relative ``image`` path is resolved against
the manifest's own folder (for a manifest URI: that folder's URI), so a manifest and its images
can move together. Row numbers in messages count data rows from 0.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.params import (
    GENERATION_PARAMS,
    ORDERED_PAIRS,
    ROW_PARAMS,
    STRICTLY_ORDERED_PAIRS,
    check_value,
)
from pipeline.storage import is_remote, local_path, put_atomic, url_to_fs

#: Optional generation columns: the row parameters of ``pipeline.params.GENERATION_PARAMS``,
#: checked against their declared kind and range (the config, the renderer and the results
#: schema use the same declaration). Model rules (a width that is no multiple of 8, ...) are
#: the renderer's to reject; they become ``failed`` rows.
KNOWN_COLUMNS = {"image", "id", *ROW_PARAMS}
#: Keys the driver adds to each row dict (never results columns): a manifest column may not
#: have these names; every other column, ``_``-prefixed ones included, is carried.
PRIVATE_KEYS = frozenset({"_image", "_row"})
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_PROBLEMS = 20


class ManifestError(ValueError):
    """The manifest cannot be run; ``problems`` names each column and row at fault."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        more = "" if len(problems) < MAX_PROBLEMS else f"\n  (stopped after {MAX_PROBLEMS} problems)"
        super().__init__("invalid manifest:\n  " + "\n  ".join(problems) + more)


@dataclass
class ManifestInfo:
    path: str
    num_rows: int
    columns: list[str]
    carried: list[str] = field(default_factory=list)  # unknown columns, carried to the results
    carried_schema: pa.Schema = field(default_factory=lambda: pa.schema([]))


def open_manifest(path: str) -> ds.Dataset:
    """A pyarrow dataset over the manifest; the format follows the extension. A URI is read
    through its fsspec filesystem (s3fs, gcsfs ...), as the images and outputs are."""
    lower = path.lower()
    if lower.endswith(".csv"):
        # Ids and images are strings whatever they look like ("007" stays "007"; JSON and
        # Parquet keep their own types, and a numeric id is written with str()).
        import pyarrow.csv as pacsv

        fmt: Any = ds.CsvFileFormat(
            convert_options=pacsv.ConvertOptions(column_types={"id": pa.string(), "image": pa.string()})
        )
    elif lower.endswith((".jsonl", ".ndjson", ".json")):
        fmt = ds.JsonFileFormat()
    else:
        fmt = "parquet"
    fs, fs_path = url_to_fs(path)
    return ds.dataset(fs_path, format=fmt, filesystem=fs)


def _base_dir(path: str) -> str | None:
    """The folder relative image paths resolve against: a local path, or a URI for a manifest
    given as a URI."""
    fs, fs_path = url_to_fs(path)
    if fs is not None:
        fs_path = fs_path.rstrip("/")
        return fs.unstrip_protocol(fs_path if fs.isdir(fs_path) else posixpath.dirname(fs_path))
    path = os.path.abspath(fs_path)
    return path if os.path.isdir(path) else os.path.dirname(path)


def resolve_image(image: str, base_dir: str | None) -> str:
    """A URI or absolute path as is; a relative path against the manifest's folder (a local
    folder, or the URI of a remote one)."""
    if is_remote(image) or base_dir is None:
        return image
    image = local_path(image)  # file:// is a local path
    if os.path.isabs(image):
        return image
    if is_remote(base_dir):
        scheme, _, folder = base_dir.partition("://")
        return f"{scheme}://{posixpath.normpath(posixpath.join(folder, image))}"
    return os.path.normpath(os.path.join(base_dir, image))


def default_id(image: str, row: int) -> str:
    stem = os.path.splitext(os.path.basename(image.rstrip("/")))[0] or "row"
    return f"{stem}-{row}"


def id_hash(value: str) -> int:
    """A 64-bit hash of an id: sets of a million ids cost 8 MB as a numpy array."""
    return int.from_bytes(
        hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
    )


def hash_ids(ids: list[str]) -> np.ndarray:
    return np.fromiter((id_hash(i) for i in ids), dtype=np.uint64, count=len(ids))


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _is_num(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _check_schema(schema: pa.Schema, reserved: set[str]) -> list[str]:
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


def _check_column(name: str, col: pa.ChunkedArray | pa.Array, offset: int) -> str | None:
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


def _check_order(batch: pa.RecordBatch, offset: int) -> str | None:
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


def _batch_ids(batch: pa.RecordBatch, offset: int) -> list[str]:
    images = batch.column("image").to_pylist()
    if "id" in batch.schema.names and not pa.types.is_null(batch.column("id").type):
        given = batch.column("id").to_pylist()
    else:
        given = [None] * batch.num_rows
    return [
        str(g) if g is not None else default_id(img or "", offset + i)
        for i, (g, img) in enumerate(zip(given, images, strict=True))
    ]


def validate_manifest(path: str, reserved: set[str] = frozenset(), chunk_rows: int = 65536) -> ManifestInfo:
    """Check the whole manifest in one streaming pass; raise ManifestError naming column and row.

    Memory: one chunk of rows plus 8 bytes per id (for the duplicate check).
    """
    try:
        dataset = open_manifest(path)
        schema = dataset.schema
    except FileNotFoundError as exc:
        raise ManifestError([f"cannot read manifest {path!r}: not found ({exc})"]) from exc
    except (OSError, pa.ArrowException, ValueError, ImportError) as exc:  # ImportError: no s3fs ...
        raise ManifestError([f"cannot read manifest {path!r}: {exc}"]) from exc
    problems = _check_schema(schema, reserved)
    if problems:
        raise ManifestError(problems)
    checked = [n for n in schema.names if n in KNOWN_COLUMNS]
    hashes: list[np.ndarray] = []
    offset = 0
    try:
        for batch in dataset.to_batches(batch_size=chunk_rows, use_threads=False):
            for name in checked:
                problem = _check_column(name, batch.column(name), offset)
                if problem and len(problems) < MAX_PROBLEMS:
                    problems.append(problem)
            problem = _check_order(batch, offset)
            if problem and len(problems) < MAX_PROBLEMS:
                problems.append(problem)
            if not problems:
                hashes.append(hash_ids(_batch_ids(batch, offset)))
            offset += batch.num_rows
    except (OSError, pa.ArrowException) as exc:
        problems.append(f"cannot read manifest {path!r} after row {offset}: {exc}")
    if not problems and hashes:
        problems.extend(_duplicates(dataset, np.concatenate(hashes), chunk_rows))
    if problems:
        raise ManifestError(problems)
    carried = [n for n in schema.names if n not in KNOWN_COLUMNS]
    return ManifestInfo(
        path=path,
        num_rows=offset,
        columns=list(schema.names),
        carried=carried,
        carried_schema=pa.schema([schema.field(n) for n in carried]),
    )


def _duplicates(dataset: ds.Dataset, hashes: np.ndarray, chunk_rows: int) -> list[str]:
    ordered = np.sort(hashes)
    dup_hashes = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if dup_hashes.size == 0:
        return []
    # Second pass, only when there are duplicates: name them with their rows.
    rows: dict[str, list[int]] = {}
    offset = 0
    for batch in dataset.to_batches(batch_size=chunk_rows, use_threads=False):
        ids = _batch_ids(batch, offset)
        hit = np.isin(hash_ids(ids), dup_hashes)
        for i in np.flatnonzero(hit):
            rows.setdefault(ids[i], []).append(offset + int(i))
        offset += batch.num_rows
    problems = [
        f"column 'id' has duplicate {value!r} at rows {', '.join(map(str, where))}"
        for value, where in rows.items()
        if len(where) > 1
    ]
    return problems[:MAX_PROBLEMS]


def iter_manifest(path: str, chunk_rows: int = 1024) -> Iterator[list[dict[str, Any]]]:
    """Stream a validated manifest as chunks of row dicts: ``id`` filled in, ``_image`` the
    resolved image, ``_row`` the row number, numbers as int or float. Nulls stay None."""
    dataset = open_manifest(path)
    base = _base_dir(path)
    int_cols = {n for n in ROW_PARAMS if GENERATION_PARAMS[n].kind == "int"}
    offset = 0
    for batch in dataset.to_batches(batch_size=chunk_rows, use_threads=False):
        ids = _batch_ids(batch, offset)
        rows = batch.to_pylist()
        for i, row in enumerate(rows):
            row["id"] = ids[i]
            row["_image"] = resolve_image(row["image"], base)
            row["_row"] = offset + i
            for name in ROW_PARAMS:
                value = row.get(name)
                if isinstance(value, str):
                    value = value.strip() or None
                    row[name] = None if value is None else (int(value) if name in int_cols else float(value))
                elif name in int_cols and isinstance(value, float) and math.isfinite(value):
                    row[name] = int(value)
        offset += batch.num_rows
        yield rows


# -- building a manifest from a folder or glob of images ------------------------------------


def list_images(source: str) -> list[str]:
    if os.path.isdir(source):
        found = [os.path.join(source, n) for n in os.listdir(source)]
    else:
        found = glob.glob(source, recursive=True)
    return sorted(p for p in found if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS))


def build_manifest(
    source: str,
    out: str,
    *,
    seeds: list[int] | None = None,
    motion_bucket_ids: list[int] | None = None,
    fps: list[int] | None = None,
    num_frames: list[int] | None = None,
) -> int:
    """Write a Parquet manifest: every image x every option value (the cartesian product).

    Image paths keep the form the user gave: an absolute ``source`` (folder or glob) writes
    absolute paths, a relative one paths relative to the manifest's folder (so the manifest
    and its images move together). Returns the number of rows.
    """
    options = [
        ("seed", "s", seeds),
        ("motion_bucket_id", "m", motion_bucket_ids),
        ("fps", "f", fps),
        ("num_frames", "n", num_frames),
    ]
    try:  # the declared ranges, as `vcut run` will check them (a seed above int64 would not fit)
        for col, _, values in options:
            for value in values or ():
                check_value(col, value)
    except ValueError as exc:
        raise ManifestError([str(exc)]) from exc
    images = list_images(source)
    if not images:
        raise ManifestError([f"no images found in {source!r} (extensions: {', '.join(IMAGE_EXTENSIONS)})"])
    out_dir = os.path.dirname(os.path.abspath(out))

    def image_path(path: str) -> str:
        if os.path.isabs(os.path.expanduser(source)):
            return os.path.abspath(os.path.expanduser(path))
        return os.path.relpath(os.path.abspath(path), out_dir)

    stems = [os.path.splitext(os.path.basename(p))[0] for p in images]
    names = [s if stems.count(s) == 1 else os.path.basename(p) for s, p in zip(stems, images, strict=True)]
    columns: dict[str, list[Any]] = {"id": [], "image": []}
    columns.update({col: [] for col, _, values in options if values})
    for name, path in zip(names, images, strict=True):
        combos: list[tuple[str, dict[str, int]]] = [(name, {})]
        for col, tag, values in options:
            if values:
                combos = [(f"{i}-{tag}{v}", {**c, col: v}) for i, c in combos for v in values]
        for row_id, values in combos:
            columns["id"].append(row_id)
            columns["image"].append(image_path(path))
            for col, value in values.items():
                columns[col].append(value)
    from jobs.results import param_type  # the results' column types (jobs.results imports this module)

    table = pa.table(
        {k: pa.array(v, pa.string() if k in ("id", "image") else param_type(k)) for k, v in columns.items()}
    )
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    put_atomic(None, out, buf.getvalue().to_pybytes())  # never half a manifest under its name
    return table.num_rows
