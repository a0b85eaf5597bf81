"""The manifest is read a batch at a time, whatever its row groups (issue 18 point 4).

``pq.write_table`` writes row groups of up to a million rows, and pyarrow's dataset scanner
decodes a whole row group at once; ``jobs.manifest.batches`` reads Parquet with
``ParquetFile.iter_batches`` instead. These tests check that nothing else changed: the same
rows and types as the scanner (a folder of files with different schemas too), a bad value in
a later row group or batch still named with its row, and that the decoded manifest is never
held whole (pyarrow's allocated bytes, deterministic: no RSS, no timing)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import manifest


def _table(n: int, start: int = 0) -> pa.Table:
    rows = np.arange(start, start + n)
    return pa.table(
        {
            "id": [f"clip-{i}" for i in rows],
            "image": [f"/data/images/a/long/folder/name/img-{i % 7}.png" for i in rows],
            "seed": pa.array(rows, pa.int64()),
            "fps": pa.array(np.full(n, 7), pa.int32()),
        }
    )


def _scanner_rows(path: str) -> pa.Table:
    """The manifest as pyarrow's dataset scanner reads it (what ``batches`` replaces)."""
    dataset = manifest.open_manifest(path)
    return pa.Table.from_batches(list(dataset.to_batches(use_threads=False)), schema=dataset.schema)


def test_batches_are_the_scanners_rows_in_order(tmp_path):
    one = tmp_path / "one.parquet"
    pq.write_table(_table(3000), one, row_group_size=700)
    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(_table(1000), folder / "a.parquet", row_group_size=300)
    # a later file: a column missing, another of a wider type, one more the folder ignores
    b = _table(500, 1000).drop_columns(["fps"]).append_column("x", pa.array([1] * 500))
    pq.write_table(b, folder / "b.parquet")
    wider = _table(1).schema.set(3, pa.field("fps", pa.int64()))
    pq.write_table(_table(400, 1500).cast(wider), folder / "c.parquet")
    for path in (one, folder):
        dataset = manifest.open_manifest(str(path))
        got = list(manifest.batches(dataset, 256))
        assert max(b.num_rows for b in got) <= 256
        table = pa.Table.from_batches(got, schema=dataset.schema)
        assert table.equals(_scanner_rows(str(path)))
    assert pa.Table.from_batches(got).column("fps").null_count == 500  # b.parquet's rows


def test_a_bad_value_in_a_later_row_group_and_batch_names_its_row(tmp_path):
    table = _table(5000)
    fps = table.column("fps").to_numpy().copy()
    fps[4321] = 0  # out of range, in the 5th row group and the 9th batch of 512
    path = tmp_path / "m.parquet"
    pq.write_table(table.set_column(3, "fps", pa.array(fps, pa.int32())), path, row_group_size=1000)
    with pytest.raises(manifest.ManifestError, match=r"'fps' is out of range \[1, \d+\]: 0 at row 4321"):
        manifest.validate_manifest(str(path), chunk_rows=512)
    # a duplicate id across row groups: both rows named
    ids = table.column("id").to_pylist()
    ids[4999] = ids[12]
    pq.write_table(table.set_column(0, "id", pa.array(ids)), path, row_group_size=1000)
    with pytest.raises(manifest.ManifestError, match="duplicate 'clip-12' at rows 12, 4999"):
        manifest.validate_manifest(str(path), chunk_rows=512)
    rows = [r for chunk in manifest.iter_manifest(str(path), chunk_rows=512) for r in chunk]
    assert [r["_row"] for r in rows] == list(range(5000)) and rows[4321]["seed"] == 4321


def _held(batches) -> int:
    """The most bytes pyarrow held beyond its start while ``batches`` were read."""
    before, held = pa.total_allocated_bytes(), 0
    for _batch in batches:
        held = max(held, pa.total_allocated_bytes() - before)
    return held


def test_one_row_group_is_never_decoded_whole(tmp_path):
    """Manifests of one row group (``pq.write_table``'s default, up to a million rows): what
    pyarrow holds while the rows stream grows far slower with the rows than with the dataset
    scanner, which decodes the row group whole (~50 MiB at a million rows; the stream holds the
    row group's encoded column chunks and one batch)."""
    stream, scanner = [], []
    for n in (100_000, 300_000):
        path = tmp_path / f"m{n}.parquet"
        pq.write_table(_table(n), path)
        assert pq.ParquetFile(path).metadata.num_row_groups == 1
        dataset = manifest.open_manifest(str(path))
        scanner.append(_held(dataset.to_batches(batch_size=1024, use_threads=False)))
        stream.append(_held(manifest.iter_manifest(str(path), chunk_rows=1024)))
        assert manifest.validate_manifest(str(path), chunk_rows=1024).num_rows == n
    assert 0 < stream[1] - stream[0] < (scanner[1] - scanner[0]) / 3, (stream, scanner)


def test_a_manifest_uri_streams_through_its_fsspec_filesystem():
    """A manifest given as a URI (here fsspec's in-memory filesystem, as s3fs would be) is read
    file by file through the dataset's filesystem, row groups and all."""
    import uuid

    import fsspec

    fs = fsspec.filesystem("memory")
    folder = f"/manifest-{uuid.uuid4().hex}"
    try:
        with fs.open(f"{folder}/m.parquet", "wb") as f:
            pq.write_table(_table(3000), f, row_group_size=1000)
        uri = f"memory://{folder}/m.parquet"
        assert manifest.validate_manifest(uri, chunk_rows=512).num_rows == 3000
        rows = [r for chunk in manifest.iter_manifest(uri, chunk_rows=512) for r in chunk]
        assert [r["id"] for r in rows] == [f"clip-{i}" for i in range(3000)]
        assert [r["seed"] for r in rows] == list(range(3000))
    finally:
        fs.rm(folder, recursive=True)
