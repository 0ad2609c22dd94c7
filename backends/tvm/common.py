"""Shared bits of the TVM backend: importing TVM, dtype/shape helpers, artifact names."""

from __future__ import annotations

import os
import sys

import torch

from flashc.errors import FlashcError, UnsupportedOpError
from flashc.ir import dtype_name

INSTALL_TVM = "pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post0"
# 2: outputs may be Python values and `main` also returns index checks (indexing.py)
ARTIFACT_FORMAT = 3  # 3: the module may return written inputs and state after its outputs (signature 'writes')
READ_FORMATS = (2, 3)  # 2 never writes in place
LIBRARY, WEIGHTS, MANIFEST, TUNING_DIR = "model.so", "weights.safetensors", "model.json", "tuning"


def import_tvm():
    """Import TVM (compiler or runtime-only build); FlashcError with the install command if absent."""
    try:
        import tvm
    except ImportError as e:
        raise FlashcError(f"the TVM backend needs Apache TVM ({e}); install it: {INSTALL_TVM}") from None
    return tvm


def cpu_cores() -> int:
    """Physical cores this process may run on: what a CPU build is scheduled and tuned for
    and how many threads its kernels use."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or usable
    except ImportError:
        physical = usable
    return max(1, min(physical, usable))


def _tvm_dtype(dtype: torch.dtype) -> str:
    return dtype_name(dtype)


def _dtype(x) -> str:
    return str(x.ty.dtype)


def _shape(x) -> list[int]:
    return [int(v) for v in x.ty.shape.values]


def _log(msg: str) -> None:
    print(f"[flashc.tvm] {msg}", file=sys.stderr, flush=True)


def refuse(node, why: str, fix: str = "use target 'cpu'") -> UnsupportedOpError:
    """UnsupportedOpError for a node the TVM backend will not lower: the op, the node, its
    module and source line, why, and what to do."""
    from flashc.lowering import unsupported_op_error

    return unsupported_op_error("TVM", [(node, f"{why}; {fix}")])
