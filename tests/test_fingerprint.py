"""A fingerprint per row (``jobs.fingerprint``): a rerun notices ok rows whose image, seed,
generation values or model/VCUT settings changed, keeps them by default with one line, and
``--rerender changed`` renders exactly those; ``--dry-run`` shows the count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from jobs import results
from jobs.config import load_config
from jobs.fingerprint import Changes, job_key, row_fingerprint
from jobs.main import main
from jobs.planner import RowTask, plan_batches, resolve_params

ROOT = Path(__file__).resolve().parents[1]
TINY_JOB = str(ROOT / "examples" / "tiny-job.yaml")


def _cfg(*dotlist: str) -> dict:
    return OmegaConf.to_container(load_config(dotlist=list(dotlist)), resolve=True, enum_to_str=True)


def test_what_changes_a_fingerprint_and_what_does_not():
    cfg = _cfg()
    params = resolve_params({"seed": 1}, cfg["defaults"])
    base = row_fingerprint("a.png", params, job_key(cfg))
    assert base == row_fingerprint("a.png", dict(params), job_key(_cfg()))  # stable
    for changed in (
        row_fingerprint("b.png", params, job_key(cfg)),
        row_fingerprint("a.png", dict(params, seed=2), job_key(cfg)),
        row_fingerprint("a.png", dict(params, motion_bucket_id=3), job_key(cfg)),
        row_fingerprint("a.png", params, job_key(_cfg("model.vcut=exact"))),
        row_fingerprint("a.png", params, job_key(_cfg("model.id=other/model"))),
        row_fingerprint("a.png", params, job_key(_cfg("model.step_cache=2"))),
        row_fingerprint("a.png", params, job_key(_cfg("defaults.decode_chunk_size=2"))),
        row_fingerprint("a.png", params, job_key(_cfg("output.crf=30"))),
    ):
        assert changed != base
    for same in (  # levers that leave the frames as they are
        _cfg("model.compile=default"),
        _cfg("workers.batch_size=7"),
        _cfg("workers.render_batch=2"),
        _cfg("workers.count=3"),
        _cfg("images.read_timeout_s=5"),
    ):
        assert row_fingerprint("a.png", params, job_key(same)) == base


def _commit_ok(out: Path, cfg: dict, rows: list[dict]) -> None:
    changes = Changes(out, cfg, resolve_params)
    writer = results.ResultWriter(out)
    committed = []
    for row in rows:
        params = resolve_params(row, cfg["defaults"])
        committed.append(
            {
                "id": row["id"],
                "image": row["_image"],
                "status": "ok",
                **params,
                "fingerprint": changes.of(row),
            }
        )
    writer.commit(committed)


def test_the_planner_counts_changed_rows_and_renders_them_only_when_asked(tmp_path):
    cfg = _cfg()
    before = [{"id": f"r{i}", "_image": f"/img/{i}.png", "seed": i} for i in range(5)]
    _commit_ok(tmp_path / "out", cfg, before)
    now = [dict(r) for r in before]
    now[1]["seed"] = 99  # a changed seed
    now[3]["_image"] = "/img/other.png"  # a changed image
    now.append({"id": "new", "_image": "/img/new.png", "seed": 0})  # not rendered yet
    done = results.done_ids(tmp_path / "out")

    for rerender, expect in ((False, ["new"]), (True, ["r1", "r3", "new"])):
        changes = Changes(tmp_path / "out", cfg, resolve_params, rerender=rerender)
        counters = {"skipped": 0}
        key = changes.key
        make = lambda row, key=key: RowTask.from_row(row, cfg["defaults"], job_key=key)  # noqa: E731
        batches = list(plan_batches(iter([now]), done, 10, counters, make, changes=changes))
        tasks = [r for b in batches for r in b.rows]
        assert sorted(r.id for r in tasks) == sorted(expect)
        # the planner's record carries the fingerprint the commit writes (computed once, there)
        by_id = {r["id"]: r for r in now}
        assert [r.fingerprint for r in tasks] == [changes.of(by_id[r.id]) for r in tasks]
        assert tasks[0].result_row({"status": "ok"}, "full", 1)["fingerprint"] == tasks[0].fingerprint
        assert changes.changed == 2
        assert counters["skipped"] == (5 if not rerender else 3)
        line = changes.line()
        assert line.startswith("2 rows already ok") and "\n" not in line
        assert ("--rerender changed to render them again" in line) != rerender

    # another VCUT mode: every ok row changed
    changes = Changes(tmp_path / "out", _cfg("model.vcut=exact"), resolve_params)
    make = lambda row: RowTask.from_row(row, cfg["defaults"])  # noqa: E731
    list(plan_batches(iter([before]), done, 10, {"skipped": 0}, make, changes=changes))
    assert changes.changed == 5


@pytest.mark.slow
def test_rerun_reports_changed_rows_and_rerender_changed_renders_exactly_those(
    ray_address, tiny_model_dir, tmp_path, capsys
):
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        imgs.append(str(path))
    rows = [{"id": f"r{i}", "image": imgs[i % 2], "seed": i} for i in range(4)]
    manifest = tmp_path / "m.parquet"
    out = tmp_path / "out"
    args = ["run", str(manifest), "--out", str(out), "--model", str(tiny_model_dir), "--config", TINY_JOB]
    args += ["--workers", "1"]
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    assert main(args) == 0
    first = {r["id"]: r for r in pq.read_table(out / "results").to_pylist()}
    assert all(len(r["fingerprint"]) == 16 for r in first.values())
    capsys.readouterr()

    rows[1]["seed"] = 50  # the seed of r1 and the image of r2 change
    rows[2]["image"] = imgs[2]
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rendered_this_run"], summary["changed_ok_rows"]) == (0, 2)
    err = capsys.readouterr().err
    assert "2 rows already ok were kept although their image" in err and "--rerender changed" in err

    assert main([*args, "--dry-run"]) == 0
    assert "changed: 2 rows already ok whose inputs changed are kept" in capsys.readouterr().out

    assert main([*args, "--rerender", "changed"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rendered_this_run"], summary["changed_ok_rows"]) == (2, 2)
    after = {r["id"]: r for r in pq.read_table(out / "results").to_pylist()}
    assert after["r1"]["seed"] == 50 and after["r2"]["image"] == imgs[2]
    rerendered = {i for i in after if after[i]["committed_at"] != first[i]["committed_at"]}
    assert rerendered == {"r1", "r2"}
    assert {i for i in after if after[i]["fingerprint"] != first[i]["fingerprint"]} == {"r1", "r2"}

    assert main(args) == 0  # nothing changed any more
    assert json.loads((out / "summary.json").read_text())["changed_ok_rows"] == 0
