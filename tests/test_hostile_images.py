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

from jobs.dispatch import BATCH_DEADLINE_FACTOR, batch_deadline
from jobs.main import main

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


def test_the_next_batch_loads_its_images_while_the_current_one_renders(tmp_path):
    """The worker's two slots: batch B's image fetch must not wait for the render lock that
    batch A holds. A's render blocks until B's image was served by a loopback server; were the
    fetch under the lock, A would wait for B and B for A (the Event's wait would time out)."""
    import http.server
    import threading

    from hostile_http import png_bytes
    from omegaconf import OmegaConf

    from jobs.config import load_config
    from jobs.planner import RowTask
    from jobs.testing import FakeRenderer, fake_encode
    from jobs.worker import RenderWorker

    served = threading.Event()

    class Serve(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = png_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            served.set()

        def log_message(self, *args) -> None:
            pass

    waited: list[bool] = []

    class Blocking(FakeRenderer):
        def generate(self, image, **kwargs):
            if kwargs.get("seed") == 1:  # batch A's row: renders until B's image has been fetched
                waited.append(served.wait(timeout=60))
            return super().generate(image, **kwargs)

    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    cfg = OmegaConf.to_container(load_config(), resolve=True, enum_to_str=True)
    worker = RenderWorker(cfg, "w0", renderer_factory=lambda m, c: Blocking(), encoder=fake_encode)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Serve)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def task(image: str, seed: int) -> RowTask:
        row = {"id": str(seed), "image": image, "seed": seed}
        return RowTask.from_row(row, cfg["defaults"], str(tmp_path / f"{seed}.mp4"))

    out: dict[str, list] = {}
    try:
        a = threading.Thread(
            target=lambda: out.setdefault("a", worker.render_batch([task(str(tmp_path / "a.png"), 1)]))
        )
        a.start()
        while not worker._render_lock.locked():  # A holds the lock (renders) before B arrives
            threading.Event().wait(0.01)
        url = f"http://127.0.0.1:{server.server_port}/b.png"
        out["b"] = worker.render_batch([task(url, 2)])
        a.join(60)
    finally:
        server.shutdown()
    assert waited == [True]  # A's render saw B's image served
    assert [r["status"] for r in out["a"] + out["b"]] == ["ok", "ok"]


def test_the_pool_measures_first_batches_and_gives_the_next_worker_that_warm_up(monkeypatch, tmp_path):
    """``WorkerPool.done`` keeps the seconds per row of a worker's first batch apart; a later
    worker's first batch then gets 5 x that (plus the fetch budget), not start_timeout_s."""
    import sys
    import time

    from omegaconf import OmegaConf
    from test_fleet import _FakeRay, _ready, _task

    from jobs import output
    from jobs.config import load_config
    from jobs.planner import Batch
    from jobs.pool import WorkerPool
    from pipeline.fetch import fetch_budget_s

    monkeypatch.setitem(sys.modules, "ray", _FakeRay())
    cfg = load_config(dotlist=["workers.inflight_per_worker=1", "workers.start_timeout_s=600"])
    pool = WorkerPool(cfg, OmegaConf.to_container(cfg), output.open_output(tmp_path), lambda b, e: None)
    first, later = pool.start_worker(), pool.start_worker()
    _ready(pool, first)
    pool.submit(iter([Batch([_task(0, 64)])]))
    ref = next(iter(first.inflight))
    first.inflight[ref] = first.last_done = time.monotonic() - 20.0  # its first batch: 20 s a row
    pool.done(first, ref, 1)
    assert len(pool.first_per_row) == 1 and 20.0 <= pool.first_per_row[0] < 30.0
    _ready(pool, later)
    pool.submit(iter([Batch([_task(1, 128)])]))  # another shape: to the fresh worker
    assert len(later.inflight) == 1 and later.batches_done == 0
    for r in later.inflight:
        later.inflight[r] = later.last_done = 0.0  # its first batch started at 0
    fetch = fetch_budget_s(1, pool.fetch_limits)
    pool.check_deadlines(now=90.0 + fetch)  # 5 x 1 row x 20 s = 100 s (+ fetch): still in time
    assert later.alive
    pool.check_deadlines(now=160.0 + fetch)  # past 5 x the measured warm-up, far below 600 s
    assert not later.alive
