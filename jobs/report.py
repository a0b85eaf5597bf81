"""``vcut report DIR``: one self-contained HTML page about a job, finished or still running.

``DIR/report.html`` holds the summary (rows, ok, failed, pending, wall time, videos per hour,
MACs spent and saved per lever), throughput over time and per worker, a render-time
histogram, the failures grouped by error message, and a contact sheet of the first frames of
a sample of videos. No script, no network: CSS inline, charts as inline SVG
(:mod:`jobs.report_svg`), thumbnails as base64 JPEG decoded with ffmpeg. Everything comes
from the committed results (``jobs.results.read_results``) and, when present,
``summary.json``; a video that cannot be read (missing, or inside a shard) shows
"no preview". ``vcut run`` writes the report at the end of every job (``output.report``).
"""

from __future__ import annotations

import base64
import json
import os
import posixpath
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from html import escape
from typing import Any

import numpy as np
import pyarrow as pa

from jobs import report_svg, results
from jobs.output import OutputDir, open_output
from pipeline.storage import is_remote, local_path

#: The results columns the report reads (those a results table lacks are treated as empty).
COLUMNS = ["id", "status", "output", "error", "seconds", "encode_seconds", "macs", "macs_saved",
           "macs_saved_vcut", "macs_saved_step_cache", "worker", "node", "vcut_mode",
           "finished_at", "committed_at"]  # fmt: skip
SAMPLE = 24  # videos on the contact sheet
THUMB_HEIGHT = 128
MAX_WORKER_LINES = 8
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PATH = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*://|/)[^\s,;:'\"()]+")
_NUMBER = re.compile(r"\b\d+(?:\.\d+)?\b")


def error_group(message: str | None) -> str:
    """The group of an error message: its first line with quoted text, paths and numbers
    replaced, so that the same failure on different rows falls into one group."""
    line = (message or "").strip().splitlines()[0] if (message or "").strip() else "(no message)"
    line = _QUOTED.sub("'…'", line)
    line = _PATH.sub("<path>", line)
    return _NUMBER.sub("N", line)[:300]


def _column(table: pa.Table, name: str, dtype: Any) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan if dtype is float else None, dtype=dtype)
    col = table.column(name)
    if dtype is float:
        return col.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(float)
    return np.array(col.to_pylist(), dtype=object)


def _timestamps(table: pa.Table, name: str) -> np.ndarray:
    """Seconds since the epoch (NaN where missing)."""
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    micros = table.column(name).cast(pa.int64())
    return micros.to_numpy(zero_copy_only=False).astype(float) / 1e6


def _sample_indices(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when n <= k)."""
    if n <= k:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, k)})


def report_data(table: pa.Table, summary: dict | None = None, *, sample: int = SAMPLE) -> dict[str, Any]:
    """Everything the page shows, from the results table (one row per id) and summary.json.

    A summary counts as current when its ok/failed counts match the table (a finished job);
    then its wall time and throughput are the run's own. Otherwise (a running or interrupted
    job, or none) wall time is the span of the rows' timestamps: the first row's start (its
    finish less its render and encode seconds) to the last finish, and videos per hour are
    the ok rows over that span. A row's finish is ``finished_at``, else ``committed_at``."""
    status = _column(table, "status", object)
    ok_mask = status == "ok"
    n, ok = table.num_rows, int(ok_mask.sum())
    failed = n - ok
    seconds = _column(table, "seconds", float)
    encode = np.nan_to_num(_column(table, "encode_seconds", float))
    finished = _timestamps(table, "finished_at")
    committed = _timestamps(table, "committed_at")
    finished = np.where(np.isnan(finished), committed, finished)
    workers = np.array([w or "(driver)" for w in _column(table, "worker", object)], dtype=object)
    current = bool(summary) and (summary.get("ok"), summary.get("failed")) == (ok, failed)

    has_t = ~np.isnan(finished)
    t0 = t1 = None
    if has_t.any():
        starts = finished[has_t] - np.nan_to_num(seconds[has_t]) - encode[has_t]
        t0, t1 = float(starts.min()), float(finished[has_t].max())
    if current:
        wall = float(summary.get("wall_seconds") or 0.0)
        per_hour = float(summary.get("videos_per_second") or 0.0) * 3600
        wall_source = "summary.json (this run)"
    else:
        wall = (t1 - t0) if t0 is not None else 0.0
        per_hour = ok / wall * 3600 if wall > 0 else 0.0
        wall_source = "row timestamps (first start to last finish)"
    manifest_rows = summary.get("manifest_rows") if summary else None
    pending = max(0, int(manifest_rows) - n) if manifest_rows is not None else None

    macs = {}
    for key in ("macs", "macs_saved", "macs_saved_vcut", "macs_saved_step_cache"):
        values = _column(table, key, float)[ok_mask]
        macs[key] = int(np.nansum(values)) if values.size else 0

    # throughput: ok videos per time bin, and the cumulative count per worker
    throughput: dict[str, Any] = {"edges": [], "per_hour": [], "series": []}
    t_ok = has_t & ok_mask
    if t_ok.any() and t0 is not None:
        span = max(t1 - t0, 1e-3)
        unit, scale = ("minutes", 60.0) if span < 3 * 3600 else ("hours", 3600.0)
        bins = int(min(40, max(1, t_ok.sum() // 2)))
        edges = np.linspace(0.0, span / scale, bins + 1)
        counts, _ = np.histogram((finished[t_ok] - t0) / scale, bins=edges)
        width_h = (edges[1] - edges[0]) * scale / 3600
        throughput.update(unit=unit, edges=edges.tolist(), per_hour=(counts / width_h).tolist())
        names = ["all workers"] + sorted(set(workers[t_ok]))
        for name in names[: MAX_WORKER_LINES + 1]:
            mask = t_ok if name == "all workers" else t_ok & (workers == name)
            xs = np.sort((finished[mask] - t0) / scale)
            idx = _sample_indices(xs.size, 300)
            throughput["series"].append((name, xs[idx].tolist(), [float(i + 1) for i in idx]))
        throughput["hidden_workers"] = max(0, len(names) - 1 - MAX_WORKER_LINES)

    per_worker = []
    for name in sorted(set(workers)):
        mask = workers == name
        wok = mask & ok_mask
        ts = finished[mask & has_t]
        active = float(ts.max() - (ts - np.nan_to_num(seconds[mask & has_t])).min()) if ts.size else 0.0
        nodes = sorted({str(x) for x in _column(table, "node", object)[mask] if x})
        per_worker.append(
            {
                "worker": name,
                "node": ", ".join(nodes),
                "ok": int(wok.sum()),
                "failed": int(mask.sum() - wok.sum()),
                "mean_seconds": float(np.nanmean(seconds[wok])) if wok.any() else None,
                "videos_per_hour": int(wok.sum()) / active * 3600 if active > 0 else None,
            }
        )

    ok_seconds = seconds[ok_mask & ~np.isnan(seconds)]
    hist: dict[str, Any] = {"edges": [], "counts": []}
    if ok_seconds.size:
        lo, hi = float(ok_seconds.min()), float(ok_seconds.max())
        counts, edges = np.histogram(
            ok_seconds, bins=min(30, max(1, ok_seconds.size // 2)), range=(lo, hi if hi > lo else lo + 1e-3)
        )
        hist = {
            "edges": edges.tolist(),
            "counts": counts.tolist(),
            "p50": float(np.percentile(ok_seconds, 50)),
            "p95": float(np.percentile(ok_seconds, 95)),
            "mean": float(ok_seconds.mean()),
        }

    ids = _column(table, "id", object)
    errors = _column(table, "error", object)
    groups: dict[str, dict[str, Any]] = {}
    for i in np.flatnonzero(~ok_mask):
        key = error_group(errors[i])
        g = groups.setdefault(key, {"group": key, "count": 0, "example": errors[i] or "", "ids": []})
        g["count"] += 1
        if len(g["ids"]) < 5:
            g["ids"].append(ids[i])
    failures = sorted(groups.values(), key=lambda g: (-g["count"], g["group"]))

    outputs = _column(table, "output", object)
    order = [int(i) for i in np.flatnonzero(ok_mask)]
    order.sort(key=lambda i: (finished[i] if not np.isnan(finished[i]) else np.inf, ids[i]))
    contact = [
        {
            "id": ids[order[j]],
            "output": outputs[order[j]],
            "seconds": None if np.isnan(seconds[order[j]]) else float(seconds[order[j]]),
        }
        for j in _sample_indices(len(order), sample)
    ]

    modes = sorted({str(m) for m in _column(table, "vcut_mode", object)[ok_mask] if m})
    return {
        "state": "finished" if current else ("running or interrupted" if n else "no rows yet"),
        "rows": manifest_rows if manifest_rows is not None else n,
        "results": n,
        "ok": ok,
        "failed": failed,
        "pending": pending,
        "wall_seconds": wall,
        "wall_source": wall_source,
        "videos_per_hour": per_hour,
        "started": t0,
        "last_finished": t1,
        "macs": macs,
        "vcut_modes": modes,
        "throughput": throughput,
        "workers": per_worker,
        "render_seconds": hist,
        "failures": failures,
        "contact": contact,
    }


# -- thumbnails ------------------------------------------------------------------------------


def thumbnail(path: str, fs: Any = None, height: int = THUMB_HEIGHT) -> bytes | None:
    """The first frame of a video as JPEG bytes ``height`` pixels high, or None when it cannot
    be read (missing, not a video, inside a shard). ``fs``: the fsspec filesystem of a URI
    (the video is copied to a temporary file first: ffmpeg needs a seekable mp4)."""
    from pipeline.ffmpeg_bin import ffmpeg_exe

    tmp = None
    try:
        if fs is not None:
            suffix = os.path.splitext(posixpath.basename(path))[1]
            fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="vcut-thumb-")
            with os.fdopen(fd, "wb") as f, fs.open(path, "rb") as src:
                f.write(src.read())
            path = tmp
        elif not os.path.isfile(path):
            return None
        cmd = [ffmpeg_exe(), "-v", "error", "-i", path, "-frames:v", "1", "-vf", f"scale=-2:{height}",
               "-q:v", "4", "-f", "image2pipe", "-c:v", "mjpeg", "pipe:1"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, timeout=60)
        return proc.stdout if proc.returncode == 0 and proc.stdout else None
    except Exception:
        return None
    finally:
        if tmp is not None:
            os.unlink(tmp)


def _link(out: OutputDir, output: str | None) -> str | None:
    """A link to a video from DIR/report.html: relative when it lies under DIR."""
    if not output:
        return None
    root = out.uri.rstrip("/") + "/" if not out.local else os.path.join(out.root, "")
    if output.startswith(root):
        return output[len(root) :].replace(os.sep, "/")
    return output if is_remote(output) else "file://" + local_path(output)


# -- HTML ------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"DejaVu Sans",sans-serif;margin:24px;color:#222;max-width:1240px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.muted{color:#666}.cards{display:flex;flex-wrap:wrap;gap:10px;margin-top:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:110px}
.card .v{font-size:20px;font-weight:600}.card .k{color:#666;font-size:12px}
.card.bad .v{color:#c62828}.card.good .v{color:#2e7d32}
table{border-collapse:collapse}td,th{border-bottom:1px solid #eee;padding:4px 10px;text-align:left}
td.n,th.n{text-align:right}code{font-size:12px;white-space:pre-wrap;word-break:break-all}
.charts{display:flex;flex-wrap:wrap;gap:16px}.chart{background:#fff;font-size:11px}
.chart .plot-bg{fill:#fafafa;stroke:#ccc}.chart .grid{stroke:#e6e6e6}.chart .axis{stroke:#999}
.sheet{display:flex;flex-wrap:wrap;gap:10px}.thumb{width:auto;text-align:center;font-size:11px}
.thumb img,.thumb .none{height:%(h)dpx;display:block;border:1px solid #ccc;background:#eee}
.thumb .none{width:%(h)dpx;line-height:%(h)dpx;color:#888}.thumb a{color:inherit}
.thumb .id{max-width:%(w)dpx;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
"""


def _human(n: float, unit: str = "") -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}".strip()


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _utc(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "–"


def _card(key: str, label: str, value: str, cls: str = "") -> str:
    return (
        f'<div class="card {cls}" data-key="{key}"><div class="v">{escape(value)}</div>'
        f'<div class="k">{escape(label)}</div></div>'
    )


def build_html(
    data: dict[str, Any], *, title: str, thumbs: list[bytes | None], links: list[str | None]
) -> str:
    """The page for ``report_data``'s dict; ``thumbs``/``links`` align with ``data["contact"]``."""
    d, m = data, data["macs"]
    stock = m["macs"] + m["macs_saved"]
    pct = f" ({m['macs_saved'] / stock:.0%} of stock)" if stock else ""
    cards = [
        _card("rows", "rows", f"{d['rows']:,}"),
        _card("ok", "ok", f"{d['ok']:,}", "good"),
        _card("failed", "failed", f"{d['failed']:,}", "bad" if d["failed"] else ""),
        _card("pending", "pending", "unknown" if d["pending"] is None else f"{d['pending']:,}"),
        _card("wall", "wall time", _duration(d["wall_seconds"])),
        _card("videos_per_hour", "videos per hour", f"{d['videos_per_hour']:,.1f}"),
        _card("macs", "MACs spent", _human(m["macs"])),
        _card("macs_saved", "MACs saved" + pct, _human(m["macs_saved"])),
        _card("macs_saved_vcut", "saved by VCUT", _human(m["macs_saved_vcut"])),
        _card("macs_saved_step_cache", "saved by step cache", _human(m["macs_saved_step_cache"])),
    ]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>vcut report: {escape(title)}</title>",
        f"<style>{_CSS % {'h': THUMB_HEIGHT, 'w': THUMB_HEIGHT * 16 // 9}}</style></head><body>",
        f"<h1>vcut report: {escape(title)}</h1>",
        f'<div class="muted" id="state">Job {escape(d["state"])}; {d["results"]:,} result rows; '
        f"first start {_utc(d['started'])}, last finish {_utc(d['last_finished'])}; "
        f"wall time from {escape(d['wall_source'])}; VCUT mode {escape(', '.join(d['vcut_modes']) or '–')}; "
        f"report written {_utc(time.time())}.</div>",
        f'<section id="summary"><div class="cards">{"".join(cards)}</div></section>',
    ]
    tp, hist = d["throughput"], d["render_seconds"]
    out.append('<section id="throughput"><h2>Throughput</h2><div class="charts">')
    if tp["series"]:
        unit = tp["unit"]
        out.append(
            report_svg.bars(
                tp["edges"],
                tp["per_hour"],
                xlabel=f"{unit} since the first start",
                ylabel="ok videos per hour",
                title="throughput over time",
            )
        )
        out.append(
            report_svg.lines(
                tp["series"],
                xlabel=f"{unit} since the first start",
                ylabel="ok videos (cumulative)",
                title="videos per worker",
            )
        )
    else:
        out.append('<p class="muted">No finished video yet.</p>')
    out.append("</div>")
    if tp.get("hidden_workers"):
        out.append(f'<p class="muted">{tp["hidden_workers"]} more workers not drawn (see the table).</p>')
    heads = "".join(f'<th class="n">{h}</th>' for h in ("ok", "failed", "mean s / video", "videos / hour"))
    out.append(f'<table id="workers"><tr><th>worker</th><th>node</th>{heads}</tr>')
    for w in d["workers"]:
        mean = "–" if w["mean_seconds"] is None else f"{w['mean_seconds']:.2f}"
        vph = "–" if w["videos_per_hour"] is None else f"{w['videos_per_hour']:,.1f}"
        cells = "".join(f"<td class=n>{v}</td>" for v in (w["ok"], w["failed"], mean, vph))
        out.append(f"<tr><td>{escape(w['worker'])}</td><td>{escape(w['node'])}</td>{cells}</tr>")
    out.append("</table></section>")

    out.append('<section id="render-time"><h2>Render time per video</h2>')
    if hist["counts"]:
        out.append(
            f'<p class="muted">ok videos: mean {hist["mean"]:.2f} s, median {hist["p50"]:.2f} s, '
            f"p95 {hist['p95']:.2f} s (render, without encoding).</p>"
        )
        out.append(
            report_svg.bars(
                hist["edges"],
                hist["counts"],
                xlabel="seconds per video",
                ylabel="videos",
                title="render-time histogram",
            )
        )
    else:
        out.append('<p class="muted">No finished video yet.</p>')
    out.append("</section>")

    out.append(f'<section id="failures"><h2>Failures ({d["failed"]:,})</h2>')
    if d["failures"]:
        out.append(
            '<table><tr><th class="n">rows</th><th>error (first example)</th><th>example ids</th></tr>'
        )
        for g in d["failures"]:
            ids = ", ".join(escape(str(i)) for i in g["ids"]) + (", …" if g["count"] > len(g["ids"]) else "")
            out.append(
                f'<tr class="failure-group"><td class=n>{g["count"]:,}</td>'
                f"<td><code>{escape(g['example'][:500])}</code></td><td>{ids}</td></tr>"
            )
        out.append("</table>")
    else:
        out.append('<p class="muted">None.</p>')
    out.append("</section>")

    shown = f"{len(d['contact'])} of {d['ok']:,} ok videos"
    out.append(f'<section id="contact-sheet"><h2>Contact sheet ({shown}, first frames)</h2><div class=sheet>')
    for item, jpeg, link in zip(d["contact"], thumbs, links, strict=True):
        if jpeg:
            src = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
            img = f'<img alt="{escape(item["id"])}" src="{src}">'
        else:
            img = '<div class="none">no preview</div>'
        if link:
            img = f'<a href="{escape(link)}">{img}</a>'
        secs = "" if item["seconds"] is None else f" · {item['seconds']:.1f} s"
        name = escape(item["id"])
        caption = f'<figcaption class="id" title="{name}">{name}{secs}</figcaption>'
        out.append(f'<figure class="thumb" style="margin:0">{img}{caption}</figure>')
    if not d["contact"]:
        out.append('<p class="muted">No ok video yet.</p>')
    out.append("</div></section></body></html>\n")
    return "\n".join(out)


def write_report(
    out_dir: str | OutputDir, *, sample: int = SAMPLE, thumbnailer: Callable[..., bytes | None] = thumbnail
) -> str:
    """Build ``DIR/report.html`` from the results (and summary.json), written atomically.
    Returns where it went (a local path or a URI)."""
    out = open_output(out_dir)
    for attempt in range(3):  # a running job's compaction may remove a part between list and read
        try:
            table = results.read_results(out, list(COLUMNS))  # only what the page shows, streamed
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
            time.sleep(0.5)
    table = table.select([c for c in COLUMNS if c in table.column_names])
    summary = None
    try:
        if out.local:
            with open(out.path("summary.json"), encoding="utf-8") as f:
                summary = json.load(f)
        else:
            with out.fs.open(out.path("summary.json"), "rb") as f:
                summary = json.loads(f.read())
    except (OSError, ValueError):
        pass
    data = report_data(table, summary, sample=sample)
    outputs = [c["output"] for c in data["contact"]]
    with ThreadPoolExecutor(max_workers=4) as pool:
        thumbs = list(pool.map(lambda p: thumbnailer(p, out.fs) if p else None, outputs))
    links = [_link(out, p) if p and (not out.local or os.path.exists(p)) else None for p in outputs]
    html = build_html(data, title=out.uri, thumbs=thumbs, links=links)
    out.write_bytes(out.path("report.html"), html.encode("utf-8"))
    return out.uri_of("report.html")


__all__ = ["build_html", "error_group", "report_data", "thumbnail", "write_report"]
