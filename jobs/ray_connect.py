"""Pre-flight's Ray checks: which cluster (``--address``, ``RAY_ADDRESS``, or a local instance
of the job's own), whether its GCS answers (with the token ``ray.init`` would send), joining it,
and whether it has the GPUs the config asks for. Each raises :class:`jobs.preflight.PreflightError`
(or :class:`~jobs.preflight.ClusterUnavailableError`, exit 69) with one line."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from jobs import leftovers, preflight
from jobs.preflight import ClusterUnavailableError, PreflightError
from jobs.text import error_line

#: What a driver of a cluster with token authentication needs (Ray 2.60's own variables).
TOKEN_HINT = (
    "set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN (or a file named by "
    "RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token), here and on every node"
)


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
        with socket.create_connection(hp, timeout=preflight.NETWORK_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or error_line(exc)
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
    limit = 2 * preflight.NETWORK_TIMEOUT_S  # the child imports Ray's core (about a second) first
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
                f"--address {address!r}: the cluster uses token authentication and {error_line(exc)}: "
                f"{TOKEN_HINT}"
            ) from exc
        if address:
            raise ClusterUnavailableError(
                f"--address {address!r}: cannot connect to Ray ({error_line(exc)}): check that the "
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
