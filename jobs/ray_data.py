"""The renderer as a Ray Data transform, for users who build their datasets with Ray Data::

    import ray
    from jobs.ray_data import RenderVideos

    ds = ray.data.read_parquet("s3://bucket/prompts/")           # columns: image, seed, fps, ...
    ds = ds.map_batches(
        RenderVideos,
        fn_constructor_kwargs={"output_uri": "s3://bucket/videos/", "model": "/models/svd-xt",
                               "vcut": "full", "settings": {"defaults.num_inference_steps": 25}},
        concurrency=4, num_gpus=1, batch_size=8,
    )
    ds.write_parquet("s3://bucket/results/")                     # one row per video

Each actor builds one ``RenderVideos``: one model load, then every batch renders through the
same row code as ``vcut run``'s workers (``jobs.worker.RenderWorker.render_batch``): a row's
failure (a bad image, a value out of range, an encoder error) is that row's ``status=failed``
and ``error``, never an exception that would stop the dataset. The rows come back with the
generation values used, ``status``, ``error``, ``output`` (the video's URI) and the timing,
MAC, worker and node columns of ``vcut run``'s results (their types from
``jobs.results.RESULT_SCHEMA``). What it does not do, being one transform in someone else's
pipeline: resume (a row is rendered each time the dataset is executed), retries of a whole
batch, metrics, the job report.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.config import DEFAULT_MODEL, check_config, load_config
from jobs.manifest import default_id
from jobs.output import open_output, video_path
from jobs.planner import RowTask, batch_key_of, resolve_params
from jobs.results import RESULT_SCHEMA
from jobs.worker import RenderWorker
from pipeline.params import ROW_PARAMS

#: Result columns that belong to the job driver, not to a transform (resume, shards, commits).
_DRIVER_ONLY = ("attempts", "shard", "committed_at")


class RenderVideos:
    """A callable class for ``ray.data.Dataset.map_batches``: renders one video per row.

    Constructed once per actor (``fn_constructor_kwargs``), which loads the model:

    Args:
        output_uri: where the videos go, a local folder or an fsspec URI (``s3://``, ``gs://``
            ...); each row's video is ``<output_uri>/videos/<id>.<output.format>``, written
            atomically (never half-written under its name).
        model: a hub id or a local model folder (``model.id``).
        vcut: ``off``, ``exact`` or ``full`` (``model.vcut``).
        config: a ``vcut run`` YAML config file (optional).
        settings: ``vcut run``'s ``key=value`` overrides as a mapping, e.g.
            ``{"defaults.num_frames": 14, "model.step_cache": 2, "output.crf": 20}``: the
            ``defaults.*`` values are used for rows without that column.
        renderer_factory, encoder: test seams (``jobs.testing``); default: the real model and
            ffmpeg.

    A batch (any Ray Data batch format) has an ``image`` column (a path or URI, bytes, or an
    ``H x W x 3`` uint8 array) and any of the generation columns (``pipeline.params``: ``seed``,
    ``num_frames``, ``fps``, ...); a missing column or a null takes the ``defaults.*`` value.
    An ``id`` column names the videos; without one, a row's id is its image's stem and a hash
    of its image and generation values. The result is a ``pyarrow.Table``: the input columns
    (an array image excepted), the generation values used, and the result columns.
    """

    def __init__(
        self,
        output_uri: str,
        model: str = DEFAULT_MODEL,
        vcut: str = "full",
        config: str | None = None,
        settings: Mapping[str, Any] | None = None,
        *,
        renderer_factory: Callable[[dict, dict], Any] | None = None,
        encoder: Callable[..., float] | None = None,
    ) -> None:
        from omegaconf import OmegaConf

        cfg = load_config(config, {**(settings or {}), "model.id": str(model), "model.vcut": vcut})
        check_config(cfg)
        self.cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        self.out = open_output(output_uri)
        self.out.makedirs("videos")
        label = f"ray-data-{os.getpid()}"
        self.worker = RenderWorker(self.cfg, label, renderer_factory=renderer_factory, encoder=encoder)
        if self.worker.startup_error:  # no row could render: the actor fails, saying why
            raise RuntimeError(f"RenderVideos could not load the model: {self.worker.startup_error['error']}")

    def __call__(self, batch: Any) -> pa.Table:
        rows = _rows(batch)
        tasks, results = [], [None] * len(rows)
        for i, row in enumerate(rows):
            try:
                tasks.append((i, self._task(row)))
            except Exception as exc:  # a value that cannot be read: this row fails, not the batch
                first = (str(exc).strip().splitlines() or [""])[0]
                results[i] = {"status": "failed", "error": f"{type(exc).__name__}: {first}"}
        if tasks:
            for (i, _), result in zip(tasks, self.worker.render_batch([t for _, t in tasks]), strict=True):
                results[i] = result
        return _table(rows, results, self.cfg)

    def _task(self, row: dict[str, Any]) -> RowTask:
        """The worker's record of one row (``jobs.worker.RenderWorker.render_batch``)."""
        given = row.get("id")
        if given not in (None, ""):
            row["id"] = str(given)
        image = row.get("image")
        if image is None:
            raise ValueError("column 'image' is null")
        if isinstance(image, np.ndarray):
            from PIL import Image

            image = Image.fromarray(image)
        params = resolve_params(_present(row), self.cfg["defaults"])
        if given in (None, ""):
            row["id"] = _content_id(row, params)
        row["_params"] = params
        output = video_path(self.out, row["id"], self.cfg["output"]["format"])
        return RowTask(row["id"], image, params, batch_key_of(params), output=output)


def _rows(batch: Any) -> list[dict[str, Any]]:
    """A Ray Data batch (dict of numpy arrays, pandas DataFrame or pyarrow Table) as row dicts
    of plain Python values (numpy scalars unwrapped; arrays, e.g. images, kept)."""
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        batch = {c: batch[c].to_numpy() for c in batch.columns}
    columns = {k: list(v) for k, v in batch.items()}
    n = len(next(iter(columns.values()), []))
    return [{k: _plain(v[i]) for k, v in columns.items()} for i in range(n)]


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _present(row: dict[str, Any]) -> dict[str, Any]:
    """The generation values a row sets: nulls (None, NaN) count as missing; an integral float
    (pandas turns an int column with nulls into floats) as the integer."""
    present = {}
    for name in ROW_PARAMS:
        value = row.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        present[name] = int(value) if isinstance(value, float) and value.is_integer() else value
    return present


def _content_id(row: dict[str, Any], params: dict[str, Any]) -> str:
    """An id for a row without one: its image's stem and a hash of the image and its values."""
    image = row["image"]
    name = image if isinstance(image, str) else "image"
    source = image if isinstance(image, str) else hashlib.blake2b(np.asarray(image).tobytes()).hexdigest()
    digest = hashlib.blake2b(repr((source, sorted(params.items()))).encode(), digest_size=5).digest()
    return default_id(name, int.from_bytes(digest, "little"))


def _table(rows: list[dict], results: list[dict | None], cfg: dict) -> pa.Table:
    """The output rows: input columns, the generation values used, the result columns."""
    out_rows = []
    for row, result in zip(rows, results, strict=True):
        merged = {k: v for k, v in row.items() if not k.startswith("_")}
        if not isinstance(merged.get("image"), str | type(None)):
            merged.pop("image")  # an array: not carried back
        merged.update(row.get("_params") or {})
        merged.setdefault("vcut_mode", cfg["model"]["vcut"])
        merged.update(result or {})
        out_rows.append(merged)
    names = [f.name for f in RESULT_SCHEMA if f.name not in _DRIVER_ONLY]
    names += [k for r in out_rows for k in r if k not in names]
    names = list(dict.fromkeys(names))
    columns = {}
    for name in names:
        values = [r.get(name) for r in out_rows]
        if name in RESULT_SCHEMA.names:
            columns[name] = _typed(values, RESULT_SCHEMA.field(name).type)
            continue
        try:  # a carried input column, as Arrow infers it
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed or odd values: as text
            columns[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(columns)


def _typed(values: list[Any], typ: pa.DataType) -> pa.Array:
    """``values`` as ``typ``; a value that is not one (a failed row's bad input) becomes null."""
    try:
        return pa.array(values, type=typ)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([_or_none(v, typ) for v in values], type=typ)


def _or_none(value: Any, typ: pa.DataType) -> Any:
    try:
        pa.array([value], type=typ)
        return value
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return None
