"""Carried columns that change type between runs: whatever a job leaves in ``results/`` reads
with the three standard readers (pandas, ``pq.read_table``, ``pyarrow.dataset``) with every
column and every value, after each run's commits (no compaction yet: a job that was killed)
and after compaction."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from jobs import results


def _rows(ids: list[str], **carried: list) -> list[dict]:
    rows = []
    for i, row_id in enumerate(ids):
        row = {"id": row_id, "image": f"{row_id}.png", "status": "ok", "seed": i}
        row.update({k: v[i] for k, v in carried.items()})
        rows.append(row)
    return rows


def _commit(out, schema: pa.Schema, rows: list[dict]) -> None:
    writer = results.ResultWriter(out, schema)
    for row in rows:  # one part per row: the folder has many parts, as after many batches
        writer.commit([row])


def _read_three_ways(folder) -> list[dict[str, dict]]:
    """Each reader's rows, by id, as plain Python values (sorted for comparison)."""
    frames = [
        pd.read_parquet(folder).to_dict("records"),
        pq.read_table(folder).to_pylist(),
        ds.dataset(folder).to_table().to_pylist(),
    ]
    out = []
    for records in frames:
        by_id: dict[str, dict] = {}
        for r in records:
            by_id.setdefault(r["id"], r)  # before compaction an id may appear once only here
        out.append(by_id)
    return out


def _value(v):
    return None if v is None or (isinstance(v, float) and pd.isna(v)) else v


CASES = {
    # run 1's type, run 1's values, run 2's type, run 2's values, the values every reader must see
    "int then string": (pa.int64(), [1, 2], pa.string(), ["x", "y"], ["1", "2", "x", "y"]),
    "all-null then string": (pa.null(), [None, None], pa.string(), ["x", "y"], [None, None, "x", "y"]),
    "added in a later run": (None, None, pa.string(), ["x", "y"], [None, None, "x", "y"]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("compacted", [False, True], ids=["parts", "compacted"])
def test_a_type_change_between_runs_reads_with_standard_readers(tmp_path, case, compacted):
    first_type, first_values, second_type, second_values, expected = CASES[case]
    out = tmp_path / "out"
    first = pa.schema([("note", first_type)]) if first_type is not None else pa.schema([])
    _commit(out, first, _rows(["a", "b"], **({"note": first_values} if first_type else {})))
    if compacted:
        results.compact(out)
    _commit(out, pa.schema([("note", second_type)]), _rows(["c", "d"], note=second_values))
    if compacted:
        results.compact(out)
    for reader, by_id in zip(
        ("pandas", "pq.read_table", "dataset"), _read_three_ways(out / "results"), strict=True
    ):
        assert sorted(by_id) == ["a", "b", "c", "d"], reader
        assert [_value(by_id[i]["note"]) for i in "abcd"] == expected, reader
        assert [by_id[i]["seed"] for i in "abcd"] == [0, 1, 0, 1], reader


def test_a_column_of_an_earlier_run_is_kept_when_a_later_manifest_lacks_it(tmp_path):
    out = tmp_path / "out"
    _commit(out, pa.schema([("old", pa.int64())]), _rows(["a"], old=[7]))
    _commit(out, pa.schema([("new", pa.float64())]), _rows(["b"], new=[0.5]))
    for by_id in _read_three_ways(out / "results"):
        assert (by_id["a"]["old"], _value(by_id["a"]["new"])) == (7, None)
        assert (_value(by_id["b"]["old"]), by_id["b"]["new"]) == (None, 0.5)


def test_a_folder_written_with_mixed_schemas_is_conformed_by_compaction(tmp_path):
    """Parts as an older vcut left them (each with its own types): the job's final compaction
    rewrites them to one schema, atomically (no temporary left)."""
    out = tmp_path / "out"
    _commit(out, pa.schema([("note", pa.int64())]), _rows(["a"], note=[1]))
    folder = out / "results"
    legacy = results.RESULT_SCHEMA.append(pa.field("note", pa.string()))
    row = dict(_rows(["b"], note=["x"])[0], committed_at=1)
    pq.write_table(
        pa.Table.from_pylist([row], schema=legacy), folder / "part-99999999999999999999-000001-old.parquet"
    )
    with pytest.raises((pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError)):
        pq.read_table(folder)  # what an older vcut left: a standard reader fails
    results.compact(out)
    for by_id in _read_three_ways(folder):
        assert (by_id["a"]["note"], by_id["b"]["note"]) == ("1", "x")
    assert [n for n in folder.iterdir() if n.name.startswith(".")] == []


def test_on_an_object_store_too(monkeypatch):
    """``results/`` on S3 (a moto server on loopback): the old parts are rewritten by one
    upload each under their own name, and pandas / pyarrow read every column through s3fs."""
    from conftest import moto_s3

    with moto_s3(monkeypatch) as fs:
        fs.mkdir("bucket")
        out = "s3://bucket/job"
        _commit(out, pa.schema([("note", pa.int64())]), _rows(["a", "b"], note=[1, 2]))
        _commit(out, pa.schema([("note", pa.string())]), _rows(["c"], note=["x"]))
        fs.invalidate_cache()
        readers = [
            pd.read_parquet("s3://bucket/job/results").to_dict("records"),
            pq.read_table("bucket/job/results", filesystem=fs).to_pylist(),
            ds.dataset("bucket/job/results", filesystem=fs).to_table().to_pylist(),
        ]
        for records in readers:
            assert sorted((r["id"], r["note"]) for r in records) == [("a", "1"), ("b", "2"), ("c", "x")]
        assert [n for n in fs.ls("bucket/job/results", detail=False) if "/." in n] == []
