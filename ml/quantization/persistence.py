"""Variants on disk: data only (tensors, or an ONNX graph), its digest checked before it is parsed.

`save_quantized` writes a variant atomically with its sha256 beside it. The float model (`none`) is
its state dict (`retrainer.quantized/1`, read back with `torch.load(weights_only=True)` into the
skeleton `build()` returns). A quantized variant is its ONNX graph, exactly the bytes ONNX Runtime
runs, with `retrainer.quantized/2`, the variant and the float skeleton's signature in the graph's
metadata; loading parses it as protobuf (no code runs), refuses custom-domain operators and external
data (ml/quantization/onnx_graph.py), and checks the signature against `build()`.

Variants saved by the torch.ao backend (`retrainer.quantized/1` with variant dynamic, static or
fp16; before issue 13) are refused with an error that says so: torch.ao's quantized modules are
gone from this code, and the fix is to retrain the pipeline (its float champion, `none`, still loads).
`serialized_size` is the artifact's size, for evaluators.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from domain.errors import ArtifactIntegrityError, ArtifactNotFoundError, InvalidInputError
from ml.quantization.onnx_graph import OnnxModule, check_graph
from ml.quantization.transforms import skeleton_signature
from ml.quantization.variants import FORMAT, ONNX_FORMAT, Variant, check_variant, first_line

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's container


@dataclass(frozen=True)
class SavedVariant:
    """Where `save_quantized` wrote a variant, and the digest a loader checks it against."""

    path: Path
    variant: Variant
    sha256: str
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "variant": self.variant, "sha256": self.sha256, "size_bytes": self.size_bytes}


def _serialized(model: nn.Module, variant: Variant) -> bytes:
    if variant == "none":
        if isinstance(model, OnnxModule):
            raise InvalidInputError(f"variant 'none' is the float torch model, not an ONNX graph ({model.variant})")
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, "variant": variant, "state": model.state_dict()}, buffer)
        return buffer.getvalue()
    if not isinstance(model, OnnxModule) or model.variant != variant:
        held = model.variant if isinstance(model, OnnxModule) else f"a {type(model).__name__}"
        raise InvalidInputError(f"variant {variant!r} is saved from quantize(model, {variant!r}), not from {held}")
    return model.onnx_bytes


def serialized_size(model: nn.Module, variant: Variant) -> int:
    """Bytes `save_quantized` would write for this model: the artifact's size, for evaluators."""
    return len(_serialized(model, variant))


def save_quantized(model: nn.Module, variant: Variant, path: Path) -> SavedVariant:
    """Writes the variant (tensors or an ONNX graph) atomically to `path`, and its sha256 to
    `path` + `.sha256` (sha256sum format)."""
    check_variant(variant)
    data = _serialized(model, variant)
    digest = hashlib.sha256(data).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, data)
    _write_atomically(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n".encode())
    return SavedVariant(path, variant, digest, len(data))


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        Path(tmp_name).replace(path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def load_quantized(
    path: Path, build: Callable[[], nn.Module], variant: Variant, *, expected_sha256: str | None = None
) -> nn.Module:
    """The saved variant, in eval mode on CPU: the float model rebuilt with `build()` and its state
    loaded, or the ONNX graph in an OnnxModule after checking that it was quantized from a model
    with `build()`'s keys and shapes.

    The bytes are hashed and parsed from one read, so what was verified is what is loaded:
    ArtifactIntegrityError if they do not match `expected_sha256`, before anything is parsed.
    """
    check_variant(variant)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise ArtifactNotFoundError(f"quantized model {path} does not exist") from e
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256.lower():
            raise ArtifactIntegrityError(
                f"quantized model {path} has sha256 {actual}, expected {expected_sha256}; refusing to load it"
            )
    if data.startswith(_ZIP_MAGIC):
        if variant != "none":  # a variant saved by torch.ao: a torch.save container, never an ONNX graph
            raise InvalidInputError(
                f"quantized model {path} is a {variant!r} variant saved by the torch.ao backend ({FORMAT}), which "
                f"this version no longer runs (variants are ONNX graphs now, {ONNX_FORMAT}); retrain the pipeline"
            )
        return _load_float(path, data, build)
    return _load_graph(path, data, build, variant)


def _load_float(path: Path, data: bytes, build: Callable[[], nn.Module]) -> nn.Module:
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file, or one that needs code to unpickle: say which
        raise InvalidInputError(f"quantized model {path} cannot be loaded safely ({first_line(e)})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InvalidInputError(f"quantized model {path} is not a {FORMAT} or {ONNX_FORMAT} file")
    if payload.get("variant") != "none":
        raise InvalidInputError(f"quantized model {path} holds variant {payload.get('variant')!r}, not 'none'")
    state = payload.get("state")
    if not isinstance(state, dict):
        raise InvalidInputError(f"quantized model {path} has no state dictionary")
    model = build().cpu().eval()
    expected = set(model.state_dict())
    if expected != set(state):
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise InvalidInputError(
            f"quantized model {path} does not fit the model build() returned: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as e:
        raise InvalidInputError(
            f"quantized model {path} does not fit the model build() returned ({first_line(e)})"
        ) from e
    return model


def _load_graph(path: Path, data: bytes, build: Callable[[], nn.Module], variant: Variant) -> nn.Module:
    try:
        graph = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf's DecodeError and friends: not a graph, whatever the cause
        raise InvalidInputError(f"quantized model {path} is neither a {FORMAT} nor an ONNX file ({e})") from e
    props = {entry.key: entry.value for entry in graph.metadata_props}
    if props.get("retrainer.format") != ONNX_FORMAT:
        raise InvalidInputError(f"quantized model {path} is an ONNX graph but not a {ONNX_FORMAT} variant")
    if props.get("retrainer.variant") != variant:
        raise InvalidInputError(
            f"quantized model {path} holds variant {props.get('retrainer.variant')!r}, not {variant!r}"
        )
    check_graph(graph, f"quantized model {path}")
    skeleton = build()
    if props.get("retrainer.skeleton") != skeleton_signature(skeleton):
        raise InvalidInputError(
            f"quantized model {path} does not fit the model build() returned: it was quantized from a model "
            f"with other keys or shapes than {type(skeleton).__name__}'s"
        )
    try:
        count = int(props.get("retrainer.parameter_count", "0"))
        return OnnxModule(data, variant=variant, parameter_count=count).eval()
    except Exception as e:  # ONNX Runtime refuses a graph it cannot run: say so, as for a foreign file
        raise InvalidInputError(f"quantized model {path} cannot be run by ONNX Runtime ({first_line(e)})") from e
