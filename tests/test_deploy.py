"""Static checks of deploy/: every file parses, and what must agree with the code does.

Docker cannot build here (no engine), KubeRay and Grafana are not running: these tests check
the files themselves, with the real argparse parser, config schema, metric names, Ray's own
cluster-config schema and, where installed, Prometheus' promtool.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

import jobs.main
from jobs import metrics as jm

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
IMAGE = f"ghcr.io/vcut-render/vcut-render:{VERSION}"
RAY_METRICS_PORT = 8080
HIST_SUFFIX = re.compile(r"_(bucket|sum|count|created)$")


def load_yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def rayjob() -> dict:
    (doc,) = load_yaml_docs(DEPLOY / "kuberay" / "rayjob.yaml")
    return doc


def monitoring() -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in load_yaml_docs(DEPLOY / "kuberay" / "monitoring.yaml"):
        out.setdefault(d["kind"], []).append(d)
    return out


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "vcut-dashboard.json").read_text())


def constraints() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "docker" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def iter_images(obj: Any):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "image" and isinstance(v, str):
                yield v
            else:
                yield from iter_images(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from iter_images(v)


def dashboard_exprs(dash: dict) -> list[str]:
    exprs = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        if var.get("type") == "query":
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bvcut_[A-Za-z0-9_]+", expr))


def base_name(name: str) -> str:
    base = HIST_SUFFIX.sub("", name)
    return base if base in jm.METRIC_NAMES else name


def promtool() -> str | None:
    path = shutil.which("promtool") or ("/usr/bin/promtool" if os.path.exists("/usr/bin/promtool") else None)
    if path is None and os.environ.get("CI"):
        pytest.fail("promtool (Debian package 'prometheus') is not installed; .ci/run must install it")
    return path


# --- every file parses --------------------------------------------------------------------


def test_all_yaml_and_json_files_parse():
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml", ".json"})
    assert len(files) >= 6, files
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert load_yaml_docs(path), path


# --- metric names -------------------------------------------------------------------------


def test_dashboard_uses_only_exported_metrics():
    used = {base_name(n) for e in dashboard_exprs(dashboard()) for n in metric_names_in(e)}
    assert used, "no vcut_ metric in the dashboard"
    unknown = used - jm.METRIC_NAMES
    assert not unknown, f"dashboard uses metrics the code does not export: {unknown}"
    # It shows what the issue asks for: throughput, latency percentiles, MAC savings,
    # failures, cache hit rate.
    for needed in (
        "vcut_videos_total",
        "vcut_frames_rendered_total",
        "vcut_render_seconds",
        "vcut_unet_step_seconds",
        "vcut_encode_seconds",
        "vcut_macs_total",
        "vcut_macs_saved_total",
        "vcut_embedding_cache_hits_total",
        "vcut_embedding_cache_misses_total",
    ):
        assert needed in used, needed
    exprs = "\n".join(dashboard_exprs(dashboard()))
    assert "histogram_quantile(0.99" in exprs and 'status="failed"' in exprs


def test_dashboard_suffixes_match_metric_types():
    for expr in dashboard_exprs(dashboard()):
        for name in metric_names_in(expr):
            base = base_name(name)
            kind = jm.METRICS[base][0]
            if name != base:
                assert kind == "histogram", f"{name}: suffix on a {kind}"
            if "histogram_quantile" in expr and kind == "histogram":
                assert name.endswith("_bucket"), expr


def test_dashboard_panels_are_well_formed():
    dash = dashboard()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert dash["uid"] and dash["title"]
    for p in dash["panels"]:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"


def test_alert_rules_use_only_exported_metrics():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"VcutHighFailureRatio", "VcutProgressStalled"} <= names
    for g in rules["groups"]:
        for r in g["rules"]:
            used = {base_name(n) for n in metric_names_in(r["expr"])}
            assert used and used <= jm.METRIC_NAMES, (r["alert"], used - jm.METRIC_NAMES)


def test_prometheus_rule_crd_matches_rule_file():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    (crd,) = monitoring()["PrometheusRule"]
    assert crd["spec"]["groups"] == rules["groups"]


# --- ports and scraping -------------------------------------------------------------------


def _ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def test_scrape_config_targets_the_metrics_port():
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    (target,) = jobs["vcut"]["static_configs"][0]["targets"]
    assert target.rsplit(":", 1)[1] == str(jm.DEFAULT_METRICS_PORT)
    assert jobs["vcut-pushgateway"]["honor_labels"] is True
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert cfg["rule_files"] == ["alerts.yml"]


def test_kuberay_ports_and_podmonitors_agree():
    job = rayjob()
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    (head_c,) = head["template"]["spec"]["containers"]
    assert _ports(head_c)["vcut-metrics"] == jm.DEFAULT_METRICS_PORT
    assert _ports(head_c)["metrics"] == RAY_METRICS_PORT
    assert head["rayStartParams"]["metrics-export-port"] == str(RAY_METRICS_PORT)
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        assert group["rayStartParams"]["metrics-export-port"] == str(RAY_METRICS_PORT)
        (c,) = group["template"]["spec"]["containers"]
        assert _ports(c)["metrics"] == RAY_METRICS_PORT

    pm = {m["metadata"]["name"]: m for m in monitoring()["PodMonitor"]}
    driver = pm["vcut-driver"]["spec"]
    assert [e["port"] for e in driver["podMetricsEndpoints"]] == ["vcut-metrics"]
    head_labels = head["template"]["metadata"]["labels"]
    assert driver["selector"]["matchLabels"].items() <= head_labels.items()
    assert [e["port"] for e in pm["vcut-ray-nodes"]["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_gpu_worker_group_has_one_gpu_per_worker():
    spec = rayjob()["spec"]["rayClusterSpec"]
    (head_c,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head_c["resources"].get("limits", {})
    (gpu_group,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    (c,) = gpu_group["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert gpu_group["minReplicas"] <= gpu_group["replicas"] <= gpu_group["maxReplicas"]


# --- image tag, versions, Dockerfile ------------------------------------------------------


def test_image_tag_is_the_same_everywhere():
    images = set(iter_images(rayjob()))
    cluster = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    images |= set(iter_images(cluster["docker"]))
    assert images == {IMAGE}
    assert f"-t {IMAGE} " in (DEPLOY / "docker" / "Dockerfile").read_text()
    assert IMAGE in (DEPLOY / "README.md").read_text()


def test_constraints_pin_every_dependency_within_pyproject_ranges():
    pins = constraints()
    for dep in PYPROJECT["project"]["dependencies"]:
        req = Requirement(dep)
        name = req.name.lower()
        assert name in pins, f"{name} is not pinned in deploy/docker/constraints.txt"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} outside {req.specifier}"
    # The fsspec family moves together (s3fs / gcsfs pin fsspec to their own release).
    assert pins["s3fs"] == pins["gcsfs"] == pins["fsspec"]
    assert rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == pins["ray"]


def test_dockerfile_cuda_base_and_project_install():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    # torch 2.13's PyPI wheel is the CUDA 13 build: the base image must be CUDA 13.
    cuda_major = re.match(r"nvidia/cuda:(\d+)\.", base).group(1)
    assert cuda_major == "13" and constraints()["torch"] == "2.13.0"
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", text, re.M)
    assert "--constraint /opt/vcut-render/constraints.txt" in text
    assert "COPY . /opt/vcut-render/src" in text and "pip install --constraint" in text
    assert '"ray[data,default]"' in text
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    assert {jm.DEFAULT_METRICS_PORT, RAY_METRICS_PORT, 8265, 6379} <= exposed
    # The allow-list context holds every package that pyproject installs.
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().split()
    for pkg in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert f"!{pkg.rstrip('*')}/" in ignore, pkg
    assert "!pyproject.toml" in ignore and "!deploy/docker/constraints.txt" in ignore


def test_cluster_launcher_config_is_valid_for_ray():
    import jsonschema
    import ray

    cfg = yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["GPU"] == 0
    assert all(t["resources"]["GPU"] == 1 for k, t in types.items() if k != cfg["head_node_type"])
    for cmd in cfg["head_start_ray_commands"][1:] + cfg["worker_start_ray_commands"][1:]:
        assert f"--metrics-export-port={RAY_METRICS_PORT}" in cmd


# --- the entrypoint is a real `vcut run` command line -------------------------------------


def _check_vcut_command(argv: list[str]) -> Any:
    """Parse ``argv`` exactly as ``jobs.cli.main`` does and resolve its config; return the config."""
    from jobs.cli import build_parser
    from jobs.cli.flags import load_config

    assert argv[0] == "vcut"
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"`{shlex.join(argv)}` is rejected by jobs.cli.build_parser() (exit {e.code})")
    assert args.command == "run", argv
    cfg = load_config(args)  # the config the command would run with (None: config error)
    assert cfg is not None, f"`{shlex.join(argv)}`: config error (see captured stderr)"
    return cfg


def test_rayjob_entrypoint_parses_with_the_real_cli():
    job = rayjob()
    argv = shlex.split(job["spec"]["entrypoint"])
    cfg = _check_vcut_command(argv)
    assert cfg.metrics.port == jm.DEFAULT_METRICS_PORT
    assert cfg.metrics.address == "0.0.0.0"  # reachable by the PodMonitor
    assert cfg.metrics.linger_seconds > 0  # the last values are scraped before the driver exits
    (gpu_group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert cfg.workers.count == gpu_group["replicas"]
    assert argv[1] == "run" and "://" in argv[2], "the manifest comes from object storage"
    assert "://" in argv[argv.index("--out") + 1]


def test_readme_commands_parse_with_the_real_cli():
    """Every `vcut run` command line in the READMEs, docs/ and cluster.yaml is accepted."""
    texts = [
        (DEPLOY / "README.md").read_text(),
        (DEPLOY / "ray" / "cluster.yaml").read_text(),
        (DEPLOY.parent / "README.md").read_text(),
        *(doc.read_text() for doc in sorted((DEPLOY.parent / "docs").glob("*.md"))),
    ]
    commands = []
    for text in texts:
        text = re.sub(r"\\\n\s*#?\s*", " ", text)  # join continued lines
        for m in re.finditer(r"\bvcut run [^\n`]*", text):
            commands.append(m.group(0).strip())
    assert commands
    for cmd in commands:
        argv = shlex.split(cmd)
        if argv[2:] == ["--help"]:  # prints the help (parameters, exit statuses) and exits 0
            with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stdout(io.StringIO()):
                jobs.main.build_parser().parse_args(argv[1:])
            assert exit_info.value.code == 0
            continue
        _check_vcut_command(argv)


# --- promtool (from Debian's prometheus package) ------------------------------------------


def test_promtool_checks_config_and_rules(tmp_path):
    tool = promtool()
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool not installed: CI must install Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    for args in (
        ["check", "config", "--syntax-only", str(DEPLOY / "prometheus" / "prometheus.yml")],
        ["check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
        ["test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yml")],
    ):
        proc = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
