"""Starting weights (`model.init`): verified reads, strict and non-strict loading, shape refusals,
and the spec's refusal of an unverified URI."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from domain.errors import ArtifactIntegrityError, InvalidInputError, SpecError
from domain.spec import parse_spec
from ml.init_weights import InitReport, apply_init, float_state_dict, read_safetensors
from ml.quantization import quantize
from ml.zoo import build_model
from tests.flows.conftest import BASE_SPEC


def mlp(hidden: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", {"hidden_sizes": [hidden], "dropout": 0.0}, [8], 3)


def saved(tmp_path: Path, state: dict[str, torch.Tensor]) -> tuple[Path, str]:
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_verified_file_loads_every_key_into_the_model(tmp_path: Path) -> None:
    source = mlp()
    path, digest = saved(tmp_path, source.state_dict())
    state = read_safetensors(path, digest, source="file://weights.safetensors")
    target = build_model("mlp", {"hidden_sizes": [16], "dropout": 0.0}, [8], 3)
    report = apply_init(target, state, strict=True, report=InitReport("file://weights.safetensors", sha256=digest))
    assert report.loaded_keys == len(source.state_dict()) and not report.missing_keys and not report.unexpected_keys
    for key, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], tensor)


def test_a_digest_mismatch_is_refused_naming_the_key(tmp_path: Path) -> None:
    path, _ = saved(tmp_path, mlp().state_dict())
    with pytest.raises(ArtifactIntegrityError) as info:
        read_safetensors(path, "0" * 64, source="file://weights.safetensors")
    assert info.value.code == "artifact_integrity" and "model.init.sha256" in str(info.value)


def test_strict_refuses_missing_keys_naming_them_and_non_strict_lists_them() -> None:
    state = mlp().state_dict()
    last = sorted(state)[-1]
    partial = {k: v for k, v in state.items() if k != last}
    partial["extra.weight"] = torch.zeros(2)
    with pytest.raises(InvalidInputError) as info:
        apply_init(mlp(), partial, strict=True, report=InitReport("file://w.safetensors"))
    assert info.value.code == "invalid_input"
    message = str(info.value)
    assert "model.init.strict" in message and last in message and "extra.weight" in message

    target = mlp()
    before = target.state_dict()[last].clone()
    report = apply_init(target, partial, strict=False, report=InitReport("file://w.safetensors"))
    assert report.missing_keys == [last] and report.unexpected_keys == ["extra.weight"]
    assert report.loaded_keys == len(state) - 1
    assert torch.equal(target.state_dict()[last], before)  # the missing key keeps its own init


def test_a_shape_mismatch_is_refused_naming_the_key_and_both_shapes() -> None:
    wide = mlp(hidden=32).state_dict()
    target = mlp(hidden=16)
    untouched = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(InvalidInputError) as info:
        apply_init(target, wide, strict=False, report=InitReport("file://w.safetensors"))
    key = next(k for k in wide if wide[k].shape != untouched[k].shape)
    message = str(info.value)
    assert key in message and str(list(wide[key].shape)) in message and str(list(untouched[key].shape)) in message
    assert all(torch.equal(target.state_dict()[k], v) for k, v in untouched.items())  # nothing half-loaded


def test_a_dynamic_int8_package_gives_its_float_weights_under_the_float_keys() -> None:
    float_model = mlp().eval()
    int8 = quantize(copy.deepcopy(float_model), "dynamic")
    state = float_state_dict(int8, "dynamic", source="champion v1")
    assert set(state) == set(float_model.state_dict())
    for key, tensor in float_model.state_dict().items():
        assert state[key].dtype == torch.float32
        assert torch.allclose(state[key], tensor, atol=0.05)
    with pytest.raises(InvalidInputError, match="static int8"):
        float_state_dict(int8, "static", source="champion v1")


@pytest.mark.parametrize(
    ("init", "expected"),
    [
        ({"from": "file:///models/encoder.safetensors"}, "sha256 is required"),
        ({"from": "s3://models/encoder.safetensors", "sha256": "abc"}, "64 lowercase hex"),
        ({"from": "https://example.org/encoder.safetensors", "sha256": "0" * 64}, "file:// or s3://"),
        ({"from": "champion", "sha256": "0" * 64}, "remove model.init.sha256"),
    ],
)
def test_the_spec_refuses_an_init_that_cannot_be_verified(init: dict[str, object], expected: str) -> None:
    document = copy.deepcopy(BASE_SPEC)
    document["model"]["init"] = init
    with pytest.raises(SpecError) as info:
        parse_spec(document, source="pipelines/x.yaml")
    assert info.value.code == "invalid_spec"
    assert info.value.problems[0].startswith("pipelines/x.yaml: model.init: ") and expected in str(info.value)


def test_the_spec_keeps_from_as_written_when_stored_and_read_back() -> None:
    document = copy.deepcopy(BASE_SPEC)
    document["model"]["init"] = {"from": "champion", "strict": False}
    spec = parse_spec(document, source="x.yaml")
    stored = spec.to_document()
    assert stored["model"]["init"] == {"from": "champion", "sha256": None, "strict": False}
    assert parse_spec(stored, source="x.yaml").model.init == spec.model.init
