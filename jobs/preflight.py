"""Pre-flight: everything a job needs that the driver can check in seconds, before Ray starts.

Each ``check_*`` function checks one thing and returns a short description of what it found
(for ``vcut doctor``), or raises :class:`PreflightError` with one line that names the input
and says what to do. ``vcut run`` calls them in :func:`run_preflight` and turns the error into
``vcut: error: ...`` and exit status 2; ``vcut doctor`` shows each as a row of its table. One
place for each check: the worker later loads the same model with the same rules
(:mod:`pipeline.model_files`), and the driver connects with :func:`connect_ray`.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from jobs.text import error_line

T = TypeVar("T")

#: The ffmpeg encoder each ``output.format`` needs (see ``pipeline.encode``).
ENCODERS = {"mp4": "libx264", "webm": "libvpx-vp9", "gif": "gif"}
#: Seconds to wait for the hub, an object store or a Ray cluster before saying it does not answer.
NETWORK_TIMEOUT_S = 5.0
SVD_HUB_ID = "stabilityai/stable-video-diffusion-img2vid-xt"


class PreflightError(Exception):
    """A job cannot run: the message is one line naming the input and what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class ClusterUnavailableError(PreflightError):
    """The Ray cluster at ``--address`` cannot be joined (nothing listens, not a Ray GCS, token
    authentication): ``vcut run`` exits 69 (EX_UNAVAILABLE), not 2, since the input may be
    right and the cluster down, and not 1 ("no worker could run")."""


#: One line of an exception, ``Type: message`` (``jobs.text.error_line``; pre-flight's and
#: doctor's name for it).
first_line = error_line


def with_deadline(fn: Callable[[], T], seconds: float, what: str) -> T:
    """``fn()``, or PreflightError when it has not returned after ``seconds`` (a library's own
    retries must not keep a person waiting; the thread is left to finish on its own)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True, name="vcut-preflight")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise PreflightError(f"{what}: no answer within {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


# -- manifest ---------------------------------------------------------------------------------


def check_manifest(path: str) -> Any:
    """The manifest exists, is valid (every row, streaming) and has rows. Returns its ManifestInfo."""
    from jobs import manifest, results
    from pipeline.storage import is_remote, local_path

    if not is_remote(path):
        local = local_path(path)
        if not os.path.exists(local):
            raise PreflightError(
                f"manifest {path!r} does not exist: check the path (a Parquet, CSV or JSONL file, "
                "or an s3:// / gs:// URI; `vcut manifest IMAGES -o FILE` writes one)"
            )
    info = manifest.validate_manifest(path, reserved=results.RESERVED_COLUMNS)  # ManifestError: its own lines
    if info.num_rows == 0:
        raise PreflightError(f"manifest {path!r} has no rows: nothing to render (check how it was built)")
    return info


# -- output -----------------------------------------------------------------------------------


def check_output(out: str | Any) -> str:
    """``--out`` can be written: a probe file (local: in the deepest folder that exists, so that
    nothing is created) or a probe object (object stores: this also finds a missing bucket;
    a bucket is never created), removed again. Returns where it was probed."""
    from jobs.output import open_output

    try:
        od = open_output(out)
    except (ValueError, ImportError) as exc:
        raise PreflightError(f"--out {out!s}: {exc}") from exc
    if od.local:
        return _probe_local(od.root, od.uri if not isinstance(out, str) else out)
    name = od.path(f".vcut-probe-{uuid.uuid4().hex[:12]}")

    def probe() -> None:
        od.fs.pipe_file(name, b"")
        od.fs.rm_file(name)

    try:
        with_deadline(probe, 3 * NETWORK_TIMEOUT_S, f"--out {od.uri}")
    except PreflightError:
        raise
    except Exception as exc:
        text = str(exc)
        bucket = od.root.split("/", 1)[0]
        if od.object_store and ("NoSuchBucket" in text or "bucket does not exist" in text.lower()):
            raise PreflightError(
                f"--out {od.uri}: bucket {bucket!r} does not exist: create it first "
                "(vcut never creates buckets) or fix the URI"
            ) from exc
        if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
            raise PreflightError(
                f"--out {od.uri}: access denied writing a probe object: check the credentials "
                "(AWS_*, GOOGLE_APPLICATION_CREDENTIALS) and the bucket policy"
            ) from exc
        if isinstance(exc, FileNotFoundError) and od.object_store:
            raise PreflightError(
                f"--out {od.uri}: bucket {bucket!r} does not exist ({first_line(exc)}): create it "
                "first (vcut never creates buckets) or fix the URI"
            ) from exc
        raise PreflightError(f"--out {od.uri}: cannot write a probe object: {first_line(exc)}") from exc
    return f"{od.uri} (probe object written and removed)"


def _probe_local(root: str, given: str) -> str:
    folder = root
    while not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    if not os.path.isdir(folder):
        where = "is a file" if folder == root else f"is under {folder!r}, which is a file"
        raise PreflightError(f"--out {given!r} {where}, not a folder: choose a folder for the videos")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".vcut-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or first_line(exc)
        raise PreflightError(
            f"--out {given!r}: cannot write in {folder!r} ({reason}): choose a writable folder "
            "or fix its permissions"
        ) from exc
    return root if folder == root else f"{root} (to be created in {folder})"


# -- model ------------------------------------------------------------------------------------


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def check_model(model: dict[str, Any] | Any) -> str:
    """The model resolves, without loading weights. A local folder: ``model_index.json`` names
    the SVD components and each has (safetensors, unless ``allow_pickle``) weights. A hub id:
    complete in the Hugging Face cache, or the hub answers a HEAD request for its
    ``model_index.json`` (with ``HF_TOKEN`` when the repo is gated)."""
    from pipeline.errors import ModelLoadError
    from pipeline.model_files import check_svd_folder, local_model_folder, strip_file_scheme

    model_id = str(model["id"])
    allow_pickle = bool(model.get("allow_pickle"))
    name = strip_file_scheme(model_id)
    folder = local_model_folder(name)
    if folder is not None:
        try:
            check_svd_folder(folder, allow_pickle)
        except ModelLoadError as exc:
            hint = ""
            if not folder.exists():
                hint = f": give a local diffusers folder or a hub id such as {SVD_HUB_ID}"
            raise PreflightError(f"--model {model_id!r}: {exc}{hint}") from exc
        return f"local folder {name}"
    if name.count("/") != 1 or not all(name.split("/")):
        raise PreflightError(
            f"--model {model_id!r} is neither an existing local folder nor a Hugging Face hub id "
            f"(owner/name, e.g. {SVD_HUB_ID})"
        )
    return _check_hub_model(name, model, allow_pickle)


def _check_hub_model(repo: str, model: dict[str, Any] | Any, allow_pickle: bool) -> str:
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.utils import get_token

    from pipeline.errors import ModelLoadError
    from pipeline.model_files import check_svd_folder, offline_from_env

    cache = hf_cache_dir()
    cached = try_to_load_from_cache(repo, "model_index.json", cache_dir=cache)
    if isinstance(cached, str):
        try:
            check_svd_folder(Path(cached).parent, allow_pickle)
            return f"{repo} (in the Hugging Face cache {cache})"
        except ModelLoadError:
            pass  # partly cached: the hub must supply the rest
    offline = offline_from_env() or bool(model.get("local_files_only"))
    where = f"the Hugging Face cache ({cache})"
    if offline:
        why = "HF_HUB_OFFLINE is set" if offline_from_env() else "model.local_files_only is set"
        raise PreflightError(
            f"--model {repo!r} is not (completely) in {where} and {why}: download it first "
            f"(`hf download {repo}`), point HF_HOME at the cache that has it, or pass a local folder"
        )
    token = get_token()
    url = hf_hub_url(repo, "model_index.json")
    try:
        with_deadline(
            lambda: get_hf_file_metadata(url, token=token, timeout=NETWORK_TIMEOUT_S),
            2 * NETWORK_TIMEOUT_S + 1,
            f"--model {repo!r}: the Hugging Face hub",
        )
    except hf_errors.GatedRepoError as exc:
        what = "your token has no access to it" if token else "no HF_TOKEN is set"
        raise PreflightError(
            f"--model {repo!r} is gated and {what}: accept its conditions on "
            f"https://huggingface.co/{repo}, then set HF_TOKEN (or run `hf auth login`)"
        ) from exc
    except hf_errors.RepositoryNotFoundError as exc:
        tail = "" if token else " (if it is private, set HF_TOKEN)"
        raise PreflightError(f"--model {repo!r}: no such model on the Hugging Face hub{tail}") from exc
    except (hf_errors.EntryNotFoundError, hf_errors.RemoteEntryNotFoundError) as exc:
        raise PreflightError(
            f"--model {repo!r} has no model_index.json: not a diffusers pipeline repository"
        ) from exc
    except (PreflightError, hf_errors.OfflineModeIsEnabled, OSError, Exception) as exc:
        reason = str(exc) if isinstance(exc, PreflightError) else first_line(exc)
        raise PreflightError(
            f"--model {repo!r} is not in {where} and the hub cannot be reached ({reason}): connect "
            "to the internet (or set HF_ENDPOINT to a mirror), or download it where you can and "
            "copy the cache, or pass a local folder"
        ) from exc
    return f"{repo} (on the hub; downloaded into {cache} by each worker)"


# -- ffmpeg -----------------------------------------------------------------------------------


def ffmpeg_encoders(exe: str) -> set[str]:
    proc = subprocess.run(
        [exe, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=20, check=False
    )
    found = set()
    for line in proc.stdout.splitlines():
        m = re.match(r"^\s*[VAS][A-Z.]{5}\s+(\S+)", line)
        if m:
            found.add(m.group(1))
    return found


def check_ffmpeg(fmt: str = "mp4") -> str:
    """ffmpeg is found (``VCUT_FFMPEG``, PATH, imageio-ffmpeg) and has the encoder ``fmt`` needs."""
    from pipeline.errors import EncodeError
    from pipeline.ffmpeg_bin import ffmpeg_exe

    if fmt not in ENCODERS:
        raise PreflightError(f"output.format {fmt!r} is not one of {', '.join(ENCODERS)}")
    try:
        exe = ffmpeg_exe()
    except EncodeError as exc:
        raise PreflightError(f"{exc}: point VCUT_FFMPEG at an ffmpeg binary, or unset it") from exc
    except Exception as exc:  # imageio-ffmpeg without its binary
        raise PreflightError(
            f"no ffmpeg found ({first_line(exc)}): install ffmpeg, or set VCUT_FFMPEG"
        ) from exc
    try:
        encoders = ffmpeg_encoders(exe)
    except (OSError, subprocess.SubprocessError) as exc:
        raise PreflightError(f"ffmpeg {exe!r} does not run ({first_line(exc)}): set VCUT_FFMPEG") from exc
    need = ENCODERS[fmt]
    if need not in encoders:
        raise PreflightError(
            f"ffmpeg {exe!r} has no {need} encoder, which output.format={fmt} needs: install an ffmpeg "
            "built with it (imageio-ffmpeg's has), point VCUT_FFMPEG at one, or choose another format"
        )
    return f"{exe} ({need})"


def run_preflight(cfg: Any, manifest: str, out: Any) -> Any:
    """Every check ``vcut run`` can do before Ray starts, cheapest first. Returns the
    ManifestInfo; raises PreflightError (or ManifestError with its own lines)."""
    from jobs.preflight_checks import check_metrics, check_results
    from jobs.ray_connect import check_address, ray_address
    from jobs.shards import check_layout

    info = check_manifest(manifest)
    check_layout(cfg, info)
    check_output(out)
    check_results(out)
    check_model(cfg.model)
    from pipeline.quantize import quantize_refusal  # FP8 where the GPUs cannot: before any worker

    refusal = quantize_refusal(
        cfg.model.quantize, cfg.model.device, cluster=bool(ray_address(cfg.ray_address))
    )
    if refusal:
        raise PreflightError(f"model.quantize: {refusal}")
    check_ffmpeg(str(cfg.output.format))
    check_metrics(cfg.metrics)
    check_address(ray_address(cfg.ray_address))
    return info


#: The Ray checks live in :mod:`jobs.ray_connect` (it imports this module's errors); their names
#: stay importable from here, where ``vcut doctor`` and the job's setup look for every check.
_RAY_CHECKS = ("auth_mode", "check_address", "check_gpus", "connect_ray", "ray_address")


def __getattr__(name: str) -> Any:
    if name in _RAY_CHECKS:
        from jobs import ray_connect

        return getattr(ray_connect, name)
    raise AttributeError(f"module 'jobs.preflight' has no attribute {name!r}")
