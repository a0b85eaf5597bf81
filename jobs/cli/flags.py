"""Flags that several commands share, built from their one declaration: the generation
parameters' flags (``pipeline.params.GENERATION_PARAMS``), the job flags of ``run`` and
``config`` with the config keys they set, and the ``key=value`` overrides."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any

from jobs.cli.common import fail
from pipeline.params import GENERATION_PARAMS
from vcut.modes import MODES  # torch-free

#: Job flags -> config keys (flags override the YAML file; ``key=value`` overrides win).
FLAG_KEYS = {
    "model": "model.id",
    "vcut": "model.vcut",
    "workers": "workers.count",
    "address": "ray_address",
    "metrics_port": "metrics.port",
    "metrics_address": "metrics.address",
    "pushgateway": "metrics.pushgateway",
    "overwrite": "output.overwrite",
    "rerender": "output.rerender",
}


def flag_name(name: str) -> str:
    """The command-line spelling of a generation parameter: ``--motion-bucket-id``."""
    return "--" + name.replace("_", "-")


def add_param_flags(
    parser: argparse.ArgumentParser, names: Iterable[str], aliases: Mapping[str, str] | None = None
) -> None:
    """One flag per generation parameter in ``names`` (``--motion-bucket-id``), with its
    declared type, default and description; ``aliases`` adds a second spelling (``--steps``).
    The value lands in ``args.<name>``."""
    aliases = aliases or {}
    for name in names:
        p = GENERATION_PARAMS[name]
        spellings = [flag_name(name)] + ([aliases[name]] if name in aliases else [])
        metavar = "N" if p.kind == "int" else "X"
        parser.add_argument(
            *spellings, dest=name, type=p.type, default=p.default, metavar=metavar, help=p.help()
        )


def defaults_help() -> str:
    """The ``defaults.*`` config keys with their descriptions, from the one declaration."""
    lines = ["generation defaults (defaults.KEY=VALUE; a manifest column of the same name wins):"]
    lines += [f"  {name}: {param.help()}" for name, param in GENERATION_PARAMS.items()]
    return "\n".join(lines)


def override(text: str) -> str:
    """A ``key=value`` config override (an argparse type): a dotted key, ``=``, a value."""
    key, eq, _ = text.partition("=")
    if text.startswith("-") or not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"not a config override KEY=VALUE (e.g. defaults.fps=8): {text!r}")
    return text


def _workers_count(text: str) -> int | str:
    """``--workers``: a positive integer or ``auto`` (workers.count)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None


def add_job_flags(p: argparse.ArgumentParser) -> None:
    """The flags ``run`` and ``config`` share (each sets a config key, :data:`FLAG_KEYS`), and
    the trailing ``key=value`` overrides (``args.overrides``; the parser must be intermixed)."""
    p.add_argument("--config", help="job YAML file (merged over the defaults)")
    p.add_argument("--model", help="hub id or local model folder (model.id)")
    p.add_argument("--vcut", choices=MODES, help="VCUT mode (model.vcut)")
    p.add_argument(
        "--workers",
        type=_workers_count,
        help="number of workers, or auto: one per GPU, also on GPUs that join mid-job "
        "(default: one per GPU at start, else 1)",
    )
    p.add_argument("--address", help="address of an existing Ray cluster (default: RAY_ADDRESS, else local)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--metrics-address", help="address to serve /metrics on (default 127.0.0.1)")
    p.add_argument("--pushgateway", help="Prometheus Pushgateway to push the final metrics to")
    p.add_argument(
        "overrides",
        nargs="*",
        type=override,
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, e.g. defaults.num_frames=14 (win over --config and the flags)",
    )


def load_config(args: argparse.Namespace) -> Any:
    """The resolved job config of ``run``/``config``'s arguments, or None after printing
    omegaconf's (or a check's) message in one line (the caller exits ``ExitStatus.USAGE``)."""
    from omegaconf.errors import OmegaConfBaseException

    from jobs.config import check_config
    from jobs.config import load_config as load

    flags = {key: getattr(args, name, None) for name, key in FLAG_KEYS.items()}
    if flags.get("output.overwrite") is False:
        flags["output.overwrite"] = None
    try:
        cfg = load(args.config, flags, args.overrides)
        check_config(cfg)
        return cfg
    except (OmegaConfBaseException, ValueError, OSError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        key = next((ln.strip() for ln in lines[1:] if ln.strip().startswith("full_key:")), "")
        fail(f"config: {lines[0]}" + (f" ({key})" if key else ""))
        return None
