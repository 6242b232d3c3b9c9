"""web/charts.py: chart geometry (pure numbers; the template draws them)."""

from __future__ import annotations

import pytest

from web.charts import HEIGHT, TOP, Series, bar_chart, line_chart, nice_ceiling


@pytest.mark.parametrize(
    ("value", "top"), [(0.0, 1.0), (-3.0, 1.0), (0.013, 0.02), (0.9, 1.0), (2.2, 2.5), (3.0, 5.0), (700, 1000)]
)
def test_nice_ceiling_is_the_next_readable_axis_top(value: float, top: float) -> None:
    assert nice_ceiling(value) == pytest.approx(top)


def test_a_missing_value_breaks_the_line_and_leaves_no_mark() -> None:
    chart = line_chart("p99", ["a", "b", "c", "d"], [Series("canary", "#000", (1.0, 2.0, None, 4.0))], fmt=str)
    assert chart.kind == "line"
    assert len(chart.lines) == 1 and len(chart.lines[0][1].split()) == 2  # a-b drawn; d alone is a mark only
    assert [m.tip for m in chart.marks] == ["canary, a: 1.0", "canary, b: 2.0", "canary, d: 4.0"]
    assert [t.text for t in chart.x_labels] == ["a", "b", "c", "d"]


def test_values_above_the_axis_top_are_drawn_at_the_top() -> None:
    chart = line_chart("traffic", ["s0", "s1"], [Series("t", "#000", (50.0, 400.0))], y_max=100.0, fmt=str)
    assert chart.marks[1].y == pytest.approx(TOP) and chart.marks[0].y > TOP
    assert chart.ticks[-1].text == "100.0"


def test_no_values_is_an_empty_chart_not_a_drawing() -> None:
    assert line_chart("error rate", ["s0"], [Series("c", "#000", (None,))], fmt=str).kind == "empty"
    assert bar_chart("accuracy", [], [Series("c", "#000", ())], fmt=str).kind == "empty"


def test_bars_print_their_value_and_a_dash_where_there_is_none() -> None:
    series = [Series("candidate", "#00f", (0.9, 0.95)), Series("champion", "#f90", (None, 0.91))]
    chart = bar_chart("accuracy", ["r1", "r2"], series, y_max=1.0, fmt=lambda v: f"{v:.2f}")
    assert [m.label for m in chart.marks] == ["0.90", "0.95", "0.91"]
    assert [g.text for g in chart.gaps] == ["—"]
    assert all(m.height > 0 and m.y + m.height <= HEIGHT for m in chart.marks)
    assert [t.text for t in chart.legend] == ["candidate", "champion"]
