"""``jobs.ray_data.RenderVideos``: the renderer as a ``Dataset.map_batches`` transform.

In-process with ``jobs.testing``'s fake renderer (batch formats, defaults, ids, bad rows);
then in a real Ray Data pipeline on the tiny random-weight model (``slow``: Ray, a model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from jobs.config import load_config
from jobs.ray_data import RenderVideos
from jobs.results import RESULT_SCHEMA
from jobs.testing import fake_renderer, fake_seams
from pipeline.params import GENERATION_PARAMS, ROW_PARAMS

ROOT = Path(__file__).resolve().parents[1]
TINY_JOB = str(ROOT / "examples" / "tiny-job.yaml")
RESULT_COLUMNS = [f.name for f in RESULT_SCHEMA if f.name not in ("attempts", "shard", "committed_at")]


def _images(folder: Path) -> tuple[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    good, bad = folder / "good.png", folder / "bad.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(good)
    bad.write_bytes(b"this is not a png")
    return str(good), str(bad)


def _by_id(table: pa.Table) -> dict[str, dict]:
    return {r["id"]: r for r in table.to_pylist()}


def test_rows_render_with_defaults_and_bad_rows_fail_alone(tmp_path):
    good, bad = _images(tmp_path / "in")
    render = RenderVideos(
        str(tmp_path / "out"),
        "unused",
        settings={"defaults.fps": 9},
        **fake_seams(video_bytes=5, load_images=True),
    )
    batch = {  # Ray Data's default batch format: a dict of numpy arrays
        "id": np.array(["a", "b", "c", "d"], dtype=object),
        "image": np.array([good, good, bad, good], dtype=object),
        "seed": np.array([3, 4, 5, 6]),
        "fps": np.array([12.0, np.nan, 7.0, 7.0]),  # a null: the default
        "num_frames": np.array([None, None, None, "many"], dtype=object),  # a value that is not one
        "note": np.array(["x", "y", "z", "w"], dtype=object),  # carried through
    }
    table = render(batch)
    assert table.column_names[: len(RESULT_COLUMNS)] == RESULT_COLUMNS and "note" in table.column_names
    for name in RESULT_COLUMNS:  # the types of vcut run's results
        assert table.schema.field(name).type == RESULT_SCHEMA.field(name).type, name
    rows = _by_id(table)
    defaults = load_config().defaults
    assert rows["a"]["status"] == "ok" and rows["a"]["error"] is None
    assert (rows["a"]["seed"], rows["a"]["fps"], rows["a"]["num_frames"]) == (3, 12, defaults.num_frames)
    assert rows["b"]["status"] == "ok" and rows["b"]["fps"] == 9  # settings' defaults.fps
    assert rows["a"]["output"] == str(tmp_path / "out" / "videos" / "a.mp4")
    assert Path(rows["a"]["output"]).read_bytes() == b"\0" * 5  # the encoder wrote it there
    assert rows["c"]["status"] == "failed" and rows["c"]["error"].startswith(f"ImageError: image '{bad}'")
    assert rows["c"]["output"] is None and not (tmp_path / "out" / "videos" / "c.mp4").exists()
    assert rows["d"]["status"] == "failed" and "num_frames" in rows["d"]["error"]
    assert [rows[i]["note"] for i in "abcd"] == ["x", "y", "z", "w"]
    assert {r["vcut_mode"] for r in rows.values()} == {"full"}


def test_batch_formats_ids_and_array_images(tmp_path):
    good, _ = _images(tmp_path / "in")
    render = RenderVideos(str(tmp_path / "out"), "unused", renderer_factory=fake_renderer)
    pixels = np.asarray(Image.open(good))
    frames = [
        pd.DataFrame({"image": [good, good], "seed": [1, 1]}),  # pandas
        pa.table({"image": [good, good], "seed": [1, 2]}),  # pyarrow
        {"image": np.stack([pixels, pixels[::-1]]), "seed": np.array([1, 1])},  # arrays (read_images)
    ]
    ids = []
    for batch in frames:
        table = render(batch)
        assert table["status"].to_pylist() == ["ok", "ok"], table["error"].to_pylist()
        ids.append(table["id"].to_pylist())
    # without an id column: the image's stem and a hash of the image and the values
    assert ids[0][0] == ids[0][1] == ids[1][0] != ids[1][1] and ids[0][0].startswith("good-")
    assert ids[2][0] != ids[2][1] and all(i.startswith("image-") for i in ids[2])
    assert render(frames[2])["image"].null_count == 2  # an array image is not carried back


def test_a_null_image_fails_its_row_and_ids_are_text(tmp_path):
    good, _ = _images(tmp_path / "in")
    render = RenderVideos(str(tmp_path / "out"), "unused", renderer_factory=fake_renderer)
    table = render({"id": np.array([7, 8]), "image": np.array([good, None], dtype=object)})
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["7", "8"] and rows[0]["status"] == "ok"
    assert rows[1]["status"] == "failed" and rows[1]["error"] == "ValueError: column 'image' is null"


def test_a_model_that_does_not_load_fails_the_actor(tmp_path):
    with pytest.raises(RuntimeError, match="RenderVideos could not load the model: .*no-such-model"):
        RenderVideos(str(tmp_path / "out"), str(tmp_path / "no-such-model"), settings={"model.device": "cpu"})


@pytest.mark.slow  # Ray, and the tiny model rendering
def test_in_a_ray_data_pipeline_on_the_tiny_model(ray_address, tiny_model_dir, tmp_path):
    import ray

    from pipeline.probe import probe_video

    ray.data.DataContext.get_current().enable_progress_bars = False
    good, bad = _images(tmp_path / "in")
    items = [
        {"id": "a", "image": good, "seed": 1},
        {"id": "b", "image": good, "seed": 2, "num_frames": 3},
        {"id": "broken", "image": bad, "seed": 3},
        {"id": "c", "image": good},  # no seed: the default
    ]
    out = tmp_path / "out"
    ds = ray.data.from_items(items).map_batches(
        RenderVideos,
        fn_constructor_kwargs={
            "output_uri": str(out),
            "model": str(tiny_model_dir),
            "vcut": "exact",
            "config": TINY_JOB,
        },
        concurrency=1,
        batch_size=2,
    )
    rows = _by_id(pa.concat_tables(ray.get(ds.to_arrow_refs())))
    assert sorted(rows) == ["a", "b", "broken", "c"]
    assert rows["broken"]["status"] == "failed" and rows["broken"]["error"].startswith("ImageError: ")
    assert bad in rows["broken"]["error"] and rows["broken"]["output"] is None
    seeds = {i: rows[i]["seed"] for i in "abc"}
    assert seeds == {"a": 1, "b": 2, "c": GENERATION_PARAMS["seed"].default}
    for i in "abc":
        row = rows[i]
        assert row["status"] == "ok" and row["error"] is None and row["vcut_mode"] == "exact", row
        assert row["macs"] > 0 and row["macs_saved"] > 0 and row["seconds"] > 0
        assert row["worker_pid"] and row["node_id"] and row["finished_at"] is not None
        assert row["output"] == str(out / "videos" / f"{i}.mp4")
        video = probe_video(row["output"])
        assert (video.width, video.height) == (64, 64), video
        assert video.frames == row["frames"] == (3 if i == "b" else 4)
    assert {k for k in rows["a"]} >= set(RESULT_COLUMNS) | set(ROW_PARAMS)
