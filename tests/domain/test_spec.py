"""Pipeline spec validation (CONTRACT section 2): one line per problem, FILE: key.path: message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from torch import nn

from domain.errors import SpecError
from domain.spec import PipelineSpec, load_spec, parse_spec
from ml.zoo import constructor_problems

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "pipelines" / "digits-classifier.yaml"


class TinyNet(nn.Module):
    """A user's own model, referenced as tests.domain.test_spec:TinyNet."""

    def __init__(self, width: int, output_classes: int, depth: int = 1) -> None:
        super().__init__()
        self.layer = nn.Linear(width, output_classes)


def example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def problems_of(document: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(document, source="pipelines/digits.yaml", param_checker=constructor_problems)
    assert info.value.code == "invalid_spec"
    return info.value.problems


def test_the_contract_example_is_valid() -> None:
    spec = load_spec(EXAMPLE, constructor_problems)
    assert isinstance(spec, PipelineSpec) and spec.name == "digits-classifier" and spec.dataset == "digits"
    assert spec.hyperparameters.lr_schedule.type == "cosine_warm_restarts"
    assert spec.gates.vs_champion["latency_p99_ms"].max_ratio == 1.10
    assert spec.canary is not None and spec.canary.steps == [10, 25, 50, 100]
    assert spec.triggers.schedule is not None and spec.triggers.schedule.cron == "0 3 * * *"


def test_contract_error_line_for_a_negative_learning_rate() -> None:
    document = example()
    document["hyperparameters"]["learning_rate"] = -1
    assert problems_of(document) == ["pipelines/digits.yaml: hyperparameters.learning_rate: must be > 0 (got -1)"]


@pytest.mark.parametrize(
    ("section", "key", "suggestion"),
    [
        (None, "hyperparameter", "hyperparameters"),
        ("hyperparameters", "epoch", "epochs"),
        ("data", "validaton_fraction", "validation_fraction"),
        ("quantization", "max_acuracy_drop", "max_accuracy_drop"),
    ],
)
def test_unknown_keys_are_refused_with_a_suggestion(section: str | None, key: str, suggestion: str) -> None:
    document = example()
    (document if section is None else document[section])[key] = 1
    path = key if section is None else f"{section}.{key}"
    assert f"pipelines/digits.yaml: {path}: unknown key (did you mean {suggestion}?)" in problems_of(document)


def test_model_params_are_checked_against_the_constructor() -> None:
    document = example()
    document["model"]["params"] = {"hidden": [128], "dropout": 0.1}
    (line,) = problems_of(document)
    assert line.startswith("pipelines/digits.yaml: model.params.hidden: unknown parameter for MLP")
    assert "did you mean hidden_sizes?" in line


def test_user_model_by_import_path() -> None:
    document = example()
    document["model"] = {
        "architecture": "tests.domain.test_spec:TinyNet",
        "params": {"width": 64},
        "input_shape": [64],
        "output_classes": 10,
    }
    assert parse_spec(document, source="x", param_checker=constructor_problems).model.params == {"width": 64}
    document["model"]["params"] = {"dept": 2}
    lines = problems_of(document)
    assert any("model.params.dept: unknown parameter for TinyNet (did you mean depth?)" in ln for ln in lines)
    assert any("model.params.width: required parameter of TinyNet is missing" in ln for ln in lines)


def test_unknown_architecture_and_metric_get_suggestions() -> None:
    document = example()
    document["model"]["architecture"] = "mpl"
    document["gates"]["min"] = {"acuracy": 0.9}
    lines = problems_of(document)
    assert any("model.architecture: unknown architecture 'mpl' (did you mean mlp?)" in ln for ln in lines)
    assert any("gates.min.acuracy: unknown metric (did you mean accuracy?)" in ln for ln in lines)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["hardware"].update(device="cpu", precision="fp16"), "hardware: precision fp16 needs a CUDA"),
        (lambda d: d["hardware"].update(device="gpu"), "hardware.device: must be auto, cpu, cuda or cuda:N"),
        (lambda d: d["distributed"].update(strategy="ddp", num_workers=1), "distributed: ddp needs num_workers >= 2"),
        (lambda d: d["data"].update(validation_fraction=0.6, test_fraction=0.5), "data: validation_fraction + test"),
        (lambda d: d["data"].update(validation_fraction=0), "early_stopping: monitors val_loss but data.validation"),
        (lambda d: d["canary"].update(steps=[10, 50]), "canary.steps: steps must end at 100"),
        (lambda d: d["canary"].update(steps=[50, 10, 100]), "canary.steps: steps must rise"),
        (lambda d: d["triggers"]["events"].update(max_wait_seconds=10), "max_wait_seconds (10.0) must be >="),
        (lambda d: d["triggers"]["schedule"].update(cron="every day"), "triggers.schedule.cron: must be a 5-field"),
        (lambda d: d["triggers"]["schedule"].update(timezone="Europe/Berln"), "(did you mean Europe/Berlin?)"),
        (lambda d: d["triggers"]["schedule"].update(timezone="Mars/Olympus"), "unknown time zone 'Mars/Olympus'"),
        (lambda d: d["model"].update(output_classes=1), "model.output_classes: must be >= 2 (got 1)"),
        (lambda d: d.update(name="Digits Classifier"), "name: must be lowercase letters"),
        (lambda d: d["quantization"].update(type="int4"), "quantization.type: must be 'none', 'dynamic'"),
        (lambda d: d.pop("model"), "model: required key is missing"),
    ],
)
def test_cross_field_and_value_checks(change: Any, expected: str) -> None:
    document = example()
    change(document)
    assert any(expected in line for line in problems_of(document)), problems_of(document)


def test_all_problems_are_reported_at_once() -> None:
    document = example()
    document["hyperparameters"]["learning_rate"] = 0
    document["hyperparameters"]["batch_size"] = -5
    document["model"]["params"]["hidden"] = 3
    assert len(problems_of(document)) == 3


def test_json_specs_and_parse_errors(tmp_path: Path) -> None:
    as_json = tmp_path / "digits.json"
    as_json.write_text(json.dumps(example()))
    assert load_spec(as_json).name == "digits-classifier"
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(SpecError, match=r"broken.yaml: invalid YAML at line \d+"):
        load_spec(broken)
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text("name: a\nname: b\n")
    with pytest.raises(SpecError, match="duplicate key 'name'"):
        load_spec(duplicate)
    with pytest.raises(SpecError, match=r"missing\.yaml: file not found"):
        load_spec(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match=r"list\.yaml: a pipeline spec is a mapping"):
        load_spec(listing)


def test_validate_command_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    document = example()
    document["hyperparameters"]["learning_rate"] = -1
    bad.write_text(yaml.safe_dump(document))
    retrainer = str(Path(sys.executable).parent / "retrainer")
    ok = subprocess.run([retrainer, "pipelines", "validate", str(EXAMPLE)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    failed = subprocess.run(
        [retrainer, "pipelines", "validate", str(EXAMPLE), str(bad)], capture_output=True, text=True, timeout=60
    )
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [f"{bad}: hyperparameters.learning_rate: must be > 0 (got -1)"]


# ---------------------------------------------------------------------------------------- cron


BAD_CRON = {
    "61 * * * *": "minute field '61' is not valid",
    "* 24 * * *": "hour field '24' is not valid",
    "* * 32 * *": "day-of-month field '32' is not valid",
    "* * * 13 *": "month field '13' is not valid",
    "* * * * 8": "day-of-week field '8' is not valid",
    "*/0 * * * *": "minute field '*/0' is not valid",
    "* * * * 1#6": "day-of-week field '1#6' is not valid",
    "0 0 * * 5L": "day-of-week field '5L' is not valid",
    "garbage": "must be a 5-field cron expression",
    "": "must be a 5-field cron expression",
    "0 3 * * * *": "(got '0 3 * * * *': 6 fields)",
    "0 3 * * * * 2030": "7 fields",
    "@reboot": "must be a 5-field cron expression",
    "R * * * *": "minute field 'R' uses R and H (random/hashed values)",
    "0 0 15W * *": "day-of-month field '15W' uses W (nearest weekday)",
    "0 0 31 2 *": "is not a usable schedule",
}
GOOD_CRON = [
    "0 3 * * *",
    "*/15 * * * *",
    "0 3 * * 1-5",
    "0 9 * * MON",
    "0 9 * * mon-fri",
    "0 0 1 JAN,JUL *",
    "0 0 * MAR THU",
    "0 0 L * *",
    "0 0 * * 1#2",
    "0 0 ? * 7",
    "0-59/5 8-18 * * *",
    "@daily",
    "@hourly",
    "@WEEKLY",
    "@monthly",
    "@yearly",
]


def with_cron(cron: str) -> dict[str, Any]:
    document = example()
    document["triggers"]["schedule"]["cron"] = cron
    return document


@pytest.mark.parametrize("cron", sorted(BAD_CRON))
def test_bad_cron_expressions_are_refused_naming_the_key_path_and_field(cron: str) -> None:
    (line,) = problems_of(with_cron(cron))
    assert line.startswith("pipelines/digits.yaml: triggers.schedule.cron: "), line
    assert BAD_CRON[cron] in line, line


@pytest.mark.parametrize("cron", GOOD_CRON)
def test_good_cron_expressions_are_accepted_and_prefect_accepts_them_too(cron: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    spec = parse_spec(with_cron(cron), source="pipelines/digits.yaml")
    assert spec.triggers.schedule is not None and spec.triggers.schedule.cron == cron
    CronSchedule(cron=cron, timezone="UTC")  # raises if Prefect's scheduler would refuse it


def test_nothing_prefect_refuses_is_accepted() -> None:
    """A seeded sample of field combinations: every expression the spec accepts, Prefect accepts."""
    import random

    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError as PydanticError

    from domain.trigger_spec import cron_problem

    tokens = "* 0 7 59 60 24 31 32 12 13 8 L 15W ? 1#2 5#6 MON jan-mar MON-FRI */5 5-1 1-5/2 */0 1,2,3 5L R H 0/5 -1"
    rng = random.Random(11)  # noqa: S311 - a reproducible sample, not a secret
    accepted = 0
    for _ in range(1500):
        cron = " ".join(rng.choice(tokens.split()) if rng.random() < 0.4 else "*" for _ in range(5))
        if cron_problem(cron) is None:
            accepted += 1
            try:
                CronSchedule(cron=cron)
            except PydanticError as e:
                pytest.fail(f"the spec accepts {cron!r} but Prefect refuses it: {e}")
    assert accepted > 100  # the sample exercises the accepting side too


def test_a_zone_file_prefect_does_not_list_is_refused() -> None:
    document = example()
    document["triggers"]["schedule"]["timezone"] = "posixrules"  # loads with zoneinfo, refused by Prefect
    (line,) = problems_of(document)
    assert line.startswith("pipelines/digits.yaml: triggers.schedule.timezone: unknown time zone 'posixrules'")


def test_validate_command_refuses_an_out_of_range_cron(tmp_path: Path) -> None:
    bad = tmp_path / "bad-cron.yaml"
    bad.write_text(yaml.safe_dump(with_cron("61 * * * *")))
    retrainer = str(Path(sys.executable).parent / "retrainer")
    failed = subprocess.run([retrainer, "pipelines", "validate", str(bad)], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 2, failed.stderr
    (line,) = failed.stderr.strip().splitlines()
    assert line.startswith(f"{bad}: triggers.schedule.cron: minute field '61' is not valid"), line
