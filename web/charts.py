"""Chart geometry for the templates: where each axis tick, point, bar and legend entry goes.

Only numbers and plain-text labels are computed here; `templates/charts.html.j2` draws them as
inline SVG (autoescaped, like every other template), so a page needs no script and no library.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Format = Callable[[float], str]

HEIGHT = 210
LEFT, TOP = 58.0, 30.0
RIGHT_MARGIN, BOTTOM_MARGIN = 14.0, 48.0


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    colour: str
    values: tuple[float | None, ...]


@dataclass(frozen=True, slots=True)
class Mark:
    """A point (x, y) or a bar (x, y, width, height) with its hover text; a bar also prints its value."""

    x: float
    y: float
    colour: str
    tip: str
    width: float = 0.0
    height: float = 0.0
    label: str = ""


@dataclass(frozen=True, slots=True)
class Text:
    x: float
    y: float
    text: str
    colour: str = ""  # set on legend entries: the swatch drawn before the text


@dataclass(frozen=True, slots=True)
class Chart:
    kind: str  # "line" | "bar" | "empty"
    title: str
    width: int = 0
    left: float = LEFT
    right: float = 0.0
    top: float = TOP
    bottom: float = HEIGHT - BOTTOM_MARGIN
    ticks: tuple[Text, ...] = ()  # y-axis grid lines and their labels
    x_labels: tuple[Text, ...] = ()
    lines: tuple[tuple[str, str], ...] = ()  # (colour, "x,y x,y …") per unbroken run of a series
    marks: tuple[Mark, ...] = ()
    gaps: tuple[Text, ...] = ()  # a dash where a bar has no value
    legend: tuple[Text, ...] = ()

    @property
    def height(self) -> int:
        return HEIGHT


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times 10^k that is >= value (a readable axis top)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if value <= step * power * (1 + 1e-9):
            return step * power
    return 10.0 * power  # pragma: no cover - 10 always fits


def _legend_step(name: str) -> float:
    return 24 + 6.5 * len(name)


@dataclass(frozen=True, slots=True)
class _Frame:
    """The plot area of one chart and its value scale."""

    title: str
    width: int
    top_value: float
    series: Sequence[Series]

    @classmethod
    def fit(cls, title: str, series: Sequence[Series], plot_width: int, y_max: float | None) -> _Frame | None:
        present = [v for s in series for v in s.values if v is not None]
        if not present:
            return None
        legend = 58 + sum(_legend_step(s.name) for s in series) + 8  # text is estimated, not measured
        width = math.ceil(max(plot_width + 80, 7 * len(title) + 24, legend))
        return cls(title, width, y_max if y_max is not None else nice_ceiling(max(max(present), 0.0)), series)

    @property
    def right(self) -> float:
        return self.width - RIGHT_MARGIN

    def y(self, value: float) -> float:
        bottom = HEIGHT - BOTTOM_MARGIN
        return bottom - max(0.0, min(value, self.top_value)) / self.top_value * (bottom - TOP)

    def chart(
        self,
        kind: str,
        fmt: Format,
        x_labels: list[Text],
        marks: list[Mark],
        *,
        lines: tuple[tuple[str, str], ...] = (),
        gaps: tuple[Text, ...] = (),
    ) -> Chart:
        mantissa = self.top_value / 10.0 ** math.floor(math.log10(self.top_value))
        count = 5 if any(math.isclose(mantissa, m) for m in (2.5, 5.0)) else 4  # round tick values
        ticks = [
            Text(LEFT, self.y(self.top_value * i / count), fmt(self.top_value * i / count)) for i in range(count + 1)
        ]
        legend, x = [], LEFT
        for s in self.series:
            legend.append(Text(x, HEIGHT - 10.0, s.name, s.colour))
            x += _legend_step(s.name)
        return Chart(
            kind,
            self.title,
            self.width,
            right=self.right,
            ticks=tuple(ticks),
            x_labels=tuple(x_labels),
            lines=lines,
            marks=tuple(marks),
            gaps=gaps,
            legend=tuple(legend),
        )


def line_chart(
    title: str, x_labels: Sequence[str], series: Sequence[Series], *, y_max: float | None = None, fmt: Format
) -> Chart:
    """Values across steps, one line per series; a missing value breaks the line."""
    frame = _Frame.fit(title, series, 70 * len(x_labels), y_max) if x_labels else None
    if frame is None:
        return Chart("empty", title)
    n = len(x_labels)

    def x_at(i: int) -> float:
        return LEFT + (frame.right - LEFT) * (i + 0.5) / n

    lines: list[tuple[str, str]] = []
    marks: list[Mark] = []
    for s in series:
        run: list[str] = []
        for i, v in enumerate(s.values[:n]):
            if v is None:
                lines += [(s.colour, " ".join(run))] if len(run) > 1 else []
                run = []
                continue
            run.append(f"{x_at(i):.1f},{frame.y(v):.1f}")
            marks.append(Mark(x_at(i), frame.y(v), s.colour, f"{s.name}, {x_labels[i]}: {fmt(v)}"))
        lines += [(s.colour, " ".join(run))] if len(run) > 1 else []
    labels = [Text(x_at(i), 0.0, label) for i, label in enumerate(x_labels)]
    return frame.chart("line", fmt, labels, marks, lines=tuple(lines))


def bar_chart(
    title: str, categories: Sequence[str], series: Sequence[Series], *, y_max: float | None = None, fmt: Format
) -> Chart:
    """Grouped vertical bars: one group per category, one bar per series; values printed on top."""
    group_width = max(40 * len(series) + 28, 64)
    frame = _Frame.fit(title, series, group_width * len(categories), y_max) if categories else None
    if frame is None:
        return Chart("empty", title)
    slot = (frame.right - LEFT) / len(categories)
    bar = min(40.0, (slot - 16) / max(len(series), 1))
    bottom = HEIGHT - BOTTOM_MARGIN
    marks: list[Mark] = []
    gaps: list[Text] = []
    labels: list[Text] = []
    for c, category in enumerate(categories):
        centre = LEFT + slot * (c + 0.5)
        labels.append(Text(centre, 0.0, category))
        for k, s in enumerate(series):
            value = s.values[c] if c < len(s.values) else None
            x = centre - bar * len(series) / 2 + k * bar
            if value is None:
                gaps.append(Text(x + bar / 2, bottom - 4, "—"))
                continue
            top = frame.y(value)
            tip = f"{s.name}, {category}: {fmt(value)}"
            marks.append(Mark(x + 1, top, s.colour, tip, width=bar - 2, height=bottom - top, label=fmt(value)))
    return frame.chart("bar", fmt, labels, marks, gaps=tuple(gaps))
