"""Inline SVG charts rendered on the server: pure functions from numbers to markup, no JavaScript.

A chart is a few dozen elements, so the page stays readable without scripts, prints, and screenshots the same in
every browser. Every text that reaches the markup goes through :func:`markupsafe.escape`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from markupsafe import Markup, escape

__all__ = ["PALETTE", "Series", "bar_chart", "line_chart", "nice_ticks"]

# Colour-blind-safe (Okabe–Ito); series cycle through it in order.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[datetime, float | None]]  # None: no data in that bucket (a gap in the line)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 5 × 10^k steps)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step)
    last = math.ceil(hi / step - 1e-9)  # the last tick reaches the maximum, so no point is drawn off the axis
    return [round(i * step, 10) for i in range(first, last + 1)]


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 0.01 or v == 0 else f"{v:.2g}"


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    unit: str = "",
    width: int = 720,
    height: int = 260,
) -> Markup:
    """Lines over time with a legend; gaps where a bucket has no data. An empty chart says so."""
    pad_l, pad_r, pad_t, pad_b = 56, 16, 28, 44
    legend_h = 18 * math.ceil(len(series) / 3) if series else 0
    h = height + legend_h
    pts = [(t, v) for s in series for t, v in s.points if v is not None]
    out = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {h}" width="{width}" height="{h}" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text class="chart-title" x="{pad_l}" y="18">{escape(title)}</text>',
    ]
    if not pts:
        out.append(
            f'<text class="chart-empty" x="{width / 2}" y="{height / 2}" text-anchor="middle">no data yet</text>'
        )
        out.append("</svg>")
        return Markup("".join(out))
    t0 = min(t for t, _ in pts).timestamp()
    t1 = max(t for t, _ in pts).timestamp()
    if t1 <= t0:
        t1 = t0 + 1.0
    ticks = nice_ticks(0.0, max(v for _, v in pts))
    vmax = ticks[-1] or 1.0
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b

    def x(t: datetime) -> float:
        return pad_l + (t.timestamp() - t0) / (t1 - t0) * pw

    def y(v: float) -> float:
        return pad_t + ph - v / vmax * ph

    for tv in ticks:
        out.append(f'<line class="grid" x1="{pad_l}" x2="{width - pad_r}" y1="{y(tv):.1f}" y2="{y(tv):.1f}"/>')
        out.append(f'<text class="tick" x="{pad_l - 6}" y="{y(tv) + 4:.1f}" text-anchor="end">{_fmt(tv)}</text>')
    if unit:
        out.append(f'<text class="tick" x="{pad_l - 6}" y="{pad_t - 10}" text-anchor="end">{escape(unit)}</text>')
    for frac in (0.0, 0.5, 1.0):
        ts = datetime.fromtimestamp(t0 + frac * (t1 - t0), UTC)
        anchor = "start" if frac == 0 else "end" if frac == 1 else "middle"
        out.append(
            f'<text class="tick" x="{pad_l + frac * pw:.1f}" y="{pad_t + ph + 16}" '
            f'text-anchor="{anchor}">{ts:%H:%M:%S}</text>'
        )
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        runs: list[list[str]] = [[]]
        for t, v in s.points:
            if v is None:
                runs.append([])
            else:
                runs[-1].append(f"{x(t):.1f},{y(v):.1f}")
        for run in runs:
            if len(run) > 1:
                out.append(f'<polyline class="line" stroke="{color}" points="{" ".join(run)}"/>')
            elif run:
                cx, cy = run[0].split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="3" fill="{color}"/>')
        lx = pad_l + (i % 3) * (pw / 3)
        ly = height + 18 * (i // 3) - 4
        out.append(f'<rect x="{lx:.1f}" y="{ly - 9}" width="12" height="4" fill="{color}"/>')
        out.append(f'<text class="legend" x="{lx + 16:.1f}" y="{ly - 4}">{escape(s.label)}</text>')
    out.append("</svg>")
    return Markup("".join(out))


def bar_chart(bars: Sequence[tuple[str, dict[str, int]]], *, title: str, width: int = 720, bar_h: int = 22) -> Markup:
    """Horizontal stacked bars: one row per label, one segment per key (e.g. devices per tier by state)."""
    keys = sorted({k for _, parts in bars for k in parts})
    colors = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}
    pad_l, pad_r, pad_t = 120, 60, 28
    legend_y = pad_t + len(bars) * (bar_h + 6) + 14
    h = legend_y + 18 * math.ceil(len(keys) / 4) + 4 if keys else pad_t + 30
    total_max = max((sum(p.values()) for _, p in bars), default=0) or 1
    pw = width - pad_l - pad_r
    out = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {h}" width="{width}" height="{h}" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text class="chart-title" x="8" y="18">{escape(title)}</text>',
    ]
    if not bars:
        out.append(
            f'<text class="chart-empty" x="{width / 2}" y="{pad_t + 16}" text-anchor="middle">no data yet</text>'
        )
    for row, (label, parts) in enumerate(bars):
        yy = pad_t + row * (bar_h + 6)
        out.append(
            f'<text class="tick" x="{pad_l - 8}" y="{yy + bar_h * 0.7:.1f}" text-anchor="end">{escape(label)}</text>'
        )
        xx = float(pad_l)
        for k in keys:
            n = parts.get(k, 0)
            if not n:
                continue
            w = n / total_max * pw
            out.append(
                f'<rect x="{xx:.1f}" y="{yy}" width="{w:.1f}" height="{bar_h}" fill="{colors[k]}">'
                f"<title>{escape(label)} · {escape(k)}: {n}</title></rect>"
            )
            xx += w
        out.append(f'<text class="tick" x="{xx + 6:.1f}" y="{yy + bar_h * 0.7:.1f}">{sum(parts.values())}</text>')
    for i, k in enumerate(keys):
        lx = 8 + (i % 4) * (width / 4)
        ly = legend_y + 18 * (i // 4)
        out.append(f'<rect x="{lx:.1f}" y="{ly - 9}" width="10" height="10" fill="{colors[k]}"/>')
        out.append(f'<text class="legend" x="{lx + 14:.1f}" y="{ly}">{escape(k)}</text>')
    out.append("</svg>")
    return Markup("".join(out))
