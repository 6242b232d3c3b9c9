"""The names every quantization module shares: the variants, their error, and torch.ao's warnings.

`Variant` is a spec's `quantization.type` minus `all`; `variants_for` turns a spec's type into the
variants to try. `torch_ao_quiet` silences torch.ao's deprecation chatter around our own calls only.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, cast, get_args

from domain.errors import InvalidInputError

Variant = Literal["none", "dynamic", "static", "fp16"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)


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


@contextmanager
def torch_ao_quiet() -> Iterator[None]:
    # torch.ao.quantization warns on every call that it is deprecated in favour of torchao. We use it
    # on purpose (ml/quantization/__init__.py: torchao's int8 path is slower than float on CPU without
    # torch.compile), so the warning says nothing new; it is silenced here only, never process-wide.
    # (Before Python 3.14 catch_warnings swaps a process-global filter list: quantize from one thread.)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        # The x86 default qconfig itself still passes reduce_range, which the observers call deprecated.
        warnings.filterwarnings("ignore", message=r"Please use quant_min and quant_max")
        # The loader converts an uncalibrated skeleton whose qparams are then overwritten by the saved state.
        warnings.filterwarnings("ignore", message=r"must run observer before calling calculate_qparams")
        yield
