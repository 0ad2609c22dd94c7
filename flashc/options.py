"""Typed compile options: each backend declares a frozen dataclass of the options it reads.

`parse_options(OnnxOptions, {"opset": 17}, "onnx-cpu")` builds the dataclass from what a
user passed (a dict or the dataclass itself). A key the dataclass lacks is an error that
names the close match and the valid fields; a value of the wrong type is an error naming
the field and the type it takes. Nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

from flashc.errors import FlashcError, closest_names


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A backend that reads no compile option."""


def parse_options(cls: type, given: Mapping[str, Any] | Any | None, target: str) -> Any:
    """An instance of the options dataclass `cls` from `given` (None, a mapping, or a `cls`)."""
    if given is None:
        return cls()
    if isinstance(given, cls):
        return given
    if dataclasses.is_dataclass(given):
        raise FlashcError(f"target {target!r} takes {cls.__name__}, not {type(given).__name__}")
    if not isinstance(given, Mapping):
        raise FlashcError(f"options for target {target!r} must be a dict or {cls.__name__}, "
                          f"not {type(given).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in given.items():
        if key not in fields:
            hint = closest_names(str(key), list(fields))
            raise FlashcError(f"target {target!r} has no option {key!r}"
                              + (f"; did you mean {hint[0]!r}?" if hint else "")
                              + f" Its options: {', '.join(fields) or 'none'}")
        if not _has_type(value, hints[key]):
            raise FlashcError(f"option {key!r} of target {target!r} takes {_type_text(hints[key])}, "
                              f"got {value!r} ({type(value).__name__})")
    return cls(**dict(given))


def _has_type(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is Any:
        return True
    if origin is not None:  # tuple[str, ...], Callable[...]: the container type is checked
        annotation = origin
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    try:
        return isinstance(value, annotation)
    except TypeError:
        return True


def _type_text(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))
