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
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
try:
    TORCH_THREADS = max(1, int(os.environ["OMP_NUM_THREADS"].split(",")[0]))
except ValueError:
    TORCH_THREADS = 1


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


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray instance (2 CPUs) for a test module; yields its GCS address."""
    ray = pytest.importorskip("ray")
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
