"""Fuzzing the spec loader (issue 16): any file, YAML or JSON, read by `read_document` and checked
by `parse_spec`, gives a PipelineSpec or a SpecError whose every line names the file and a
problem; never another exception and never a hang. The documents are the shipped example specs
with parts replaced or removed, and text made of YAML's awkward constructs. Seeded (derandomize)
and bounded, so CI sees the same inputs every run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.errors import SpecError
from domain.spec import PipelineSpec, parse_spec, read_document

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
EXAMPLES = sorted([*PIPELINES.glob("*.yaml"), *PIPELINES.glob("examples/*.yaml")])
FUZZ = settings(
    max_examples=200, deadline=5000, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.sampled_from(["auto", "mlp"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
# What YAML allows and JSON does not, where a loader written for mappings of strings trips.
YAML_FRAGMENTS = [
    "? [a, b]\n: 1\n",
    "? {a: 1}\n: 2\n",
    "a: &x [*x]\n",
    "&x {a: *x}\n",
    "name: a\nname: b\n",
    "1: 2\nnull: 3\ntrue: 4\n",
    "2026-01-01: date key\n",
    "name: 2026-01-01\n",
    "model: !!binary aGVsbG8=\n",
    "model: !!python/object:os.system {}\n",
    "!!set {a, b}\n",
    "- a\n- b\n",
    "a: b: c\n",
    "\ta: 1\n",
    "{\n",
    "'unterminated\n",
    "---\na: 1\n---\nb: 2\n",
    "x: .nan\ny: .inf\nz: 0x1F\n",
    "gates: {min: {accuracy: .nan}}\n",
    "model: {architecture: mlp, params: [1, 2]}\n",
    "\ufeffname: bom\n",
    "\x00\n",
]


def _paths(document: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into `document`'s nested mappings and lists."""
    found: list[tuple[Any, ...]] = []
    children = (
        document.items() if isinstance(document, dict) else enumerate(document) if isinstance(document, list) else ()
    )
    for key, child in children:
        found.append((*prefix, key))
        found += _paths(child, (*prefix, key))
    return found


@st.composite
def mutated_specs(draw: st.DrawFn) -> Any:
    """A shipped example spec with up to three values replaced by any JSON value, or removed."""
    document = json.loads(json.dumps(read_document(draw(st.sampled_from(EXAMPLES))), default=str))
    for _ in range(draw(st.integers(0, 3))):
        paths = _paths(document)
        if not paths:
            break
        *parents, last = draw(st.sampled_from(paths))
        holder = document
        for part in parents:
            holder = holder[part]
        if draw(st.booleans()) and isinstance(holder, dict):
            del holder[last]
        else:
            holder[last] = draw(json_values)
    return document


yaml_texts = st.lists(st.sampled_from(YAML_FRAGMENTS) | st.text(max_size=30), max_size=4).map("".join)


def load_text(text: str, suffix: str = ".yaml") -> PipelineSpec:
    """`text` as a spec file named fuzzed`suffix`, read and checked as `retrainer` does."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzzed{suffix}"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        return parse_spec(read_document(path), source=str(path))


def check_spec_file(text: str, suffix: str) -> None:
    try:
        spec = load_text(text, suffix)
    except SpecError as refused:
        assert refused.code == "invalid_spec" and refused.problems
        for line in refused.problems:
            source, _, problem = line.partition(": ")
            assert source.endswith(f"fuzzed{suffix}") and problem.strip(), line
        return
    assert isinstance(spec, PipelineSpec) and spec.name


def test_the_examples_are_found_and_valid() -> None:
    """Guards the fuzz below: its documents start from valid specs."""
    assert len(EXAMPLES) >= 3
    for example in EXAMPLES:
        assert isinstance(parse_spec(read_document(example), source=str(example)), PipelineSpec)


@FUZZ
@given(document=mutated_specs(), as_json=st.booleans())
def test_any_mutated_spec_is_a_spec_or_spec_error_lines(document: Any, as_json: bool) -> None:
    text = json.dumps(document) if as_json else yaml.safe_dump(document, sort_keys=False)
    check_spec_file(text, ".json" if as_json else ".yaml")


@FUZZ
@given(text=yaml_texts)
def test_any_yaml_text_is_a_spec_or_spec_error_lines(text: str) -> None:
    check_spec_file(text, ".yaml")


@FUZZ
@given(text=st.text(max_size=80) | json_values.map(json.dumps))
def test_any_json_text_is_a_spec_or_spec_error_lines(text: str) -> None:
    check_spec_file(text, ".json")


@pytest.mark.parametrize("fragment", YAML_FRAGMENTS)
def test_each_awkward_yaml_construct_is_a_spec_error(fragment: str) -> None:
    """`? [a, b]` (a list as a key) raised TypeError in the duplicate-key check before this fuzz."""
    with pytest.raises(SpecError) as refused:
        load_text(fragment)
    assert refused.value.code == "invalid_spec"
