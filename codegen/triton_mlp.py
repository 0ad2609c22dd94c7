"""Gated MLP activations (SwiGLU, GeGLU-tanh) as Triton kernels, with PyTorch references.

Semantics (compute in fp32, output in the input dtype):

* ``swiglu(gate, up) = silu(gate) * up``          (Llama, Mistral, Qwen)
* ``geglu(gate, up)  = gelu_tanh(gate) * up``     (Gemma)

and "packed" variants taking one tensor ``gu[..., 2F]`` whose first half of the
last dim is the gate and second half the up projection: flashc merges the gate
and up ``Linear`` layers into one GEMM, and these variants consume its output
without a split/copy.

gelu_tanh is evaluated as ``g * sigmoid(2 z)`` with ``z = sqrt(2/pi) (g + 0.044715 g^3)``,
which equals ``0.5 g (1 + tanh(z))`` exactly (``0.5 (1 + tanh z) = sigmoid(2 z)``)
and needs no tanh intrinsic (portable across Triton versions, no cancellation
near 0, saturates correctly for large |g|).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import tuning
from ._triton_common import (
    HAS_TRITON,
    check_devices,
    check_out,
    check_same_dtype,
    check_tensor,
    device_guard,
    launch_opts,
    next_pow2,
    require_triton,
    triton,
    tl,
)

__all__ = [
    "swiglu",
    "geglu",
    "swiglu_packed",
    "geglu_packed",
    "tune_glu",
    "reference_swiglu",
    "reference_geglu",
    "reference_swiglu_packed",
    "reference_geglu_packed",
]

_ACTS = {"silu": 0, "gelu_tanh": 1}


# ---------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------
def _ref_acc(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def reference_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` computed in fp32 (fp64 for fp64 inputs), cast to the input dtype."""
    return (F.silu(_ref_acc(gate)) * _ref_acc(up)).to(gate.dtype)


def reference_geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu(gate, approximate='tanh') * up`` computed in fp32 (fp64 for fp64), cast to the input dtype."""
    return (F.gelu(_ref_acc(gate), approximate="tanh") * _ref_acc(up)).to(gate.dtype)


def _split(gu: torch.Tensor):
    f = gu.shape[-1] // 2
    return gu[..., :f], gu[..., f:]


def reference_swiglu_packed(gu: torch.Tensor) -> torch.Tensor:
    """``swiglu(gu[..., :F], gu[..., F:])``."""
    return reference_swiglu(*_split(gu))


def reference_geglu_packed(gu: torch.Tensor) -> torch.Tensor:
    """``geglu(gu[..., :F], gu[..., F:])``."""
    return reference_geglu(*_split(gu))


# ---------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _glu_kernel(
        G, U, Y,
        M, N,
        stride_gm, stride_um, stride_ym,
        ACT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_F: tl.constexpr,
    ):
        """Y[m, f] = act(G[m, f]) * U[m, f] over a [BLOCK_M, BLOCK_F] tile (last dims contiguous).

        Gate and up are two base pointers with their own row strides, so the
        packed layout is the same kernel with U = G + F.
        """
        pid_m = tl.program_id(0)
        pid_f = tl.program_id(1)
        rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        g = tl.load(G + rows[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + rows[:, None] * stride_um + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # sigmoid(t) = 1 / (1 + exp(-t)); the exponent is capped at 80 so exp never overflows
        # (for t < -80 the product is < 1e-33 either way).
        if ACT == 0:
            a = g / (1.0 + tl.exp(tl.minimum(-g, 80.0)))  # silu
        else:
            # gelu_tanh(g) = g * sigmoid(2 * sqrt(2/pi) * (g + 0.044715 g^3))
            z2 = 1.5957691216057308 * (g + 0.044715 * g * g * g)
            a = g / (1.0 + tl.exp(tl.minimum(-z2, 80.0)))
        tl.store(Y + rows[:, None] * stride_ym + cols[None, :], (a * u).to(Y.dtype.element_ty), mask=mask)

    tuning.register_kernel_source("glu", _glu_kernel)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, n)


def _launch(act: str, g2, u2, y2, config, device) -> None:
    M, N = y2.shape
    if M == 0 or N == 0:
        return
    if config is None:
        key = {"F": N, "M": M, "dtype": str(y2.dtype).replace("torch.", "")}
        config = tuning.get_config("glu", key, tuning.detect_profile(device))
    block_m = int(config.get("BLOCK_M", 1))
    block_f = min(int(config.get("BLOCK_F", 1024)), max(16, next_pow2(N)))
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_f))
    if grid[1] > 65535:
        raise ValueError(f"glu: F={N} needs {grid[1]} programs on grid axis 1 (max 65535); use a larger BLOCK_F")
    with device_guard(device):
        _glu_kernel[grid](
            g2, u2, y2,
            M, N,
            g2.stride(0), u2.stride(0), y2.stride(0),
            ACT=_ACTS[act],
            BLOCK_M=block_m,
            BLOCK_F=block_f,
            **launch_opts(config),
        )


def _out(fn: str, out, shape, dtype, dev, inputs):
    if out is None:
        return torch.empty(shape, dtype=dtype, device=dev)
    check_out(fn, "out", out, shape, dtype, dev, contiguous=True, inputs=inputs)
    return out


def _glu(fn: str, act: str, gate: torch.Tensor, up: torch.Tensor, config, out) -> torch.Tensor:
    require_triton(fn)
    check_tensor(fn, "gate", gate, min_ndim=1)
    check_tensor(fn, "up", up, min_ndim=1)
    if gate.shape != up.shape:
        raise ValueError(f"{fn}: gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    check_same_dtype(fn, [("gate", gate), ("up", up)])
    dev = check_devices(fn, _glu_kernel, [("gate", gate), ("up", up)])
    n = gate.shape[-1]
    y = _out(fn, out, gate.shape, gate.dtype, dev, (gate, up))
    if y.numel():
        _launch(act, _rows(gate, n), _rows(up, n), y.view(-1, n), config, dev)
    return y


def _glu_packed(fn: str, act: str, gu: torch.Tensor, config, out) -> torch.Tensor:
    require_triton(fn)
    check_tensor(fn, "gu", gu, min_ndim=1)
    if gu.shape[-1] % 2:
        raise ValueError(f"{fn}: gu's last dim must be even (gate and up halves), got shape {tuple(gu.shape)}")
    dev = check_devices(fn, _glu_kernel, [("gu", gu)])
    f = gu.shape[-1] // 2
    y = _out(fn, out, (*gu.shape[:-1], f), gu.dtype, dev, (gu,))
    if y.numel():
        gu2 = _rows(gu, 2 * f)
        _launch(act, gu2, gu2[:, f:], y.view(-1, f), config, dev)
    return y


def swiglu(
    gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None, config: dict | None = None
) -> torch.Tensor:
    """``silu(gate) * up`` elementwise (same shapes and dtype); fp32 math, output in the input dtype."""
    return _glu("swiglu", "silu", gate, up, config, out)


def geglu(
    gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None, config: dict | None = None
) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` elementwise (same shapes and dtype); fp32 math, output in the input dtype."""
    return _glu("geglu", "gelu_tanh", gate, up, config, out)


def swiglu_packed(
    gu: torch.Tensor, *, out: torch.Tensor | None = None, config: dict | None = None
) -> torch.Tensor:
    """SwiGLU of a merged gate/up projection ``gu[..., 2F]`` -> ``[..., F]``.

    ``out`` (optional) must be contiguous and not share memory with the input;
    the same holds for the other GLU launchers.
    """
    return _glu_packed("swiglu_packed", "silu", gu, config, out)


def geglu_packed(
    gu: torch.Tensor, *, out: torch.Tensor | None = None, config: dict | None = None
) -> torch.Tensor:
    """GeGLU (tanh) of a merged gate/up projection ``gu[..., 2F]`` -> ``[..., F]``."""
    return _glu_packed("geglu_packed", "gelu_tanh", gu, config, out)


def tune_glu(gu: torch.Tensor, act: str = "silu") -> dict:
    """Autotune (and cache) the GLU kernel on a packed example ``gu[..., 2F]``; returns the winning config."""
    if act not in _ACTS:
        raise ValueError(f"tune_glu: act must be one of {sorted(_ACTS)}, got {act!r}")
    require_triton("tune_glu")
    check_tensor("tune_glu", "gu", gu, min_ndim=1)
    dev = check_devices("tune_glu", _glu_kernel, [("gu", gu)])
    f = gu.shape[-1] // 2
    gu2 = _rows(gu, 2 * f)
    y = torch.empty((gu2.shape[0], f), dtype=gu.dtype, device=dev)
    key = {"F": f, "M": gu2.shape[0], "dtype": str(gu.dtype).replace("torch.", "")}
    profile = tuning.detect_profile(dev)
    return tuning.autotune(
        "glu", key, tuning.candidates("glu", profile), lambda cfg: _launch(act, gu2, gu2[:, f:], y, cfg, dev), profile
    )


# sqrt(2/pi) * 2, used in the kernel as a literal; checked here so a typo can't hide.
assert abs(1.5957691216057308 - 2.0 * math.sqrt(2.0 / math.pi)) < 1e-15
