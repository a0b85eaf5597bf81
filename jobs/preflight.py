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
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from jobs import leftovers
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


#: What a driver of a cluster with token authentication needs (Ray 2.60's own variables).
TOKEN_HINT = (
    "set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN (or a file named by "
    "RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token), here and on every node"
)


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


# -- Ray --------------------------------------------------------------------------------------


def ray_address(cfg_address: str | None) -> str | None:
    """The cluster a job joins: ``--address`` / ``ray_address``, else ``RAY_ADDRESS``, else None (local)."""
    return cfg_address or os.environ.get("RAY_ADDRESS") or None


def auth_mode() -> str:
    """Ray's token authentication for this process: ``RAY_AUTH_MODE``, or what Ray does unset."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode:
        return mode.lower()
    token = bool(os.environ.get("RAY_AUTH_TOKEN")) or (Path.home() / ".ray" / "auth_token").is_file()
    return "unset (token: a token file exists)" if token else "unset"


def _host_port(address: str) -> tuple[str, int] | None:
    text = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def check_address(address: str | None) -> str:
    """With an address, something listens there (a TCP connect within seconds, instead of Ray's
    own retries). ``auto`` and ``local`` are left to Ray."""
    if not address:
        return "none: a local Ray instance is started"
    if address in ("auto", "local"):
        return address
    hp = _host_port(address)
    if hp is None:
        raise PreflightError(f"--address {address!r} is not host:port (or ray://host:port)")
    try:
        with socket.create_connection(hp, timeout=NETWORK_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or first_line(exc)
        raise ClusterUnavailableError(
            f"--address {address!r}: no Ray cluster answers there ({reason}): start one "
            "(`ray start --head`), fix the address, or leave --address out to run locally"
        ) from exc
    if address.startswith("ray://"):  # the Ray Client protocol: ray.init says the rest
        return address
    _probe_gcs(address)
    return f"{address} (Ray GCS answers; auth mode {auth_mode()})"


#: Joins the GCS at argv[1] as ``ray.init`` would (same token sources); run in a child process
#: so that Ray's C++ retry lines stay out of this terminal and a hung probe can be killed.
_GCS_PROBE = "import sys\nfrom ray._raylet import GcsClient\nGcsClient(address=sys.argv[1])\n"


def _probe_gcs(address: str) -> None:
    """Ask the GCS at ``address`` for its cluster id with the token ``ray.init`` would send,
    within seconds: a token-auth refusal or a port that is not a Ray GCS is one line now,
    instead of ``ray.init``'s 20 s of retries and a ConnectionError."""
    limit = 2 * NETWORK_TIMEOUT_S  # the child imports Ray's core (about a second) first
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _GCS_PROBE, address], capture_output=True, text=True, timeout=limit
        )
    except subprocess.TimeoutExpired as exc:  # accepts TCP connections, but no GCS answers
        raise ClusterUnavailableError(
            f"--address {address!r} accepts connections but no Ray GCS answers there within "
            f"{limit:.0f} s: give the head's GCS address (port 6379 by default; 8265 is the "
            "dashboard, ray://HOST:10001 the Ray Client)"
        ) from exc
    if proc.returncode == 0:
        return
    text = proc.stderr
    if "AuthenticationError" in text or "Unauthenticated" in text or "InvalidAuthToken" in text:
        raise ClusterUnavailableError(
            f"--address {address!r}: the cluster uses token authentication and refuses this driver's "
            f"token (auth mode here: {auth_mode()}): {TOKEN_HINT}"
        )
    last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), f"exit {proc.returncode}")
    raise ClusterUnavailableError(f"--address {address!r}: the Ray GCS there does not answer: {last}")


def connect_ray(address: str | None, *, verbose: bool = False) -> None:
    """``ray.init`` quietly (no banner, workers' output not streamed unless ``verbose``);
    an authentication failure or a cluster that does not answer is a PreflightError."""
    import logging

    import ray

    from pipeline.notices import quiet_notices

    quiet_notices()  # the local instance's token-auth banner (pipeline.notices says why)
    if not address:  # a local instance: first end what killed vcut drivers left (jobs.leftovers)
        leftovers.end_and_say()
    try:
        ray.init(
            # no address: an instance of our own ("local"), never one `ray start` registered
            # on this machine (ray.init(address=None) would join that one)
            address=address or "local",
            include_dashboard=False,
            logging_level=logging.INFO if verbose else logging.WARNING,
            configure_logging=False,
            log_to_driver=verbose,
        )
    except Exception as exc:
        text = str(exc)
        if "uthentication" in text or type(exc).__name__ == "AuthenticationError":
            raise ClusterUnavailableError(
                f"--address {address!r}: the cluster uses token authentication and {first_line(exc)}: "
                f"{TOKEN_HINT}"
            ) from exc
        if address:
            raise ClusterUnavailableError(
                f"--address {address!r}: cannot connect to Ray ({first_line(exc)}): check that the "
                f"cluster is up (`ray status`) and the address; with token authentication, {TOKEN_HINT}"
            ) from exc
        raise
    node = getattr(ray._private.worker, "_global_node", None)  # Ray's: no public session dir
    if getattr(node, "head", False):  # this driver started the instance (not a `ray start` one)
        leftovers.mark_session(node.get_session_dir_path())


def check_gpus(cfg: Any, resources: dict[str, float], address: str | None = None) -> str:
    """The GPUs the config asks for exist on the cluster (``resources``: ``ray.cluster_resources()``)."""
    gpus = float(resources.get("GPU", 0))
    w, device = cfg.workers, str(cfg.model.device or "")
    where = f"the cluster at {address}" if address else "this machine"
    if w.num_gpus is not None and float(w.num_gpus) > 0 and gpus < float(w.num_gpus):
        raise PreflightError(
            f"workers.num_gpus={w.num_gpus} but {where} has {gpus:g} GPU(s) in Ray: add GPU nodes, "
            "check `ray status`, or set workers.num_gpus=0 to render on CPUs"
        )
    if device.startswith("cuda") and gpus < 1 and not (w.num_gpus and float(w.num_gpus) > 0):
        raise PreflightError(
            f"model.device={device} but {where} has no GPU in Ray: add GPU nodes or set model.device=cpu"
        )
    return f"{gpus:g} GPU(s), {float(resources.get('CPU', 0)):g} CPU(s)"


# -- all of it --------------------------------------------------------------------------------


def run_preflight(cfg: Any, manifest: str, out: Any) -> Any:
    """Every check ``vcut run`` can do before Ray starts, cheapest first. Returns the
    ManifestInfo; raises PreflightError (or ManifestError with its own lines)."""
    from jobs.preflight_checks import check_metrics, check_results
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
