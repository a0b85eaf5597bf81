"""pipeline.storage: one answer to "is this a URI", one filesystem lookup, one atomic put.

Object-store behaviour against a real S3 API (moto) is in tests/test_object_storage.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from jobs.output import clean_temporaries, open_output
from pipeline.storage import (
    is_object_store,
    is_remote,
    is_temporary,
    local_path,
    put_atomic,
    temporary_name,
    url_to_fs,
)


@pytest.mark.parametrize(
    ("path", "remote"),
    [
        ("/data/a.png", False),
        ("data/a.png", False),
        ("./a.png", False),
        (Path("/data/a.png"), False),
        ("file:///data/a.png", False),
        ("FILE:///data/a.png", False),
        ("C:\\data\\a.png", False),  # a Windows path, not a URI
        ("C://data/a.png", False),  # a one-letter scheme is a drive, as fsspec decides
        ("data/x://y.png", False),  # "://" inside a relative path
        ("s3://bucket/a.png", True),
        ("S3://bucket/a.png", True),
        ("gs://bucket/a.png", True),
        ("memory://a.png", True),  # remote for images and videos; jobs' --out refuses it
        ("https://host/a.png", True),
        ("simplecache::s3://bucket/a.png", True),
    ],
)
def test_is_remote_answers_every_case(path, remote):
    assert is_remote(path) is remote


def test_url_to_fs_local_paths_have_no_filesystem(tmp_path):
    assert url_to_fs("rel/a.png") == (None, "rel/a.png")
    assert url_to_fs(tmp_path / "a.png") == (None, str(tmp_path / "a.png"))
    assert url_to_fs(f"file://{tmp_path}/a.png") == (None, f"{tmp_path}/a.png")
    assert local_path(f"FILE://{tmp_path}") == str(tmp_path)
    assert url_to_fs(f"local://{tmp_path}/a.png")[0] is None  # fsspec's local disk is local
    fs, path = url_to_fs("memory://bucket/a.png")
    assert isinstance(fs, MemoryFileSystem) and path == "/bucket/a.png" and not is_object_store(fs)
    assert not is_object_store(None)
    with pytest.raises(ValueError, match="nosuchprotocol"):
        url_to_fs("nosuchprotocol://bucket/a.png")


def test_open_output_takes_file_uris_and_refuses_memory(tmp_path):
    out = open_output(f"file://{tmp_path}/o")
    assert out.local and out.root == out.uri == str(tmp_path / "o")
    with pytest.raises(ValueError, match="memory://"):
        open_output("memory://out")
    assert open_output(out) is out


def test_temporary_names_are_recognised_and_real_names_are_not():
    for name in ("a.mp4", "part-1.parquet", "00001.tar"):
        tmp = temporary_name(name)
        assert tmp.startswith(f".{name}.tmp-") and is_temporary(tmp) and not is_temporary(name)
    assert is_temporary(".part-x.parquet.tmp")  # results' name before the suffix had a random part
    assert is_temporary("v.mp4.tmp-0123456789ab")  # encode's old upload name on a URI
    assert not is_temporary("v.tmp-0123456789ab.mp4")  # a video whose id happens to look like one
    assert not is_temporary(".vcut.lock") and not is_temporary(".vcut.lease")


def test_put_atomic_local_bytes_and_file(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    put_atomic(None, str(target), b"one")  # parent folders are created
    assert target.read_bytes() == b"one"
    src = tmp_path / "src.bin"
    src.write_bytes(b"two" * 1000)
    put_atomic(None, str(target), str(src))
    assert target.read_bytes() == b"two" * 1000 and sorted(os.listdir(target.parent)) == ["a.bin"]


def test_put_atomic_local_failure_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "a.bin"
    put_atomic(None, str(target), b"old")
    with pytest.raises(FileNotFoundError):
        put_atomic(None, str(target), str(tmp_path / "missing.bin"))

    def no_rename(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="simulated"):
        put_atomic(None, str(target), b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


def test_put_atomic_other_fsspec_moves_a_hidden_temporary(request, monkeypatch):
    fs = fsspec.filesystem("memory")
    root = f"/{request.node.name}"
    moves = []
    real_mv = fs.mv

    def spy_mv(src, dst, **kw):
        moves.append((src.rsplit("/", 1)[1], dst))
        return real_mv(src, dst, **kw)

    monkeypatch.setattr(fs, "mv", spy_mv)
    try:
        put_atomic(fs, f"{root}/d/a.bin", b"data")
        assert fs.cat_file(f"{root}/d/a.bin") == b"data" and fs.ls(f"{root}/d", detail=False) == [
            f"{root}/d/a.bin"
        ]
        ((tmp, dst),) = moves
        assert is_temporary(tmp) and tmp.startswith(".a.bin.tmp-") and dst == f"{root}/d/a.bin"

        def broken_mv(src, dst, **kw):
            raise OSError("simulated failure of the move")

        monkeypatch.setattr(fs, "mv", broken_mv)
        with pytest.raises(OSError, match="simulated"):
            put_atomic(fs, f"{root}/d/b.bin", b"data")
        assert fs.ls(f"{root}/d", detail=False) == [f"{root}/d/a.bin"]  # the temporary is removed
    finally:
        fs.rm(root, recursive=True)


def test_clean_temporaries_uses_the_one_rule(tmp_path):
    out = open_output(tmp_path)
    for sub, name in [("results", temporary_name("part-1.parquet")), ("videos", temporary_name("a.mp4")),
                      ("shards", temporary_name("00000.tar")), ("videos", "a.mp4")]:  # fmt: skip
        (tmp_path / sub).mkdir(exist_ok=True)
        (tmp_path / sub / name).write_bytes(b"x")
    assert clean_temporaries(out) == 3
    assert os.listdir(tmp_path / "videos") == ["a.mp4"]
