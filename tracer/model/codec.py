"""Model values <-> plain JSON data, driven by their type hints.

Recordings store the Snapshot sections that have no table of their own (lock, syscall,
fault and memory statistics, whatever is added next) as JSON; this turns any dataclass
tree of them into JSON data and back without a hand-written shape per section, so a
new Snapshot field is recorded and read back with no change to the recording code.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any


def encode(value: Any) -> Any:
    """A dataclass tree as JSON-ready lists, dicts and scalars (tuples become lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [encode(v) for v in value]
    return value


def decode(hint: Any, data: Any) -> Any:
    """Rebuild a value of type `hint` from `encode`'s output.

    Raises ValueError (or TypeError) when `data` does not fit the type: callers reading
    untrusted files turn that into their own error.
    """
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any or hint is object:
        return data
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return decode(arg, data)
            except (ValueError, TypeError) as err:
                errors.append(str(err))
        raise ValueError(f"no type of {hint} fits: {'; '.join(errors)}")
    if origin in (list, set, frozenset, tuple) or hint in (list, tuple):
        if not isinstance(data, list):
            raise ValueError(f"expected a list for {hint}, got {type(data).__name__}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(data):
                raise ValueError(f"expected {len(args)} items for {hint}")
            return tuple(decode(a, d) for a, d in zip(args, data))
        item = args[0] if args else Any
        items = [decode(item, d) for d in data]
        container = origin or hint
        return items if container is list else container(items)
    if origin is dict or hint is dict:
        if not isinstance(data, dict):
            raise ValueError(f"expected an object for {hint}, got {type(data).__name__}")
        key_t, val_t = args if args else (Any, Any)
        return {_key(key_t, k): decode(val_t, v) for k, v in data.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(data, dict):
            raise ValueError(f"expected an object for {hint.__name__}")
        hints = _hints(hint)
        kwargs = {f.name: decode(hints[f.name], data[f.name])
                  for f in dataclasses.fields(hint) if f.init and f.name in data}
        return hint(**kwargs)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(data)
    return _scalar(hint, data)


def field_hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's fields (strings under `from __future__`)."""
    return _hints(cls)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _key(hint: Any, key: str) -> Any:
    if hint is int:
        return int(key)
    if hint is float:
        return float(key)
    return key


def _scalar(hint: Any, data: Any) -> Any:
    if hint is float and isinstance(data, (int, float)) and not isinstance(data, bool):
        return float(data)
    if hint is int and isinstance(data, bool):
        raise ValueError("expected an int, got a bool")
    if hint is type(None):
        if data is not None:
            raise ValueError("expected null")
        return None
    if isinstance(hint, type) and not isinstance(data, hint):
        raise ValueError(f"expected {hint.__name__}, got {type(data).__name__}")
    return data
