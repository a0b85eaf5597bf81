"""A job whose manifest has image URLs on hosts that misbehave (loopback servers: one accepts
and never answers, one trickles a byte at a time, one sends an endless body) among good rows:
the good rows commit, each bad row fails alone with its one-line reason, and no worker is
taken for hung (the fetch happens in the worker, within ``images.*`` limits, before the model)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hostile_http import hostile_server

from jobs.main import main
from jobs.runner import BATCH_DEADLINE_FACTOR, batch_deadline

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bad_hosts_fail_their_own_rows_and_no_worker_is_killed(ray_address, tiny_model_dir, tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    good = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        good.append(str(path))
    with contextlib.ExitStack() as stack:
        urls = {
            kind: stack.enter_context(hostile_server(kind)) for kind in ("hang", "trickle", "endless", "good")
        }
        rows = [
            {"id": "good-0", "image": good[0]},
            {"id": "hang", "image": urls["hang"]},
            {"id": "good-1", "image": good[1]},
            {"id": "trickle", "image": urls["trickle"]},
            {"id": "endless", "image": urls["endless"]},
            {"id": "good-http", "image": urls["good"]},
            {"id": "good-2", "image": good[2]},
        ]
        manifest = tmp_path / "m.parquet"
        pq.write_table(pa.Table.from_pylist(rows), manifest)
        out = tmp_path / "out"
        args = ["run", str(manifest), "--out", str(out), "--model", str(tiny_model_dir)]
        args += ["--config", str(ROOT / "examples" / "tiny-job.yaml"), "--workers", "1"]
        # deadlines far below the time a hung fetch would take without limits: a worker stuck on
        # a host would be killed (and the rows charged attempts) on a build without them
        args += ["workers.start_timeout_s=120", "workers.batch_timeout_s=20", "workers.max_restarts=1"]
        args += ["images.connect_timeout_s=1", "images.read_timeout_s=2", "images.max_bytes=200000"]
        assert main(args) == 3
    err = capsys.readouterr().err
    assert "taken for hung" not in err and " died " not in err, err
    table = pq.read_table(out / "results").to_pylist()
    by_id = {r["id"]: r for r in table}
    assert {i for i, r in by_id.items() if r["status"] == "ok"} == {"good-0", "good-1", "good-2", "good-http"}
    for kind in ("hang", "trickle"):
        error = by_id[kind]["error"]
        assert error.startswith(
            f"ImageError: image '{urls[kind]}' cannot be read: unreachable (timeout after "
        ), error
    assert by_id["endless"]["error"] == (
        f"ImageError: image '{urls['endless']}' is too large (over 200000 bytes; max_bytes=200000)"
    )
    assert {r["attempts"] for r in table} == {1}  # nobody was charged a worker death
    assert {r["worker"] for r in table} == {"worker-0"}  # the one worker lived through the job


def test_the_hung_deadline_allows_the_fetch_and_learns_the_warm_up():
    # the fetch budget (images' timeouts) comes on top of the time allowed in the model
    assert batch_deadline(4, [10.0], None, fetch_s=30.0) == BATCH_DEADLINE_FACTOR * 4 * 10.0 + 30.0
    assert batch_deadline(4, [10.0], 50.0, fetch_s=30.0) == 80.0
    # a worker's first batch: start_timeout_s until a first batch was measured on the job ...
    assert batch_deadline(2, [1.0], None, 600.0) == 600.0
    # ... then that measured warm-up (x the factor), not start_timeout_s again for every worker
    assert batch_deadline(2, [1.0], None, 600.0, first_per_row=[20.0]) == BATCH_DEADLINE_FACTOR * 2 * 20.0
    assert batch_deadline(2, [1.0], None, 600.0, first_per_row=[400.0]) == 600.0  # never above it
