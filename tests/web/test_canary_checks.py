"""web/canary_checks.py: a canary check's evidence as the text cells the report, the CLI and the
controller's artifact print; windows stored before the checks were tests fall back to flat checks."""

from __future__ import annotations

from domain import entities as e
from domain.canary_stats import (
    AbsErrors,
    Tally,
    accuracy_check,
    error_rate_check,
    error_rate_vs_champion_check,
    latency_check,
    mae_check,
    prediction_drift_check,
)
from domain.evidence import CanaryAction
from domain.histogram import LatencyHistogram
from tests.web.test_views import attempt
from web.canary_checks import HEADERS, CheckRow, check_rows, markdown_table


def test_each_check_shows_its_statistic_limit_test_level_and_sizes_in_its_own_units() -> None:
    errors = CheckRow.of_evidence(error_rate_check(3, 250, max_error_rate=0.01, alpha=0.0125, final=True))
    assert errors.cells == (
        "error_rate",
        "pass",
        "rate 1.20 % (limit 1.00 %)",
        "[0.36 %, 3.97 %], p = 0.457",
        "0.0125",
        "250",
    )
    versus = error_rate_vs_champion_check(Tally(3, 250), Tally(2, 900), alpha=0.01, final=True)
    assert CheckRow.of_evidence(versus).cells[2:] == (
        "Δ rate +0.98 pp (limit +0.00 pp)",
        "[-0.17 pp, +3.91 pp], p = 0.0717",
        "0.01",
        "250 / 900",
    )
    # accuracy is non-inferiority: the limit shown is the margin the difference may fall to
    accuracy = CheckRow.of_evidence(
        accuracy_check(Tally(180, 200), Tally(700, 760), max_drop=0.02, alpha=0.01, final=True)
    )
    assert accuracy.statistic_text == "Δ accuracy -2.11 pp (margin -2.00 pp)"
    assert accuracy.test_text == "[-8.46 pp, +2.60 pp]"
    drift = prediction_drift_check({"0": 200}, {"0": 20, "1": 180}, max_psi=0.2, alpha=0.01, final=True)
    row = CheckRow.of_evidence(drift)
    assert (row.outcome_text, row.statistic_text.endswith("(limit 0.200)"), row.sizes_text) == (
        "fail",
        True,
        "200 / 200",
    )
    assert row.statistic_text.startswith(f"PSI {drift.statistic:.3f}") and row.test_text.startswith("p = ")


def test_a_regression_canarys_mae_shows_its_relative_change_against_the_allowed_increase() -> None:
    # canary |errors| mean 12, champion mean 10, both sd ~1: +20 % against +10 % allowed
    check = mae_check(AbsErrors(100, 1200.0, 14500.0), AbsErrors(100, 1000.0, 10100.0), max_increase=0.1,
                      alpha=0.01, final=True)  # fmt: skip
    row = CheckRow.of_evidence(check)
    assert row.cells[:3] == ("mae", "fail", "Δ MAE +20.0 % (limit +10.0 %)")
    assert row.test_text.startswith("[+") and " %, +" in row.test_text and ", p = " in row.test_text
    assert (row.alpha_text, row.sizes_text) == ("0.01", "100 / 100")


def test_latency_is_a_ratio_with_its_adjusted_p_value() -> None:
    canary = LatencyHistogram.of([9.8] * 300)
    champion = LatencyHistogram.of([3.3] * 300)
    row = CheckRow.of_evidence(latency_check(canary, champion, max_ratio=1.2, slack_ms=0.0, alpha=0.004, final=True))
    assert (
        row.outcome == "fail" and row.statistic_text.startswith("p99 ratio ") and "(limit 1.20x)" in row.statistic_text
    )
    assert row.test_text.startswith("p = ") and (row.alpha_text, row.sizes_text) == ("0.004", "300 / 300")


def test_a_check_still_collecting_reads_not_yet_with_dashes_for_what_it_lacks() -> None:
    row = CheckRow.of_evidence(error_rate_check(0, 0, max_error_rate=0.01, alpha=0.0, final=False))
    assert row.cells == ("error_rate", "not yet", "rate — (limit 1.00 %)", "—", "0", "0")


def test_a_window_stored_before_the_tests_shows_its_flat_checks_as_stored() -> None:
    slow = e.GateCheck("latency_p99_ratio", "canary", e.Verdict.FAIL, "p99 2.97x", 2.97, 3.3, 1.2, 2.5, 3.4)
    old = attempt(CanaryAction.ADVANCE, slow)
    (row,) = check_rows(old)
    assert not row.tested
    assert row.cells == ("latency_p99_ratio", "fail", "2.97 (champion 3.3; limit 1.2)", "[2.5, 3.4]", "—", "—")
    assert check_rows(attempt(CanaryAction.WAIT)) == () and markdown_table(attempt(CanaryAction.WAIT)) == []


def test_evidence_wins_over_the_flat_checks_and_the_markdown_keeps_cells_whole() -> None:
    evidence = error_rate_check(2, 200, max_error_rate=0.01, alpha=0.01, final=True)
    judged = attempt(
        CanaryAction.ADVANCE, evidence.to_gate_check(), evidence=(evidence.model_copy(update={"reason": "a | b"}),)
    )
    (row,) = check_rows(judged)
    assert row.tested and row.alpha == 0.01
    header, rule, line = markdown_table(judged)
    assert header == "| " + " | ".join((*HEADERS, "reason")) + " |" and rule.count("---") == len(HEADERS) + 1
    assert line.endswith("| a \\| b |") and "| rate 1.00 % (limit 1.00 %) |" in line
