"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


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


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread for a module: on a shared, oversubscribed CPU the tiny
    model renders ~10x faster than with spinning OpenMP threads. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
