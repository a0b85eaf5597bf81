"""The ``vcut`` entry point: one module per command, ``key=value`` overrides parsed by argparse
wherever they stand, usage errors in one line with the table's exit status. No Ray, no model."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from jobs.cli import build_parser, main
from jobs.cli.flags import load_config
from jobs.stop import ExitStatus

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("macs", "compare", "tiny-model", "run", "report", "doctor", "config", "manifest")


def test_every_command_has_its_own_module():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert set(sub) == set(COMMANDS)
    for name in COMMANDS:
        module = sub[name].get_default("func").__module__
        assert module == f"jobs.cli.{name.replace('-', '_')}", (name, module)
    main_py = (ROOT / "jobs" / "main.py").read_text()
    assert "add_parser" not in main_py and "def " not in main_py  # only the shim is left there


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "m.parquet", "--out", "o", "defaults.fps=9", "workers.batch_size=2"],
        ["run", "m.parquet", "defaults.fps=9", "--out", "o", "workers.batch_size=2"],
        ["run", "--out", "o", "m.parquet", "defaults.fps=9", "--dry-run", "workers.batch_size=2"],
        [
            "run",
            "m.parquet",
            "--dry-run",
            "defaults.fps=9",
            "--vcut",
            "exact",
            "workers.batch_size=2",
            "--out",
            "o",
        ],
    ],
)
def test_overrides_are_taken_wherever_they_stand(argv):
    args = build_parser().parse_args(argv)
    assert (args.manifest, args.out) == ("m.parquet", "o")
    assert args.overrides == ["defaults.fps=9", "workers.batch_size=2"]
    cfg = load_config(args)
    assert (cfg.defaults.fps, cfg.workers.batch_size) == (9, 2)


def test_off_and_on_are_words_where_a_setting_takes_words(tmp_path: Path):
    """YAML reads off/on as booleans; a string or enum setting gets the word back, from a
    ``KEY=VALUE`` override and from a config file alike; a boolean setting stays a boolean."""
    args = build_parser().parse_args(
        ["run", "m.parquet", "--out", "o", "model.vcut=off", "model.quantize=off", "model.compile=on"]
    )
    cfg = load_config(args)
    assert (cfg.model.vcut.value, cfg.model.quantize, cfg.model.compile) == ("off", "off", "on")
    config = tmp_path / "job.yaml"
    config.write_text("model:\n  vcut: off\n  allow_pickle: on\nworkers:\n  overlap_decode: off\n")
    cfg = load_config(build_parser().parse_args(["run", "m.parquet", "--out", "o", "--config", str(config)]))
    assert (cfg.model.vcut.value, cfg.model.allow_pickle, cfg.workers.overlap_decode) == ("off", True, "off")


def test_usage_errors_are_one_line_with_the_usage_status(capsys):
    cases = [
        (["run", "m.parquet", "--out", "o", "fps"], "'fps'"),  # not key=value
        (["run", "m.parquet", "--out", "o", "=3"], "'=3'"),  # no key
        (["run", "m.parquet", "--out", "o", "--nope"], "--nope"),
        (["run", "--out", "o"], "manifest"),
        (["macs", "x=1"], "x=1"),  # only run and config take overrides
        (["config", "defaults.fps=oops"], "defaults.fps"),  # the config's own check
    ]
    for argv, named in cases:
        assert main(argv) == ExitStatus.USAGE, argv
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("vcut: error:") and named in lines[0], (argv, err)


def test_run_help_prints_the_defaults_and_the_exit_table(capsys):
    assert main(["run", "--help"]) == ExitStatus.OK
    text = capsys.readouterr().out
    assert "KEY=VALUE" in text and "defaults.KEY=VALUE" in text and "exit status:" in text
    for status in ExitStatus:
        assert f"{int(status):>3}  " in text


def test_no_command_returns_a_bare_number():
    """Every ``return`` of a command module is an ``ExitStatus`` (or another call's status),
    never a literal such as 2."""
    for path in sorted((ROOT / "jobs" / "cli").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant):
                assert not isinstance(node.value.value, int), (
                    f"{path.name}:{node.lineno} returns {node.value.value}"
                )
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                for arg in node.exc.args:
                    assert not (isinstance(arg, ast.Constant) and isinstance(arg.value, int)), path.name


def test_the_parser_imports_no_heavy_library():
    """``vcut --help`` is instant: building every command's parser imports no torch, ray,
    pyarrow or omegaconf (each command imports what it needs when it runs)."""
    import subprocess
    import sys

    code = (
        "import sys; from jobs.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'ray', 'pyarrow', 'omegaconf') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
