"""Renders the report views (`web/views.py`) with the Jinja2 templates in `web/templates/`.

`render_report(data)` gives one self-contained HTML document: inline CSS, charts as inline SVG
(`web/charts.py` places them, `templates/charts.html.j2` draws them), no scripts, and a
Content-Security-Policy that forbids fetching anything even if a stored string tried to.
Autoescaping is on for every template, so stored text is always shown as text. The templates are
package data (found after `pip install` too) and are meant to be reused by the API's dashboard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from domain.evidence import CanaryAttempt, VariantWindow
from domain.task import QUALITY_METRICS, Task
from web.canary_checks import DASH
from web.charts import Chart, Series, bar_chart, line_chart, nice_ceiling
from web.views import HEADLINE_METRIC, Interval, PipelineReport, Quantization, ReportData, RunReport, StepReport

TEMPLATES = Path(__file__).resolve().parent / "templates"

CANDIDATE_COLOUR = "#1a73e8"
CHAMPION_COLOUR = "#f29900"
TRAFFIC_COLOUR = "#12b5cb"
PSI_COLOUR = "#9334e6"

# CSP: nothing may be fetched; inline styles are the only thing allowed in.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"

_TONES = {
    "good": {"pass", "promoted", "promote", "advance", "champion"},
    "bad": {"fail", "failed", "rejected", "rolled_back", "rollback", "aborted"},
    "warn": {"repeat", "wait", "skipped", "not yet", "awaiting_approval"},
    "info": {"canary", "running", "queued", "active"},
}


# ------------------------------------------------------------------------------------- filters


def dash(value: object) -> str:
    """The value as text; None and blank strings become a dash."""
    text = "" if value is None else str(value)
    return text if text.strip() else DASH


def tone(word: object) -> str:
    return next((name for name, words in _TONES.items() if str(word) in words), "")


def version(number: int | None) -> str:
    return DASH if number is None else f"v{number}"


def time(moment: datetime | None) -> str:
    if moment is None:
        return DASH
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return DASH
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def num(value: float | None, digits: int = 4) -> str:
    return DASH if value is None else f"{value:.{digits}g}"


def size(value: float | None) -> str:
    if value is None:
        return DASH
    amount = float(value)
    for unit in ("B", "KiB", "MiB"):
        if abs(amount) < 1024:
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} GiB"


def percent(fraction: float | None) -> str:
    return DASH if fraction is None else f"{fraction * 100:.2f} %"


def ms(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{value:.0f} ms" if abs(value) >= 100 else f"{value:.2f} ms"


def metric(value: float | None, name: str) -> str:
    if name == "size_bytes":
        return size(value)
    if name.startswith("latency_"):
        return ms(value)
    if value is None:
        return DASH
    # four decimals read well for fractions and for a regression error in the target's units;
    # a very large or very small error keeps four significant digits instead
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.4g}"


def signed(delta: float | None, name: str) -> str:
    if delta is None:
        return DASH
    sign = "+" if delta > 0 else "\u2212" if delta < 0 else "\u00b1"  # minus sign, plus-minus
    return sign + metric(abs(delta), name)


def interval(bounds: Interval | None, name: str) -> str:
    """A paired interval of candidate - champion as "[low, high] at 95 %"."""
    if bounds is None:
        return DASH
    level = "" if bounds.confidence is None else f" at {bounds.confidence * 100:g} %"
    return f"[{signed(bounds.low, name)}, {signed(bounds.high, name)}]{level}"


def budget(quantization: Quantization) -> str:
    """The quantization budget in words: "max accuracy drop 1 %" (in points, as the spec has always
    said it), "max rmse rise 0.5" for a metric where lower is better."""
    amount, name = quantization.max_drop, quantization.metric
    if amount is None:
        return ""
    if name == "accuracy":
        return f"max accuracy drop {amount * 100:.2g} %"
    return f"max {name} {'drop' if quantization.higher_is_better else 'rise'} {metric(amount, name)}"


def yes_no(value: bool | None) -> str:
    return DASH if value is None else ("yes" if value else "no")


def px(value: float) -> str:
    """An SVG coordinate: one decimal is finer than a pixel."""
    return f"{value:.1f}"


def traffic(value: float | None) -> str:
    return DASH if value is None else f"{value:g} %"


# -------------------------------------------------------------------------------------- charts


def _headline(runs: Sequence[RunReport], name: str, title: str, categories: list[str], fmt: str) -> Chart:
    pairs = [r.metric(name) for r in runs]
    series = [
        Series("candidate", CANDIDATE_COLOUR, tuple(p.candidate if p else None for p in pairs)),
        Series("champion", CHAMPION_COLOUR, tuple(p.champion if p else None for p in pairs)),
    ]
    # accuracy is a fraction: its axis ends at 1; an error in the target's units gets a round top
    y_max = 1.0 if name == "accuracy" else None
    return bar_chart(title, categories, series, y_max=y_max, fmt=lambda v: f"{v:{fmt}}")


def _direction(name: str, task: Task) -> str:
    """Said in a chart's title when a lower bar is the better one."""
    return "" if QUALITY_METRICS[task].get(name, True) else " (lower is better)"


def pipeline_headline_chart(pipeline: PipelineReport) -> Chart:
    """The pipeline's headline metric (accuracy, or rmse for regression) per run, both models."""
    name = pipeline.headline_metric
    title = f"{name} per run{_direction(name, pipeline.task)}: candidate vs champion (same test rows)"
    fmt = ".3f" if name == "accuracy" else ".4g"
    return _headline(pipeline.runs, name, title, [r.short_id for r in pipeline.runs], fmt)


def run_headline_chart(run: RunReport) -> Chart:
    name = HEADLINE_METRIC[run.task]
    fmt = ".4f" if name == "accuracy" else ".4g"
    return _headline([run], name, f"{name}{_direction(name, run.task)}", [name], fmt)


def rollout_charts(steps: Sequence[StepReport]) -> list[Chart]:
    """Traffic, error rate, p99 latency, requests and (when measured) drift across a rollout's steps,
    each from the step's deciding window."""
    labels = [f"step {s.step_index}" for s in steps]
    decisive = [s.decisive for s in steps]

    def both(pick: Callable[[VariantWindow], float | int | None]) -> list[Series]:
        return [
            Series("canary", CANDIDATE_COLOUR, _values(decisive, lambda a: pick(a.canary))),
            Series("champion", CHAMPION_COLOUR, _values(decisive, lambda a: pick(a.champion))),
        ]

    error_rates = both(lambda w: w.error_rate)
    worst = max([v for s in error_rates for v in s.values if v is not None] + [0.01])
    traffic_line = Series("canary traffic", TRAFFIC_COLOUR, tuple(s.traffic_percent for s in steps))
    charts = [
        line_chart("canary traffic (%)", labels, [traffic_line], y_max=100.0, fmt=lambda v: f"{v:g} %"),
        line_chart("error rate", labels, error_rates, y_max=nice_ceiling(worst), fmt=lambda v: f"{v * 100:.2g} %"),
        line_chart("p99 latency (ms)", labels, both(lambda w: w.latency_p99_ms), fmt=lambda v: f"{v:.3g}"),
        line_chart("requests in the deciding window", labels, both(lambda w: w.requests), fmt=lambda v: f"{v:.0f}"),
    ]
    psi = _values(decisive, lambda a: a.psi)
    if any(v is not None for v in psi):
        charts.append(
            line_chart("prediction drift (PSI)", labels, [Series("PSI", PSI_COLOUR, psi)], fmt=lambda v: f"{v:.2g}")
        )
    return charts


def _values(
    attempts: Sequence[CanaryAttempt | None], pick: Callable[[CanaryAttempt], float | int | None]
) -> tuple[float | None, ...]:
    picked = (pick(a) if a is not None else None for a in attempts)
    return tuple(None if v is None else float(v) for v in picked)


# ------------------------------------------------------------------------------------ rendering


def environment() -> Environment:
    """The templates' environment: autoescaped, and an undefined name is an error, never blank."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        dash=dash, tone=tone, version=version, time=time, duration=duration, num=num, size=size,
        percent=percent, ms=ms, metric=metric, signed=signed, yes_no=yes_no, traffic=traffic, px=px,
        interval=interval, budget=budget,
    )  # fmt: skip
    env.globals.update(
        CSP=CSP,
        pipeline_headline_chart=pipeline_headline_chart,
        run_headline_chart=run_headline_chart,
        rollout_charts=rollout_charts,
    )
    return env


_ENVIRONMENT = environment()


def render_report(
    data: ReportData, *, title: str = "Retrainer demo report", generated_at: datetime | None = None
) -> str:
    """One self-contained HTML document of `data`: no scripts, no external resources, all text escaped."""
    template = _ENVIRONMENT.get_template("report.html.j2")
    return template.render(data=data, title=title, generated_at=generated_at or datetime.now(UTC))
