"""Canary verdicts before and after issue 12: false rollbacks and detection, by sample size and check.

Runs synthetic rollouts (`domain/canary_simulation.py`: seeded, known distributions, 2 % of
requests delayed 1-5 ms by jitter in both variants) through two judges that see the same windows:

- before: the point-estimate rules of `domain/canary.py` (`next_canary_step`), reimplemented here
  on the same evidence: error rate > limit; below 100 %, p99 ratio > limit while more than the
  slack slower, PSI > limit; accuracy below champion - drop once both have `min_labels`;
- after: the controller's own decision, `domain.canary.next_canary_step` (`judge_window` of
  `domain/canary_stats.py` at the levels of the spending plan of `domain/sequential.py`).

Prints, per policy and scenario, the share of rollouts rolled back at all and by the second
analysed window; then, for the equal candidate, which check caused the false rollbacks; then the
power figures `retrainer pipelines validate` would compute for each policy.

    .venv/bin/python bench/canary_power.py [--rollouts 400] [--seed 12]
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from dataclasses import replace

from domain.canary import population_stability_index
from domain.canary_power import canary_power
from domain.canary_simulation import (
    SCENARIOS,
    Judge,
    Scenario,
    simulate_rollout,
    statistical_judge,
)
from domain.canary_stats import VariantSample
from domain.evidence import CheckOutcome
from domain.spec import CanarySpec

CONFIDENCE = 0.95
POLICIES: dict[str, CanarySpec] = {
    "issue: 30 @ 20/50/100, p99 x1.5": CanarySpec(min_requests=30, steps=[20, 50, 100], max_latency_p99_ratio=1.5),
    "100 @ 20/50/100": CanarySpec(min_requests=100, steps=[20, 50, 100]),
    "default: 200 @ 10/25/50/100": CanarySpec(),
    "500 @ 10/25/50/100": CanarySpec(min_requests=500),
}
# Not in the tests' set: a model twice as costly while the scheduler's jitter stays as it was, so
# the window's p99 (made by the jitter) barely moves. Shown to state where the tests' power ends.
MODEL_COST_ONLY = Scenario(
    "model_cost_2x_jitter_same",
    replace(SCENARIOS[0].canary, slowdown=1.0, median_ms=4.0, jitter_share=0.02),
    bad=True,
)


def point_estimate_judge(policy: CanarySpec) -> Judge:
    """Today's rules (domain/canary.py) as a Judge over the same windows."""

    def judge(canary: VariantSample, champion: VariantSample, step: int) -> tuple[CheckOutcome, tuple[str, ...]]:
        failed = []
        if canary.errors / canary.requests > policy.max_error_rate:
            failed.append("error_rate")
        if policy.steps[step] < 100.0:
            canary_p99, champion_p99 = canary.latency.quantile(0.99), champion.latency.quantile(0.99)
            if canary_p99 is not None and champion_p99:
                slower = canary_p99 - champion_p99
                if canary_p99 / champion_p99 > policy.max_latency_p99_ratio and slower > policy.latency_p99_slack_ms:
                    failed.append("latency")
            psi = population_stability_index(dict(champion.class_counts), dict(canary.class_counts))
            if psi > policy.max_prediction_psi:
                failed.append("prediction_drift")
        labelled = min(canary.labelled, champion.labelled) >= policy.min_labels
        if (
            labelled
            and canary.correct / canary.labelled < champion.correct / champion.labelled - policy.max_accuracy_drop
        ):
            failed.append("accuracy")
        return (CheckOutcome.FAIL if failed else CheckOutcome.PASS), tuple(failed)

    return judge


def _run(
    scenario: Scenario, policy: CanarySpec, judge: Judge, rollouts: int, seed: int
) -> tuple[float, float, Counter[str]]:
    rng = random.Random(seed)  # noqa: S311 - a simulation, not a secret
    results = [simulate_rollout(scenario, policy, judge, rng) for _ in range(rollouts)]
    causes: Counter[str] = Counter(c for r in results if r.rolled_back for c in r.failed_checks)
    back = sum(r.rolled_back for r in results) / rollouts
    early = sum(r.rolled_back and r.windows <= 2 for r in results) / rollouts
    return back, early, causes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=400)
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    started = time.perf_counter()
    scenarios = (*SCENARIOS, MODEL_COST_ONLY)
    print(f"canary rollouts: {args.rollouts} per cell, seed {args.seed}, confidence {CONFIDENCE}")
    print("share rolled back (at all / by the 2nd analysed window); good candidates want 0, bad ones 100 %\n")
    header = f"{'policy':<34} {'scenario':<27} {'bad':<4} {'before':>15} {'after':>15}"
    print(header)
    print("-" * len(header))
    false_causes: dict[str, tuple[Counter[str], Counter[str]]] = {}
    for label, policy in POLICIES.items():
        for scenario in scenarios:
            old = _run(scenario, policy, point_estimate_judge(policy), args.rollouts, args.seed)
            new = _run(
                scenario,
                policy,
                statistical_judge(policy, scenario.expected_disagreement),
                args.rollouts,
                args.seed,
            )
            cells = [f"{back:6.1%} / {early:6.1%}" for back, early, _ in (old, new)]
            print(f"{label:<34} {scenario.name:<27} {'yes' if scenario.bad else 'no':<4} {cells[0]:>15} {cells[1]:>15}")
            if scenario.name == "equal":
                false_causes[label] = (old[2], new[2])
        print()
    print("equal candidate: rollouts rolled back, by the check that failed (before -> after)")
    for label, (old_causes, new_causes) in false_causes.items():
        checks = sorted(set(old_causes) | set(new_causes)) or ["none"]
        parts = ", ".join(f"{c} {old_causes[c]} -> {new_causes[c]}" for c in checks)
        print(f"  {label:<34} {parts}")
    print("\npower at validation (smallest effect detected with 95 % power at the step's planned sample)")
    for label, policy in POLICIES.items():
        print(f"  {label}")
        for figure in canary_power(policy, confidence=CONFIDENCE, classes=10):
            detectable = "never" if figure.detectable is None else f"{figure.detectable:.3f}"
            verdict = "sound" if figure.sound else f"UNSOUND: {figure.message}"
            print(
                f"    {figure.step_percent:>5g} % {figure.check:<17} n={figure.canary_n}/{figure.champion_n} "
                f"alpha {figure.alpha:.4f}: {detectable} {figure.detectable_unit}; {verdict}"
            )
    print(f"\n({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
