"""Prometheus metrics for a ``vcut run`` job.

Everything is recorded on the driver from the committed result rows, so the exported
figures agree with the results table by construction. Each job gets its own
:class:`~prometheus_client.CollectorRegistry`, so several jobs in one process (tests,
notebooks) never clash, and nothing leaks into the process-global registry.

The driver uses it as a :class:`jobs.hooks.JobHook`, through :class:`jobs.hooks.SafeHook`
(which logs a failing method once and never lets it stop the job)::

    hook = make_metrics_hook(cfg.metrics)   # serves /metrics if cfg.metrics.port is set
    hook.on_pending(n)                       # rows still to render
    hook.on_workers(alive, busy)
    hook.on_result(row)                      # once per committed result row
    hook.on_finish(summary)                  # pushes to the Pushgateway, if one is set
    hook.close()                             # lingers ``linger_seconds``, then stops serving

What is counted, exactly (``row`` is one result row):

* ``vcut_videos_total{status,worker,node}``: +1 per row, ``status`` is ``"ok"`` or ``"failed"``.
* ``vcut_frames_rendered_total``, ``vcut_macs_total``, ``vcut_macs_saved_total``: the row's
  ``frames``, ``macs`` and ``macs_saved`` summed over ``ok`` rows (null counts as 0), as in
  ``summary.json``'s ``total_macs`` / ``total_macs_saved`` (a row that rendered but failed to
  encode is not counted).
* ``vcut_macs_saved_by_lever_total{lever,worker,node}``: the row's ``macs_saved_vcut``
  (``lever="vcut"``), ``macs_saved_step_cache`` (``lever="step_cache"``) and
  ``macs_saved_guidance`` (``lever="guidance"``, guidance on part of the schedule) over ``ok`` rows;
  summed over ``lever`` it equals ``vcut_macs_saved_total``.
* ``vcut_embedding_cache_hits_total`` / ``..._misses_total``: rows (any status) whose
  ``cache_hit`` is true / false; rows with a null ``cache_hit`` are not counted.
* Histograms observe ``ok`` rows only: ``vcut_render_seconds`` (``seconds``),
  ``vcut_encode_seconds`` (``encode_seconds``) and ``vcut_unet_step_seconds``, which
  observes ``denoise_seconds / num_inference_steps`` once per step, so that its ``_count``
  is the number of UNet steps (each a CFG batch) and its ``_sum`` the denoising seconds.
* Gauges: ``vcut_rows_pending``, ``vcut_workers_alive``, ``vcut_workers_busy``,
  ``vcut_gpu_memory_used_bytes{worker,node}`` (peak CUDA memory allocated during the
  worker's last video; only where a GPU exists), ``vcut_job_start_time_seconds``,
  ``vcut_last_progress_time_seconds`` (Unix time of the last result, or of the start; used by
  the stalled-progress alert),
  ``vcut_build_info{version}``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway, start_http_server

log = logging.getLogger(__name__)

PREFIX = "vcut_"

#: Default port in the deploy/ files (Prometheus scrape config, KubeRay manifests, Dockerfile).
DEFAULT_METRICS_PORT = 9410
DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PUSH_JOB = "vcut"

# Buckets cover both the tiny CPU model (milliseconds) and SVD-XT on a GPU (minutes).
RENDER_BUCKETS = (
    0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 240, 300, 450, 600, 900, 1200, 1800, 3600,
)
UNET_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 60)
ENCODE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)

WORKER_LABELS = ("worker", "node")

#: ``lever`` label values of ``vcut_macs_saved_by_lever_total`` -> the result row's field.
MAC_LEVERS = {
    "vcut": "macs_saved_vcut",
    "step_cache": "macs_saved_step_cache",
    "guidance": "macs_saved_guidance",
}

#: name -> (Prometheus type, label names). Counter names include ``_total`` as exposed.
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "vcut_videos_total": ("counter", ("status", *WORKER_LABELS)),
    "vcut_frames_rendered_total": ("counter", WORKER_LABELS),
    "vcut_macs_total": ("counter", WORKER_LABELS),
    "vcut_macs_saved_total": ("counter", WORKER_LABELS),
    "vcut_macs_saved_by_lever_total": ("counter", ("lever", *WORKER_LABELS)),
    "vcut_embedding_cache_hits_total": ("counter", WORKER_LABELS),
    "vcut_embedding_cache_misses_total": ("counter", WORKER_LABELS),
    "vcut_render_seconds": ("histogram", WORKER_LABELS),
    "vcut_unet_step_seconds": ("histogram", WORKER_LABELS),
    "vcut_encode_seconds": ("histogram", WORKER_LABELS),
    "vcut_rows_pending": ("gauge", ()),
    "vcut_workers_alive": ("gauge", ()),
    "vcut_workers_busy": ("gauge", ()),
    "vcut_gpu_memory_used_bytes": ("gauge", WORKER_LABELS),
    "vcut_job_start_time_seconds": ("gauge", ()),
    "vcut_last_progress_time_seconds": ("gauge", ()),
    "vcut_build_info": ("gauge", ("version",)),
}

#: Every metric name this module exports (as it appears in PromQL, before any
#: ``_bucket``/``_sum``/``_count``/``_created`` suffix).
METRIC_NAMES: frozenset[str] = frozenset(METRICS)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("vcut-render")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


def _get(cfg: Any, key: str, default: Any) -> Any:
    """Read ``key`` from a DictConfig, dataclass, mapping or ``None``, with a default."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None else value


def _num(value: Any) -> float:
    """A finite, non-negative number from a row field (None, NaN, negative -> 0)."""
    if value is None:
        return 0.0
    try:
        x = float(value)
    except (TypeError, ValueError):
        return 0.0
    return x if math.isfinite(x) and x > 0 else 0.0


class JobMetrics:
    """The metrics of one job, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        wl = list(WORKER_LABELS)
        self.videos = Counter(
            "vcut_videos", "Videos finished, by status (ok/failed).", ["status", *wl], registry=r
        )
        self.frames = Counter("vcut_frames_rendered", "Video frames rendered.", wl, registry=r)
        self.macs = Counter(
            "vcut_macs", "Multiply-accumulates spent by the UNet (VCUT accounting per video shape).", wl,
            registry=r,
        )
        self.macs_saved = Counter(
            "vcut_macs_saved", "Multiply-accumulates saved vs the stock UNet (all levers).", wl, registry=r
        )
        self.macs_saved_by_lever = Counter(
            "vcut_macs_saved_by_lever",
            "Multiply-accumulates saved versus the stock UNet, per lever (vcut, step_cache, guidance).",
            ["lever", *wl], registry=r,
        )
        self.cache_hits = Counter(
            "vcut_embedding_cache_hits", "Videos whose CLIP image embedding came from the cache.", wl,
            registry=r,
        )
        self.cache_misses = Counter(
            "vcut_embedding_cache_misses", "Videos whose CLIP image embedding had to be computed.", wl,
            registry=r,
        )
        self.render_seconds = Histogram(
            "vcut_render_seconds", "Render seconds per successful video.", wl, buckets=RENDER_BUCKETS,
            registry=r,
        )
        self.unet_step_seconds = Histogram(
            "vcut_unet_step_seconds", "Seconds per UNet denoising step (one CFG batch).", wl,
            buckets=UNET_STEP_BUCKETS, registry=r,
        )
        self.encode_seconds = Histogram(
            "vcut_encode_seconds", "Video encode seconds per successful video.", wl, buckets=ENCODE_BUCKETS,
            registry=r,
        )
        self.rows_pending = Gauge("vcut_rows_pending", "Manifest rows not yet rendered.", registry=r)
        self.workers_alive = Gauge("vcut_workers_alive", "Render workers alive.", registry=r)
        self.workers_busy = Gauge("vcut_workers_busy", "Render workers busy rendering.", registry=r)
        self.gpu_memory = Gauge(
            "vcut_gpu_memory_used_bytes", "Peak GPU memory allocated during each worker's last video.", wl,
            registry=r,
        )
        self.start_time = Gauge("vcut_job_start_time_seconds", "Unix time the job started.", registry=r)
        self.last_progress = Gauge(
            "vcut_last_progress_time_seconds", "Unix time of the last finished video (or of the start).",
            registry=r,
        )
        self.build_info = Gauge("vcut_build_info", "vcut-render version; always 1.", ["version"], registry=r)

        now = time.time()
        self.start_time.set(now)
        self.last_progress.set(now)
        self.build_info.labels(version=_version()).set(1)

    def record(self, row: Mapping[str, Any]) -> None:
        """Record one committed result row."""
        worker = str(row.get("worker") or "unknown")
        node = str(row.get("node") or "unknown")
        status = str(row.get("status") or "unknown")
        labels = {"worker": worker, "node": node}

        self.videos.labels(status=status, **labels).inc()
        # Create the work counters at 0 for every worker, so rate() sees their first increase.
        frames, macs, saved = (c.labels(**labels) for c in (self.frames, self.macs, self.macs_saved))
        by_lever = {lever: self.macs_saved_by_lever.labels(lever=lever, **labels) for lever in MAC_LEVERS}

        cache_hit = row.get("cache_hit")
        if cache_hit is not None:
            (self.cache_hits if bool(cache_hit) else self.cache_misses).labels(**labels).inc()

        if status == "ok":
            frames.inc(_num(row.get("frames")))
            macs.inc(_num(row.get("macs")))
            saved.inc(_num(row.get("macs_saved")))
            for lever, key in MAC_LEVERS.items():
                by_lever[lever].inc(_num(row.get(key)))
            if row.get("seconds") is not None:
                self.render_seconds.labels(**labels).observe(_num(row["seconds"]))
            if row.get("encode_seconds") is not None:
                self.encode_seconds.labels(**labels).observe(_num(row["encode_seconds"]))
            steps = int(_num(row.get("num_inference_steps")))
            if steps > 0 and row.get("denoise_seconds") is not None:
                per_step = _num(row["denoise_seconds"]) / steps
                hist = self.unet_step_seconds.labels(**labels)
                for _ in range(steps):
                    hist.observe(per_step)

        gpu_bytes = row.get("gpu_memory_bytes")
        if gpu_bytes is not None:
            self.gpu_memory.labels(**labels).set(_num(gpu_bytes))

        self.last_progress.set(time.time())


class PushError(RuntimeError):
    """The final push to the Pushgateway failed (the message names the gateway)."""


class MetricsHook:
    """The job's :class:`jobs.hooks.JobHook`; see the module docstring.

    Construction raises ``OSError`` if ``port`` cannot be bound (better at the start than a
    blank dashboard hours later). The ``on_*`` methods may raise (a Pushgateway that does not
    answer is a :class:`PushError`): the driver calls them through :class:`jobs.hooks.SafeHook`,
    the one place where a hook's failure is logged and kept from stopping the job.
    """

    def __init__(
        self,
        port: int | None = None,
        address: str = DEFAULT_ADDRESS,
        pushgateway: str | None = None,
        linger_seconds: float = 0.0,
        push_job: str = DEFAULT_PUSH_JOB,
    ) -> None:
        self.metrics = JobMetrics()
        self.registry = self.metrics.registry
        self.address = address
        self.pushgateway = pushgateway
        self.linger_seconds = max(0.0, float(linger_seconds))
        self.push_job = push_job
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self._closed = False
        if port is not None:
            # Raises (OSError) if the port is taken: better to fail at start than to run for
            # hours with a dashboard that shows nothing.
            self._server, self._thread = start_http_server(int(port), addr=address, registry=self.registry)
            self.port = int(self._server.server_port)
            log.info("serving Prometheus metrics on http://%s:%d/metrics", address, self.port)

    @property
    def url(self) -> str | None:
        """The ``/metrics`` URL being served, or None."""
        return None if self.port is None else f"http://{self.address}:{self.port}/metrics"

    def on_result(self, row: Mapping[str, Any]) -> None:
        self.metrics.record(row)

    def on_pending(self, n: int) -> None:
        self.metrics.rows_pending.set(max(0, int(n)))

    def on_workers(self, alive: int, busy: int) -> None:
        self.metrics.workers_alive.set(max(0, int(alive)))
        self.metrics.workers_busy.set(max(0, int(busy)))

    def on_finish(self, summary: Mapping[str, Any] | None = None) -> None:
        """End of job: no worker is busy any more; push the final figures to the Pushgateway,
        if one is configured, in the one group ``job=<push_job>``: each job's push replaces the
        last one's (a group per run would pile up in the gateway, which never forgets one)."""
        self.metrics.workers_busy.set(0)
        if not self.pushgateway:
            return
        try:
            push_to_gateway(self.pushgateway, job=self.push_job, registry=self.registry)
            log.info("pushed final metrics to %s (job=%s)", self.pushgateway, self.push_job)
        except Exception as exc:  # SafeHook logs it: the results are written, the job did not fail
            raise PushError(f"push to Pushgateway {self.pushgateway} failed: {exc}") from exc

    def close(self) -> None:
        """Stop serving, after ``linger_seconds`` so a scraper sees the final values. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        if self.linger_seconds > 0:
            log.info("metrics: serving final values for %.1f s before shutting down", self.linger_seconds)
            time.sleep(self.linger_seconds)
        try:
            server.shutdown()
            server.server_close()
            if thread is not None:
                thread.join(timeout=5)
        except Exception:
            log.exception("metrics: error while stopping the HTTP server")

    def __enter__(self) -> MetricsHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_metrics_hook(cfg: Any = None) -> MetricsHook:
    """Build the job's metrics hook from ``cfg.metrics``.

    Fields read (attribute or key; missing or null means the default):
    ``port`` (None: do not serve; 0: any free port, see ``hook.port``), ``address``
    (``127.0.0.1``), ``pushgateway`` (URL or None), ``linger_seconds`` (0),
    ``push_job`` (``"vcut"``, the Pushgateway job name).
    """
    port = _get(cfg, "port", None)
    return MetricsHook(
        port=None if port is None else int(port),
        address=str(_get(cfg, "address", DEFAULT_ADDRESS)),
        pushgateway=_get(cfg, "pushgateway", None) or None,
        linger_seconds=float(_get(cfg, "linger_seconds", 0.0)),
        push_job=str(_get(cfg, "push_job", DEFAULT_PUSH_JOB)),
    )
