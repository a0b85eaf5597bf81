"""A real Prometheus server scrapes a real `vcut run` job; its counters must equal the results.

Starts Debian's ``prometheus`` binary on loopback with deploy/prometheus/prometheus.yml (the
job target pointed at the job's --metrics-port, 1 s scrape interval, the real alert rules),
runs a small job with the tiny random-weight model in a subprocess, then asks Prometheus'
HTTP query API for the scraped ``vcut_`` figures and compares them with the results table.
Also runs every dashboard query through the same API. No mock of Prometheus.

Without the binary the test fails when ``CI`` is set (``.ci/run`` installs it) and skips
otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
JOB_TIMEOUT_S = 480
LINGER_S = 3

pytestmark = pytest.mark.slow


def find_binary(name: str) -> str | None:
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
    if path is None:
        message = f"{name} is not installed (Debian: apt-get install -y prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read()


class Prometheus:
    """A real Prometheus server on loopback, for one test."""

    def __init__(self, binary: str, tmp: Path, targets: dict[str, str]) -> None:
        """``targets``: scrape job name in deploy/prometheus/prometheus.yml -> host:port to
        scrape instead; the other scrape jobs are left out (no Ray here)."""
        cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
        jobs = [j for j in cfg["scrape_configs"] if j["job_name"] in targets]
        assert len(jobs) == len(targets), f"no scrape job named {set(targets)} in prometheus.yml"
        for job in jobs:
            job["scrape_interval"] = "1s"
            job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        cfg["scrape_configs"] = jobs
        cfg["rule_files"] = [str(DEPLOY / "prometheus" / rf) for rf in cfg["rule_files"]]
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump(cfg))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "prometheus.log"
        self.log = open(self.log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if http_get(self.url + "/-/ready")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("prometheus did not become ready in 60 s")
            time.sleep(0.2)

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            status, body = http_get(url, timeout=10)
        except urllib.error.HTTPError as e:  # 400/422: a bad query; show Prometheus' message
            body = e.read()
            raise AssertionError(f"{url}: HTTP {e.code}: {body.decode()}") from e
        data = json.loads(body)
        assert data["status"] == "success", data
        return data["data"]

    def query(self, expr: str, **params: Any) -> list[dict]:
        return self.api("query", query=expr, **params)["result"]

    def scalar(self, expr: str, **params: Any) -> float:
        """The value of a one-series query; 0 for an empty result (a counter never created)."""
        result = self.query(expr, **params)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def write_inputs(tmp: Path) -> Path:
    """Images (one used twice, for a cache hit; one corrupt, for a failed row) and a manifest."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    images = tmp / "images"
    images.mkdir()
    paths = []
    for i in range(2):
        path = images / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    broken = images / "broken.png"
    broken.write_bytes(b"this is not a PNG file")
    manifest = tmp / "manifest.parquet"
    column = [paths[0], paths[1], paths[0], str(broken)]
    pq.write_table(pa.table({"image": column, "id": ["a", "b", "a-again", "broken"]}), manifest)
    return manifest


def run_job(manifest: Path, out: Path, model: Path, metrics_port: int, log: Path) -> int:
    argv = [
        sys.executable, "-m", "jobs.main", "run", str(manifest),
        "--out", str(out),
        "--model", str(model),
        "--workers", "1",
        "--metrics-port", str(metrics_port),
        f"metrics.linger_seconds={LINGER_S}",
        "defaults.height=64",
        "defaults.width=64",
        "defaults.num_frames=2",
        "defaults.num_inference_steps=2",
    ]  # fmt: skip
    env = subprocess_env(drop=("RAY_ADDRESS",))
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return proc.wait(JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the job and any Ray process it started
            proc.wait(30)
            pytest.fail(f"vcut run did not finish in {JOB_TIMEOUT_S} s:\n{log.read_text()[-5000:]}")


def expected_from_results(out: Path) -> dict[str, Any]:
    import pyarrow.compute as pc

    from jobs.results import read_results

    t = read_results(str(out))
    rows = t.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    return {
        "rows": len(rows),
        "ok": len(ok),
        "failed": sum(r["status"] == "failed" for r in rows),
        "frames": sum(r["frames"] or 0 for r in ok),
        "macs": sum(r["macs"] or 0 for r in ok),
        "macs_saved": sum(r["macs_saved"] or 0 for r in ok),
        "cache_hits": sum(r["cache_hit"] is True for r in rows),
        "cache_misses": sum(r["cache_hit"] is False for r in rows),
        "render_seconds_sum": sum(r["seconds"] for r in ok),
        "encode_seconds_sum": sum(r["encode_seconds"] for r in ok),
        "unet_steps": sum(r["num_inference_steps"] for r in ok),
        "denoise_seconds_sum": sum(r["denoise_seconds"] for r in ok),
        "workers": set(pc.unique(t.column("worker")).to_pylist()) - {None},
    }


def test_prometheus_scrapes_job_counters_equal_to_results(tmp_path, tiny_model_dir):
    binary = find_binary("prometheus")
    manifest = write_inputs(tmp_path)
    out = tmp_path / "out"
    metrics_port = free_port()
    prom = Prometheus(binary, tmp_path, {"vcut": f"127.0.0.1:{metrics_port}"})
    try:
        started = time.time()
        job_log = tmp_path / "job.log"
        rc = run_job(manifest, out, tiny_model_dir, metrics_port, job_log)
        assert rc in (0, 3), f"vcut run exited {rc}:\n{job_log.read_text()[-5000:]}"
        exp = expected_from_results(out)
        assert exp["rows"] == 4 and exp["ok"] >= 3 and exp["failed"] >= 1, exp
        assert exp["macs"] > 0 and exp["macs_saved"] > 0, "the tiny job should count VCUT MACs"

        # Final values, whether or not the target is still up: the newest scraped sample of
        # each series over the job's lifetime (the counters only grow within one job).
        window = f"{int(time.time() - started) + 60}s"

        def last(metric: str, sel: str = "") -> float:
            return prom.scalar(f"sum(last_over_time({metric}{{job='vcut'{sel}}}[{window}]))")

        # Wait until Prometheus has scraped the last row (the job lingers LINGER_S seconds).
        deadline = time.monotonic() + 20
        while last("vcut_videos_total") != exp["rows"] and time.monotonic() < deadline:
            time.sleep(0.5)

        got = {
            "rows": last("vcut_videos_total"),
            "ok": last("vcut_videos_total", ",status='ok'"),
            "failed": last("vcut_videos_total", ",status='failed'"),
            "frames": last("vcut_frames_rendered_total"),
            "macs": last("vcut_macs_total"),
            "macs_saved": last("vcut_macs_saved_total"),
            "cache_hits": last("vcut_embedding_cache_hits_total"),
            "cache_misses": last("vcut_embedding_cache_misses_total"),
            "ok_histogram_count": last("vcut_render_seconds_count"),
            "encode_count": last("vcut_encode_seconds_count"),
            "unet_steps": last("vcut_unet_step_seconds_count"),
        }
        want = {
            "rows": exp["rows"],
            "ok": exp["ok"],
            "failed": exp["failed"],
            "frames": exp["frames"],
            "macs": exp["macs"],
            "macs_saved": exp["macs_saved"],
            "cache_hits": exp["cache_hits"],
            "cache_misses": exp["cache_misses"],
            "ok_histogram_count": exp["ok"],
            "encode_count": exp["ok"],
            "unet_steps": exp["unet_steps"],
        }
        assert got == {k: float(v) for k, v in want.items()}, f"\nprometheus: {got}\nresults:    {want}"
        assert exp["cache_hits"] >= 1, "the repeated image should hit the embedding cache"
        for name, key in [
            ("vcut_render_seconds_sum", "render_seconds_sum"),
            ("vcut_encode_seconds_sum", "encode_seconds_sum"),
            ("vcut_unet_step_seconds_sum", "denoise_seconds_sum"),
        ]:
            assert last(name) == pytest.approx(exp[key], rel=1e-9, abs=1e-9), name

        # Labels: every worker of the results table, and the node.
        series = prom.query(f"last_over_time(vcut_videos_total{{job='vcut'}}[{window}])")
        assert {s["metric"]["worker"] for s in series} == exp["workers"]
        assert all(s["metric"].get("node") for s in series)
        assert prom.scalar(f"last_over_time(vcut_rows_pending{{job='vcut'}}[{window}])") == 0
        assert prom.scalar(f"max_over_time(up{{job='vcut'}}[{window}])") == 1

        # The alert rules loaded and evaluate without error on the real server.
        groups = prom.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert {r["name"] for r in rules} >= {"VcutHighFailureRatio", "VcutProgressStalled"}
        assert all(r.get("health") != "err" for r in rules), rules

        # Every dashboard query is valid PromQL for this server, evaluated at the last scrape
        # of the job; the stat panels show the results table's figures.
        samples = prom.query(f"vcut_build_info{{job='vcut'}}[{window}]")
        at = max(float(v[0]) for s in samples for v in s["values"])
        dash = json.loads((DEPLOY / "grafana" / "vcut-dashboard.json").read_text())
        values = {}
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", "1m").replace('=~"$job"', '=~".*"')
                assert "$" not in expr, expr
                values[(panel["title"], target["refId"])] = prom.query(expr, time=at)
        ratio = values[("MACs saved by VCUT", "A")]
        assert float(ratio[0]["value"][1]) == pytest.approx(
            exp["macs_saved"] / (exp["macs"] + exp["macs_saved"]), rel=1e-9
        )
        failed = values[("Failure ratio", "A")]
        assert float(failed[0]["value"][1]) == pytest.approx(exp["failed"] / exp["rows"])
        hit = values[("Embedding cache hit rate", "A")]
        assert float(hit[0]["value"][1]) == pytest.approx(
            exp["cache_hits"] / (exp["cache_hits"] + exp["cache_misses"])
        )
        done = values[("Videos done", "A")]
        assert float(done[0]["value"][1]) == exp["ok"]
    finally:
        prom.stop()
    log_text = prom.log_path.read_text()
    assert not re.search(r'level=error.*rule', log_text), log_text[-3000:]


def test_pushgateway_final_figures_reach_prometheus(tmp_path):
    """`--pushgateway`: the hook pushes at the end of a job to a real Pushgateway, which the
    deploy config's `vcut-pushgateway` scrape job (honor_labels) brings into Prometheus."""
    from jobs.metrics import make_metrics_hook

    prometheus = find_binary("prometheus")
    pushgateway = find_binary("prometheus-pushgateway")
    pg_port = free_port()
    pg_log = open(tmp_path / "pushgateway.log", "wb")
    pg = subprocess.Popen(
        # Its own persistence file: Debian's default (/var/lib/prometheus/pushgateway.data) is
        # shared by every run on the machine, so groups pushed by earlier runs would come back.
        [pushgateway, f"--web.listen-address=127.0.0.1:{pg_port}", "--log.level=warn",
         f"--persistence.file={tmp_path / 'pushgateway.data'}"],  # fmt: skip
        stdout=pg_log,
        stderr=subprocess.STDOUT,
    )
    prom = None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if http_get(f"http://127.0.0.1:{pg_port}/-/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert pg.poll() is None and time.monotonic() < deadline, "pushgateway did not start"
            time.sleep(0.2)
        prom = Prometheus(prometheus, tmp_path, {"vcut-pushgateway": f"127.0.0.1:{pg_port}"})

        hook = make_metrics_hook({"pushgateway": f"http://127.0.0.1:{pg_port}"})
        rows = [
            {"status": "ok", "worker": "w0", "node": "n0", "frames": 14, "seconds": 3.0,
             "encode_seconds": 0.5, "denoise_seconds": 2.0, "num_inference_steps": 4, "macs": 900,
             "macs_saved": 100, "cache_hit": i > 0}
            for i in range(3)
        ] + [{"status": "failed", "worker": "w0", "node": "n0", "cache_hit": None}]
        for row in rows:
            hook.on_result(row)
        hook.on_finish({})
        hook.close()

        sel = "{job='vcut'}"
        deadline = time.monotonic() + 20
        while prom.scalar(f"sum(vcut_videos_total{sel})") != 4 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert prom.scalar(f"sum(vcut_videos_total{sel})") == 4
        assert prom.scalar("sum(vcut_videos_total{job='vcut',status='failed'})") == 1
        assert prom.scalar(f"sum(vcut_frames_rendered_total{sel})") == 42
        assert prom.scalar(f"sum(vcut_macs_saved_total{sel})") == 300
        assert prom.scalar(f"sum(vcut_embedding_cache_hits_total{sel})") == 2
        assert prom.scalar(f"sum(vcut_unet_step_seconds_count{sel})") == 12
        # Pushed figures stay after the job: Prometheus keeps scraping them from the gateway.
        assert prom.scalar("max(push_time_seconds{job='vcut'})") > 0
    finally:
        if prom is not None:
            prom.stop()
        pg.terminate()
        try:
            pg.wait(20)
        except subprocess.TimeoutExpired:
            pg.kill()
            pg.wait(10)
        pg_log.close()
