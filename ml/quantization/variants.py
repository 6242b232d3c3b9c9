"""The names every quantization module shares: the variants, their error, the artifact formats.

`Variant` is a spec's `quantization.type` minus `all`; `variants_for` turns a spec's type into the
variants to try. `FORMAT` marks the float model's artifact (a torch state dict), `ONNX_FORMAT` the
quantized variants' (an ONNX graph; ml/quantization/persistence.py).
"""

from __future__ import annotations

from typing import Literal, cast, get_args

from domain.errors import InvalidInputError

Variant = Literal["none", "dynamic", "static", "fp16"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
FORMAT = "retrainer.quantized/1"  # the float model's state dict; was also torch.ao's variants, before ONNX
ONNX_FORMAT = "retrainer.quantized/2"  # a quantized variant as an ONNX graph, in the graph's metadata


class QuantizationUnavailableError(InvalidInputError):
    """The variant cannot be applied to this architecture; the message says why."""

    code = "quantization_unavailable"


def variants_for(kind: str) -> tuple[Variant, ...]:
    """The variants a spec's `quantization.type` asks to try: always the float model, plus the one named
    (`all`, for benchmarks, tries every variant)."""
    if kind == "all":
        return VARIANTS
    if kind not in VARIANTS:
        raise InvalidInputError(f"quantization type {kind!r} is unknown; use one of {', '.join(VARIANTS)} or all")
    return ("none",) if kind == "none" else ("none", cast(Variant, kind))


def check_variant(variant: str) -> None:
    """InvalidInputError naming the variants there are, for a caller that passed a name outside them."""
    if variant not in VARIANTS:
        raise InvalidInputError(f"quantization variant {variant!r} is unknown; use one of {', '.join(VARIANTS)}")


def first_line(error: BaseException) -> str:
    """The first line of an error's text (torch's can run to pages), for a message that names the cause."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
