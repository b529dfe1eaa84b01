"""The console's SVG charts: axis labels, markers at the right x, bands drawn, and arbitrary series
that never raise and never leave the view box."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from fleetops.lib.charts import Band, Marker, Series, line_chart, sparkline, time_ticks

T0 = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
NUMBER = re.compile(r'(?:x|y|x1|x2|y1|y2|cx|cy|width|height)="(-?[\d.]+)"')
POINTS = re.compile(r'points="([^"]*)"')


def _coordinates(svg: str) -> tuple[list[float], list[float]]:
    """Every x and y of every polyline point, line end, circle and rect (with its far corner)."""
    xs, ys = [], []
    for points in POINTS.findall(svg):
        for pair in points.split():
            x, y = pair.split(",")
            xs.append(float(x))
            ys.append(float(y))
    for name, value in re.findall(r'\b(x|x1|x2|cx|y|y1|y2|cy)="(-?[\d.]+)"', svg):
        (xs if name.startswith(("x", "cx")) else ys).append(float(value))
    for x, y, w, h in re.findall(
        r'<rect[^>]* x="([\d.-]+)" y="([\d.-]+)" width="([\d.-]+)" height="([\d.-]+)"', svg
    ):
        xs.append(float(x) + float(w))
        ys.append(float(y) + float(h))
    return xs, ys


def test_the_line_chart_has_a_time_axis_and_a_value_range_with_its_unit():
    chart = line_chart(
        [Series("lag", [(T0 + timedelta(minutes=m), float(m)) for m in range(0, 61, 5)])],
        start=T0,
        end=T0 + timedelta(hours=1),
        unit=" blocks",
    )
    labels = re.findall(r'class="fo-x-label"[^>]*>([^<]+)<', chart.svg)
    assert labels[0] == "10:00" and "10:30" in labels and labels[-1] == "11:00"
    assert 3 <= len(labels) <= 9
    y_labels = re.findall(r'class="fo-y-label"[^>]*>([^<]+)<', chart.svg)
    assert y_labels[-1] == "0 blocks"  # the bottom of the range
    assert y_labels[0].endswith(" blocks") and float(y_labels[0].split()[0]) >= 60


def test_a_week_long_axis_labels_dates():
    ticks = time_ticks(T0, T0 + timedelta(days=7), width=600)
    assert len(ticks) <= 9 and all("-" in label for _, label in ticks)


def test_markers_sit_at_their_time_in_the_plot():
    start, end = T0, T0 + timedelta(hours=6)
    chart = line_chart(
        [Series("lag", [(start, 1.0), (end, 2.0)])],
        start=start,
        end=end,
        width=648,  # plot: 48 .. 640, 592 px wide
        markers=[
            Marker(at=start + timedelta(hours=3), label="reorg at 120", kind="reorg"),
            Marker(at=start + timedelta(hours=1, minutes=30), label="rollback to 90", kind="rollback"),
            Marker(at=start - timedelta(hours=1), label="before the window", kind="halt"),
        ],
    )
    assert chart.marker_x == [48 + 592 / 2, 48 + 592 / 4, 48]  # the early one is clamped to the edge
    assert 'class="fo-marker fo-marker-reorg" x1="344.0" x2="344.0"' in chart.svg
    assert "<title>reorg at 120</title>" in chart.svg
    assert 'class="fo-marker fo-marker-halt"' in chart.svg


def test_a_band_is_drawn_between_its_values_with_its_label():
    chart = line_chart(
        [Series("observed", [(T0, 0.0), (T0 + timedelta(minutes=10), 100.0)])],
        start=T0,
        end=T0 + timedelta(minutes=10),
        height=222,  # plot: 10 .. 200, 190 px tall
        bands=[Band(40.0, 60.0, "target 50 kW ± 10")],
    )
    match = re.search(r'<rect class="fo-band" x="48" y="([\d.]+)" width="\d+" height="([\d.]+)"', chart.svg)
    assert match, chart.svg
    top = 100.0 * 1.08  # the range's head room
    y_60 = 10 + 190 - 60 / top * 190
    y_40 = 10 + 190 - 40 / top * 190
    assert abs(float(match.group(1)) - y_60) < 0.2
    assert abs(float(match.group(2)) - (y_40 - y_60)) < 0.3
    assert "target 50 kW ± 10" in chart.svg


def test_a_step_series_holds_its_level_until_the_next_point():
    chart = line_chart(
        [Series("commanded", [(T0, 10.0), (T0 + timedelta(minutes=5), 4.0)], step=True)],
        start=T0,
        end=T0 + timedelta(minutes=10),
        width=648,
    )
    points = [tuple(map(float, p.split(","))) for p in POINTS.findall(chart.svg)[0].split()]
    assert points[1][1] == points[0][1]  # horizontal to the second time, then down
    assert points[1][0] == points[2][0]
    assert points[-1][0] == 640  # held to the end of the plot


def test_text_is_escaped():
    chart = line_chart(
        [Series("<script>", [(T0, 1.0)])], start=T0, end=T0 + timedelta(minutes=1), label='a"b'
    )
    assert "<script>" not in chart.svg and "&lt;script&gt;" in chart.svg
    assert 'aria-label="a&quot;b"' in chart.svg


def test_a_sparkline_draws_gaps_and_marks_the_last_value():
    svg = sparkline([[1.0, None, 3.0, 4.0], [0.0, 0.0]], width=100, height=20, label="lag")
    assert svg.count("<polyline") == 3  # first series split at the gap, plus the second
    assert "<circle" in svg and 'aria-label="lag"' in svg


values = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**12), 10**12))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(values, max_size=60), max_size=4), st.integers(10, 400), st.integers(6, 120))
def test_any_sparkline_renders_inside_its_view_box(series, width, height):
    svg = sparkline(series, width=width, height=height)
    xs, ys = _coordinates(str(svg))
    assert all(0 <= x <= width for x in xs)
    assert all(0 <= y <= height for y in ys)


offsets = st.integers(min_value=-10 * 86_400, max_value=10 * 86_400)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(st.tuples(offsets, values), max_size=40), max_size=3),
    st.lists(offsets, max_size=5),
    st.lists(st.tuples(values, values), max_size=2),
    st.integers(min_value=0, max_value=8 * 86_400),
)
def test_any_line_chart_renders_inside_its_view_box(series, marker_offsets, bands, span):
    start = T0
    end = T0 + timedelta(seconds=span)
    chart = line_chart(
        [Series(f"s{i}", [(T0 + timedelta(seconds=o), v) for o, v in s]) for i, s in enumerate(series)],
        start=start,
        end=end,
        width=640,
        height=200,
        markers=[Marker(at=T0 + timedelta(seconds=o), label="m") for o in marker_offsets],
        bands=[Band(a, b, "band") for a, b in bands if a is not None and b is not None],
    )
    xs, ys = _coordinates(str(chart.svg))
    assert all(0 <= x <= 640 for x in xs)
    assert all(0 <= y <= 200 for y in ys)
    assert len(chart.marker_x) == len(marker_offsets)
