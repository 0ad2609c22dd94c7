"""Shared helpers of flashc's Triton kernel modules: optional import, argument checks, device rules.

Triton is an optional dependency of flashc (``pip install flashc[triton]``).
The kernel modules import this module, which tries ``import triton``; when it
fails, ``HAS_TRITON`` is False, the ``reference_*`` functions still work and the
launchers raise :class:`TritonUnavailable` with the original import error.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

try:  # pragma: no branch
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
    TRITON_IMPORT_ERROR: Exception | None = None
except Exception as _e:  # ImportError, or a broken install raising something else
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = _e

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TritonUnavailable(RuntimeError):
    """Raised by a launcher when Triton cannot be imported."""


def require_triton(what: str) -> None:
    if not HAS_TRITON:
        raise TritonUnavailable(f"{what} needs Triton, which failed to import: {TRITON_IMPORT_ERROR!r}")


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was built by Triton's interpreter (``TRITON_INTERPRET=1`` at import).

    Decided per kernel object, not from the environment now, because what
    counts is the state when the ``@triton.jit`` decorator ran.
    """
    return type(kernel).__name__ == "InterpretedFunction"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_tensor(
    fn: str,
    name: str,
    t,
    *,
    ndim: int | None = None,
    min_ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
) -> None:
    """Raise TypeError/ValueError naming the function, the argument, what was expected and what came."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{fn}: {name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{fn}: {name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_same_dtype(fn: str, pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
    pairs = list(pairs)
    first_name, first = pairs[0]
    for name, t in pairs[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{fn}: {name} must have the dtype of {first_name} ({first.dtype}), got {t.dtype}")


def check_devices(fn: str, kernel, pairs: Iterable[tuple[str, torch.Tensor]]) -> torch.device:
    """All tensors on one device, and a device the kernel can run on.

    Compiled Triton kernels need CUDA tensors; interpreted ones (TRITON_INTERPRET=1)
    run on CPU tensors.
    """
    pairs = list(pairs)
    dev = pairs[0][1].device
    for name, t in pairs[1:]:
        if t.device != dev:
            raise ValueError(f"{fn}: {name} is on {t.device} but {pairs[0][0]} is on {dev}; all inputs must share a device")
    if dev.type != "cuda" and not is_interpreted(kernel):
        raise ValueError(
            f"{fn}: inputs are on {dev}, but compiled Triton kernels need CUDA tensors "
            "(set TRITON_INTERPRET=1 before importing flashc.codegen to run them on the CPU through Triton's interpreter)"
        )
    return dev


def check_out(
    fn: str,
    name: str,
    out,
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    *,
    contiguous: bool = False,
    inputs: Iterable[torch.Tensor] = (),
) -> None:
    """Validate a caller-provided output buffer (shape, dtype, device, layout, no aliasing of inputs)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{fn}: {name} must have dtype {dtype}, got {out.dtype}")
    if out.device != device:
        raise ValueError(f"{fn}: {name} must be on {device}, got {out.device}")
    if contiguous and not out.is_contiguous():
        raise ValueError(f"{fn}: {name} must be contiguous, got strides {out.stride()}")
    for t in inputs:
        if t is not None and out.numel() and t.numel() and out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            raise ValueError(f"{fn}: {name} must not share memory with an input")


def launch_opts(config: dict) -> dict:
    """The launch keywords (num_warps, num_stages) present in ``config``."""
    return {k: int(config[k]) for k in ("num_warps", "num_stages") if k in config}


def device_guard(dev: torch.device):
    """Make ``dev`` current while launching (Triton launches on the current CUDA device)."""
    if dev.type == "cuda":
        return torch.cuda.device(dev)
    import contextlib

    return contextlib.nullcontext()


_PDL: dict = {}


def pdl_enabled(dev: torch.device) -> bool:
    """Whether kernels on ``dev`` launch with programmatic dependent launch (PDL).

    With PDL a kernel may be launched while the previous one is still running; it
    waits for that kernel's results (``gdc_wait``) before touching memory, so the launch
    latency between the many small kernels of a decode step overlaps the previous
    kernel's tail. Needs Hopper or newer and a Triton with grid dependency control;
    ``FLASHC_PDL=0`` turns it off.
    """
    import os

    if dev.type != "cuda" or os.environ.get("FLASHC_PDL", "1") == "0":
        return False
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index not in _PDL:
        cuda = getattr(getattr(tl, "extra", None), "cuda", None)
        _PDL[index] = (HAS_TRITON and hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents")
                       and torch.cuda.get_device_capability(index)[0] >= 9)
    return _PDL[index]
