"""The compile cache a fleet shares: torch's compile artifacts per setup and shape in a folder or URI.

``torch.compiler.save_cache_artifacts()`` ("mega-cache") serializes what this process compiled
(AOTAutograd and inductor cache entries, PGO's dynamic-shape decisions, autotuning results;
on CUDA inductor bundles the Triton kernels too) and ``torch.compiler.load_cache_artifacts``
puts them into a fresh process's local caches, so that its compile of the same graph is a
cache hit (torch's compile-time caching recipe). :class:`CompileCache` keeps one such blob
per render shape under a folder named by :func:`cache_key` (what makes artifacts valid:
versions, device, model, VCUT levers, dtype, compile mode). On a CPU a hit still builds
inductor's C++ kernels with the system compiler (they are not among the artifacts), so it
saves less there than on CUDA.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import posixpath
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)


#: First line of a cache entry; a JSON header line (key, shape, payload size and sha256) and
#: torch's artifact bytes follow.
ENTRY_MAGIC = b"vcut-compile-cache 1\n"
_ENTRY_SUFFIX = ".bin"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def device_tag(device: torch.device | str) -> str:
    """What compiled code depends on about a device: ``cuda-sm90-NVIDIA_H200`` (capability and
    name), ``cpu-x86_64`` (inductor's C++ also checks the vector ISA: a miss, never wrong code)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}-{torch.cuda.get_device_name(device)}"
    return f"{device.type}-{platform.machine()}"


def cache_key(
    *,
    model_id: str,
    vcut_mode: str,
    step_cache: int | None,
    step_cache_depth: int,
    dtype: torch.dtype,
    device: torch.device | str,
    mode: str,
    backend: str,
    vae: bool,
    quantize: str = "off",
) -> dict[str, Any]:
    """What makes compile artifacts valid: versions, device, model, VCUT levers, FP8, dtype, mode."""
    try:
        import triton  # type: ignore[import-not-found]

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "device": device_tag(device),
        "model": str(model_id),
        "vcut": str(vcut_mode),
        "step_cache": step_cache,
        "step_cache_depth": int(step_cache_depth),
        "dtype": str(dtype).removeprefix("torch."),
        "compile": mode,
        "backend": backend,
        "vae": bool(vae),
        "quantize": str(quantize),
    }


@dataclass
class CacheStats:
    """What a :class:`CompileCache` did in this process."""

    loaded: int = 0  # entries loaded before a first call of their shape
    saved: int = 0  # entries written after a first compiled call
    ignored: int = 0  # entries found but unusable (corrupt, another key, torch refused them)
    load_seconds: float = 0.0
    save_seconds: float = 0.0
    shapes: dict[str, str] = field(default_factory=dict)  # entry name -> loaded/missing/ignored


class CompileCache:
    """torch's compile artifacts for one :func:`cache_key`, one entry per shape, under ``uri``
    (a folder, or any fsspec URI: ``s3://...``).

    ``before_call(shape)`` loads the shape's entry (once per shape and process) before the
    renderer's first call of it; ``after_call(shape, compiled)`` saves this process's
    artifacts (``torch.compiler.save_cache_artifacts``: everything compiled so far) as the
    shape's entry when that first call compiled and no usable entry was there. Entries are
    written with :func:`pipeline.storage.put_atomic` (never seen half-written; concurrent
    writers of one entry: the last complete one wins) and checked on load (magic, key,
    shape, size and sha256). Nothing here ever fails a render: a cache that cannot be read or
    written, or an entry that is corrupt, from another key or refused by torch, is one
    warning line and a cold compile.
    """

    def __init__(self, uri: str, key: Mapping[str, Any]) -> None:
        self.key = dict(key)
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        readable = _UNSAFE.sub("_", f"{self.key.get('device', '')}-{self.key.get('vcut', '')}")
        self.uri = posixpath.join(str(uri).rstrip("/"), f"{readable}-{digest}")
        self.stats = CacheStats()
        self._fs: Any = None
        self._root: str | None = None
        self._done: dict[tuple, bool] = {}  # shape -> a usable entry was loaded

    def _where(self) -> tuple[Any, str]:
        if self._root is None:
            from pipeline.storage import url_to_fs

            self._fs, self._root = url_to_fs(self.uri)
        return self._fs, self._root

    def _join(self, name: str) -> str:
        fs, root = self._where()
        return os.path.join(root, name) if fs is None else posixpath.join(root, name)

    @staticmethod
    def entry_name(shape: tuple) -> str:
        """The entry's file name for a render shape tuple."""
        return _UNSAFE.sub("_", "-".join(str(v) for v in shape)) + _ENTRY_SUFFIX

    def entries(self) -> list[str]:
        """Entry names present for this key (empty when the folder is missing or unreadable)."""
        try:
            fs, root = self._where()
            names = (
                os.listdir(root) if fs is None else [posixpath.basename(p) for p in fs.ls(root, detail=False)]
            )
        except FileNotFoundError:
            return []
        except Exception as exc:
            logger.warning("compile cache %s cannot be listed (%s); compiling cold", self.uri, _one_line(exc))
            return []
        return sorted(n for n in names if n.endswith(_ENTRY_SUFFIX) and not n.startswith("."))

    def has_entries(self) -> bool:
        return bool(self.entries())

    def encode(self, shape: tuple, payload: bytes) -> bytes:
        """An entry: magic line, JSON header line, torch's artifact bytes."""
        header = {
            "key": self.key,
            "shape": [_jsonable(v) for v in shape],
            "bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        return ENTRY_MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload

    def decode(self, shape: tuple, data: bytes) -> bytes:
        """The artifact bytes of an entry; ValueError saying why an entry is unusable."""
        if not data.startswith(ENTRY_MAGIC):
            raise ValueError("not a vcut compile-cache entry (or another format version)")
        end = data.find(b"\n", len(ENTRY_MAGIC))
        if end < 0:
            raise ValueError("truncated header")
        try:
            header = json.loads(data[len(ENTRY_MAGIC) : end])
        except ValueError as exc:
            raise ValueError(f"unreadable header ({exc})") from None
        payload = data[end + 1 :]
        if header.get("key") != self.key:
            diff = sorted(
                k
                for k in set(header.get("key") or {}) | set(self.key)
                if (header.get("key") or {}).get(k) != self.key.get(k)
            )
            raise ValueError(f"made for another setup (differs in {', '.join(diff) or 'key'})")
        if header.get("shape") != [_jsonable(v) for v in shape]:
            raise ValueError(f"made for shape {header.get('shape')}")
        if header.get("bytes") != len(payload) or header.get("sha256") != hashlib.sha256(payload).hexdigest():
            raise ValueError(
                f"corrupt: {len(payload)} bytes, header says {header.get('bytes')}, or checksum differs"
            )
        return payload

    def before_call(self, shape: tuple) -> None:
        """Load ``shape``'s entry, if any, before the first call of that shape in this process."""
        if shape in self._done:
            return
        name = self.entry_name(shape)
        start = time.perf_counter()
        loaded = False
        try:
            fs, _ = self._where()
            path = self._join(name)
            try:
                if fs is None:
                    with open(path, "rb") as f:
                        data = f.read()
                else:
                    data = fs.cat_file(path)
            except FileNotFoundError:
                self.stats.shapes[name] = "missing"
            else:
                payload = self.decode(shape, data)
                with _quiet_torch_cache_log():  # our one line says it; not torch's traceback too
                    info = torch.compiler.load_cache_artifacts(payload)
                if info is None:
                    raise ValueError("torch could not read its artifacts")
                loaded = True
                self.stats.loaded += 1
                self.stats.shapes[name] = "loaded"
                logger.info(
                    "compile cache: loaded %s (%.1f MB) in %.1fs",
                    path,
                    len(data) / 1e6,
                    time.perf_counter() - start,
                )
        except Exception as exc:
            self.stats.ignored += 1
            self.stats.shapes[name] = "ignored"
            logger.warning(
                "compile cache: ignoring %s/%s: %s; compiling cold", self.uri, name, _one_line(exc)
            )
        self.stats.load_seconds += time.perf_counter() - start
        self._done[shape] = loaded

    def after_call(self, shape: tuple, compiled: bool) -> None:
        """After a call of ``shape``: save this process's artifacts as its entry when this was
        its first call here, it compiled, and no usable entry was loaded for it."""
        if self._done.get(shape, True) or not compiled:
            self._done[shape] = True
            return
        self._done[shape] = True
        start = time.perf_counter()
        name = self.entry_name(shape)
        try:
            saved = torch.compiler.save_cache_artifacts()
            if saved is None:
                logger.info("compile cache: torch recorded no artifacts for %s; nothing saved", name)
                return
            from pipeline.storage import put_atomic

            fs, _ = self._where()
            path = self._join(name)
            data = self.encode(shape, saved[0])
            put_atomic(fs, path, data)
            self.stats.saved += 1
            logger.info("compile cache: saved %s (%.1f MB)", path, len(data) / 1e6)
        except Exception as exc:
            logger.warning("compile cache: could not save %s/%s: %s", self.uri, name, _one_line(exc))
        finally:
            self.stats.save_seconds += time.perf_counter() - start


@contextlib.contextmanager
def _quiet_torch_cache_log() -> Iterator[None]:
    """torch logs a failed deserialization as a warning with a traceback; we log one line."""
    torch_log = logging.getLogger("torch.compiler._cache")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        torch_log.setLevel(level)


def _jsonable(value: Any) -> Any:
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def plan_compile(
    setting: bool | str | None,
    *,
    cache_uri: str | None,
    rows_per_worker_per_shape: float | None,
    device: torch.device,
    backend: Any,
    vae: bool | None,
    **key: Any,
) -> tuple[str, CompileCache | None]:
    """The mode a renderer compiles with and its :class:`CompileCache` (None: no cache, or not
    compiling). ``auto`` is decided by :func:`pipeline.compile.compile_pays`, counting a cache
    entry for this setup (any shape) as a warm compile. ``key``: :func:`cache_key`'s model
    and lever fields."""
    from pipeline.compile import compile_mode, compile_pays, compile_vae_by_default, resolve_compile

    mode = compile_mode(setting)
    if mode == "auto" and not compile_pays(device.type, rows_per_worker_per_shape, cached=True):
        mode = "off"  # not even a warm compile would pay (a CPU, or few rows): no cache I/O
    if mode == "off":
        return mode, None
    cache = None
    if cache_uri:
        backend_name = (
            backend if isinstance(backend, str) else getattr(backend, "__name__", type(backend).__name__)
        )
        cache = CompileCache(
            cache_uri,
            cache_key(
                device=device,
                mode="default" if mode == "auto" else mode,
                backend=backend_name,
                vae=compile_vae_by_default(device) if vae is None else vae,
                **key,
            ),
        )
    if mode == "auto":
        cached = cache is not None and cache.has_entries()
        mode = resolve_compile(
            "auto",
            device_kind=device.type,
            rows_per_worker_per_shape=rows_per_worker_per_shape,
            cached=cached,
        )
        logger.info(
            "compile=auto on %s, %s rows per worker and shape, %s: %s",
            device.type,
            "unknown" if rows_per_worker_per_shape is None else f"{rows_per_worker_per_shape:.0f}",
            "a cache entry exists" if cached else "no cache entry",
            "compiling" if mode != "off" else "not compiling",
        )
    return mode, (cache if mode != "off" else None)
