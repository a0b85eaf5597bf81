"""The job configuration: a typed omegaconf schema, merged defaults < YAML < flags < dotlist."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, make_dataclass
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.compile_modes import compile_mode
from pipeline.fetch import FetchLimits
from pipeline.params import GENERATION_PARAMS, check_generation
from pipeline.quantize import QUANTIZE_MODES
from pipeline.storage import is_remote, local_path
from vcut.modes import MODES

DEFAULT_MODEL = "stabilityai/stable-video-diffusion-img2vid-xt"


class Layout(str, Enum):
    files = "files"  # DIR/videos/<id>.<format>
    webdataset = "webdataset"  # DIR/shards/NNNNN.tar (+ .parquet, _stats.json): jobs/shards.py


#: the VCUT modes as an omegaconf enum, built from the one list (vcut.modes, torch-free)
VcutMode = Enum("VcutMode", {mode: mode for mode in MODES}, type=str)


@dataclass
class ModelConfig:
    id: str = DEFAULT_MODEL  # hub id or local folder
    vcut: VcutMode = VcutMode.full
    device: str | None = None  # None: cuda when the worker has a GPU, else cpu
    dtype: str | None = None  # None: fp16 on GPU, fp32 on CPU (the Renderer's choice)
    variant: str | None = None
    # torch.compile mode: auto (compile on CUDA where the job's rows per worker and shape pay
    # the compile back: pipeline.compile.compile_pays), off, default, max-autotune or
    # reduce-overhead (a YAML true/false is read as default/off); see model_compile_mode.
    compile: str = "auto"
    # torch's compile artifacts shared by the job's workers and later jobs: a folder or URI
    # (s3://...); null: DIR/compile-cache; off: none (pipeline.compile_cache).
    compile_cache: str | None = None
    allow_pickle: bool = False
    local_files_only: bool | None = None
    # Step caching (changes the output): the whole UNet every N-th step, the shallow path between.
    step_cache: int | None = None  # None or 1: off
    step_cache_depth: int = 1  # outer down/up levels that always run
    # off or fp8: the UNet's Linear layers in FP8 (changes the output; compute capability >= 8.9)
    quantize: str = "off"


#: Defaults for the manifest's optional columns (a row's own value wins): one typed field per
#: parameter of ``pipeline.params.GENERATION_PARAMS``, built from that declaration (name, type,
#: default), so the config cannot drift from the manifest, the renderer and the results.
GenerationConfig = make_dataclass(
    "GenerationConfig",
    [
        (p.name, p.type | None if p.optional else p.type, field(default=p.default))
        for p in GENERATION_PARAMS.values()
    ],
    namespace={
        "__doc__": "Defaults for the manifest's optional columns (a row's own value wins).\n\n"
        + "\n".join(f"{p.name}: {p.help()}" for p in GENERATION_PARAMS.values()),
        "__module__": __name__,
    },
)


@dataclass
class OutputConfig:
    format: str = "mp4"
    crf: int = 18
    preset: str = "medium"
    overwrite: bool = False  # render rows that are already ``ok`` again
    # "changed": render again the ok rows whose inputs changed (jobs.fingerprint); None: keep them
    rerender: str | None = None
    layout: Layout = Layout.files
    shard_size: int = 1000  # samples per shard (layout webdataset)
    # A worker publishes its open shard once it has been open this long, full or not: what a
    # worker's death can cost in renders (they render again) is bounded (jobs/shards.py).
    shard_max_age_s: float = 600.0
    caption_column: str | None = None  # a manifest column written as <key>.txt (layout webdataset)
    report: bool = True  # write DIR/report.html at the end of every job (`vcut report DIR` any time)


@dataclass
class WorkersConfig:
    # None: one per GPU at start (else one CPU worker); "auto": the same, then one more worker
    # on each GPU that joins mid-job (elastic clusters, jobs/pool.py); an int: that many.
    count: Any = None
    num_cpus: float | None = None  # per worker; None: 1 on GPU, else (CPUs - 1) / count, >= 0.25
    num_gpus: float | None = None  # None: 1 when the cluster has GPUs, else 0
    batch_size: int = 4  # rows per task: also the commit granularity
    # Rows rendered together in one pipeline call (rows that share every generation value but
    # image and seed). A task holds max(batch_size, render_batch) rows.
    render_batch: int = 1
    # Decode a pipeline call while the next one denoises (docs/performance.md, the fixed cost):
    # auto (on a GPU only), true or false.
    overlap_decode: str = "auto"
    inflight_per_worker: int = 2  # queued batches per worker, so it never idles
    # SIGINT / SIGTERM: seconds the batches in flight may take to finish (and be committed)
    # before the job ends; a second signal ends it at once (jobs/stop.py).
    stop_grace_s: float = 30.0
    window_rows: int = 1024  # manifest rows grouped by image at a time (bounded memory)
    max_attempts: int = 3  # tries of a row whose worker process died
    max_restarts: int = 8  # replacement workers over the whole job
    start_timeout_s: float = 600.0  # model load per worker, counted from its own start
    # A batch not back by this many seconds: its worker is killed and the batch retried like a
    # dead worker's. None: auto, from the job's measured seconds per row (jobs.dispatch.batch_deadline).
    batch_timeout_s: float | None = None
    # A worker given a GPU on which torch sees no CUDA refuses to start, unless this is true
    # (then it renders on the CPU).
    allow_cpu_fallback: bool = False


@dataclass
class ImagesConfig:
    """Limits of each input image's fetch, in the worker before rendering (pipeline.fetch): a
    host that never answers, trickles or sends an endless body fails its own row."""

    connect_timeout_s: float = FetchLimits.connect_timeout_s
    read_timeout_s: float = FetchLimits.read_timeout_s  # after connecting: the answer and the whole body
    max_bytes: int = FetchLimits.max_bytes  # encoded size


@dataclass
class CacheConfig:
    entries: int = 64
    bytes: int = 256 * 2**20


@dataclass
class MetricsConfig:
    port: int | None = None
    address: str = "127.0.0.1"
    pushgateway: str | None = None
    # Keep serving /metrics this long after the last video, so a scraper sees the final values.
    linger_seconds: float = 0.0
    # Pushgateway job name.
    push_job: str = "vcut"


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    defaults: GenerationConfig = field(default_factory=GenerationConfig)  # generation defaults
    output: OutputConfig = field(default_factory=OutputConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    ray_address: str | None = None  # None: RAY_ADDRESS, else start a local Ray instance
    progress_interval_s: float = 10.0  # log line period when stderr is not a terminal


def load_config(
    yaml_path: str | None = None,
    flags: dict[str, Any] | None = None,
    dotlist: list[str] | None = None,
) -> DictConfig:
    """Merge defaults < YAML file < CLI flags < ``key=value`` overrides into a typed config.

    Raises ``omegaconf.errors.OmegaConfBaseException`` (wrong key or type) with omegaconf's
    own message; flags whose value is None are ignored.
    """
    cfg = OmegaConf.structured(JobConfig)
    layers = []
    if yaml_path:
        layers.append(OmegaConf.load(yaml_path))
    if flags:
        set_flags = OmegaConf.create()
        for key, value in flags.items():
            if value is not None:
                OmegaConf.update(set_flags, key, value, force_add=True)
        layers.append(set_flags)
    if dotlist:
        layers.append(OmegaConf.from_dotlist(dotlist))
    for layer in layers:
        _words_as_written(cfg, layer)
    cfg = OmegaConf.merge(cfg, *layers)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _words_as_written(schema: DictConfig, layer: Any) -> None:
    """YAML reads ``off``/``on`` (and no/yes) as booleans; a boolean given to a string or enum
    setting is the word the user wrote (``model.vcut=off``, ``quantize: off``): ``off``/``on``."""
    from omegaconf import EnumNode, StringNode

    if not isinstance(layer, DictConfig) or not isinstance(schema, DictConfig):
        return
    for key in list(layer.keys()):
        if key not in schema:
            continue  # omegaconf's merge names the unknown key
        node, value = schema._get_node(key), layer._get_node(key)
        if isinstance(node, DictConfig):
            _words_as_written(node, value)
        elif isinstance(node, (EnumNode, StringNode)) and isinstance(value._value(), bool):
            layer[key] = "on" if value._value() else "off"


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def model_compile_mode(value: Any) -> str:
    """``model.compile`` as a renderer compile mode (YAML booleans, read as "True"/"False", map
    to ``default``/``off``). Raises ValueError naming the key for anything else."""
    return compile_mode(value, label="model.compile", words=True)


def overlap_decode(value: Any, on_cuda: bool) -> bool:
    """``workers.overlap_decode``: whether a worker decodes a pipeline call while the next one
    denoises. ``auto``: on a GPU only (on a CPU the two share the cores and the GIL: measured
    slower); true/false (YAML booleans read as "True"/"False"). Raises ValueError naming the
    key for anything else."""
    text = str(value).strip().lower()
    if text in ("auto", "true", "on", "yes", "false", "off", "no"):
        return on_cuda if text == "auto" else text in ("true", "on", "yes")
    raise ValueError(f"workers.overlap_decode must be auto, true or false, got {value!r}")


def compile_cache_uri(value: Any, default: str) -> str | None:
    """``model.compile_cache`` as the folder or URI the workers use: ``default`` (the job's
    ``DIR/compile-cache``) for null, None for off/false/no (YAML false reads as "False")."""
    if value is None:
        return default
    text = str(value).strip()
    if text.lower() in ("off", "false", "no", ""):
        return None
    return text if is_remote(text) else os.path.abspath(local_path(text))  # workers' cwd differs


def check_config(cfg: DictConfig) -> None:
    """Value checks that types alone cannot express; raises ValueError naming the key."""
    w, g, m = cfg.workers, cfg.defaults, cfg.model
    checks = [
        (m.step_cache is None or m.step_cache >= 1, "model.step_cache must be >= 1 (1 or null: off)"),
        (m.step_cache_depth >= 1, "model.step_cache_depth must be >= 1"),
        (
            str(m.quantize) in QUANTIZE_MODES,
            f"model.quantize must be one of {', '.join(QUANTIZE_MODES)}, got {m.quantize!r}",
        ),
        (
            w.count is None
            or w.count == "auto"
            or (isinstance(w.count, int) and not isinstance(w.count, bool) and w.count >= 1),
            f"workers.count must be an integer >= 1 or auto, got {w.count!r}",
        ),
        (
            w.batch_timeout_s is None or w.batch_timeout_s > 0,
            "workers.batch_timeout_s must be > 0 (null: auto)",
        ),
        (w.start_timeout_s > 0, "workers.start_timeout_s must be > 0"),
        (w.num_cpus is None or w.num_cpus > 0, "workers.num_cpus must be > 0"),
        (w.num_gpus is None or w.num_gpus >= 0, "workers.num_gpus must be >= 0"),
        (w.batch_size >= 1, "workers.batch_size must be >= 1"),
        (
            not isinstance(w.render_batch, bool) and w.render_batch >= 1,
            f"workers.render_batch must be an integer >= 1 (rows per pipeline call), got {w.render_batch}",
        ),
        (w.inflight_per_worker >= 1, "workers.inflight_per_worker must be >= 1"),
        (w.window_rows >= 1, "workers.window_rows must be >= 1"),
        (w.stop_grace_s >= 0, "workers.stop_grace_s must be >= 0"),
        (w.max_attempts >= 1, "workers.max_attempts must be >= 1"),
        (w.max_restarts >= 0, "workers.max_restarts must be >= 0"),
        (cfg.output.format.isalnum(), "output.format must be a plain extension such as mp4"),
        (cfg.output.shard_size >= 1, "output.shard_size must be >= 1"),
        (cfg.output.shard_max_age_s > 0, "output.shard_max_age_s must be > 0"),
        (cfg.images.connect_timeout_s > 0, "images.connect_timeout_s must be > 0"),
        (cfg.images.read_timeout_s > 0, "images.read_timeout_s must be > 0"),
        (cfg.images.max_bytes >= 1, "images.max_bytes must be >= 1"),
        (cfg.output.rerender in (None, "changed"), "output.rerender must be changed or null"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    # The one check of the generation values (pipeline.params), as the renderer's.
    check_generation(OmegaConf.to_container(g), label=lambda name: f"defaults.{name}")
    model_compile_mode(cfg.model.compile)
    overlap_decode(w.overlap_decode, on_cuda=False)
