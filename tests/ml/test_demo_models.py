"""ml.demo_models: the demo's slow candidate is the zoo's MLP, checked as one, slow only at inference."""

from __future__ import annotations

import time

import pytest
import torch

from domain.errors import InvalidInputError
from ml.demo_models import LookupMLP
from ml.zoo import MLP, build_model, constructor_problems

ARCHITECTURE = "ml.demo_models:LookupMLP"


def test_lookup_mlp_computes_what_the_mlp_computes_and_waits_at_inference() -> None:
    torch.manual_seed(0)
    model = build_model(ARCHITECTURE, {"lookup_ms": 30.0, "hidden_sizes": [8], "dropout": 0.0}, [4], 3)
    assert isinstance(model, LookupMLP) and model.lookup_ms == 30.0
    twin = MLP([4], 3, hidden_sizes=[8], dropout=0.0)
    twin.load_state_dict(model.state_dict())  # same layers, so the same artifact layout as the MLP
    batch = torch.randn(2, 4)
    model.eval()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model(batch)
    assert time.perf_counter() - started >= 0.030
    with torch.inference_mode():
        assert torch.equal(out, twin.eval()(batch))


def test_lookup_mlp_parameters_are_checked_against_the_mlp() -> None:
    assert constructor_problems(ARCHITECTURE, {"lookup_ms": 50.0}) == []
    with pytest.raises(InvalidInputError) as info:
        build_model(ARCHITECTURE, {"lookup_ms": 50.0, "hidden": [8]}, [4], 3)
    assert info.value.code == "invalid_input"
    assert "model.params.hidden: unknown parameter for LookupMLP (did you mean hidden_sizes?)" in str(info.value)
