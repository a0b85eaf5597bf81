"""The job's setup: one driver per output folder (the lock), its own Ray instance or the
cluster at ``--address``, then the loop (``jobs.loop.Runner``). ``run_job`` is what ``vcut run``
calls.

How the job core is split, by role:

* ``jobs.planner``: manifest rows -> one typed record per row (``RowTask``) -> batches;
* ``jobs.dispatch``: the pool's decisions without Ray (sizes, shape affinity, deadlines);
* ``jobs.pool``: the worker actors (starts, readiness, dispatch with shape affinity,
  deadlines, elastic workers, requeue; labels reused by slot);
* ``jobs.loop``: the driver's loop (``Runner``): collects results, hands commits to
  ``jobs.commits`` (a writer thread: the loop never waits on storage), writes the summary;
* ``jobs.runner`` (here): the lock, Ray, ``run_job``.
"""

from __future__ import annotations

import contextlib
from typing import Any

from omegaconf import DictConfig

from jobs import manifest, output, results
from jobs.loop import Runner
from jobs.pool import JobError
from jobs.shards import check_layout
from jobs.stop import StopSignals

__all__ = ["JobError", "Runner", "run_job"]


def run_job(
    cfg: DictConfig,
    manifest_path: str,
    out_dir: str | output.OutputDir,
    *,
    verbose: bool = False,
    signals: StopSignals | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run a job on the connected Ray cluster, or on a local Ray instance started (and shut
    down) here: ``cfg.ray_address``, else ``RAY_ADDRESS``, else local. Returns the summary.

    A cluster that cannot be joined or lacks the GPUs the config asks for raises
    ``PreflightError`` before any worker starts, and an output folder another driver holds
    raises ``jobs.lock.OutputLockedError`` (see ``jobs.lock``); ``verbose`` streams the workers' output to
    this terminal (they always log to ``DIR/logs/`` when DIR is local). SIGINT and SIGTERM
    stop the job gracefully (``jobs.stop``: ``signals``, else handlers installed here); the
    summary then has ``stopped``."""
    import ray

    from jobs.lock import OutputLock
    from jobs.preflight import check_gpus, connect_ray, ray_address

    info = kwargs.pop("info", None)
    info = info or manifest.validate_manifest(manifest_path, reserved=results.RESERVED_COLUMNS)
    check_layout(cfg, info)
    out_dir = output.open_output(out_dir)  # an unknown protocol or a missing s3fs/gcsfs: before Ray
    # One driver per output folder (raises OutputLockedError), held until the job ends: only
    # its holder cleans temporaries, so a second driver never deletes the first one's files.
    grace_s = float(cfg.workers.stop_grace_s)
    stop = StopSignals(grace_s) if signals is None else contextlib.nullcontext(signals)
    with OutputLock(out_dir), stop as sig:
        own = not ray.is_initialized()
        address = ray_address(cfg.ray_address)
        try:
            if own:
                connect_ray(address, verbose=verbose)
                sig.install()  # again: ray.init sets its own SIGTERM handler
            check_gpus(cfg, ray.cluster_resources(), address)
            runner = Runner(cfg, manifest_path, out_dir, info=info, **kwargs)
            sig.target = runner.request_stop  # from now on a signal stops the job gracefully
            return runner.run()
        finally:
            sig.target = None
            if own:
                ray.shutdown()
