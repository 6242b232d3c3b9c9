"""User code named by an import path, `package.module:attribute` (custom architectures, losses,
metrics, loaders): one resolver, so every key that takes a path refuses a bad one the same way,
naming the key, the path and what is wrong."""

from __future__ import annotations

import importlib
from typing import Any

from domain.errors import InvalidInputError


def is_import_path(value: str) -> bool:
    module_name, sep, attribute = value.partition(":")
    return bool(sep and module_name and attribute)


def resolve_import_path(path: str, what: str) -> Any:
    """The object `path` names; InvalidInputError starting with `what` (the key or thing it is for)."""
    if not isinstance(path, str) or not is_import_path(path):
        raise InvalidInputError(f"{what} {path!r}: use an import path of the form 'package.module:name'")
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise InvalidInputError(f"{what} {path!r}: cannot import module {module_name!r} ({e})") from e
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise InvalidInputError(f"{what} {path!r}: {module_name} has no attribute {attribute!r}")
    return target


def resolve_callable(path: str, what: str) -> Any:
    """`resolve_import_path`, refusing what cannot be called."""
    target = resolve_import_path(path, what)
    if not callable(target):
        raise InvalidInputError(f"{what} {path!r}: {path.partition(':')[2]!r} is not callable; it must be a function")
    return target
