"""Small server-rendered SVG charts for the console: a sparkline for dashboard cards and a line chart
with a time axis, markers (vertical lines at instants: reorgs, rollbacks, halts) and bands
(horizontal ranges: a target ± tolerance).

Pure functions from plain data to SVG text; no JavaScript, no assets. Every coordinate is clamped
into the view box, non-finite values (NaN, ±inf) and None are gaps, and an empty or flat series
still draws, so a chart never raises on what the database holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from html import escape

from django.utils.safestring import SafeString, mark_safe

PALETTE = ("#417690", "#c05621", "#2f855a", "#c53030", "#6b46c1", "#718096")
# Time-axis tick steps to choose from, smallest first; the first giving at most `max_ticks` wins.
TICK_STEPS = (
    timedelta(minutes=1),
    timedelta(minutes=5),
    timedelta(minutes=10),
    timedelta(minutes=15),
    timedelta(minutes=30),
    timedelta(hours=1),
    timedelta(hours=2),
    timedelta(hours=3),
    timedelta(hours=6),
    timedelta(hours=12),
    timedelta(days=1),
    timedelta(days=2),
    timedelta(days=7),
)


# Values beyond this are treated as gaps: nothing the console plots is that large, and it keeps the
# scale arithmetic finite.
PLOTTABLE = 1e15


def _finite(v: float | None) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v) and abs(v) < PLOTTABLE


def _clamp(v: float, low: float, high: float) -> float:
    if not math.isfinite(v):
        return round(low, 1)
    return round(min(max(v, low), high), 1)


def _fmt(v: float) -> str:
    """A short number for an axis label: 1234567 -> 1.2M, 0.5 -> 0.5."""
    a = abs(v)
    if a >= 1e9:
        return f"{v / 1e9:.1f}G"
    if a >= 1e6:
        return f"{v / 1e6:.1f}M"
    if a >= 1e4:
        return f"{v / 1e3:.0f}k"
    if a >= 100 or v == int(v):
        return f"{v:.0f}"
    return f"{v:.2g}" if a < 1 else f"{v:.1f}"


def _runs(points: list[tuple[float, float] | None]) -> list[list[tuple[float, float]]]:
    """Split at gaps (None) into runs of consecutive points."""
    runs: list[list[tuple[float, float]]] = [[]]
    for p in points:
        if p is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(p)
    return [r for r in runs if r]


def sparkline(
    series: Sequence[Sequence[float | None]],
    *,
    width: int = 160,
    height: int = 28,
    label: str = "",
    colors: Sequence[str] = PALETTE,
) -> SafeString:
    """One or more equally spaced series (oldest first) sharing one y scale from 0 to their maximum.
    The last value of the first series is marked with a dot."""
    values = [v for s in series for v in s if _finite(v)]
    top = max([float(v) for v in values if v is not None] + [0.0])
    bottom = min([float(v) for v in values if v is not None] + [0.0])
    span = (top - bottom) or 1.0
    pad = 2.0
    parts = [
        f'<svg class="fo-spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(label)}" preserveAspectRatio="none">'
    ]
    if label:
        parts.append(f"<title>{escape(label)}</title>")
    for index, s in enumerate(series):
        n = len(s)
        step = (width - 2 * pad) / max(n - 1, 1)
        points: list[tuple[float, float] | None] = []
        for i, v in enumerate(s):
            if not _finite(v):
                points.append(None)
                continue
            assert v is not None
            x = _clamp(pad + i * step, 0, width)
            y = _clamp(height - pad - (float(v) - bottom) / span * (height - 2 * pad), 0, height)
            points.append((x, y))
        color = escape(colors[index % len(colors)])
        for run in _runs(points):
            if len(run) == 1:
                run = [run[0], run[0]]
            coords = " ".join(f"{x},{y}" for x, y in run)
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>')
        last = next((p for p in reversed(points) if p is not None), None)
        if index == 0 and last is not None:
            parts.append(f'<circle cx="{last[0]}" cy="{last[1]}" r="2" fill="{color}"/>')
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 - every interpolated text is escaped above


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[datetime, float | None]]
    color: str = PALETTE[0]
    step: bool = False  # draw as a step line (a commanded level holds until the next command)
    dashed: bool = False


@dataclass(frozen=True)
class Marker:
    at: datetime
    label: str
    kind: str = "event"  # reorg | rollback | halt | ...: picks the colour, and a CSS class


@dataclass(frozen=True)
class Band:
    low: float
    high: float
    label: str
    color: str = "#2f855a"


MARKER_COLORS = {"reorg": "#c05621", "rollback": "#6b46c1", "halt": "#c53030"}


@dataclass(frozen=True)
class LineChart:
    """What `line_chart` computed, for tests and templates: the SVG and where things were put."""

    svg: SafeString
    marker_x: list[float] = field(default_factory=list)
    ticks: list[tuple[float, str]] = field(default_factory=list)


def time_ticks(
    start: datetime, end: datetime, *, width: float, max_ticks: int = 8
) -> list[tuple[float, str]]:
    """Tick positions (x within [0, width]) and labels at round multiples of a step picked so that
    at most `max_ticks` fit; labels show the date when the span exceeds a day."""
    span = (end - start).total_seconds()
    if span <= 0:
        return [(0.0, start.strftime("%H:%M"))]
    step = next((s for s in TICK_STEPS if span / s.total_seconds() <= max_ticks), TICK_STEPS[-1])
    step_s = step.total_seconds()
    epoch = datetime(1970, 1, 1, tzinfo=start.tzinfo)
    first = math.ceil((start - epoch).total_seconds() / step_s) * step_s
    fmt = "%m-%d %H:%M" if span > 86_400 else "%H:%M"
    ticks: list[tuple[float, str]] = []
    t = first
    while t <= (end - epoch).total_seconds() and len(ticks) <= max_ticks:
        at = epoch + timedelta(seconds=t)
        ticks.append((round((at - start).total_seconds() / span * width, 1), at.strftime(fmt)))
        t += step_s
    return ticks


def line_chart(
    series: Sequence[Series],
    *,
    start: datetime,
    end: datetime,
    width: int = 640,
    height: int = 200,
    unit: str = "",
    markers: Sequence[Marker] = (),
    bands: Sequence[Band] = (),
    label: str = "",
    y_min: float | None = 0.0,
) -> LineChart:
    """Series over [start, end] with a time axis at the bottom, the y range on the left (0 and the
    maximum, with `unit`), markers as labelled vertical lines and bands as shaded ranges.

    The plot area leaves a margin for the labels; x of a time `t` is
    `left + (t - start) / (end - start) * plot_width`, clamped into the plot."""
    left, right, top_pad, bottom_pad = 48, 8, 10, 22
    plot_w = max(width - left - right, 1)
    plot_h = max(height - top_pad - bottom_pad, 1)
    span = max((end - start).total_seconds(), 1.0)
    values = [float(v) for s in series for _, v in s.points if _finite(v) and v is not None]
    values += [b.low for b in bands if _finite(b.low)] + [b.high for b in bands if _finite(b.high)]
    vmax = max(values, default=1.0)
    vmin = min(values, default=0.0)
    if y_min is not None:
        vmin = min(vmin, y_min)
    if vmax <= vmin:
        vmax = vmin + 1.0
    vmax += (vmax - vmin) * 0.08

    def x_of(at: datetime) -> float:
        return _clamp(left + (at - start).total_seconds() / span * plot_w, left, left + plot_w)

    def y_of(v: float) -> float:
        return _clamp(top_pad + plot_h - (v - vmin) / (vmax - vmin) * plot_h, top_pad, top_pad + plot_h)

    esc_label = escape(label)
    parts = [
        f'<svg class="fo-chart" viewBox="0 0 {width} {height}" width="100%" '
        f'style="max-width:{width}px" role="img" aria-label="{esc_label}">',
        f"<title>{esc_label}</title>" if label else "",
        f'<rect x="{left}" y="{top_pad}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#ddd"/>',
    ]
    for band in bands:
        if not (_finite(band.low) and _finite(band.high)):
            continue
        y_hi, y_lo = y_of(max(band.low, band.high)), y_of(min(band.low, band.high))
        parts.append(
            f'<rect class="fo-band" x="{left}" y="{y_hi}" width="{plot_w}" height="{round(y_lo - y_hi, 1)}" '
            f'fill="{escape(band.color)}" fill-opacity="0.15"><title>{escape(band.label)}</title></rect>'
        )
        parts.append(
            f'<text x="{left + plot_w - 4}" y="{_clamp(y_hi - 2, 9, height)}" font-size="10" '
            f'text-anchor="end" fill="{escape(band.color)}">{escape(band.label)}</text>'
        )
    # y labels: the bottom and the top of the range
    parts.append(
        f'<text class="fo-y-label" x="{left - 4}" y="{top_pad + 9}" font-size="10" text-anchor="end">'
        f"{escape(_fmt(vmax))}{escape(unit)}</text>"
    )
    parts.append(
        f'<text class="fo-y-label" x="{left - 4}" y="{top_pad + plot_h}" font-size="10" text-anchor="end">'
        f"{escape(_fmt(vmin))}{escape(unit)}</text>"
    )
    ticks = [(round(left + x / width * plot_w, 1), text) for x, text in time_ticks(start, end, width=width)]
    for x, text in ticks:
        x = _clamp(x, left, left + plot_w)
        parts.append(
            f'<line x1="{x}" x2="{x}" y1="{top_pad + plot_h}" y2="{top_pad + plot_h + 4}" stroke="#999"/>'
            f'<text class="fo-x-label" x="{x}" y="{height - 6}" font-size="10" text-anchor="middle">'
            f"{escape(text)}</text>"
        )
    for s in series:
        points: list[tuple[float, float] | None] = []
        prev_y: float | None = None
        for at, v in sorted(s.points, key=lambda p: p[0]):
            if not _finite(v) or v is None:
                points.append(None)
                prev_y = None
                continue
            x, y = x_of(at), y_of(float(v))
            if s.step and prev_y is not None:
                points.append((x, prev_y))
            points.append((x, y))
            prev_y = y
        if s.step and prev_y is not None:
            points.append((left + plot_w, prev_y))
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        for run in _runs(points):
            if len(run) == 1:
                run = [run[0], (_clamp(run[0][0] + 1, left, left + plot_w), run[0][1])]
            coords = " ".join(f"{x},{y}" for x, y in run)
            parts.append(
                f'<polyline class="fo-series" fill="none" stroke="{escape(s.color)}" stroke-width="2"{dash} '
                f'points="{coords}"><title>{escape(s.label)}</title></polyline>'
            )
    marker_x = []
    for m in markers:
        x = x_of(m.at)
        marker_x.append(x)
        color = MARKER_COLORS.get(m.kind, "#4a5568")
        parts.append(
            f'<line class="fo-marker fo-marker-{escape(m.kind)}" x1="{x}" x2="{x}" y1="{top_pad}" '
            f'y2="{top_pad + plot_h}" stroke="{color}" stroke-width="1.5" stroke-dasharray="3 2">'
            f"<title>{escape(m.label)}</title></line>"
        )
    parts.append("</svg>")
    return LineChart(svg=mark_safe("".join(parts)), marker_x=marker_x, ticks=ticks)  # noqa: S308


def legend(series: Sequence[Series], bands: Sequence[Band] = ()) -> SafeString:
    """A one-line HTML legend for a line chart."""
    items = [
        f'<span class="fo-legend-item"><span style="border-top:2px {"dashed" if s.dashed else "solid"} '
        f'{escape(s.color)};display:inline-block;width:18px;vertical-align:middle"></span> '
        f"{escape(s.label)}</span>"
        for s in series
    ]
    items += [
        f'<span class="fo-legend-item"><span style="background:{escape(b.color)};opacity:.3;'
        f'display:inline-block;width:18px;height:8px"></span> {escape(b.label)}</span>'
        for b in bands
    ]
    return mark_safe('<span class="fo-legend">' + " ".join(items) + "</span>")  # noqa: S308
