"""The demo digits model as an MLServer custom runtime: the MLServer peer of bench/serving_oip.py.
(In bench/support/: `make bench` runs bench/*.py, and this module only imports where MLServer is.)

It runs inside MLServer's scratch virtualenv (made by bench/serving_oip.py), never in the project's
venv, which has no mlserver. It loads the weights file the bench wrote (`parameters.uri` in the model
settings: the state dict of `bench.serving.module_for(DEMO_PARAMS, seed=1)`, the architecture and
the standardizer's statistics), rebuilds the module with the project's own `ml.zoo.build_model`, and
answers exactly what our server answers: `probabilities` FP32 [N, classes] (softmax of the logits of
the standardized rows) and `predicted_class` INT64 [N], computed with torch on one intra-op thread
like ours. MLServer's adaptive batching (max_batch_size / max_batch_time in the model settings)
merges requests along the first dimension before `predict` and splits the outputs after it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from mlserver import MLModel  # type: ignore[import-not-found,unused-ignore]
from mlserver.codecs import NumpyCodec  # type: ignore[import-not-found,unused-ignore]
from mlserver.types import InferenceRequest, InferenceResponse  # type: ignore[import-not-found,unused-ignore]


class DigitsRuntime(MLModel):  # type: ignore[misc,unused-ignore]
    """One torch module, standardizer and softmax, as `serving.registry.LoadedModel.predict` computes them."""

    async def load(self) -> bool:
        from ml.zoo import build_model

        torch.set_num_threads(1)  # as our server ships (RETRAINER_SERVING_TORCH_THREADS=1)
        saved: dict[str, Any] = torch.load(self.settings.parameters.uri, weights_only=True)
        self.module = build_model(saved["architecture"], saved["params"], [saved["features"]], saved["classes"]).eval()
        self.module.load_state_dict(saved["state_dict"])
        self.mean = torch.as_tensor(saved["mean"], dtype=torch.float32)
        self.std = torch.as_tensor(saved["std"], dtype=torch.float32)
        self.features = int(saved["features"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = np.asarray(NumpyCodec.decode_input(payload.inputs[0]), dtype=np.float32)
        x = torch.from_numpy(rows.reshape(rows.shape[0], self.features))
        with torch.inference_mode():
            probabilities = torch.softmax(self.module((x - self.mean) / self.std), dim=-1)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[
                NumpyCodec.encode_output("probabilities", probabilities.numpy()),
                NumpyCodec.encode_output("predicted_class", probabilities.argmax(dim=1).numpy().astype(np.int64)),
            ],
        )
