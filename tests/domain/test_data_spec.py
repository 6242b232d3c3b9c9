"""The spec's `data.target`: one column name, or (for a regression with several outputs) a list of them."""

from __future__ import annotations

from typing import Any

import pytest

from domain.data_spec import DataSpec
from domain.errors import SpecError
from domain.spec import parse_spec


def spec_with(data: dict[str, Any]) -> dict[str, Any]:
    """A regression spec (a list target is a regression's) with one model output per target column."""
    target = data.get("target", "label")
    outputs = len(target) if isinstance(target, list) and target else 1
    return {
        "name": "p",
        "dataset": "d",
        "task": "regression",
        "data": data,
        "model": {"architecture": "mlp", "input_shape": [3], "outputs": outputs},
    }


def test_target_is_a_name_or_a_list_and_target_columns_is_always_a_list() -> None:
    assert DataSpec().target == "label" and DataSpec().target_columns == ["label"]
    assert DataSpec(target="price").target_columns == ["price"]
    listed = DataSpec(target=["price", "units"], columns=["a", "b"])
    assert listed.target == ["price", "units"] and listed.target_columns == ["price", "units"]
    listed.target_columns.append("x")  # a copy: the frozen spec is unchanged
    assert listed.target_columns == ["price", "units"]


def test_a_string_and_a_list_target_round_trip_through_the_stored_document() -> None:
    for target in ("price", ["price", "units"]):
        data = parse_spec(spec_with({"target": target}), source="s").data
        document = data.model_dump(mode="json")
        assert document["target"] == target
        assert DataSpec.model_validate(document).target == target


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ([], "data.target: lists no column"),
        (["a", "b", "a"], "data.target: lists 'a' more than once"),
        (["a", ""], "data.target: entry 1 ('') must be a column name"),
        (["a", 3], "data.target: entry 1 (3) must be a column name"),
        ("", "data.target: must name a column"),
        (3, "data.target: must be a column name or, for a regression with several outputs, a list"),
        ({"a": 1}, "data.target: must be a column name"),
    ],
)
def test_a_bad_target_is_refused_with_one_line(target: Any, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with({"target": target}), source="spec.yaml")
    assert info.value.code == "invalid_spec"
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(f"spec.yaml: {fragment}"), (
        info.value.problems
    )


def test_columns_may_not_list_any_target() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with({"target": ["y1", "y2"], "columns": ["a", "y2"]}), source="spec.yaml")
    assert info.value.code == "invalid_spec"
    assert any("data.columns lists 'y2', the target (data.target)" in line for line in info.value.problems)
    assert parse_spec(spec_with({"target": ["y1", "y2"], "columns": ["b", "a"]}), source="s").data.columns == ["b", "a"]
