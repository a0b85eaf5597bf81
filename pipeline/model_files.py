"""What a model folder must hold, checked without torch or diffusers (fast, on any machine).

Used by :mod:`pipeline.loading` right before loading, and by ``jobs.preflight`` on the driver
before any worker starts, so a typo in ``--model`` is one line and not a dead Ray actor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ModelLoadError
from .storage import local_path

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_WEIGHT_COMPONENTS = ("unet", "vae", "image_encoder")
#: The components ``StableVideoDiffusionPipeline`` needs, as named in ``model_index.json``.
SVD_COMPONENTS = ("vae", "image_encoder", "unet", "scheduler", "feature_extractor")
_TRUE = {"1", "true", "yes", "on"}


def offline_from_env() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for no network access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def strip_file_scheme(model: str | os.PathLike) -> str:
    """A model folder given as ``file://`` is the local folder (``pipeline.storage.local_path``)."""
    return local_path(model)


def is_local_model(name: str) -> bool:
    """A local folder (existing, or spelled like a path) rather than a hub id ``owner/name``."""
    return Path(name).expanduser().exists() or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def local_model_folder(model: str | os.PathLike) -> Path | None:
    """The local folder ``model`` names (``file://`` stripped, ``~`` expanded), or None for a
    hub id: the one rule the loader, ``vcut run``'s pre-flight, ``doctor`` and ``compare`` use."""
    name = strip_file_scheme(model)
    return Path(name).expanduser() if is_local_model(name) else None


def pickle_only_components(folder: Path) -> dict[str, list[str]]:
    """Components of a local diffusers folder whose weights exist only as pickle files."""
    found: dict[str, list[str]] = {}
    for name in _WEIGHT_COMPONENTS:
        sub = folder / name
        if not sub.is_dir():
            continue
        files = [p.name for p in sub.iterdir() if p.is_file()]
        pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        if pickles and not any(f.endswith(".safetensors") for f in files):
            found[name] = pickles
    return found


def _local_has_variant(folder: Path, variant: str) -> bool:
    return any(folder.glob(f"*/*.{variant}.safetensors")) or any(folder.glob(f"*/*.{variant}-*.safetensors"))


def _check_local_folder(folder: Path, allow_pickle: bool) -> None:
    if not folder.exists():
        raise ModelLoadError(f"model folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        kind = "pickle checkpoint" if folder.suffix in PICKLE_SUFFIXES else "file"
        raise ModelLoadError(
            f"model {str(folder)!r} is a single {kind}; expected a diffusers folder with model_index.json "
            "(or a Hugging Face hub id)"
        )
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"model folder {str(folder)!r} has no model_index.json: not a diffusers pipeline folder "
            "(write one with StableVideoDiffusionPipeline.save_pretrained)"
        )
    pickles = pickle_only_components(folder)
    if pickles and not allow_pickle:
        listing = "; ".join(f"{k}: {', '.join(v)}" for k, v in pickles.items())
        raise ModelLoadError(
            f"model folder {str(folder)!r} has pickle weights only ({listing}). Pickle files can run "
            "arbitrary code when loaded, so they are refused: convert them to safetensors, or pass "
            "allow_pickle=True if you trust this checkpoint"
        )


def check_svd_folder(folder: Path, allow_pickle: bool = False) -> list[str]:
    """Everything :func:`_check_local_folder` checks, plus: ``model_index.json`` is readable JSON
    naming every SVD component, and each weight component has weights. Returns the components;
    raises :class:`ModelLoadError` (one line) otherwise. Reads no weights."""
    _check_local_folder(folder, allow_pickle)
    index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {str(index_path)!r}: {exc}") from exc
    if not isinstance(index, dict):
        raise ModelLoadError(f"{str(index_path)!r} is not a JSON object")
    missing = [c for c in SVD_COMPONENTS if not (isinstance(index.get(c), list) and any(index[c]))]
    if missing:
        cls = index.get("_class_name", "?")
        raise ModelLoadError(
            f"model folder {str(folder)!r} is a {cls}, not a Stable Video Diffusion pipeline: its "
            f"model_index.json lacks {', '.join(missing)}"
        )
    suffixes = (".safetensors", *PICKLE_SUFFIXES) if allow_pickle else (".safetensors",)
    for name in _WEIGHT_COMPONENTS:
        sub = folder / name
        if not sub.is_dir() or not any(p.name.endswith(suffixes) for p in sub.iterdir()):
            kind = "weights" if allow_pickle else "safetensors weights"
            raise ModelLoadError(f"model folder {str(folder)!r} has no {kind} in {name}/")
    return list(SVD_COMPONENTS)
