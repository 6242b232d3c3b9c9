"""ml.models:PretrainedTextClassifier: the real all-MiniLM-L6-v2 encoder (offline, from the package's
folder) with a head; frozen but its last layers; padding does not change its answer; it builds from a
spec through the zoo, model.freeze and param_groups work on it, and bad parameters name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from domain.errors import InvalidInputError, SpecError
from domain.spec import PipelineSpec
from ml.param_groups import count_parameters, freeze_parameters, parameter_groups
from ml.text import TextTokenizer
from ml.zoo import build_for_spec, constructor_problems

pytest.importorskip("transformers", reason="the text extra is not installed: pip install 'retrainer[text]'")
from ml.models import PretrainedTextClassifier


@pytest.fixture(scope="module")
def model() -> PretrainedTextClassifier:
    torch.manual_seed(0)
    return PretrainedTextClassifier([16], 3, train_last_layers=2).eval()


def test_only_the_last_layers_and_the_head_train(model: PretrainedTextClassifier) -> None:
    assert model.head.weight.requires_grad
    layers = {name.split(".")[3] for name, p in model.named_parameters() if p.requires_grad and ".layer." in name}
    assert layers == {"4", "5"}  # MiniLM-L6: layers 0..5, the last two train
    assert not any(p.requires_grad for p in model.encoder.embeddings.parameters())
    counts = count_parameters(model)
    assert 0 < counts.trainable < counts.frozen


def test_token_ids_as_floats_give_logits_and_padding_changes_nothing(model: PretrainedTextClassifier) -> None:
    short = TextTokenizer.for_data(None, [16]).encode(["Heavy rain over the coast."])
    longer = TextTokenizer.for_data(None, [32]).encode(["Heavy rain over the coast."])
    with torch.inference_mode():
        a = model(torch.from_numpy(short).float())
        b = PretrainedTextClassifier.forward(model, torch.from_numpy(longer).float())
    assert a.shape == (1, 3)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # the mask comes from the pad id


def test_built_from_a_spec_with_freeze_and_param_groups() -> None:
    spec = PipelineSpec.model_validate(
        {
            "name": "t",
            "dataset": "d",
            "data": {"text_column": "text"},
            "model": {"architecture": "ml.models:PretrainedTextClassifier", "params": {"train_last_layers": 1},
                      "input_shape": [8], "output_classes": 2},
        }
    )  # fmt: skip
    assert constructor_problems(spec.model.architecture, dict(spec.model.params)) == []
    built = build_for_spec(spec)
    freeze_parameters(built, ["encoder.encoder.layer.5.attention"])
    grouped = {id(p) for group in parameter_groups(built, 0.01, []) for p in group["params"]}
    named = dict(built.named_parameters())
    assert id(named["head.weight"]) in grouped and id(named["encoder.encoder.layer.5.output.dense.weight"]) in grouped
    assert id(named["encoder.encoder.layer.5.attention.self.query.weight"]) not in grouped
    assert id(named["encoder.encoder.layer.4.output.dense.weight"]) not in grouped  # train_last_layers: 1
    with pytest.raises(SpecError):
        freeze_parameters(built, ["encoder.no_such_part"])


def test_bad_parameters_name_the_key_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError) as refused:
        PretrainedTextClassifier([16], 3, train_last_layers=7)
    assert "model.params.train_last_layers" in refused.value.message and "0..6" in refused.value.message
    with pytest.raises(InvalidInputError) as refused:
        PretrainedTextClassifier([16], 3, encoder_dir=str(tmp_path))
    assert "model.params.encoder_dir" in refused.value.message
    with pytest.raises(InvalidInputError) as refused:
        PretrainedTextClassifier([4, 4], 3)
    assert refused.value.code == "invalid_input" and "model.input_shape" in refused.value.message
