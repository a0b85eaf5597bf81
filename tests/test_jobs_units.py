"""Unit tests of jobs/ without Ray or a model: manifest, config, results, batching, progress."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FakeClock

from jobs import manifest, output, results
from jobs.config import load_config
from jobs.dispatch import size_workers
from jobs.main import main
from jobs.planner import RowTask, plan_batches, resolve_params
from jobs.progress import Progress, format_summary


def _write(path, table: pa.Table) -> str:
    pq.write_table(table, path)
    return str(path)


# -- manifest ----------------------------------------------------------------------------------


def test_validate_reports_column_and_row(tmp_path):
    path = _write(
        tmp_path / "m.parquet",
        pa.table({"image": ["a.png", "b.png", "c.png"], "fps": [7, 7, 0], "seed": [0, 1, 2]}),
    )
    with pytest.raises(manifest.ManifestError) as err:
        manifest.validate_manifest(path)
    assert "'fps'" in str(err.value) and "row 2" in str(err.value)


def test_validate_missing_image_and_wrong_types(tmp_path):
    with pytest.raises(manifest.ManifestError, match="missing required column 'image'"):
        manifest.validate_manifest(_write(tmp_path / "a.parquet", pa.table({"path": ["a.png"]})))
    csv = tmp_path / "m.csv"
    csv.write_text("image,seed,noise_aug_strength\na.png,1,0.1\nb.png,two,0.2\n")
    with pytest.raises(manifest.ManifestError) as err:
        manifest.validate_manifest(str(csv))
    assert "'seed'" in str(err.value) and "'two' at row 1" in str(err.value)
    path = _write(tmp_path / "f.parquet", pa.table({"image": ["a", "b"], "num_frames": [4.0, 2.5]}))
    with pytest.raises(manifest.ManifestError, match="'num_frames' expects an integer, got 2.5 at row 1"):
        manifest.validate_manifest(path)
    path = _write(tmp_path / "n.parquet", pa.table({"image": ["a", "b"], "num_frames": [4, 1]}))
    with pytest.raises(manifest.ManifestError, match=r"'num_frames' is out of range \[2, 1024\]: 1 at row 1"):
        manifest.validate_manifest(path)


def test_validate_duplicates_reserved_and_guidance(tmp_path):
    path = _write(tmp_path / "d.parquet", pa.table({"image": ["a", "b", "c"], "id": ["x", "y", "x"]}))
    with pytest.raises(manifest.ManifestError, match="duplicate 'x' at rows 0, 2"):
        manifest.validate_manifest(path)
    # a default id (stem-row) colliding with a given id is a duplicate too
    path = _write(tmp_path / "e.parquet", pa.table({"image": ["a.png", "b.png"], "id": [None, "a-0"]}))
    with pytest.raises(manifest.ManifestError, match="duplicate 'a-0'"):
        manifest.validate_manifest(path)
    path = _write(tmp_path / "r.parquet", pa.table({"image": ["a"], "status": ["x"]}))
    with pytest.raises(manifest.ManifestError, match="'status' is reserved"):
        manifest.validate_manifest(path, reserved=results.RESERVED_COLUMNS)
    path = _write(
        tmp_path / "g.parquet",
        pa.table({"image": ["a", "b"], "min_guidance_scale": [1.0, 4.0], "max_guidance_scale": [3.0, 3.0]}),
    )
    with pytest.raises(manifest.ManifestError, match="above 'max_guidance_scale' at row 1"):
        manifest.validate_manifest(path)


def test_iter_manifest_streams_resolved_rows(tmp_path):
    (tmp_path / "sub").mkdir()
    jsonl = tmp_path / "sub" / "m.jsonl"
    lines = [
        {"image": "i.png", "seed": 3, "note": "n0"},
        {"image": "/abs/j.png", "id": "custom", "fps": None},
    ]
    lines += [{"image": "s3://bucket/k.png"}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in lines))
    info = manifest.validate_manifest(str(jsonl))
    assert info.num_rows == 3 and info.carried == ["note"]
    chunks = list(manifest.iter_manifest(str(jsonl), chunk_rows=2))
    assert [len(c) for c in chunks] == [2, 1]
    rows = [r for c in chunks for r in c]
    assert [r["id"] for r in rows] == ["i-0", "custom", "k-2"]
    assert rows[0]["_image"] == str(tmp_path / "sub" / "i.png") and rows[0]["image"] == "i.png"
    assert rows[1]["_image"] == "/abs/j.png" and rows[2]["_image"] == "s3://bucket/k.png"
    assert rows[0]["seed"] == 3 and rows[0]["note"] == "n0"
    params = resolve_params(rows[1], {"seed": 0, "fps": 7, "num_frames": None})
    assert params["seed"] == 0 and params["fps"] == 7 and params["num_frames"] is None


def test_build_manifest_cartesian_product(tmp_path, monkeypatch):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("a.png", "b.jpg", "notes.txt"):
        (imgs / name).write_bytes(b"x")
    out = tmp_path / "out" / "m.parquet"
    assert (
        main(["manifest", str(imgs), "-o", str(out), "--seeds", "0,1", "--motion-bucket-ids", "10,20"]) == 0
    )
    table = pq.read_table(out).to_pylist()
    assert len(table) == 8
    # an absolute folder: absolute image paths, as given (issue 19)
    assert table[0] == {"id": "a-s0-m10", "image": str(imgs / "a.png"), "seed": 0, "motion_bucket_id": 10}
    assert len({r["id"] for r in table}) == 8
    assert manifest.validate_manifest(str(out)).num_rows == 8
    # a relative folder: paths relative to the manifest's folder (they move together)
    monkeypatch.chdir(tmp_path)
    assert main(["manifest", "imgs", "-o", str(out)]) == 0
    assert pq.read_table(out).column("image").to_pylist() == ["../imgs/a.png", "../imgs/b.jpg"]
    assert main(["manifest", str(tmp_path / "empty*"), "-o", str(out)]) == 2


def test_cli_exit_2_on_bad_manifest_and_config(tmp_path, capsys):
    bad = _write(tmp_path / "m.parquet", pa.table({"image": ["a.png"], "width": ["wide"]}))
    assert main(["run", bad, "--out", str(tmp_path / "o")]) == 2
    assert "'width'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing started, nothing written
    good = _write(tmp_path / "g.parquet", pa.table({"image": ["a.png"]}))
    assert main(["run", good, "--out", str(tmp_path / "o"), "defaults.heigth=64"]) == 2
    assert "heigth" in capsys.readouterr().err
    assert main(["run", good, "--out", str(tmp_path / "o"), "workers.count=abc"]) == 2
    assert main(["run", good, "--out", str(tmp_path / "o"), "--workers", "0"]) == 2
    assert main(["run", good, "--out", str(tmp_path / "o"), "--bogus"]) == 2


# -- config ------------------------------------------------------------------------------------


def test_config_precedence(tmp_path, capsys):
    yaml = tmp_path / "job.yaml"
    yaml.write_text("model:\n  vcut: exact\ndefaults:\n  fps: 9\n  height: 64\nworkers:\n  count: 3\n")
    cfg = load_config(str(yaml), {"workers.count": 2, "model.id": None}, ["defaults.fps=11"])
    assert cfg.model.vcut.value == "exact" and cfg.workers.count == 2 and cfg.defaults.fps == 11
    assert cfg.defaults.height == 64 and cfg.model.id.startswith("stabilityai/")
    assert main(["config", "--config", str(yaml), "--vcut", "off", "--metrics-port", "9100"]) == 0
    out = capsys.readouterr().out
    assert "vcut: 'off'" in out or "vcut: off" in out
    assert "port: 9100" in out and "fps: 9" in out


# -- results -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["../x", "../../etc/passwd", "/abs/path", "a/../../b", "nul\x00byte", "x" * 1000, ".", ".."]
)
def test_ids_cannot_escape(tmp_path, bad):
    path = output.video_path(str(tmp_path / "out"), bad, "mp4")
    assert os.path.dirname(path) == str(tmp_path / "out" / "videos")
    name = os.path.basename(path)
    assert "\x00" not in name and "/" not in name and not name.startswith(".") and len(name) <= 130


def test_safe_names_are_distinct_and_stable():
    assert output.safe_name("cat-0") == "cat-0"
    names = {output.safe_name(i) for i in ["a/b", "a_b", "a?b", "x" * 300, "x" * 301]}
    assert len(names) == 5 and output.safe_name("a/b") == output.safe_name("a/b")


def _row(row_id: str, status: str) -> dict:
    return {"id": row_id, "image": "i.png", "status": status, "note": "n"}


def test_commit_resume_and_last_row_wins(tmp_path):
    out = str(tmp_path)
    carried = pa.schema([("note", pa.string())])
    writer = results.ResultWriter(out, carried)
    writer.commit([_row("a", "ok"), _row("b", "failed")])
    writer.commit([_row("c", "failed")])
    done = results.done_ids(out)
    hashes = manifest.hash_ids(["a", "b", "c", "d"])
    assert results.is_done(hashes, done).tolist() == [True, False, False, False]
    # a later run renders the failed rows again: its rows win
    writer2 = results.ResultWriter(out, carried)
    writer2.commit([_row("b", "ok")])
    writer2.commit([_row("c", "failed")])
    (tmp_path / "results" / ".part-x.parquet.tmp").write_bytes(b"half")  # a crash's leftover
    table = results.read_results(out)
    assert sorted(zip(table["id"].to_pylist(), table["status"].to_pylist(), strict=True)) == [
        ("a", "ok"),
        ("b", "ok"),
        ("c", "failed"),
    ]
    assert results.compact(out) == 2
    on_disk = pq.read_table(tmp_path / "results")
    assert sorted(on_disk["id"].to_pylist()) == ["a", "b", "c"]
    assert output.clean_temporaries(out) == 1
    assert results.compact(out) == 0
    summary = results.summarize(out, manifest_rows=3, rendered=2, skipped=1, wall_seconds=2.0)
    assert (summary["ok"], summary["failed"], summary["videos_per_second"]) == (2, 1, 1.0)
    assert "manifest rows" in format_summary(summary)


# -- batching, sizing, progress ----------------------------------------------------------------


def test_plan_batches_groups_shared_images_and_skips_done():
    rows = [{"id": f"r{i}", "_image": img} for i, img in enumerate("abacbaddd")]
    counters = {"skipped": 0}
    done = np.sort(manifest.hash_ids(["r8"]))
    make = lambda r: RowTask.from_row(r, {})  # noqa: E731
    batches = list(plan_batches(iter([rows[:6], rows[6:]]), done, 3, counters, make))
    ids = [[r.id for r in b.rows] for b in batches]
    assert counters["skipped"] == 1
    assert ids == [["r0", "r2", "r5"], ["r1", "r4", "r3"], ["r6", "r7"]]


def test_size_workers_never_reserves_every_cpu():
    cfg = load_config()
    assert size_workers(cfg, {"CPU": 2}) == (1, 1.0, 0.0)
    cfg = load_config(flags={"workers.count": 2})
    count, cpus, gpus = size_workers(cfg, {"CPU": 2})
    assert count == 2 and count * cpus < 2 and gpus == 0
    assert size_workers(load_config(), {"CPU": 16, "GPU": 4}) == (4, 1.0, 1.0)


@pytest.mark.parametrize("boot", [0.5, 1e6])  # monotonic time just after boot, and days later
def test_progress_log_lines(caplog, boot):
    """The first update is logged, the next ones once ``interval_s`` has passed, one at the end;
    on a fake clock that starts ``boot`` seconds after the machine booted (a clock below the
    interval once hid the first line)."""
    caplog.set_level(logging.INFO, logger="jobs")
    clock = FakeClock(boot)
    stream = io.StringIO()  # not a terminal: log lines every interval, no bar
    progress = Progress(10, interval_s=60, stream=stream, clock=clock)
    progress.skipped = 2
    clock.advance(8)
    progress.update(ok=3, failed=1)  # the first update logs at once
    clock.advance(59)
    progress.update(ok=1)  # within the interval: no line
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("progress: 6/10 rows, 0.50 videos/s, elapsed 00:08")
    assert "1 failed" in lines[0] and "2 already ok" in lines[0]
    clock.advance(1)
    progress.update()  # the interval has passed
    progress.close()  # and one line at the end
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[1] == lines[2]
    assert lines[2].startswith("progress: 7/10 rows, 0.07 videos/s, elapsed 01:08, ETA 00:40")
    assert stream.getvalue() == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_is_tqdm_with_the_counts(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)  # what `vcut run` installs, on the same terminal
    monkeypatch.setattr(root, "handlers", [*root.handlers, console])
    progress = Progress(10, stream=terminal)
    assert progress.bar is not None
    progress.skipped = 2  # found already ok as the manifest streams by: not in the rate
    progress.bar.start_t -= 8  # 8 s ago
    progress.update(ok=3, failed=1, force=True)
    frame = terminal.getvalue().split("\r")[-1]
    assert frame.startswith("vcut:  60%|") and "6/10 rows" in frame
    # 4 rows rendered in 8 s: 0.50 videos/s, and the 4 rows left take 8 s more
    assert "[00:08<00:08,  0.50 videos/s, 3 ok, 1 failed, 2 already ok]" in frame
    logging.getLogger("jobs").warning("worker-1 died")  # written above the bar, not into it
    assert re.search(r"\r *\r[^\r]*worker-1 died\n\rvcut:", terminal.getvalue())  # bar cleared, line, bar
    assert console not in root.handlers  # the redirection (tqdm.contrib.logging) is on
    progress.close()
    assert console in root.handlers and terminal.getvalue().endswith("\n")


def test_writer_merges_small_parts_keeping_commit_order(tmp_path):
    out = str(tmp_path)
    writer = results.ResultWriter(out, merge_every=3)
    for i in range(7):
        writer.commit([_row(f"r{i}", "failed" if i == 1 else "ok")])
    writer.commit([_row("r1", "ok")])  # the row rendered again later wins over the merged one
    assert len(os.listdir(tmp_path / "results")) == 4  # two merged parts + two fresh ones
    table = results.read_results(out)
    assert table.num_rows == 7 and set(table["status"].to_pylist()) == {"ok"}
    results.compact(out)
    assert len(os.listdir(tmp_path / "results")) == 1
    assert sorted(pq.read_table(tmp_path / "results")["id"].to_pylist()) == [f"r{i}" for i in range(7)]


def test_a_hook_that_raises_everywhere_is_logged_once_per_method(caplog):
    from jobs.hooks import SafeHook

    class Broken:
        calls = 0

        def __getattr__(self, name: str):
            def fail(*args: object) -> None:
                Broken.calls += 1
                raise RuntimeError(f"boom in {name}")

            return fail

    hook = SafeHook(Broken())
    for _ in range(3):  # the driver keeps calling it: a later call may succeed
        hook.on_pending(5)
        hook.on_workers(2, 1)
        hook.on_result({"id": "a"})
        hook.on_finish({})
    assert Broken.calls == 12
    messages = sorted(r.getMessage() for r in caplog.records)
    methods = ("on_finish", "on_pending", "on_result", "on_workers")
    assert len(messages) == len(methods), messages
    for message, method in zip(messages, methods, strict=True):
        assert message.startswith(f"job hook Broken.{method} failed") and f"boom in {method}" in message


def test_a_missing_hook_or_method_is_skipped(caplog):
    from jobs.hooks import SafeHook

    class OnlyResults:
        rows: list = []

        def on_result(self, row: dict) -> None:
            self.rows.append(row)

    partial = SafeHook(OnlyResults())
    partial.on_result({"id": "a"})
    partial.on_finish({})  # not defined: skipped
    SafeHook(None).on_pending(3)  # no hook at all
    assert OnlyResults.rows == [{"id": "a"}] and not caplog.records


def test_out_uri_resolves_once_and_bad_protocols_exit_2(tmp_path, capsys):
    local = output.open_output(f"file://{tmp_path}/o")
    assert local.local and local.root == local.uri == str(tmp_path / "o")
    assert output.video_path(local, "a", "mp4") == str(tmp_path / "o" / "videos" / "a.mp4")
    good = _write(tmp_path / "g.parquet", pa.table({"image": ["a.png"]}))
    # memory:// lives in one process (the workers could not write there); unknown protocols
    assert main(["run", good, "--out", "memory://out"]) == 2
    assert "memory://" in capsys.readouterr().err
    assert main(["run", good, "--out", "nosuchprotocol://bucket/out"]) == 2
    assert "nosuchprotocol" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()  # nothing started, nothing written


def _memory_output(tmp_name: str):
    """An OutputDir on fsspec's in-memory filesystem: the non-local code path, without a server
    (``open_output`` refuses memory:// for jobs, whose workers are other processes)."""
    from fsspec.implementations.memory import MemoryFileSystem

    fs = MemoryFileSystem()
    root = f"/{tmp_name}/out"
    return output.OutputDir(uri=f"memory://{root}", root=root, fs=fs)


def test_results_through_an_fsspec_filesystem(request):
    out = _memory_output(request.node.name)
    fs = out.fs
    try:
        for bad in ["../x", "../../etc/passwd", "/abs/path", "a/../../b", ".", ".."]:
            path = output.video_path(out, bad, "mp4")
            assert path.startswith(out.uri + "/videos/") and "/" not in path[len(out.uri + "/videos/") :]
        writer = results.ResultWriter(out, pa.schema([("note", pa.string())]), merge_every=3)
        for i in range(4):
            writer.commit([_row(f"r{i}", "failed" if i == 1 else "ok")])
        writer.commit([_row("r1", "ok")])
        hashes = manifest.hash_ids(["r0", "r1", "r9"])
        assert results.is_done(hashes, results.done_ids(out)).tolist() == [True, True, False]
        fs.pipe_file(out.path("results", ".part-x.parquet.tmp"), b"half")  # a crash's leftovers
        fs.pipe_file(out.path("videos", "v.mp4.tmp-0123456789ab"), b"half")
        fs.pipe_file(out.path("videos", "v.tmp-0123456789ab.mp4"), b"a video")  # a real video name
        assert output.clean_temporaries(out) == 2
        assert out.listdir("videos") == ["v.tmp-0123456789ab.mp4"]
        results.compact(out)
        assert len(out.listdir("results")) == 1
        table = results.read_results(out)
        assert sorted(table["id"].to_pylist()) == [f"r{i}" for i in range(4)]
        assert set(table["status"].to_pylist()) == {"ok"} and set(table["note"].to_pylist()) == {"n"}
        summary = results.summarize(out, manifest_rows=4, rendered=5, skipped=0, wall_seconds=1.0)
        assert (summary["ok"], summary["failed"]) == (4, 0)
    finally:
        fs.rm(out.root, recursive=True)


def test_a_worker_outside_ray_has_no_placement_and_starts_no_ray():
    """Rows' node id/IP come from Ray's runtime context, which starts a local Ray instance
    when asked outside one: a RenderWorker used in-process must not."""
    import ray

    from jobs import worker

    assert not ray.is_initialized()
    assert worker._ray_placement() == (None, None)
    assert not ray.is_initialized()
