"""web/render.py: the report views rendered by the Jinja2 templates, from views built by hand (no SQL).

The collecting side (SQL → views) is tested in tests/retrainer/test_report.py."""

from __future__ import annotations

import html
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

import pytest

from domain import entities as e
from domain.canary_stats import VariantSample, WindowJudgement, judge_window
from domain.evidence import CanaryAction, CanaryAttempt, StepAnalysis, VariantWindow
from domain.histogram import LatencyHistogram
from domain.sequential import SpendingPlan
from domain.spec import CanarySpec
from web import render
from web import views as v
from web.canary_checks import check_rows
from web.render import render_report

EVIL = "<script>alert('x')</script>"
START = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
GENERATED = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "embed", "source", "track", "wbr"}


class StrictTags(HTMLParser):
    """Fails on a closing tag that does not close the innermost open element, and records every
    attribute that could load a resource."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.resource_attrs: list[tuple[str, str, str]] = []
        self.ids: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "xlink:href", "action", "srcset", "poster", "data"):
                self.resource_attrs.append((tag, name, value or ""))
            if name == "id" and value:
                self.ids.append(value)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(document: str) -> StrictTags:
    parser = StrictTags()
    parser.feed(document)
    parser.close()
    assert parser.errors == []
    assert parser.stack == [], f"unclosed elements: {parser.stack}"
    return parser


# ------------------------------------------------------------------------------------ the views


TRIGGERS = {"event": "first data", "manual": "more data", "schedule": "cron schedule"}


def run(
    candidate: int,
    trigger: str,
    accuracy: float,
    champion: tuple[int, float] | None,
    outcome: tuple[list[v.GateRow], str, str],
) -> v.RunReport:
    gate, status, decision = outcome
    run_id = f"run-{candidate}{'abc'[candidate - 1] * 7}"
    values = {"accuracy": accuracy, "macro_f1": accuracy - 0.01, "latency_p99_ms": 1.0, "size_bytes": 40_000.0}
    before = champion[1] if champion else 0.0
    old = {"accuracy": before, "macro_f1": before - 0.01, "latency_p99_ms": 1.1, "size_bytes": 40_000.0}
    quantization = v.Quantization(
        chosen="dynamic_int8",
        reason="fastest variant within 1 % accuracy",
        max_drop=0.01,
        variants=(
            v.QuantizationVariant("none", True, True, "float baseline", 0.95, 0.8, 40_000),
            v.QuantizationVariant("dynamic_int8", True, True, "1.6x faster, 3.1x smaller", 0.948, 0.5, 13_000),
        ),
    )
    return v.RunReport(
        run_id=run_id,
        trigger_kind=trigger,
        trigger_reason=TRIGGERS[trigger],
        event_count=1 if trigger == "event" else 0,
        status=status,
        dataset="digits",
        dataset_version=f"v{candidate}",
        candidate_version=candidate,
        evaluated=True,
        champion_recorded=champion is not None,
        champion_version=champion[0] if champion else None,
        champion_error=None,
        decision_reason=decision,
        error=None,
        created_at=START,
        started_at=START,
        finished_at=START + timedelta(seconds=42),
        metrics=tuple(
            v.MetricPair(name, values.get(name), old.get(name) if champion else None, higher)
            for name, higher in v.compared_metrics("classification")
        ),
        gate=tuple(gate),
        quantization=quantization,
    )


def window(version: str, requests: int, errors: int, p99: float) -> VariantWindow:
    counts = {"0": requests // 2, "1": requests - requests // 2}
    return VariantWindow(version=version, requests=requests, errors=errors, latency_p99_ms=p99, class_counts=counts)


def attempt(
    action: CanaryAction, reason: str, canary: VariantWindow, psi: float | None = None, judged: bool = False
) -> CanaryAttempt:
    """A window as the controller stores it; `judged`: with each check's evidence (judge_window over
    the windows' numbers), else the flat checks of a window stored before the checks were tests."""
    champion = window("1", 1000 if judged else 2000, 1, 3.2)
    checks = [e.GateCheck("error_rate", "canary", e.Verdict.PASS, "error rate 0.00 % <= 1.00 %", 0.0, None, 0.01)]
    if psi is not None:
        checks.append(
            e.GateCheck("prediction_psi", "canary", e.Verdict.PASS, f"PSI {psi:.3f} <= 0.200", psi, None, 0.2)
        )
    if action is CanaryAction.ROLLBACK:
        checks.append(e.GateCheck("latency_p99_ratio", "canary", e.Verdict.FAIL, reason, 2.97, 3.3, 1.2))
    judgement = judge(canary, champion) if judged else None
    return CanaryAttempt(
        action=action,
        reason=reason,
        at=START,
        elapsed_seconds=31.2,
        traffic_percent=0.0 if action is CanaryAction.ROLLBACK else 50.0,
        canary=canary,
        champion=champion,
        checks=tuple(c.to_gate_check() for c in judgement.checks) if judgement else tuple(checks),
        evidence=judgement.checks if judgement else (),
        server_error="stats endpoint timed out" if action is CanaryAction.REPEAT else None,
    )


POLICY = CanarySpec(steps=[10.0, 50.0, 100.0], min_requests=200)


def judge(canary: VariantWindow, champion: VariantWindow) -> WindowJudgement:
    """The 50 % step's checks on two windows whose latencies sit at their p99 (a little jitter)."""

    def sample(w: VariantWindow) -> VariantSample:
        latency = LatencyHistogram.of((w.latency_p99_ms or 0.0) - (i % 5) * 0.05 for i in range(w.requests))
        return VariantSample(w.requests, w.errors, latency, w.class_counts)

    return judge_window(sample(canary), sample(champion), POLICY, SpendingPlan.for_policy(POLICY.steps, 0.95), 1)


def step(index: int, traffic: float, verdict: str, *attempts: CanaryAttempt) -> v.StepReport:
    analysis = StepAnalysis(attempts=attempts, action=attempts[-1].action, reason=attempts[-1].reason)
    return v.StepReport(index, traffic, verdict, analysis, START, START + timedelta(seconds=31))


def rollout(rollout_id: int, candidate: int, status: str, reason: str, steps: list[v.StepReport]) -> v.RolloutReport:
    policy: tuple[tuple[str, str], ...] = (("max_error_rate", "0.01"), ("steps", "10.0 → 50.0 → 100.0"))
    if any(a.evidence for s in steps for a in s.attempts):  # stored since the checks are tests
        policy += (("confidence", "0.95"),)
    return v.RolloutReport(
        rollout_id, f"run-{candidate}", candidate, candidate - 1, status, reason, policy, START, START, tuple(steps)
    )


SLOW = "canary p99 latency 9.80 ms is 2.97x the champion's 3.30 ms (limit 1.20x)"
PASS_MIN = v.GateRow("accuracy", "min", "pass", "accuracy 0.9500 >= 0.9000", 0.95, None, 0.9)
BETTER = v.GateRow("accuracy", "vs_champion", "pass", "+0.04 better than champion", 0.95, 0.91, 0)
SLOWER = v.GateRow("latency_p99_ms", "max", "fail", f"latency too high {EVIL}", 7.0, None, 5.0)
DATA = v.ReportData(
    pipelines=(
        v.PipelineReport(
            name="digits",
            dataset="digits",
            champion_version=2,
            runs=(
                run(1, "event", 0.91, None, ([PASS_MIN], "promoted", "first model")),
                run(
                    2, "manual", 0.95, (1, 0.91), ([PASS_MIN, BETTER], "promoted", "all 3 steps passed; v2 is champion")
                ),
                run(3, "schedule", 0.96, (2, 0.95), ([PASS_MIN, SLOWER], "rolled_back", f"gate passed; {EVIL}")),
            ),
            alias_moves=(
                v.AliasMoveReport(None, 1, "gate", "first model", "run-1aaaaaaa", START),
                v.AliasMoveReport(1, 2, "canary", "canary passed", "run-2bbbbbbb", START),
            ),
            rollouts=(
                rollout(
                    1,
                    2,
                    "promoted",
                    "all 3 steps passed; v2 is champion",
                    [
                        step(
                            0,
                            10.0,
                            "pass",
                            attempt(CanaryAction.ADVANCE, "passed at 10 %", window("2", 220, 0, 3.4), 0.01),
                        ),
                        step(
                            1,
                            50.0,
                            "pass",
                            attempt(CanaryAction.REPEAT, "only 40 canary requests (< 200)", window("2", 40, 0, 3.0)),
                            attempt(CanaryAction.ADVANCE, "passed at 50 %", window("2", 900, 0, 3.4), 0.02),
                        ),
                        step(
                            2, 100.0, "pass", attempt(CanaryAction.PROMOTE, "promote", window("2", 1800, 0, 3.4), 0.03)
                        ),
                    ],
                ),
                rollout(
                    2,
                    3,
                    "rolled_back",
                    f"rolled back at step 1: {SLOW}",
                    [
                        step(
                            0,
                            10.0,
                            "pass",
                            attempt(CanaryAction.ADVANCE, "passed at 10 %", window("3", 250, 0, 3.5), judged=True),
                        ),
                        step(
                            1,
                            50.0,
                            "fail",
                            attempt(CanaryAction.ROLLBACK, SLOW, window("3", 1000, 3, 9.8), judged=True),
                        ),
                    ],
                ),
            ),
        ),
        v.PipelineReport("other", "iris", None, (), (), ()),
    )
)


@pytest.fixture(scope="module")
def document() -> str:
    return render_report(DATA, generated_at=GENERATED)


# ------------------------------------------------------------------------------------ rendering


def test_html_is_well_formed_and_self_contained(document: str) -> None:
    parsed = parse(document)
    assert document.startswith("<!DOCTYPE html>")
    assert "script" not in parsed.tags and "link" not in parsed.tags and "iframe" not in parsed.tags
    # the only links are fragments inside the document, and each points at an element that exists
    for tag, attr, value in parsed.resource_attrs:
        assert (tag, attr) == ("a", "href") and value.startswith("#"), (tag, attr, value)
        assert value[1:] in parsed.ids
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", document, re.IGNORECASE)
    assert "http://" not in document and "https://" not in document
    assert "Content-Security-Policy" in document and "default-src &#39;none&#39;" in document
    assert "<style>" in document


def test_html_shows_runs_verdicts_reasons_and_alias_history(document: str) -> None:
    text = " ".join(parse(document).text)
    for run_report in DATA.pipelines[0].runs:
        assert run_report.short_id in text and f'id="run-{run_report.run_id}"' in document
    for expected in (
        "first data",
        "more data",
        "cron schedule",
        "accuracy 0.9500 >= 0.9000",
        "+0.04 better than champion",
        "fastest variant within 1 % accuracy",
        "dynamic_int8",
        "first model",
        "canary passed",
        "all 3 steps passed; v2 is champion",
        "only 40 canary requests (< 200)",
        "stats endpoint timed out",
        SLOW,
        "PSI 0.020 <= 0.200",
    ):
        assert expected in text, expected
    assert 'class="fail"' in document and 'class="pass"' in document
    assert "badge bad" in document and "badge good" in document
    assert "2026-11-23 12:00:00 UTC" in text
    assert "candidate v1 vs champion none (first model)" in text


def text_of(fragment: str) -> str:
    """A part of the document as the reader sees its text (the whole is checked by parse)."""
    return html.unescape(re.sub(r"<[^>]+>", " ", fragment))


def test_each_judged_window_shows_its_checks_evidence_and_the_rollouts_budget(document: str) -> None:
    old_card, judged_card = (document.split('id="rollout-2"')[i] for i in (0, 1))
    judged = DATA.pipelines[0].rollouts[1]
    rows = [c for *_, c in judged.checks]
    assert [c.check for c in rows[:5]] == [
        "error_rate",
        "error_rate_vs_champion",
        "latency",
        "prediction_drift",
        "accuracy",
    ]
    decisive = judged.steps[1].decisive
    assert decisive is not None
    latency = next(c for c in check_rows(decisive) if c.check == "latency")
    assert latency.outcome == "fail" and latency.statistic is not None and latency.p_value is not None
    text = text_of(judged_card)
    for expected in (
        f"p99 ratio {latency.statistic:.2f}x (limit 1.20x)",
        f"p = {latency.p_value:.3g}",
        f"{latency.alpha:.3g}",
        "1000 / 1000",  # canary n / champion n of the deciding window
        "250 / 1000",
        "rate 0.30 % (limit 1.00 %)",
        "not yet",  # no delayed labels: accuracy still collecting
        latency.reason,
        "False-rollback budget 5.00 % (1 - canary.confidence)",
    ):
        assert expected in text, expected
    assert 'class="badge warn">not yet<' in judged_card
    # the rollout stored before the checks were tests: its flat checks, no levels, no budget line
    old_text = text_of(old_card)
    assert "PSI 0.020 <= 0.200" in old_text and "prediction_psi" in old_text
    assert "False-rollback budget" not in old_card


def test_html_charts_are_inline_svg(document: str) -> None:
    assert document.count("<svg") >= 1 + 3 + 2 * 5  # overview + one per run + five per rollout
    for label in ("accuracy", "canary traffic (%)", "error rate", "p99 latency (ms)", "prediction drift (PSI)"):
        assert f'aria-label="{label}"' in document, label
    assert "<polyline" in document and "<rect" in document


def test_stored_text_is_escaped(document: str) -> None:
    assert "<script" not in document
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in document
    assert EVIL in " ".join(parse(document).text)  # shown to the reader as text


def test_title_is_escaped() -> None:
    document = render_report(v.ReportData(pipelines=()), title="a <b> & c", generated_at=GENERATED)
    parse(document)
    assert "<title>a &lt;b&gt; &amp; c</title>" in document and "No pipelines recorded yet." in document


def test_unknown_values_and_steps_without_windows_show_dashes_not_errors() -> None:
    sparse = replace(
        DATA.pipelines[0].runs[0],
        status="failed",
        dataset_version=None,
        candidate_version=None,
        champion_recorded=True,
        champion_error="champion v2 unreadable",
        decision_reason="RuntimeError: boom",
        started_at=None,
        metrics=tuple(v.MetricPair(name, None, None, higher) for name, higher in v.compared_metrics("classification")),
        gate=(),
        quantization=v.Quantization(None, None, None, ()),
    )
    open_steps = (
        v.StepReport(0, 10.0, None, StepAnalysis(), START, None),
        v.StepReport(
            1, 25.0, None, StepAnalysis(action=e.RolloutStatus.ABORTED, reason="aborted by operator"), START, START
        ),
    )
    aborted = v.RolloutReport(3, None, None, None, "aborted", "aborted by operator", (), START, START, open_steps)
    data = v.ReportData(pipelines=(v.PipelineReport("digits", "digits", None, (sparse,), (), (aborted,)),))
    document = render_report(data, generated_at=GENERATED)
    parse(document)
    assert "aborted by operator" in document and "RuntimeError: boom" in document
    assert "champion v2 unreadable" in document and "—" in document
    assert "none (first model)" not in document  # unknown is not the same as "no champion"
    assert "canary traffic (%)" in document  # the traffic chart still draws from the step rows
    assert "error rate: no data" in document  # no numbers: said, not drawn


def test_metric_values_intervals_and_budgets_read_in_the_metrics_units() -> None:
    assert render.metric(0.91, "accuracy") == "0.9100"
    assert render.metric(1234.5678, "rmse") == "1234.5678"  # an error in the target's units
    assert render.metric(2.5e7, "rmse") == "2.5e+07" and render.metric(0.00012345, "mape") == "0.0001234"
    assert render.interval(v.Interval(-1.5, -0.25, 0.95), "rmse") == "[\u22121.5000, \u22120.2500] at 95 %"
    assert render.interval(v.Interval(None, 0.25, None), "r2") == "[\u2014, +0.2500]"
    assert render.interval(None, "rmse") == "\u2014"
    accuracy = v.Quantization("dynamic", "ok", 0.01, ())
    assert render.budget(accuracy) == "max accuracy drop 1 %"
    assert render.budget(replace(accuracy, metric="rmse", higher_is_better=False, max_drop=0.5)) == (
        "max rmse rise 0.5000"
    )
    assert render.budget(replace(accuracy, metric="r2", max_drop=0.05)) == "max r2 drop 0.0500"
    assert render.budget(replace(accuracy, max_drop=None)) == ""


def test_a_regression_run_charts_rmse_with_its_direction_and_a_round_axis() -> None:
    first = DATA.pipelines[0].runs[1]
    metrics = (v.MetricPair("rmse", 812.0, 905.0, False), v.MetricPair("r2", 0.71, 0.64, True))
    regression = replace(first, task="regression", metrics=metrics, quantization=None)
    chart = render.run_headline_chart(regression)
    assert chart.title == "rmse (lower is better)" and chart.kind == "bar"
    assert [m.label for m in chart.marks] == ["812", "905"]
    assert chart.ticks[-1].text == "1000"  # not the 0..1 of accuracy
    pipeline = v.PipelineReport("demand", "sales", 1, (regression,), (), (), task="regression")
    assert render.pipeline_headline_chart(pipeline).title.startswith("rmse per run (lower is better)")
    assert render.run_headline_chart(first).title == "accuracy"  # a classifier's chart is as it was
