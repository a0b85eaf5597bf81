"""``vcut report DIR``: one self-contained HTML page about a job, finished or still running.

``DIR/report.html`` holds the summary (rows, ok, failed, pending, wall time, videos per hour,
MACs spent and saved per lever), throughput over time and per worker, a render-time
histogram, the failures grouped by error message, and a contact sheet of the first frames of
a sample of videos. No script, no network: CSS inline, charts as inline SVG
(:mod:`jobs.report_svg`), thumbnails as base64 JPEG decoded with ffmpeg (a WebDataset job's
from the sample inside its shard's tar). The page is the Jinja2 template
``jobs/templates/report.html.j2`` (autoescaped), filled from :func:`jobs.report_data.report_data`'s dict.
Everything comes from the committed results (``jobs.results.read_results``) and, when
present, ``summary.json``; a video that cannot be read (missing, not a video) shows
"no preview". ``vcut run`` writes the report at the end of every job (``output.report``).
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

from jobs import report_svg, results
from jobs.output import OutputDir, open_output
from jobs.report_data import COLUMNS, SAMPLE, error_group, report_data
from jobs.report_thumbs import THUMB_HEIGHT, link, thumbnail
from jobs.text import si


@lru_cache(maxsize=1)
def _template() -> Any:
    """``jobs/templates/report.html.j2`` (package data), autoescaped."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("jobs", "templates"),
        autoescape=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("report.html.j2")


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _utc(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "–"


def _cards(d: dict[str, Any]) -> list[dict[str, str]]:
    m = d["macs"]
    stock = m["macs"] + m["macs_saved"]
    pct = f" ({m['macs_saved'] / stock:.0%} of stock)" if stock else ""
    rows = [
        ("rows", "rows", f"{d['rows']:,}", ""),
        ("ok", "ok", f"{d['ok']:,}", "good"),
        ("failed", "failed", f"{d['failed']:,}", "bad" if d["failed"] else ""),
        ("pending", "pending", "unknown" if d["pending"] is None else f"{d['pending']:,}", ""),
        ("wall", "wall time", _duration(d["wall_seconds"]), ""),
        ("videos_per_hour", "videos per hour", f"{d['videos_per_hour']:,.1f}", ""),
        ("macs", "MACs spent", si(m["macs"]), ""),
        ("macs_saved", "MACs saved" + pct, si(m["macs_saved"]), ""),
        ("macs_saved_vcut", "saved by VCUT", si(m["macs_saved_vcut"]), ""),
        ("macs_saved_step_cache", "saved by step cache", si(m["macs_saved_step_cache"]), ""),
    ]
    return [{"key": k, "label": label, "value": v, "cls": cls} for k, label, v, cls in rows]


def build_html(
    data: dict[str, Any], *, title: str, thumbs: list[bytes | None], links: list[str | None]
) -> str:
    """The page for ``report_data``'s dict; ``thumbs``/``links`` align with ``data["contact"]``."""
    from markupsafe import Markup

    tp, hist = data["throughput"], data["render_seconds"]
    charts = []
    if tp["series"]:
        xlabel = f"{tp['unit']} since the first start"
        charts = [
            report_svg.bars(tp["edges"], tp["per_hour"], xlabel=xlabel, ylabel="ok videos per hour",
                            title="throughput over time"),
            report_svg.lines(tp["series"], xlabel=xlabel, ylabel="ok videos (cumulative)",
                             title="videos per worker"),
        ]  # fmt: skip
    histogram = None
    if hist["counts"]:
        histogram = report_svg.bars(
            hist["edges"],
            hist["counts"],
            xlabel="seconds per video",
            ylabel="videos",
            title="render-time histogram",
        )
    workers = [
        {
            **w,
            "mean": "–" if w["mean_seconds"] is None else f"{w['mean_seconds']:.2f}",
            "per_hour": "–" if w["videos_per_hour"] is None else f"{w['videos_per_hour']:,.1f}",
        }
        for w in data["workers"]
    ]
    contact = [
        {
            **item,
            "src": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode() if jpeg else None,
            "link": link,
        }
        for item, jpeg, link in zip(data["contact"], thumbs, links, strict=True)
    ]
    return _template().render(
        d=data,
        title=title,
        cards=_cards(data),
        started=_utc(data["started"]),
        last_finished=_utc(data["last_finished"]),
        written=_utc(time.time()),
        throughput_charts=[Markup(c) for c in charts],  # report_svg escapes every text it draws
        histogram=Markup(histogram) if histogram else None,
        workers=workers,
        contact=contact,
        thumb_height=THUMB_HEIGHT,
        thumb_width=THUMB_HEIGHT * 16 // 9,
    )


def write_report(
    out_dir: str | OutputDir, *, sample: int = SAMPLE, thumbnailer: Callable[..., bytes | None] = thumbnail
) -> str:
    """Build ``DIR/report.html`` from the results (and summary.json), written atomically.
    Returns where it went (a local path or a URI)."""
    out = open_output(out_dir)
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
    for attempt in range(3):  # a running job's compaction may remove a part between list and read
        try:  # only what the page shows, one part at a time (memory: a few numbers a row)
            data = report_data(
                lambda columns: results.iter_results(out, columns),
                summary,
                sample=sample,
                every_row=lambda columns: results.iter_parts(out, columns),
            )
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
            time.sleep(0.5)
    from jobs.shards import sample_key

    def thumb(item: dict[str, Any]) -> bytes | None:
        if not item["output"]:
            return None
        if item["in_shard"]:  # a WebDataset sample: the video inside its shard's tar
            return thumbnailer(item["output"], out.fs, sample=sample_key(item["id"]))
        return thumbnailer(item["output"], out.fs)

    with ThreadPoolExecutor(max_workers=4) as pool:
        thumbs = list(pool.map(thumb, data["contact"]))
    outputs = [c["output"] for c in data["contact"]]
    links = [link(out, p) if p and (not out.local or os.path.exists(p)) else None for p in outputs]
    html = build_html(data, title=out.uri, thumbs=thumbs, links=links)
    out.write_bytes(out.path("report.html"), html.encode("utf-8"))
    return out.uri_of("report.html")


__all__ = ["COLUMNS", "SAMPLE", "build_html", "error_group", "report_data", "thumbnail", "write_report"]
