"""A fingerprint per row: what determines its video, so that a rerun notices changed inputs.

A row's fingerprint is a hash (16 hex digits) of

- its image reference (the resolved path or URI, ``_image``; not the file's bytes: the driver
  does not read images),
- its generation values (``pipeline.params.ROW_PARAMS``, the row's own or the job's
  ``defaults.*``) and the job-only ones (``JOB_PARAMS``: ``decode_chunk_size``),
- the model and the levers that change the output (:data:`FINGERPRINT_KEYS`: model id,
  variant, dtype, VCUT mode, step caching; the encoding: format, crf, preset),

and not what leaves the frames as they are: compile mode, batch sizes, worker counts,
timeouts. The planner puts it on each row's record (``jobs.planner.RowTask.fingerprint``,
computed once with :func:`row_fingerprint`) and results rows carry it (``fingerprint``). On
a rerun, an id whose latest row is ``ok`` but whose fingerprint differs from what the
manifest and config give now is *changed*: kept and counted by default (one line at the
end, ``changed_ok_rows`` in ``summary.json``); with ``--rerender changed``
(``output.rerender=changed``) rendered again. Rows committed before fingerprints existed
have none and count as unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.compute as pc

from jobs import manifest, results
from jobs.output import OutputDir, open_output
from jobs.planner import resolve_params
from pipeline.params import JOB_PARAMS, ROW_PARAMS

#: (section, key) of the job config that change a row's video.
FINGERPRINT_KEYS = (
    ("model", "id"),
    ("model", "variant"),
    ("model", "dtype"),
    ("model", "vcut"),
    ("model", "step_cache"),
    ("model", "step_cache_depth"),
    ("output", "format"),
    ("output", "crf"),
    ("output", "preset"),
)
#: ``output.rerender`` values (``--rerender``).
RERENDER = ("changed",)


def job_key(cfg: dict[str, Any]) -> str:
    """The job's part of every fingerprint (``cfg``: the config as a plain dict)."""
    values = {f"{s}.{k}": cfg[s].get(k) for s, k in FINGERPRINT_KEYS}
    values.update({f"defaults.{k}": cfg["defaults"].get(k) for k in JOB_PARAMS})
    return json.dumps(values, sort_keys=True, default=str)


def row_fingerprint(image: str, params: dict[str, Any], key: str) -> str:
    """The fingerprint of a row rendering ``image`` with ``params`` (its resolved generation
    values) in a job of ``key`` (:func:`job_key`)."""
    text = json.dumps([key, str(image), {k: params.get(k) for k in ROW_PARAMS}], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _as_int(fingerprints: list[str | None]) -> np.ndarray:
    """Fingerprints as uint64 (0: none recorded), 8 bytes per row."""
    return np.array([int(f, 16) if f else 0 for f in fingerprints], dtype=np.uint64)


class Changes:
    """The ``ok`` rows of ``DIR`` whose fingerprint differs from the rows a manifest gives now.

    ``check`` takes a manifest chunk and the planner's skip mask (ids already ``ok``) and
    returns the mask to use: unchanged, with the changed ids counted (default), or with them
    no longer skipped (``rerender=True``). Memory: 16 bytes per committed ``ok`` id; the results
    are read streaming, one part at a time, ``id``, ``status`` and ``fingerprint`` only."""

    def __init__(
        self,
        out_dir: str | OutputDir,
        cfg: dict[str, Any],
        resolve: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] = resolve_params,
        rerender: bool = False,
    ):
        out = open_output(out_dir)
        self.key = job_key(cfg)
        self.defaults = cfg["defaults"]
        self.resolve = resolve  # the planner's: a row's generation values, the defaults' where unset
        self.rerender = rerender
        self.changed = 0
        self.ids = np.zeros(0, dtype=np.uint64)
        self.prints = np.zeros(0, dtype=np.uint64)
        schema = results.committed_schema(out)
        if schema is None or "fingerprint" not in schema.names:
            return
        ids, prints = [self.ids], [self.prints]
        for part in results.iter_results(out, ["id", "status", "fingerprint"]):
            fp = part.column("fingerprint")
            ok = pc.and_(pc.equal(part.column("status"), "ok"), pc.not_equal(fp, ""))
            part = part.filter(pc.fill_null(ok, False))
            ids.append(manifest.hash_ids(part.column("id").to_pylist()))
            prints.append(_as_int(part.column("fingerprint").to_pylist()))
        order = np.argsort(np.concatenate(ids))
        self.ids = np.concatenate(ids)[order]
        self.prints = np.concatenate(prints)[order]

    def of(self, row: dict[str, Any]) -> str:
        """The fingerprint of a manifest row (``_image`` and its own generation values)."""
        return row_fingerprint(row["_image"], self.resolve(row, self.defaults), self.key)

    def check(self, chunk: list[dict[str, Any]], skip: np.ndarray) -> np.ndarray:
        """The skip mask for ``chunk`` (see the class docstring)."""
        if self.ids.size == 0 or not skip.any():
            return skip
        hashes = manifest.hash_ids([r["id"] for r in chunk])
        pos = np.clip(np.searchsorted(self.ids, hashes), 0, self.ids.size - 1)
        known = skip & (self.ids[pos] == hashes)
        changed = np.zeros(skip.size, dtype=bool)
        for i in np.flatnonzero(known):
            changed[i] = int(self.prints[pos[i]]) != int(self.of(chunk[i]), 16)
        self.changed += int(changed.sum())
        return skip & ~changed if self.rerender else skip

    def report(self, summary: dict[str, Any], log: Any) -> None:
        """At the end of a job: ``changed_ok_rows`` into ``summary``, and :meth:`line` as a warning."""
        summary["changed_ok_rows"] = self.changed
        if self.line():
            log.warning("%s", self.line())

    def line(self) -> str | None:
        """One line about the changed rows (None when there are none)."""
        if not self.changed:
            return None
        what = "image, generation values, model or VCUT settings changed since they were rendered"
        if self.rerender:
            return f"{self.changed} rows already ok were rendered again (--rerender changed): {what}"
        return (
            f"{self.changed} rows already ok were kept although their {what}; "
            "rerun with --rerender changed to render them again"
        )
