"""The model zoo: built-in architectures and user models by import path.

`build_model(architecture, params, input_shape, output_classes)` is the one entry point:

- `mlp`: tabular features, input_shape `[F]`;
- `cnn`: a small residual CNN over images, input_shape `[C, H, W]`;
- `transformer`: an encoder classifier over token-id sequences, input_shape `[T]`
  (inputs are integer token ids stored as floats, as every tensor in our data path is float);
- `"package.module:ClassName"`: any `nn.Module`; `params` become keyword arguments, and the
  constructor may also accept `input_shape` and/or `output_classes` (or `outputs`), passed when named.

A regression model is built the same way with its output width (`model.outputs`) in the place of
the classes: the built-ins end in a linear layer of that width (`build_for_spec`).

`constructor_problems` lets spec validation name unknown or missing parameters without building.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from domain.errors import InvalidInputError
from domain.spec import PipelineSpec

BUILTIN = ("mlp", "cnn", "transformer")
# Arguments the zoo supplies itself; a spec's params must not repeat them.
_SUPPLIED = ("input_shape", "output_classes")


class MLP(nn.Module):
    """Feed-forward classifier for tabular features: Linear → LayerNorm → GELU → Dropout blocks."""

    def __init__(
        self,
        input_shape: Sequence[int],
        output_classes: int,
        hidden_sizes: Sequence[int] = (128, 64),
        dropout: float = 0.1,
        layer_norm: bool = True,
    ) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise InvalidInputError(f"mlp needs input_shape [features] (got {list(input_shape)})")
        layers: list[nn.Module] = []
        width = int(input_shape[0])
        for hidden in hidden_sizes:
            layers.append(nn.Linear(width, hidden))
            if layer_norm:
                layers.append(nn.LayerNorm(hidden))
            layers += [nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, output_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))  # type: ignore[no-any-return]


class _ResidualBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False), nn.BatchNorm2d(channels_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResidualCNN(nn.Module):
    """A small ResNet-style classifier: a stem, residual stages (stride 2 after the first), pooling."""

    def __init__(
        self,
        input_shape: Sequence[int],
        output_classes: int,
        channels: Sequence[int] = (16, 32),
        blocks_per_stage: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise InvalidInputError(f"cnn needs input_shape [channels, height, width] (got {list(input_shape)})")
        in_channels = int(input_shape[0])
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU()
        )
        stages: list[nn.Module] = []
        width = channels[0]
        for index, out in enumerate(channels):
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(_ResidualBlock(width, out, stride))
                width = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(width, output_classes)
        )
        self.input_shape = tuple(int(d) for d in input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], *self.input_shape)
        return self.head(self.stages(self.stem(x)))  # type: ignore[no-any-return]


class TransformerClassifier(nn.Module):
    """Encoder-only transformer over token ids: embedding + learned positions, pre-norm layers,
    mean pooling, linear head. Token ids arrive as floats (our tensors are float) and are rounded."""

    def __init__(
        self,
        input_shape: Sequence[int],
        output_classes: int,
        vocab_size: int = 256,
        d_model: int = 64,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise InvalidInputError(f"transformer needs input_shape [sequence_length] (got {list(input_shape)})")
        if d_model % nhead:
            raise InvalidInputError(f"transformer: d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Parameter(torch.zeros(1, int(input_shape[0]), d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout, batch_first=True, norm_first=True, activation="gelu"
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, output_classes)
        nn.init.normal_(self.position, std=0.02)
        self.gradient_checkpointing = False

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer's activations in backward instead of keeping them (the hook
        `hardware.gradient_checkpointing` calls, named as on Hugging Face models)."""
        self.gradient_checkpointing = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.round().long().clamp_(0, self.vocab_size - 1)
        hidden = self.embed(tokens) + self.position[:, : tokens.shape[1]]
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            for layer in self.encoder.layers:  # what the encoder does without mask or final norm
                hidden = checkpoint(layer, hidden, use_reentrant=False)
        else:
            hidden = self.encoder(hidden)
        return self.head(self.norm(hidden).mean(dim=1))  # type: ignore[no-any-return]


_BUILTIN_CLASSES: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "cnn": ResidualCNN,
    "transformer": TransformerClassifier,
}


def resolve_architecture(architecture: str) -> type[nn.Module]:
    """The class for a built-in name or a `package.module:ClassName` import path."""
    if architecture in _BUILTIN_CLASSES:
        return _BUILTIN_CLASSES[architecture]
    module_name, sep, class_name = architecture.partition(":")
    if not sep or not module_name or not class_name:
        close = difflib.get_close_matches(architecture, BUILTIN, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        choices = ", ".join(BUILTIN)
        raise InvalidInputError(
            f"unknown architecture {architecture!r}{hint}; use one of {choices} or 'package.module:ClassName'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InvalidInputError(f"architecture {architecture!r}: cannot import module {module_name!r} ({e})") from e
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise InvalidInputError(
            f"architecture {architecture!r}: {class_name!r} is not an nn.Module class in {module_name}"
        )
    return cls


def constructor_problems(architecture: str, params: dict[str, Any]) -> list[tuple[str, str]]:
    """Problems with `params` for the architecture's constructor, as (key, message) pairs:
    unknown parameters (with a suggestion), missing required ones, parameters the zoo supplies."""
    try:
        cls = resolve_architecture(architecture)
    except InvalidInputError as e:
        return [("architecture", str(e))]
    accepted, takes_any = _constructor_parameters(cls)
    problems: list[tuple[str, str]] = []
    for key in params:
        if key in _SUPPLIED:
            problems.append((key, f"set by the spec's model.{key}, not in model.params"))
        elif key not in accepted and not takes_any:
            candidates = [name for name in accepted if name not in _SUPPLIED]
            close = difflib.get_close_matches(key, candidates, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append((key, f"unknown parameter for {cls.__name__}{hint}; accepted: {', '.join(candidates)}"))
    # Required: only the class's own; a base's may be supplied by the subclass itself.
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        required = parameter.default is inspect.Parameter.empty and parameter.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        )
        if name != "self" and required and name not in _SUPPLIED and name not in params:
            problems.append((name, f"required parameter of {cls.__name__} is missing"))
    return problems


def _constructor_parameters(cls: type[nn.Module]) -> tuple[list[str], bool]:
    """The keyword parameters `cls(...)` accepts, and whether it takes any keyword at all.

    A constructor with `**kwargs` is followed into the next base class that defines `__init__`, so a
    subclass that adds a parameter to a zoo model and forwards the rest (ml/demo_models.py) is still
    checked name by name. One that reaches nn.Module's own `__init__` may consume its keywords itself:
    any name is accepted there, as Python would.
    """
    accepted: list[str] = []
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        if klass in (nn.Module, object):
            return accepted, True
        parameters = inspect.signature(init).parameters.values()
        accepted += [
            p.name
            for p in parameters
            if p.name != "self"
            and p.name not in accepted
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        ]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return accepted, False
    return accepted, True


def build_model(
    architecture: str, params: dict[str, Any], input_shape: Sequence[int], output_classes: int
) -> nn.Module:
    """Instantiates the architecture; InvalidInputError if the parameters do not fit it."""
    problems = constructor_problems(architecture, params)
    if problems:
        raise InvalidInputError("; ".join(f"model.params.{key}: {message}" for key, message in problems))
    cls = resolve_architecture(architecture)
    accepted, _ = _constructor_parameters(cls)
    kwargs = dict(params)
    if "input_shape" in accepted:
        kwargs["input_shape"] = list(input_shape)
    if "output_classes" in accepted:
        kwargs["output_classes"] = output_classes
    if "outputs" in accepted:  # a user regression model may name its width so
        kwargs["outputs"] = output_classes
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"model.params: {cls.__name__} refused its parameters ({e})") from e


def build_for_spec(spec: PipelineSpec) -> nn.Module:
    """The spec's model with its task's output width (classes, or a regression model's outputs)."""
    model = spec.model
    return build_model(model.architecture, dict(model.params), model.input_shape, spec.output_width)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
