"""One hierarchy for every error flashc raises on purpose.

A message says what went wrong, where (module path, op, source line, file) and what
to do about it, so a user can act on it without reading flashc's code.
"""

from __future__ import annotations


class FlashcError(Exception):
    """Base class of all flashc errors."""


class CaptureError(FlashcError):
    """The model could not be captured into a graph."""


class UnsupportedOpError(FlashcError):
    """An op has no lowering for the chosen target."""


class UnknownNameError(FlashcError, KeyError):
    """A target, hardware profile or zoo model name that flashc does not know."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class InputError(FlashcError, ValueError):
    """Inputs given at call time do not match what the model was compiled for."""


class ArtifactError(FlashcError):
    """An artifact on disk is missing, corrupt, tampered with or incompatible."""


class VerificationError(FlashcError):
    """A pass left the graph malformed or changed what it computes."""


def closest_names(name: str, known: list[str], n: int = 3) -> list[str]:
    """The known names closest to `name`, for 'did you mean' hints."""
    import difflib

    return difflib.get_close_matches(name, known, n=n, cutoff=0.4)


def unknown_name(kind: str, name: str, known: list[str]) -> UnknownNameError:
    """An UnknownNameError listing the known names and the closest ones."""
    hint = closest_names(name, known)
    msg = f"unknown {kind} {name!r}"
    if hint:
        msg += f"; did you mean {', '.join(repr(h) for h in hint)}?"
    msg += f" Known {kind}s: {', '.join(sorted(known))}"
    return UnknownNameError(msg)
