"""Tiny inline-SVG charts for ``jobs.report``: bars (histograms, rates over time) and lines.

Hand-written rather than matplotlib so the job report needs no plotting dependency, renders
crisply at any zoom, and keeps its labels as text in the page.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from jobs.text import SI_PREFIXES, si

#: matplotlib's tab10: one colour per worker (cycled).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip
_W, _H = 500, 240
_L, _R, _T, _B = 56, 12, 12, 40  # margins: left (y labels), right, top, bottom (x labels)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step - 1e-9)) + 1)]


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Labels for ``ticks`` with the fewest decimals that tell every tick apart (never two
    alike, however narrow the range: 10.0005 and 10.001 are not both "10"); from a million on,
    in the largest tick's SI unit (``0.5 M``, ``1.0 M``)."""
    if not ticks:
        return []
    top = max(abs(t) for t in ticks)
    factor, prefix = next(((f, p) for f, p in SI_PREFIXES if top >= f and f >= 1e6), (1.0, ""))
    unit = f" {prefix}" if prefix else ""
    labels: list[str] = []
    for digits in range(12):
        labels = [f"{t / factor:,.{digits}f}{unit}" for t in ticks]
        labels = [
            "0" if lb.removesuffix(unit).lstrip("-").strip("0.,") == "" else lb for lb in labels
        ]  # no "-0.00"
        if len(set(labels)) == len(labels):
            break
    return labels


def _fmt(v: float) -> str:
    """A bar's value in its tooltip."""
    if abs(v) >= 1e6:
        return si(v)
    if v and abs(v) < 1e-2:
        return f"{v:.2g}"
    if abs(v) >= 1e4:
        return f"{v:,.0f}"
    return f"{v:g}" if float(v).is_integer() else f"{v:.3g}"


def _frame(x_ticks: list[float], y_ticks: list[float], sx, sy, xlabel: str, ylabel: str) -> list[str]:
    parts = [f'<rect x="{_L}" y="{_T}" width="{_W - _L - _R}" height="{_H - _T - _B}" class="plot-bg"/>']
    for y, label in zip(y_ticks, tick_labels(y_ticks), strict=True):
        py = sy(y)
        parts.append(f'<line x1="{_L}" x2="{_W - _R}" y1="{py:.1f}" y2="{py:.1f}" class="grid"/>')
        parts.append(f'<text x="{_L - 6}" y="{py + 4:.1f}" text-anchor="end">{label}</text>')
    for x, label in zip(x_ticks, tick_labels(x_ticks), strict=True):
        px = sx(x)
        parts.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{_H - _B}" y2="{_H - _B + 4}" class="axis"/>')
        parts.append(f'<text x="{px:.1f}" y="{_H - _B + 16}" text-anchor="middle">{label}</text>')
    parts.append(f'<text x="{(_L + _W - _R) / 2}" y="{_H - 6}" text-anchor="middle">{escape(xlabel)}</text>')
    parts.append(
        f'<text transform="translate(14 {(_T + _H - _B) / 2}) rotate(-90)" text-anchor="middle">'
        f"{escape(ylabel)}</text>"
    )
    return parts


def _scales(x0: float, x1: float, y1: float):
    xt = nice_ticks(x0, x1)
    yt = nice_ticks(0.0, y1 if y1 > 0 else 1.0)
    xlo, xhi, yhi = xt[0], xt[-1], yt[-1]

    def sx(x: float) -> float:
        return _L + (x - xlo) / (xhi - xlo) * (_W - _L - _R)

    def sy(y: float) -> float:
        return _H - _B - y / yhi * (_H - _T - _B)

    return xt, yt, sx, sy


def _svg(parts: list[str], title: str) -> str:
    body = "\n".join(parts)
    return (
        f'<svg class="chart" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>\n{body}\n</svg>'
    )


def bars(edges: Sequence[float], counts: Sequence[float], *, xlabel: str, ylabel: str, title: str) -> str:
    """Bars between consecutive ``edges`` (len(counts) + 1 of them): a histogram or a rate."""
    if len(counts) == 0:
        return _svg(_frame([0, 1], [0, 1], lambda x: _L, lambda y: _H - _B, xlabel, ylabel), title)
    xt, yt, sx, sy = _scales(float(edges[0]), float(edges[-1]), float(max(counts)))
    parts = _frame(xt, yt, sx, sy, xlabel, ylabel)
    for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True):
        x, w = sx(lo), max(0.5, sx(hi) - sx(lo) - 1)
        parts.append(
            f'<rect x="{x:.1f}" y="{sy(c):.1f}" width="{w:.1f}" height="{sy(0) - sy(c):.1f}" '
            f'fill="{PALETTE[0]}"><title>{_fmt(lo)}–{_fmt(hi)}: {_fmt(c)}</title></rect>'
        )
    return _svg(parts, title)


def lines(
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]], *, xlabel: str, ylabel: str, title: str
) -> str:
    """Step lines, one per ``(name, xs, ys)``, with a legend; the first drawn thicker (the total)."""
    xs_all = [x for _, xs, _ in series for x in xs] or [0.0, 1.0]
    ys_all = [y for _, _, ys in series for y in ys] or [1.0]
    xt, yt, sx, sy = _scales(min(xs_all), max(xs_all), max(ys_all))
    parts = _frame(xt, yt, sx, sy, xlabel, ylabel)
    for i, (name, xs, ys) in enumerate(series):
        color = "#222" if i == 0 and len(series) > 1 else PALETTE[(i - (len(series) > 1)) % len(PALETTE)]
        pts = []
        prev = 0.0
        for x, y in zip(xs, ys, strict=True):
            pts.append(f"{sx(x):.1f},{sy(prev):.1f} {sx(x):.1f},{sy(y):.1f}")
            prev = y
        width = 2.5 if i == 0 else 1.5
        parts.append(
            f'<polyline points="{" ".join(pts)}" fill="none" stroke="{color}" stroke-width="{width}">'
            f"<title>{escape(name)}</title></polyline>"
        )
        ly = _T + 14 + 14 * i
        parts.append(
            f'<line x1="{_L + 8}" x2="{_L + 24}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" '
            f'stroke-width="{width}"/>'
        )
        parts.append(f'<text x="{_L + 28}" y="{ly}" class="legend">{escape(name)}</text>')
    return _svg(parts, title)
