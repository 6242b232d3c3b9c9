"""`retrainer pipelines validate` refuses a canary policy whose thresholds sit inside sampling noise,
naming the key path and the smallest `min_requests` that would make it sound (issue 12)."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from retrainer import demo as story

RETRAINER = str(Path(sys.executable).parent / "retrainer")
# The policy: 30 requests per window, 20 % first step, a p99 ratio of 1.5 and the default
# PSI limit (0.2), on the demo's 10-class digits model.
NOISY_CANARY: dict[str, Any] = {
    "steps": [20, 50, 100],
    "min_requests": 30,
    "max_latency_p99_ratio": 1.5,
    "failure_limit": 1,
}


def spec_with(canary: dict[str, Any], path: Path) -> Path:
    document = copy.deepcopy(story.DEMO_SPEC)
    document["canary"] = canary
    assert document["model"]["output_classes"] == 10
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def validate(*paths: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RETRAINER, "pipelines", "validate", *map(str, paths)], capture_output=True, text=True, timeout=120, env=env
    )


def smallest_sound(lines: list[str]) -> int:
    """The largest "use at least N" of the validator's lines: the min_requests that makes all sound."""
    sizes = [int(m.group(1)) for line in lines if (m := re.search(r"use at least (\d+)$", line))]
    assert len(sizes) == len(lines), lines
    return max(sizes)


def test_a_policy_inside_sampling_noise_is_refused_with_the_sample_size_that_would_do(tmp_path: Path) -> None:
    noisy = spec_with(NOISY_CANARY, tmp_path / "noisy.yaml")
    refused = validate(noisy)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr + refused.stdout
    lines = refused.stderr.strip().splitlines()
    # one line per unsound threshold, each naming the key path, the value and the fix
    for line in lines:
        assert line.startswith(f"{noisy}: canary.min_requests: 30 is too few for canary."), line
    named = set(re.findall(r"too few for (canary\.\w+)", refused.stderr))
    assert named == {"canary.max_error_rate", "canary.max_latency_p99_ratio", "canary.max_prediction_psi"}, lines
    drift = next(line for line in lines if "canary.max_prediction_psi 0.2 at the 50 % step" in line)
    assert "identical models exceed it" in drift, drift
    needed = smallest_sound(lines)
    assert needed == smallest_sound([drift]) and needed > 100  # the PSI limit needs the most requests

    just_short = validate(spec_with({**NOISY_CANARY, "min_requests": needed - 1}, tmp_path / "short.yaml"))
    assert just_short.returncode == 2
    (line,) = just_short.stderr.strip().splitlines()
    assert f"canary.min_requests: {needed - 1} is too few for canary.max_prediction_psi" in line
    assert line.endswith(f"use at least {needed}"), line

    sound = spec_with({**NOISY_CANARY, "min_requests": needed}, tmp_path / "sound.yaml")
    accepted = validate(sound)
    assert accepted.returncode == 0, accepted.stderr
    # rich wraps long paths at the terminal's width: compare the words
    assert accepted.stdout.split() == f"{sound}: ok (pipeline {story.PIPELINE}, dataset digits)".split()


def test_every_act_of_the_demo_has_a_sound_canary_policy(tmp_path: Path) -> None:
    """`retrainer serve` loads the demo's specs through the same validation."""
    paths = [story.write_spec(tmp_path / act.key, story.spec_for(act)) for act in story.ACTS]
    accepted = validate(*paths)
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.count(": ok (pipeline") == len(story.ACTS), accepted.stdout


def test_a_loss_path_that_does_not_resolve_is_refused_before_anything_runs(tmp_path: Path) -> None:
    document = copy.deepcopy(story.DEMO_SPEC)
    document["hyperparameters"]["loss_function"] = "tests.ml.user_losses:focall"
    path = tmp_path / "loss.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    importable = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # the tests package
    refused = validate(path, env=importable)
    assert refused.returncode == 2
    assert (
        refused.stderr.split()
        == (
            f"{path}: hyperparameters.loss_function: 'tests.ml.user_losses:focall': "
            "tests.ml.user_losses has no attribute 'focall'"
        ).split()
    )
    document["hyperparameters"]["loss_function"] = "tests.ml.user_losses:focal"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    assert validate(path, env=importable).returncode == 0
