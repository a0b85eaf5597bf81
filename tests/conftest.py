"""Shared pytest fixtures.

Torch runs on one intra-op thread in tests unless ``OMP_NUM_THREADS`` says otherwise: on a
small, shared CPU the tiny model renders several times faster than with OpenMP's default of
one thread per core (tests/test_vcut.py: 84 s for one test with the default, 22 s with one).
The variable is set here, before any test module imports torch, so subprocesses the tests
start (``python -m jobs.main ...``, the benchmark scripts) and Ray's workers (started by a
raylet that ``ray.init`` forks from this process) inherit the same count.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
ROOT = Path(__file__).resolve().parents[1]

try:
    TORCH_THREADS = max(1, int(os.environ["OMP_NUM_THREADS"].split(",")[0]))
except ValueError:
    TORCH_THREADS = 1


class FakeClock:
    """A monotonic clock a test moves by hand (``advance``), instead of sleeping: pass the
    instance where code takes a ``clock`` callable. ``start`` defaults to a small value, as
    ``time.monotonic()`` has shortly after a machine boots."""

    def __init__(self, start: float = 1.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def macs_args(model: Path, steps: int, *extra: str, size: int = 64) -> list[str]:
    """``vcut macs`` arguments (for ``jobs.main.main``): ``model`` at ``size`` x ``size`` over
    ``steps`` steps, as JSON, then ``extra`` flags."""
    shape = ["--height", str(size), "--width", str(size), "--steps", str(steps)]
    return ["macs", "--model", str(model), *shape, "--json", *extra]


@pytest.fixture(scope="module")
def stock_pipe() -> Any:
    """The tiny random-weight SVD pipeline as diffusers builds it (one per test module; tests
    patch deep copies of it)."""
    from vcut.tiny import make_tiny_pipeline

    pipe = make_tiny_pipeline(seed=1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight SVD pipeline written once to disk (safetensors) with save_pretrained."""
    from vcut.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-svd")


@pytest.fixture(scope="session")
def tiny_pickle_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline saved with ``safe_serialization=False`` (UNet and VAE as pickle .bin)."""
    from vcut.tiny import make_tiny_pipeline

    path = tmp_path_factory.mktemp("models") / "tiny-svd-pickle"
    make_tiny_pipeline().save_pretrained(path, safe_serialization=False)
    return path


@pytest.fixture(autouse=True)
def torch_one_thread() -> Iterator[None]:
    """Every test runs torch on ``TORCH_THREADS`` intra-op threads (1 unless ``OMP_NUM_THREADS``
    is set): enforced before and after each test, in case torch was imported before this file
    or code under test (a worker's ``torch_threads``) changed it. Never imports torch itself."""

    def enforce() -> None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.get_num_threads() != TORCH_THREADS:
            torch.set_num_threads(TORCH_THREADS)

    enforce()
    yield
    enforce()


@pytest.fixture(scope="session", autouse=True)
def ray_without_token_auth() -> Iterator[None]:
    """Every Ray this test process starts or joins runs without token auth. Ray 2.60 turns
    token auth on for a new local instance (``ray.init`` sets ``RAY_AUTH_MODE=token``) and its
    core worker keeps that token for the life of the process: a later ``ray.init`` to a
    cluster without auth (``tests/test_cluster.py``'s ``ray start`` nodes) then connects, but
    every actor it creates dies unscheduled ("all references to the actor were removed").
    Token auth itself is tested against ``ray start`` nodes in child processes
    (``tests/test_faults.py``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        yield


@pytest.fixture(scope="module", autouse=True)
def no_ray_left_connected(request: pytest.FixtureRequest) -> Iterator[None]:
    """A module that leaves this process connected to Ray would break the next module's
    ``ray.init``: disconnect, and fail the module's last test so the leak is fixed."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail(f"{request.module.__name__} left this process connected to Ray")


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray instance (2 CPUs) for a test module; yields its GCS address. Its workers
    import this worktree's code (``PYTHONPATH``: also for drivers in subprocesses that join it)
    and never ask the hub (``HF_HUB_OFFLINE``). ``RAY_AUTH_MODE`` and those variables are
    restored afterwards, whatever ``ray.init`` set (see ``ray_without_token_auth``)."""
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")  # restored on exit, whatever ray.init set
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("PYTHONPATH", _pythonpath())  # the raylet's workers inherit this environment
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()


@contextlib.contextmanager
def moto_server() -> Iterator[dict[str, str]]:
    """A moto S3 server on loopback, started empty; yields the AWS_* environment that points at it.

    Every moto server in one process shares one in-memory backend, so it is reset first: no
    bucket of an earlier test is seen. Variables that could point elsewhere (a profile, a
    session token, an S3-only endpoint) are to be removed by the caller: see ``AWS_UNSET``.
    """
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        _, port = server.get_host_and_port()
        reset = urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST")
        urllib.request.urlopen(reset, timeout=10).close()
        yield {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_CONFIG_FILE": os.devnull,  # no profile of the machine's user leaks in
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
    finally:
        server.stop()


#: AWS variables a test against ``moto_server`` must not inherit.
AWS_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3")


@contextlib.contextmanager
def moto_s3(mp: pytest.MonkeyPatch) -> Iterator[Any]:
    """``moto_server()`` with its environment set in this process through ``mp`` (so restored
    afterwards) and ``AWS_UNSET`` removed; yields an s3fs filesystem on it. s3fs's instance
    cache is cleared before and after: a cached filesystem would keep an earlier endpoint."""
    s3fs = pytest.importorskip("s3fs")
    with moto_server() as env:
        for name, value in env.items():
            mp.setenv(name, value)
        for name in AWS_UNSET:
            mp.delenv(name, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield s3fs.S3FileSystem()
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (as the kernel just handed it out)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pythonpath() -> str:
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def subprocess_env(
    *, drop: tuple[str, ...] = ("RAY_", "VCUT_"), keep: tuple[str, ...] = (), **extra: str
) -> dict[str, str]:
    """The environment of a process a test starts (``python -m jobs.main``, ``ray start``, a
    script): this process's, without the variables whose names start with one of ``drop``
    (a Ray address or a ``VCUT_`` setting of whoever runs the tests) unless they start with
    one of ``keep``; this worktree first on ``PYTHONPATH``; then ``extra``. ``OMP_NUM_THREADS``
    comes from this process (set at the top of this file)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(keep) or not k.startswith(drop)}
    env["PYTHONPATH"] = _pythonpath()
    env.update(extra)
    return env


def no_hub(tmp_path: Path) -> dict[str, str]:
    """Variables for a child process that must not reach the Hugging Face hub: an empty cache
    under ``tmp_path`` and an endpoint on a closed loopback port (refused at once). Pass with
    ``drop`` including ``"HF_"``."""
    return {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


@contextlib.contextmanager
def ray_head_node(**env: str) -> Iterator[str]:
    """``ray start --head --block`` on loopback with its own temp dir and free ports, one CPU, no
    GPU; ``env`` adds variables (``RAY_AUTH_MODE`` is ``disabled`` unless given). Yields its
    address; stopped by killing the process group of the process started here (and only it)."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    if not os.path.exists(ray_cli):
        pytest.skip("the ray CLI is not installed beside this Python")
    temp = tempfile.mkdtemp(prefix="vrd", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    ports = {
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    cmd = [ray_cli, "start", "--head", "--block"]
    cmd += ["--node-ip-address", "127.0.0.1", "--port", str(port), "--temp-dir", temp]
    cmd += ["--num-cpus", "1", "--num-gpus", "0", "--include-dashboard", "false", "--disable-usage-stats"]
    cmd += [f"{k}={v}" for k, v in ports.items()]
    child_env = subprocess_env(drop=("RAY_",), **{"RAY_AUTH_MODE": "disabled", **env})
    log = os.path.join(temp, "ray-start.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=child_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        # `ray start` prints this once its raylet has registered with the GCS (Ray's Node() waits
        # for the node's entry in the GCS): the cluster then has its node, no fixed sleep needed.
        deadline = time.monotonic() + 60
        while "Ray runtime started" not in (text := open(log, errors="replace").read()):
            assert proc.poll() is None, f"ray start --head exited:\n{text[-2000:]}"
            assert time.monotonic() < deadline, f"ray start --head did not start in 60 s:\n{text[-2000:]}"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        # SIGKILL to the group of the process started here (and only it): SIGTERM makes Ray
        # drain for 30 s first. Its GCS, raylet and workers are in that group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def random_image(seed: int, w: int = 80, h: int = 72) -> Any:
    """A reproducible RGB noise image (PIL) of ``w`` x ``h`` pixels."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def max_level_diff(a: Any, b: Any) -> int:
    """The largest difference, in uint8 levels, between two videos of one shape."""
    assert a.shape == b.shape
    return int(abs(a.astype(int) - b.astype(int)).max())


def unet_call_macs(pipe: Any, run: Any) -> list[int]:
    """The MACs of each whole UNet call (its hooks included: counted from before every pre-hook
    to after every hook) while ``run()`` renders with ``pipe``, by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counts: list[int] = []
    active: list[FlopCounterMode] = []

    def pre(module, args, kwargs):
        active.append(FlopCounterMode(display=False))
        active[-1].__enter__()

    def post(module, args, kwargs, output):
        mode = active.pop()
        mode.__exit__(None, None, None)
        counts.append(mode.get_total_flops() // 2)

    handles = [
        pipe.unet.register_forward_pre_hook(pre, with_kwargs=True, prepend=True),
        pipe.unet.register_forward_hook(post, with_kwargs=True, always_call=True),
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return counts


def tiny_job_cfg(model_dir: Path, *dotlist: str, keys: dict[str, Any] | None = None) -> dict[str, Any]:
    """examples/tiny-job.yaml on ``model_dir`` with ``keys`` ({"model.vcut": "off"}: a dotlist
    would read ``off`` as YAML's false) and ``KEY=VALUE`` overrides, resolved to plain
    containers (what a worker gets)."""
    from omegaconf import OmegaConf

    from jobs.config import load_config

    cfg = load_config(
        str(ROOT / "examples" / "tiny-job.yaml"), {"model.id": str(model_dir), **(keys or {})}, list(dotlist)
    )
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


class FrameRecorder:
    """A worker's encoder that keeps each video's frames by output name instead of encoding."""

    def __init__(self) -> None:
        self.frames: dict[str, Any] = {}

    def __call__(self, frames: Any, out: str, **kwargs: Any) -> float:
        import numpy as np

        self.frames[out] = np.array(frames)
        return 0.001


def vcut_error(args: list[str], env: dict[str, str], tmp_path: Path, expect: str, code: int = 2) -> str:
    """Run ``vcut ARGS``: exactly one stderr line ``vcut: error: ...`` containing ``expect``,
    exit ``code``, and Ray never started (what would take long). Returns the line."""
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.main", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = proc.stderr.splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("vcut: error: "), proc.stderr
    assert expect in lines[0], lines[0]
    assert not (tmp_path / "raytmp").exists(), "Ray was started"
    assert proc.stdout == ""
    return lines[0]
