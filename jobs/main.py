"""The ``vcut`` command line: the only module of the project that faces the user.

Each sub-command lives in its own small function; the heavy imports (torch, ray) happen
inside them so that ``vcut --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.params import GENERATION_PARAMS, add_flags
from vcut.modes import MODES  # torch-free

#: ``vcut compare``'s generation flags: every parameter but the seed (``--seed``/``--seeds``).
COMPARE_PARAMS = tuple(n for n in GENERATION_PARAMS if n != "seed")


def _cmd_macs(args: argparse.Namespace) -> int:
    from vcut import count_macs

    try:
        report = count_macs(
            args.model,
            height=args.height,
            width=args.width,
            num_frames=args.num_frames,
            num_inference_steps=args.steps,
            mode=args.mode,
            guidance=not args.no_guidance,
            step_cache=args.step_cache,
            step_cache_depth=args.step_cache_depth,
        )
    except ValueError as exc:  # a bad shape, steps or step-cache setting: say which
        print(f"vcut macs: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_table())
    return 0


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from pipeline.notices import quiet_notices
    from vcut.tiny import RANDOM_WEIGHTS_WARNING, save_tiny_pipeline

    quiet_notices()  # its CLIP image processor's torchvision notice
    print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    path = save_tiny_pipeline(args.dir, seed=args.seed)
    print(f"wrote tiny random-weight SVD pipeline to {path}")
    print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    return 0


# -- compare: the quality A/B on the user's own weights ----------------------------------------


def _cmd_compare(args: argparse.Namespace) -> int:
    import importlib.util

    from jobs.compare import CompareError, check_images, check_model, parse_configs
    from pipeline.params import check_generation, check_value, flag_name

    def fail(msg: str) -> int:
        print(f"vcut: error: {msg}", file=sys.stderr)
        return 2

    try:  # everything that can be checked before a model is loaded
        if not args.model:
            raise CompareError("--model is required (a local SVD folder or a hub id)")
        if not args.out:
            raise CompareError("--out is required (the folder for compare.json, compare.md and the PNGs)")
        configs, added_off = parse_configs(args.configs)
        check_model(args.model, args.allow_pickle)
        check_images(args.images)
        if args.warmup < 0 or args.step_cache_depth < 1 or args.sheet_height < 0:
            raise CompareError("--step-cache-depth must be >= 1, --warmup and --sheet-height >= 0")
        if args.seeds is not None:
            if len(args.seeds) != len(args.images):
                raise CompareError(f"--seeds gives {len(args.seeds)} seeds for {len(args.images)} images")
            seeds = list(args.seeds)
        else:
            seeds = [args.seed + i for i in range(len(args.images))]
        try:  # the renderer's own check of the generation values, before anything is loaded
            generate_kwargs = check_generation({n: getattr(args, n) for n in COMPARE_PARAMS}, label=flag_name)
            for seed in seeds:
                check_value("seed", seed)
        except ValueError as exc:
            raise CompareError(str(exc)) from exc
        for module, package in (("skimage", "scikit-image"), ("matplotlib", "matplotlib")):
            if importlib.util.find_spec(module) is None:
                raise CompareError(f"vcut compare needs {package}: pip install 'vcut-render[compare]'")
        from jobs.output import open_output

        try:
            out = open_output(args.out)
        except (ValueError, ImportError) as exc:
            raise CompareError(f"--out {args.out!r}: {exc}") from exc
    except CompareError as exc:
        return fail(str(exc))

    from jobs.compare import run_compare
    from pipeline.errors import ImageError, ModelLoadError

    if added_off:
        print("vcut: 'off' added to --configs: it is the reference of every distance", file=sys.stderr)
    generate_kwargs["fit"] = args.fit
    try:
        data = run_compare(
            args.model,
            args.images,
            configs,
            seeds=seeds,
            out=out,
            generate_kwargs=generate_kwargs,
            device=args.device,
            dtype=args.dtype,
            variant=args.variant,
            allow_pickle=args.allow_pickle,
            warmup=args.warmup,
            step_cache_depth=args.step_cache_depth,
            save_videos=args.save_videos,
            use_lpips=not args.no_lpips,
            thumb_height=args.sheet_height or None,
        )
    except (CompareError, ModelLoadError, ImageError, ValueError) as exc:
        return fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    from jobs.compare_report import build_markdown

    print(build_markdown(data))
    print(
        f"wrote compare.json, compare.md, contact_sheet.png, psnr_per_frame.png to {out.uri}", file=sys.stderr
    )
    return 0


# -- jobs: run, config, manifest ------------------------------------------------------------

#: CLI flags -> config keys (flags override the YAML file; ``key=value`` overrides win).
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


def _fail(message: str) -> int:
    """One line on stderr, ``vcut: error: ...``; exit status 2 (bad usage, config or input)."""
    print(f"vcut: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``vcut: error: ...``), exit 2."""

    def error(self, message: str):  # type: ignore[override]
        _fail(f"{message} (see `{self.prog} --help`)")
        raise SystemExit(2)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (so captured output in tests sees it too)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(verbose: bool) -> None:
    """The terminal shows the job's own lines (logger ``jobs``) and warnings; ``--verbose``
    shows every library's INFO lines too. Called once per command (replaces its handler)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_vcut", False)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler._vcut = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if not verbose:
        handler.addFilter(
            lambda r: r.levelno >= logging.WARNING or r.name == "jobs" or r.name.startswith("jobs.")
        )
    root.addHandler(handler)
    root.setLevel(logging.INFO)


class _QuietFileHandler(logging.FileHandler):
    """``DIR/logs/vcut.log``. A disk that fills up (or turns read-only) mid-job fails the log
    file too: one warning on the terminal and the file is given up, instead of logging's
    traceback for every record (the job's own error line says what failed)."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        error = sys.exc_info()[1]
        logging.getLogger().removeHandler(self)
        print(f"vcut: warning: {self.baseFilename} no longer written: {error}", file=sys.stderr)


def _log_to_out(out) -> str | None:
    """Everything the driver logs also goes to ``DIR/logs/vcut.log`` (local DIR only)."""
    if not out.local:
        return None
    import os

    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_vcut_file", False)]:
        root.removeHandler(handler)
        handler.close()
    try:
        os.makedirs(out.path("logs"), exist_ok=True)
        handler = _QuietFileHandler(out.path("logs", "vcut.log"))
    except OSError:
        return None
    handler._vcut_file = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    return out.path("logs", "vcut.log")


def _load_config(args: argparse.Namespace):
    """The resolved job config, or None after printing omegaconf's message, one line (exit 2)."""
    from omegaconf.errors import OmegaConfBaseException

    from jobs.config import check_config, load_config

    flags = {key: getattr(args, name, None) for name, key in FLAG_KEYS.items()}
    if flags.get("output.overwrite") is False:
        flags["output.overwrite"] = None
    try:
        cfg = load_config(args.config, flags, args.overrides)
        check_config(cfg)
        return cfg
    except (OmegaConfBaseException, ValueError, OSError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        key = next((ln.strip() for ln in lines[1:] if ln.strip().startswith("full_key:")), "")
        _fail(f"config: {lines[0]}" + (f" ({key})" if key else ""))
        return None


def _left(summary: dict) -> str:
    ok = summary.get("ok")
    return str(max(0, int(summary["manifest_rows"]) - ok)) if isinstance(ok, int) else "an unknown number"


def _stopped_line(reason: str, summary: dict | None) -> str:
    """The last line of a job stopped by a signal (``summary``: None when stopped at once)."""
    if summary is None:
        return (
            f"vcut: stopped by {reason}: the rows committed so far are kept (no summary was written); "
            "rerun the same command to resume"
        )
    return (
        f"vcut: stopped by {reason}: {summary.get('rendered_this_run', 0)} rows committed this run, "
        f"{_left(summary)} left; rerun the same command to resume"
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from jobs.stop import ExitStatus, Interrupted, StopSignals, exit_for_signal

    try:  # Ctrl-C / SIGTERM: before the job's runner exists, Interrupted; then a graceful stop
        with StopSignals() as signals:
            return _run_job(args, signals)
    except Interrupted as exc:
        print(_stopped_line(exc.reason, None), file=sys.stderr)
        return exit_for_signal(exc.signum)
    except KeyboardInterrupt:  # before the handlers were installed
        print(_stopped_line("SIGINT", None), file=sys.stderr)
        return ExitStatus.SIGINT


def _run_job(args: argparse.Namespace, signals) -> int:
    """``vcut run`` under ``signals`` (``jobs.stop.StopSignals``): each way a job ends is one
    line and one exit status of ``jobs.stop.ExitStatus``."""
    from jobs.lock import OutputLockedError
    from jobs.manifest import ManifestError
    from jobs.metrics import make_metrics_hook
    from jobs.output import open_output
    from jobs.preflight import ClusterUnavailableError, PreflightError, run_preflight
    from jobs.progress import format_summary
    from jobs.results import CorruptPartError
    from jobs.runner import JobError, run_job
    from jobs.stop import ExitStatus, OutputWriteError, exit_for_signal, quiet_orphaned_storage_errors

    _setup_logging(args.verbose)
    quiet_orphaned_storage_errors()
    try:  # a local folder or an fsspec URI (s3://, gs://, file:// ...); creates nothing yet
        out = open_output(args.out)
    except (ValueError, ImportError) as exc:
        return _fail(f"--out {args.out!r}: {exc}")
    cfg = _load_config(args)
    if cfg is None:
        return 2
    signals.grace_s = float(cfg.workers.stop_grace_s)
    if args.dry_run:  # what would run: no Ray, no model, nothing written
        from jobs.dryrun import dry_run

        try:
            return dry_run(cfg, args.manifest, out, sys.stdout)
        except ManifestError as exc:
            print(f"vcut: error: {exc}", file=sys.stderr)
            return 2
        except CorruptPartError as exc:  # a damaged results part: its name and the fix
            return _fail(str(exc))
    try:  # manifest, output, model, ffmpeg, cluster address: before Ray starts
        info = run_preflight(cfg, args.manifest, out)
    except ClusterUnavailableError as exc:  # --address: nothing answers, not Ray, token auth
        _fail(str(exc))
        return ExitStatus.UNAVAILABLE
    except PreflightError as exc:
        return _fail(str(exc))
    except ManifestError as exc:  # one line per problem, each naming column and row
        print(f"vcut: error: {exc}", file=sys.stderr)
        return 2
    log_file = _log_to_out(out)
    hook = make_metrics_hook(cfg.metrics)
    try:
        summary = run_job(
            cfg, args.manifest, out, hook=hook, info=info, verbose=args.verbose, signals=signals
        )
    except OutputLockedError as exc:  # another driver runs on this --out
        _fail(str(exc))
        return ExitStatus.LOCKED
    except ClusterUnavailableError as exc:  # joining the cluster failed after all
        _fail(str(exc))
        return ExitStatus.UNAVAILABLE
    except PreflightError as exc:  # the cluster has too few GPUs
        return _fail(str(exc))
    except OutputWriteError as exc:  # disk full, read-only, object store gone: what is kept
        print(format_summary(exc.summary))
        _fail(
            f"{exc}; {exc.summary.get('rendered_this_run', 0)} rows committed this run are kept, "
            f"{_left(exc.summary)} left: rerun the same command to resume"
        )
        return ExitStatus.IO_ERROR
    except ManifestError as exc:
        print(f"vcut: error: {exc}", file=sys.stderr)
        return 2
    except CorruptPartError as exc:  # a damaged results part: its name and the fix
        return _fail(str(exc))
    except JobError as exc:
        logs = f"; details in {out.uri_of('logs')}" if (exc.causes or log_file) else ""
        for cause in exc.causes or [""]:
            print(f"vcut: error: {exc}{': ' + cause if cause else ''}{logs}", file=sys.stderr)
        return ExitStatus.NO_WORKER
    finally:
        hook.close()
    print(format_summary(summary))
    if summary.get("stopped"):
        print(_stopped_line(summary["stopped"], summary), file=sys.stderr)
        return exit_for_signal(summary["stopped"])
    return ExitStatus.OK if summary["failed"] == 0 else ExitStatus.FAILED_ROWS


def _cmd_report(args: argparse.Namespace) -> int:
    from jobs.output import open_output
    from jobs.report import write_report

    try:
        out = open_output(args.dir)
    except (ValueError, ImportError) as exc:
        return _fail(f"{args.dir!r}: {exc}")
    if not out.listdir("results") and "summary.json" not in out.listdir():
        return _fail(f"{out.uri} has no results yet (not the --out of a vcut run?)")
    if args.sample < 0:
        return _fail("--sample must be >= 0")
    from jobs.results import CorruptPartError

    try:
        print(f"wrote {write_report(out, sample=args.sample)}")
    except CorruptPartError as exc:  # a damaged results part: its name and the fix
        return _fail(str(exc))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from jobs.doctor import main as doctor_main

    _setup_logging(False)
    return doctor_main(args)


def _cmd_config(args: argparse.Namespace) -> int:
    from jobs.config import to_yaml

    cfg = _load_config(args)
    if cfg is None:
        return 2
    print(to_yaml(cfg), end="")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _cmd_manifest(args: argparse.Namespace) -> int:
    from jobs.manifest import ManifestError, build_manifest

    try:
        n = build_manifest(
            args.source,
            args.output,
            seeds=args.seeds,
            motion_bucket_ids=args.motion_bucket_ids,
            fps=args.fps,
            num_frames=args.num_frames,
        )
    except ManifestError as exc:
        print(f"vcut: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {n} rows to {args.output}")
    return 0


def _defaults_help() -> str:
    """The ``defaults.*`` config keys with their descriptions, from the one declaration."""
    lines = ["generation defaults (defaults.KEY=VALUE; a manifest column of the same name wins):"]
    lines += [f"  {name}: {param.help()}" for name, param in GENERATION_PARAMS.items()]
    return "\n".join(lines)


def _workers_count(text: str) -> int | str:
    """``--workers``: a positive integer or ``auto`` (workers.count)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None


def _add_job_flags(p: argparse.ArgumentParser) -> None:
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
    p.set_defaults(overrides=[], accepts_overrides=True)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vcut",
        description="Batch image-to-video rendering with Stable Video Diffusion and VCUT.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("macs", help="count UNet MACs and parameters, stock vs VCUT (no weights needed)")
    p.add_argument(
        "--model", default="svd-xt", help="'svd', 'svd-xt' or a local model folder (default: svd-xt)"
    )
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument(
        "--num-frames", type=int, default=None, help="default: the model's own (25 for svd-xt, 14 for svd)"
    )
    p.add_argument("--steps", type=int, default=25, help="denoising steps per video")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="full",
        help="VCUT mode to compare (default: full)",
    )
    p.add_argument(
        "--step-cache",
        type=int,
        default=None,
        metavar="N",
        help="step caching: the whole UNet every N-th step, the shallow path between (default: off)",
    )
    p.add_argument(
        "--step-cache-depth",
        type=int,
        default=1,
        metavar="D",
        help="outer down/up levels that always run with --step-cache (default: 1)",
    )
    p.add_argument(
        "--no-guidance", action="store_true", help="count without classifier-free guidance (batch 1)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_macs)

    p = sub.add_parser(
        "compare",
        help="render images under several VCUT / step-cache configurations and measure each against 'off'",
        description="Render every IMAGE under every configuration with the same seeds, and write per "
        "configuration: seconds per video, MACs, and the distance to 'off' (PSNR and SSIM per frame; "
        "LPIPS when the lpips package is installed) as compare.json, compare.md, contact_sheet.png and "
        "psnr_per_frame.png in --out.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="input images (paths or URIs)")
    p.add_argument("--model", help="local SVD folder or hub id (required)")
    p.add_argument(
        "--configs",
        default=",".join(MODES),
        help=f"comma-separated VCUT modes ({', '.join(MODES)}), each optionally +cacheN for a step-cache "
        "interval N >= 2, e.g. off,exact,full,full+cache3; 'off' is the reference, added when missing "
        f"(default: {','.join(MODES)})",
    )
    p.add_argument("--out", help="output folder (or URI) for the report files (required)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seed", type=int, default=0, help="image i is rendered with seed SEED + i (default 0)"
    )
    seeds.add_argument("--seeds", type=_int_list, help="comma-separated seeds, one per image")
    # Every generation parameter but the seed, from its one declaration (pipeline.params).
    add_flags(p, COMPARE_PARAMS, aliases={"num_inference_steps": "--steps"})
    p.add_argument("--fit", choices=["crop", "letterbox"], default="crop")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--variant", help="weights variant, e.g. fp16")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle weights (runs their code)")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed videos per configuration before the timed ones (default 1)",
    )
    p.add_argument("--step-cache-depth", type=int, default=1, help="outer levels the step cache always runs")
    p.add_argument("--save-videos", action="store_true", help="also write every video to OUT/videos/")
    p.add_argument(
        "--no-lpips", action="store_true", help="skip LPIPS even when the lpips package is installed"
    )
    p.add_argument(
        "--sheet-height",
        type=int,
        default=288,
        help="frame height on the contact sheet (0: full size; default 288)",
    )
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("tiny-model", help="write a tiny RANDOM-WEIGHT SVD pipeline for tests and demos")
    p.add_argument("dir", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tiny_model)

    from jobs.stop import EXIT_HELP

    p = sub.add_parser(
        "run",
        help="render every row of a manifest to a video (resumes; exit 0 all ok, 3 some failed; "
        "every exit status: vcut run --help)",
        epilog="Trailing key=value arguments override config keys, e.g. defaults.num_frames=14.\n\n"
        + _defaults_help()
        + "\n\n"
        + EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "manifest",
        help="Parquet (or CSV / JSONL) manifest, one row per video: a path or a URI (s3://, gs://)",
    )
    p.add_argument(
        "--out", required=True, help="output folder or URI (s3://, gs://): videos/, results/, summary.json"
    )
    p.add_argument("--overwrite", action="store_true", help="render rows that are already ok again")
    p.add_argument(
        "--rerender",
        choices=["changed"],
        help="render again the ok rows whose image, generation values, model or VCUT settings changed",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the manifest and print what would run (rows, images, shapes, MACs, GPU-hours); "
        "no Ray, nothing written",
    )
    p.add_argument(
        "--verbose", action="store_true", help="also show Ray's and the workers' logs (always in DIR/logs/)"
    )
    _add_job_flags(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "report",
        help="write DIR/report.html: summary, throughput, render times, failures, thumbnails",
        description="Write DIR/report.html, one self-contained page (no network) about a finished or "
        "running job: counts, wall time, videos per hour, MACs spent and saved, throughput over time "
        "and per worker, a render-time histogram, the failures grouped by error, and the first frames "
        "of a sample of videos. `vcut run` writes it at the end of every job (output.report=false: not).",
    )
    p.add_argument("dir", metavar="DIR", help="the --out folder (or URI) of a vcut run")
    p.add_argument("--sample", type=int, default=24, help="videos on the contact sheet (default 24)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "doctor",
        help="check this machine (and a cluster) for a job: OK / WARN / FAIL rows (exit 0: a job would run)",
        description="One table of what a job needs: Python, torch and its CUDA build, GPUs seen by torch "
        "and by Ray, ffmpeg and its encoders, the Ray cluster (reachable, auth mode), the model (config "
        "only, no weights loaded), the Hugging Face cache and token, the output folder. Exit status 0 "
        "when no row is FAIL, else 1.",
    )
    p.add_argument("--model", help="hub id or local model folder to check (nothing is downloaded)")
    p.add_argument("--address", help="Ray cluster to check (default: RAY_ADDRESS, else none)")
    p.add_argument("--out", help="output folder or URI to check with a probe file (removed again)")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("config", help="print the resolved job config (same flags as run)")
    _add_job_flags(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("manifest", help="build a manifest from a folder or glob of images")
    p.add_argument("source", help="a folder, or a glob such as 'imgs/**/*.png'")
    p.add_argument("-o", "--output", required=True, help="manifest file to write (.parquet)")
    p.add_argument("--seeds", type=_int_list, help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--motion-bucket-ids", type=_int_list, help="comma-separated motion bucket ids")
    p.add_argument("--fps", type=_int_list, help="comma-separated frame rates")
    p.add_argument("--num-frames", type=_int_list, help="comma-separated frame counts")
    p.set_defaults(func=_cmd_manifest)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        bad = [a for a in extra if a.startswith("-") or "=" not in a]
        if bad or (extra and not getattr(args, "accepts_overrides", False)):
            parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    except SystemExit as exc:  # usage errors: argparse printed the message
        return int(exc.code or 0)
    if getattr(args, "accepts_overrides", False):
        args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C in any command: a line, not a traceback
        print(f"vcut: interrupted ({args.command})", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
