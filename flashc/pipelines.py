"""What each optimization level runs, readable as one list per level."""

from __future__ import annotations

from flashc.errors import FlashcError
from flashc.passes.cleanup import Canonicalize, EliminateCommonSubexpressions, EliminateDeadCode, FoldConstants
from flashc.passes.fusion import (
    FUSE_ADD_RMS_NORM, FUSE_ATTENTION, FUSE_GEGLU, FUSE_MOE, FUSE_RMS_NORM,
    FUSE_ROTARY, FUSE_SWIGLU, Fuse,
)
from flashc.passes.decode_attention import DecodeAttention
from flashc.passes.merge import MergeProjections


def cleanup():
    return [Canonicalize(), FoldConstants(), EliminateCommonSubexpressions(), EliminateDeadCode()]


def pipeline(level: int) -> list:
    """The passes of optimization level 0-3 (-O0 is capture only)."""
    if level == 0:
        return []
    if level == 1:
        return cleanup()
    if level == 2:
        return [
            Canonicalize(),
            # MoE first, before folding turns its expert-weight transposes into new
            # weights, and before FUSE_SWIGLU takes the silu(gate) * up of its experts.
            Fuse(FUSE_MOE, name="fuse_moe"),
            *cleanup(),
            Fuse(FUSE_RMS_NORM, FUSE_ROTARY, FUSE_SWIGLU, FUSE_GEGLU, FUSE_ATTENTION),
            Fuse(FUSE_ADD_RMS_NORM, name="fuse_residual"),
            DecodeAttention(),
            *cleanup(),
        ]
    if level == 3:
        return [*pipeline(2), MergeProjections(), *cleanup()]
    raise FlashcError(f"unknown optimization level {level}; use 0, 1, 2 or 3")


LEVELS = (0, 1, 2, 3)
