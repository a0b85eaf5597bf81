"""Unit tests for jobs.metrics: synthetic rows in, Prometheus text exposition out (over HTTP)."""

from __future__ import annotations

import http.server
import re
import threading
import time
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobs import metrics
from jobs.hooks import SafeHook

ROWS = [
    dict(id="a", status="ok", worker="w0", node="n0", frames=14, seconds=2.0, encode_seconds=0.25,
         denoise_seconds=1.5, num_inference_steps=3, macs=1000, macs_saved=200, cache_hit=False,
         gpu_memory_bytes=1 << 30, vcut_mode="full"),
    dict(id="b", status="ok", worker="w0", node="n0", frames=14, seconds=4.0, encode_seconds=0.5,
         denoise_seconds=3.0, num_inference_steps=3, macs=1000, macs_saved=200, cache_hit=True,
         gpu_memory_bytes=2 << 30, vcut_mode="full"),
    dict(id="c", status="ok", worker="w1", node="n1", frames=25, seconds=10.0, encode_seconds=1.0,
         denoise_seconds=8.0, num_inference_steps=4, macs=3000, macs_saved=0, cache_hit=False,
         gpu_memory_bytes=None, vcut_mode="off"),
    dict(id="d", status="failed", worker="w1", node="n1", frames=0, seconds=None, encode_seconds=None,
         denoise_seconds=None, num_inference_steps=4, macs=None, macs_saved=None, cache_hit=None,
         gpu_memory_bytes=None, vcut_mode="full"),
    # Rendered, then the encode failed: its work is not counted as rendered frames or MACs.
    dict(id="e", status="failed", worker="w0", node="n0", frames=14, seconds=2.0, encode_seconds=None,
         denoise_seconds=1.5, num_inference_steps=3, macs=1000, macs_saved=200, cache_hit=True,
         gpu_memory_bytes=3 << 30, vcut_mode="full"),
]


def scrape(url: str) -> dict[str, list]:
    """Scrape ``url`` and return {sample name: [(labels, value), ...]}."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(samples: dict[str, list], name: str, **match: str) -> float:
    return sum(v for labels, v in samples.get(name, []) if all(labels.get(k) == x for k, x in match.items()))


@pytest.fixture
def hook():
    h = metrics.make_metrics_hook(SimpleNamespace(port=0, address="127.0.0.1", pushgateway=None))
    yield h
    h.close()


def test_serves_metrics_that_agree_with_rows(hook):
    hook.on_pending(7)
    hook.on_workers(2, 1)
    for row in ROWS:
        hook.on_result(row)
    hook.on_pending(3)
    s = scrape(hook.url)

    ok = [r for r in ROWS if r["status"] == "ok"]
    assert total(s, "vcut_videos_total", status="ok") == 3
    assert total(s, "vcut_videos_total", status="failed") == 2
    assert total(s, "vcut_videos_total", status="ok", worker="w0", node="n0") == 2
    assert total(s, "vcut_frames_rendered_total") == sum(r["frames"] for r in ok)
    assert total(s, "vcut_frames_rendered_total", worker="w1") == 25
    assert total(s, "vcut_macs_total") == 5000
    assert total(s, "vcut_macs_saved_total") == 400
    assert total(s, "vcut_embedding_cache_hits_total") == 2
    assert total(s, "vcut_embedding_cache_misses_total") == 2  # the failed row's null is not counted
    assert total(s, "vcut_rows_pending") == 3
    assert total(s, "vcut_workers_alive") == 2
    assert total(s, "vcut_workers_busy") == 1
    hook.on_finish({})
    assert total(scrape(hook.url), "vcut_workers_busy") == 0

    assert total(s, "vcut_render_seconds_count") == len(ok)
    assert total(s, "vcut_render_seconds_sum") == pytest.approx(sum(r["seconds"] for r in ok))
    assert total(s, "vcut_encode_seconds_count") == len(ok)
    assert total(s, "vcut_encode_seconds_sum") == pytest.approx(1.75)
    # One observation per UNet step: count = steps, sum = denoise seconds.
    assert total(s, "vcut_unet_step_seconds_count") == 3 + 3 + 4
    assert total(s, "vcut_unet_step_seconds_sum") == pytest.approx(1.5 + 3.0 + 8.0)
    # 1.5 s / 3 steps = 0.5 s per step for row a: all 3 in the le=0.5 bucket of w0.
    assert total(s, "vcut_unet_step_seconds_bucket", worker="w0", le="0.5") == 3
    assert total(s, "vcut_render_seconds_bucket", worker="w1", le="+Inf") == 1

    # GPU memory: last value per worker, absent where no GPU reported.
    assert total(s, "vcut_gpu_memory_used_bytes", worker="w0") == 3 << 30
    assert not [lbl for lbl, _ in s.get("vcut_gpu_memory_used_bytes", []) if lbl["worker"] == "w1"]

    assert total(s, "vcut_build_info") == 1
    assert total(s, "vcut_last_progress_time_seconds") >= total(s, "vcut_job_start_time_seconds") > 0


def test_metric_names_follow_conventions_and_match_exposition(hook):
    for row in ROWS:
        hook.on_result(row)
    hook.on_workers(1, 0)
    s = scrape(hook.url)
    exposed = {re.sub(r"_(bucket|sum|count|created)$", "", n) for n in s}
    exposed |= {n for n in s if n.endswith("_total")}
    assert metrics.METRIC_NAMES <= exposed, metrics.METRIC_NAMES - exposed
    for name, (kind, labels) in metrics.METRICS.items():
        assert name.startswith("vcut_")
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", name)
        if kind == "counter":
            assert name.endswith("_total")
        else:
            assert not name.endswith("_total")
        if kind == "histogram":
            assert name.endswith("_seconds")
        for labels_seen, _ in s.get(name if kind != "histogram" else name + "_count", []):
            assert set(labels_seen) == set(labels), name


def test_bad_rows_count_as_zero_and_bad_counts_are_logged_once(hook, caplog):
    hook.on_result({"status": "ok", "frames": "not a number", "macs": -5, "seconds": float("nan")})
    hook.on_result({})  # nothing at all
    safe = SafeHook(hook)  # as the driver calls it: a bad count is logged, not raised
    safe.on_pending("x")  # type: ignore[arg-type]
    safe.on_pending("y")  # type: ignore[arg-type]
    s = scrape(hook.url)
    assert total(s, "vcut_videos_total") == 2
    assert total(s, "vcut_macs_total") == 0
    assert caplog.text.count("MetricsHook.on_pending failed") == 1


def test_separate_registries_and_port_reuse():
    a = metrics.make_metrics_hook(SimpleNamespace(port=0))
    port = a.port
    a.on_result(ROWS[0])
    a.close()
    a.close()  # idempotent
    b = metrics.make_metrics_hook({"port": port, "address": "127.0.0.1"})  # the same port is free again
    try:
        s = scrape(b.url)
        assert total(s, "vcut_videos_total") == 0  # nothing from job a
    finally:
        b.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(b.url, timeout=2)


def test_no_port_serves_nothing():
    h = metrics.make_metrics_hook(None)
    assert h.port is None and h.url is None
    h.on_result(ROWS[0])
    h.on_finish({})
    h.close()


def test_omegaconf_config_and_linger(monkeypatch):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"port": 0, "address": "127.0.0.1", "pushgateway": None, "linger_seconds": 0.3})
    h = metrics.make_metrics_hook(cfg)
    assert h.linger_seconds == pytest.approx(0.3)
    url = h.url
    # close() lingers with time.sleep: replaced by a wait on events, so that the scrape below
    # happens during the linger (not before close() began, nor after it ended on a busy CPU)
    lingering, scraped = threading.Event(), threading.Event()
    waits: list = []

    def linger(seconds: float) -> None:
        waits.append(seconds)
        lingering.set()
        assert scraped.wait(30)

    fake_time = SimpleNamespace(sleep=linger, monotonic=time.monotonic, time=time.time)
    monkeypatch.setattr(metrics, "time", fake_time)
    t = threading.Thread(target=h.close)
    t.start()
    try:
        assert lingering.wait(30), "close() did not linger"
        assert total(scrape(url), "vcut_videos_total") == 0  # still served during the linger
    finally:
        scraped.set()
        t.join(30)
    assert not t.is_alive() and waits == [pytest.approx(0.3)]
    with pytest.raises(OSError):  # and no longer served once close() has returned
        urllib.request.urlopen(url, timeout=2)


class _PushSink(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _PushSink.received.append((self.path, body.decode()))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_pushgateway_push_on_finish():
    server = http.server.HTTPServer(("127.0.0.1", 0), _PushSink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _PushSink.received.clear()
    try:
        h = metrics.make_metrics_hook({"pushgateway": f"http://127.0.0.1:{server.server_port}"})
        for row in ROWS:
            h.on_result(row)
        h.on_finish({})
        h.close()
    finally:
        server.shutdown()
        server.server_close()
    (path, body), = _PushSink.received
    assert path == "/metrics/job/vcut"
    pushed = {}
    for family in text_string_to_metric_families(body):
        for smp in family.samples:
            pushed[smp.name] = pushed.get(smp.name, 0) + smp.value
    assert pushed["vcut_videos_total"] == 5
    assert pushed["vcut_macs_saved_total"] == 400


def test_push_failure_names_the_gateway_and_is_logged_by_the_driver(caplog):
    h = metrics.make_metrics_hook({"pushgateway": "http://127.0.0.1:9"})  # nothing listens on port 9
    with pytest.raises(metrics.PushError, match="push to Pushgateway http://127.0.0.1:9 failed"):
        h.on_finish({})
    SafeHook(h).on_finish({})  # the driver's call: one warning line, no exception
    h.close()
    assert caplog.text.count("push to Pushgateway http://127.0.0.1:9 failed") == 1


def test_hook_from_the_real_job_config():
    from jobs.config import load_config

    cfg = load_config(dotlist=["metrics.port=0"])  # read-only, struct-mode DictConfig
    h = metrics.make_metrics_hook(cfg.metrics)
    try:
        assert h.port and h.address == "127.0.0.1" and h.pushgateway is None
        assert h.linger_seconds == float(getattr(cfg.metrics, "linger_seconds", 0.0))
        h.on_result(ROWS[0])
        assert total(scrape(h.url), "vcut_videos_total") == 1
    finally:
        h.close()
    assert metrics.make_metrics_hook(load_config().metrics).port is None  # no port: nothing served
