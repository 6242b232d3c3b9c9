"""How a rollout's false-failure budget is spent over its steps, checks and looks.

The policy's confidence (`canary.confidence`, e.g. 0.95) bounds the probability that a candidate
as good as the champion is rolled back by ANY test of the rollout: every step, every check, every
look at a growing window, every repeated window. The plan (`SpendingPlan`) splits
alpha = 1 - confidence so that the union bound (Bonferroni) closes over all of them, which holds
whatever the correlation between checks on one window and between looks at one step:

- **Steps**, front-loaded: step s of S gets weight (S - s) / (1 + 2 + … + S), e.g. 40/30/20/10 %
  for four steps. A bad candidate should be caught while it serves the fewest users; and a good one
  has passed earlier steps before it meets the smaller budgets of the later ones.
- **Checks**, equal shares of the step's budget among the checks that run at that step
  (`checks_at(step)`): at a step below 100 % the five of `CHECKS`; at 100 % the champion serves
  only requests already in flight, so only the absolute error-rate limit and accuracy (which pools
  delayed labels over the whole rollout) are tested. A regression plan (`task="regression"`) has
  the delayed labels' mean absolute error check `mae` in accuracy's place, with the same share.
- **Looks**, "decide at the planned sample, with at most a few interim looks": the final look
  (the step's window reached its planned size: `min_requests` per variant, `min_labels` for
  accuracy) gets `1 - interim_share` of the check's budget; each of the first `interim_looks` looks
  before that gets `interim_share / interim_looks` (Pocock-like: equal, because the controller
  polls at irregular information fractions and keeps no running spend); any further interim look
  gets 0 and can report only `not_yet`. With `interim_looks=0` (the default) the check waits for its
  planned sample and is tested once, at the end of each interval.

Repeated windows after a failure need no budget of their own: a good candidate is rolled back only
after at least one false failure, and the first false failure of a rollout happens on a step's
first window, which the split above already covers (P(rollback) <= P(any false failure) <= alpha).
A check decided at a step's final look keeps its outcome for that window: the controller must not
test it again on the same window (that would be another look).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from domain.task import Task

CheckName = Literal["error_rate", "error_rate_vs_champion", "latency", "prediction_drift", "accuracy", "mae"]
# A classifier's checks; a regression rollout tests the delayed labels' mean absolute error instead of accuracy.
CHECKS: tuple[CheckName, ...] = ("error_rate", "error_rate_vs_champion", "latency", "prediction_drift", "accuracy")
# Tested even at 100 %: the absolute error limit needs no champion, accuracy pools the rollout's labels.
ALWAYS_TESTED: tuple[CheckName, ...] = ("error_rate", "accuracy")
# The delayed-label check of each task (it takes accuracy's place in the plan).
LABEL_CHECK: dict[Task, CheckName] = {"classification": "accuracy", "regression": "mae"}


@dataclass(frozen=True, slots=True)
class SpendingPlan:
    """The whole rollout's alpha and how it is split; build it with `SpendingPlan.for_policy`."""

    alpha: float
    steps: tuple[float, ...]
    interim_looks: int = 0
    interim_share: float = 0.2
    task: Task = "classification"

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha = 1 - canary.confidence must lie in (0, 1) (got {self.alpha})")
        if not self.steps:
            raise ValueError("a rollout has at least one step")
        if self.interim_looks < 0:
            raise ValueError(f"interim_looks is a count of looks, >= 0 (got {self.interim_looks})")
        if not 0.0 <= self.interim_share < 1.0:
            raise ValueError(f"interim_share lies in [0, 1) (got {self.interim_share})")

    @classmethod
    def for_policy(
        cls,
        steps: list[float] | tuple[float, ...],
        confidence: float,
        interim_looks: int = 0,
        *,
        task: Task = "classification",
    ) -> SpendingPlan:
        """The plan for a policy's `canary.steps` and `canary.confidence`, for a pipeline's `task`."""
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"canary.confidence must lie in (0, 1) (got {confidence})")
        return cls(alpha=1.0 - confidence, steps=tuple(steps), interim_looks=interim_looks, task=task)

    def checks_at(self, step: int) -> tuple[CheckName, ...]:
        """The checks tested at a step (0-based): comparisons with the champion only below 100 %; the
        delayed-label check is the task's (`LABEL_CHECK`: accuracy, or regression's mae)."""
        self._step_percent(step)
        checks = CHECKS if self.steps[step] < 100.0 else ALWAYS_TESTED
        label = LABEL_CHECK[self.task]
        return tuple(label if check == "accuracy" else check for check in checks)

    def step_alpha(self, step: int) -> float:
        """The share of alpha that all of this step's tests together may spend."""
        self._step_percent(step)
        count = len(self.steps)
        return self.alpha * (count - step) / (count * (count + 1) / 2)

    def _step_percent(self, step: int) -> float:
        if not 0 <= step < len(self.steps):
            raise ValueError(f"step {step} does not exist: the rollout has steps 0..{len(self.steps) - 1}")
        return self.steps[step]


def alpha_for(plan: SpendingPlan, step: int, check: CheckName, look: int, *, final: bool) -> float:
    """The significance level of `check` at `step` (0-based) on this look.

    `final`: the window reached its planned size, and this look decides the check. Otherwise `look`
    (1-based) counts the interim looks at this step's window so far; past `plan.interim_looks` the
    level is 0 (the check can only wait). A check not tested at this step gets 0.
    """
    checks = plan.checks_at(step)
    if check not in checks:
        return 0.0
    per_check = plan.step_alpha(step) / len(checks)
    if plan.interim_looks == 0:
        return per_check if final else 0.0
    if final:
        return per_check * (1.0 - plan.interim_share)
    if look < 1:
        raise ValueError(f"looks are counted from 1 (got {look})")
    if look > plan.interim_looks:
        return 0.0
    return per_check * plan.interim_share / plan.interim_looks


def total_alpha(plan: SpendingPlan) -> float:
    """What the plan spends at most over a whole rollout (equals `plan.alpha` up to rounding)."""
    looks = [(look, False) for look in range(1, plan.interim_looks + 1)] + [(0, True)]
    return sum(
        alpha_for(plan, step, check, look, final=final)
        for step in range(len(plan.steps))
        for check in plan.checks_at(step)
        for look, final in looks
    )
