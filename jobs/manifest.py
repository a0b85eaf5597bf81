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
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from jobs.manifest_checks import KNOWN_COLUMNS, check_column, check_order, check_schema
from pipeline.params import GENERATION_PARAMS, ROW_PARAMS, check_value
from pipeline.storage import is_remote, local_path, put_atomic, url_to_fs

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


def batches(dataset: ds.Dataset, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """The manifest's rows in order, in batches of at most ``chunk_rows``, with the dataset's
    schema. Parquet is decoded a batch at a time (``ParquetFile.iter_batches``, file after
    file): the dataset's scanner decodes a whole row group at once, and ``pq.write_table``
    writes row groups of up to a million rows (a 1M-row manifest held ~50 MiB through a whole
    job). CSV and JSON go through the scanner."""
    if not isinstance(dataset.format, ds.ParquetFileFormat):
        yield from dataset.to_batches(batch_size=chunk_rows, use_threads=False)
        return
    schema = dataset.schema
    for file in dataset.files:
        with dataset.filesystem.open_input_file(file) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=chunk_rows, use_threads=False):
                yield batch if batch.schema.equals(schema) else _conform(batch, schema)


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """A batch of one file of a manifest folder with the folder's schema, as the dataset's
    scanner gives it: a column the file lacks as nulls, the others cast."""
    n = batch.num_rows
    columns = [
        batch.column(f.name).cast(f.type) if f.name in batch.schema.names else pa.nulls(n, f.type)
        for f in schema
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


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
    problems = check_schema(schema, reserved)
    if problems:
        raise ManifestError(problems)
    checked = [n for n in schema.names if n in KNOWN_COLUMNS]
    hashes: list[np.ndarray] = []
    offset = 0
    try:
        for batch in batches(dataset, chunk_rows):
            for name in checked:
                problem = check_column(name, batch.column(name), offset)
                if problem and len(problems) < MAX_PROBLEMS:
                    problems.append(problem)
            problem = check_order(batch, offset)
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
    for batch in batches(dataset, chunk_rows):
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
    for batch in batches(dataset, chunk_rows):
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
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    put_atomic(None, out, buf.getvalue().to_pybytes())  # never half a manifest under its name
    return table.num_rows
