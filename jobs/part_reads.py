"""Reading one results part: a part that cannot be read because it is damaged (truncated,
corrupt, not Parquet) raises :class:`CorruptPartError`, one line that names the file and the
fix; a storage failure stays what it is (``jobs.output.OutputError``). ``jobs.results`` reads
every part through :func:`read_schema` and :func:`read_table`."""

from __future__ import annotations

import os
import posixpath

import pyarrow as pa

from jobs.output import OutputDir, OutputError


class CorruptPartError(ValueError):
    """A results part that cannot be read (truncated, corrupt, not Parquet): one line that
    names the file and the fix."""

    def __init__(self, uri: str, cause: BaseException):
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        super().__init__(
            f"results part {uri} is corrupt or truncated ({first}): move it out of results/ "
            "(e.g. into a folder beside it) and rerun: its rows render again"
        )
        self.uri = uri


def _damage(exc: BaseException) -> BaseException | None:
    """The read error when it says the file is damaged, None when the storage failed. The
    output folder (``OutputDir``) wraps every OSError as ``OutputError``: its cause decides."""
    if isinstance(exc, OutputError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, pa.ArrowInvalid):
        return exc
    text = str(exc).lower()
    words = ("corrupt", "deserializ", "end of", "magic bytes", "invalid")
    damaged = isinstance(exc, OSError) and exc.errno is None and any(w in text for w in words)
    return exc if damaged else None


def read_schema(out: OutputDir, path: str) -> pa.Schema:
    try:
        return out.read_schema(path)
    except Exception as exc:
        if (damage := _damage(exc)) is not None:
            raise CorruptPartError(_uri(out, path), damage) from exc
        raise


def read_table(out: OutputDir, path: str, columns: list[str] | None = None) -> pa.Table:
    try:
        return out.read_table(path, columns=columns)
    except Exception as exc:
        if (damage := _damage(exc)) is not None:
            raise CorruptPartError(_uri(out, path), damage) from exc
        raise


def _uri(out: OutputDir, path: str) -> str:
    return out.uri_of("results", (os.path if out.local else posixpath).basename(path))
