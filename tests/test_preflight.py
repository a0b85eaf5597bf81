"""The first five minutes: each common mistake is one line, ``vcut: error: ...``, exit 2, within
seconds and without starting Ray; a worker that cannot start is one line per cause.

The CLI runs in a subprocess (what a person's terminal shows) with ``RAY_TMPDIR`` pointing at
an empty temporary folder: Ray creates its session folder there as soon as it starts, so "Ray
was not started" is checked by that folder not existing. The Hugging Face hub is made
unreachable (``HF_ENDPOINT`` on a loopback port nobody listens on) and the cache empty
(``HF_HOME`` in a temporary folder), whatever network the machine has.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import AWS_UNSET, free_port, moto_server, no_hub, subprocess_env, vcut_error

from jobs import preflight as pf

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = str(ROOT / "examples" / "manifest.parquet")
TINY_JOB = str(ROOT / "examples" / "tiny-job.yaml")
HUB_ID = "stabilityai/stable-video-diffusion-img2vid-xt"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return subprocess_env(
        drop=("HF_", "RAY_", "VCUT_"), **no_hub(tmp_path), RAY_TMPDIR=str(tmp_path / "raytmp")
    )


def run_args(model: str, *extra: str, manifest: str = MANIFEST, out: str = "out") -> list[str]:
    return ["run", manifest, "--out", out, "--model", model, "--config", TINY_JOB, *extra]


@pytest.mark.slow
def test_missing_local_model_folder(env, tmp_path):
    line = vcut_error(run_args("/tmp/typo-vcut-nothing-here"), env, tmp_path, "does not exist")
    assert "'/tmp/typo-vcut-nothing-here'" in line and "hub id" in line
    assert not (tmp_path / "out").exists()  # nothing created


@pytest.mark.slow
def test_hub_id_not_cached_and_hub_unreachable(env, tmp_path):
    line = vcut_error(run_args(HUB_ID), env, tmp_path, "hub cannot be reached")
    assert HUB_ID in line and "not in the Hugging Face cache" in line


@pytest.mark.slow
def test_hub_id_not_cached_and_offline(env, tmp_path):
    env["HF_HUB_OFFLINE"] = "1"
    vcut_error(run_args(HUB_ID), env, tmp_path, "HF_HUB_OFFLINE is set")


@pytest.mark.slow
def test_manifest_that_does_not_exist(env, tmp_path, tiny_model_dir):
    args = run_args(str(tiny_model_dir), manifest=str(tmp_path / "nope.parquet"))
    vcut_error(args, env, tmp_path, "nope.parquet' does not exist")


@pytest.mark.slow
def test_manifest_without_rows(env, tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"image": pa.array([], pa.string())}), empty)
    vcut_error(run_args(str(tiny_model_dir), manifest=str(empty)), env, tmp_path, "has no rows")


@pytest.mark.slow
@pytest.mark.parametrize("how", [["--vcut", "fast"], ["model.vcut=fast"]])
def test_unknown_vcut_mode(env, tmp_path, tiny_model_dir, how):
    vcut_error(run_args(str(tiny_model_dir), *how), env, tmp_path, "fast")


@pytest.mark.slow
def test_address_nobody_listens_on(env, tmp_path, tiny_model_dir):
    address = f"127.0.0.1:{free_port()}"
    args = run_args(str(tiny_model_dir), "--address", address)
    line = vcut_error(args, env, tmp_path, address, code=69)  # EX_UNAVAILABLE, not 2 or 1
    assert "no Ray cluster answers there" in line


@pytest.mark.slow
def test_out_not_writable(env, tmp_path, tiny_model_dir):
    # A path under a regular file cannot be created, even by root (where chmod stops nothing).
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    vcut_error(run_args(str(tiny_model_dir), out=str(blocker / "sub")), env, tmp_path, "which is a file")


@pytest.mark.slow
def test_ffmpeg_missing(env, tmp_path, tiny_model_dir):
    env["VCUT_FFMPEG"] = str(tmp_path / "no-such-ffmpeg")
    vcut_error(run_args(str(tiny_model_dir)), env, tmp_path, "VCUT_FFMPEG")


@pytest.mark.slow
def test_missing_s3_bucket(env, tmp_path, tiny_model_dir):
    with moto_server() as aws:
        env.update(aws)
        for name in AWS_UNSET:
            env.pop(name, None)
        args = run_args(str(tiny_model_dir), out="s3://no-such-bucket/renders/x")
        line = vcut_error(args, env, tmp_path, "bucket 'no-such-bucket' does not exist")
        assert "never creates buckets" in line
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        # no bucket was created (moto's in-process backend may hold other tests' buckets)
        assert "no-such-bucket" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}


# -- the checks themselves, in process --------------------------------------------------------


SVD_PARTS = ("vae", "image_encoder", "unet", "scheduler", "feature_extractor")


def _fake_model(folder: Path, *, components=SVD_PARTS, weights=".safetensors") -> Path:
    folder.mkdir(parents=True)
    index = {"_class_name": "StableVideoDiffusionPipeline", **{c: ["x", "Y"] for c in components}}
    (folder / "model_index.json").write_text(json.dumps(index))
    for c in ("unet", "vae", "image_encoder"):
        (folder / c).mkdir()
        (folder / c / f"diffusion_pytorch_model{weights}").write_bytes(b"")
    return folder


def test_model_folder_checks(tmp_path, tiny_model_dir):
    assert "local folder" in pf.check_model({"id": str(tiny_model_dir)})
    assert pf.check_model({"id": f"file://{tiny_model_dir}"})
    sd = _fake_model(tmp_path / "sd", components=("vae", "unet", "scheduler"))
    with pytest.raises(pf.PreflightError, match="not a Stable Video Diffusion pipeline.*image_encoder"):
        pf.check_model({"id": str(sd)})
    pickled = _fake_model(tmp_path / "pickled", weights=".bin")
    with pytest.raises(pf.PreflightError, match="pickle weights only"):
        pf.check_model({"id": str(pickled)})
    assert pf.check_model({"id": str(pickled), "allow_pickle": True})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text("{not json")
    with pytest.raises(pf.PreflightError, match="cannot read"):
        pf.check_model({"id": str(tmp_path / "broken")})
    with pytest.raises(pf.PreflightError, match="neither an existing local folder nor"):
        pf.check_model({"id": "no-slash"})


def test_hub_id_complete_in_cache_passes_offline(tmp_path, monkeypatch):
    """A hub id whose snapshot is complete in the cache resolves with no network at all."""
    cache = tmp_path / "hub"
    repo = cache / "models--owner--svd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    _fake_model(repo / "snapshots" / ("0" * 40))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "in the Hugging Face cache" in pf.check_model({"id": "owner/svd"})
    with pytest.raises(pf.PreflightError, match="HF_HUB_OFFLINE is set"):
        pf.check_model({"id": "owner/other"})


def test_output_probe_leaves_nothing(tmp_path):
    assert pf.check_output(str(tmp_path)) == str(tmp_path)
    assert "to be created in" in pf.check_output(str(tmp_path / "new" / "deeper"))
    assert os.listdir(tmp_path) == []  # probe removed, nothing created


def test_ffmpeg_has_the_encoder_the_format_needs(monkeypatch):
    assert "libx264" in pf.check_ffmpeg("mp4")
    with pytest.raises(pf.PreflightError, match="output.format 'avi'"):
        pf.check_ffmpeg("avi")
    monkeypatch.setattr(pf, "ffmpeg_encoders", lambda exe: {"gif"})
    with pytest.raises(pf.PreflightError, match="no libvpx-vp9 encoder"):
        pf.check_ffmpeg("webm")


def test_gpus_the_config_asks_for_must_exist():
    from jobs.config import load_config

    cpu_only = {"CPU": 4.0}
    assert pf.check_gpus(load_config(), cpu_only)  # default: GPUs when there are any
    with pytest.raises(pf.PreflightError, match="workers.num_gpus=1.0 but the cluster at x:1 has 0 GPU"):
        pf.check_gpus(load_config(dotlist=["workers.num_gpus=1"]), cpu_only, "x:1")
    with pytest.raises(pf.PreflightError, match="model.device=cuda"):
        pf.check_gpus(load_config(dotlist=["model.device=cuda"]), cpu_only)
    assert pf.check_gpus(load_config(dotlist=["workers.num_gpus=1"]), {"CPU": 4.0, "GPU": 2.0})


# -- worker start-up failures after pre-flight ------------------------------------------------


@pytest.mark.slow
def test_worker_startup_failure_is_one_line_per_cause(tmp_path, tiny_model_dir):
    """Two workers die loading the model with the same CUDA error: one cause line naming both,
    each traceback in DIR/logs/, and the job fails (JobError) without any row committed."""
    ray = pytest.importorskip("ray")
    from jobs.config import load_config
    from jobs.runner import JobError, run_job

    def cuda_oom(model, cache):
        raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be reported later")

    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": ["a.png", "b.png"]}), manifest)
    cfg = load_config(TINY_JOB, {"model.id": str(tiny_model_dir), "workers.count": 2})
    ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        with pytest.raises(JobError, match="no worker could start") as info:
            run_job(cfg, str(manifest), str(tmp_path / "out"), renderer_factory=cuda_oom)
    finally:
        ray.shutdown()
    causes = info.value.causes
    assert len(causes) == 1 and "\n" not in causes[0], causes
    # workers start side by side, so either may be listed first
    assert causes[0].startswith("RuntimeError: CUDA error: out of memory [worker-")
    assert "worker-0 on " in causes[0] and "worker-1 on " in causes[0]
    logs = sorted(os.listdir(tmp_path / "out" / "logs"))
    assert "worker-0.startup-error.log" in logs and "worker-1.startup-error.log" in logs
    text = (tmp_path / "out" / "logs" / "worker-0.startup-error.log").read_text()
    assert "Traceback" in text and "cuda_oom" in text and "CUDA kernel errors" in text
    assert os.listdir(tmp_path / "out" / "results") == []
