"""4-bit block-quantized weights in ONNX Runtime's MatMulNBits layout.

`flashc.linear_wq` (flashc/quantized_ops.py, written by passes/quantize) keeps its
weights in this layout at 4 and 8 bits, so `_quantized` lowers it to one `matmul_nbits`
node with the tensors as initializers and nothing repacked. `Int4Weight` and
`quantize_int4` are this module's own 4-bit packing, the reference the layout is tested
against.

* The layout (com.microsoft.MatMulNBits, bits=4): W is split along K into blocks of
  `block_size` (a power of two >= 16); each block has a scale (x's dtype) and a 4-bit
  zero point; W[n, k] = (q[n, k] - zp[n, k // bs]) * scale[n, k // bs] with q in 0..15.
  `packed` is uint8 [N, n_blocks, bs / 2], two values a byte, the even k in the low
  nibble; zero points are uint8 [N, ceil(n_blocks / 2)], the even block in the low
  nibble; scales are [N * n_blocks]. K need not be a multiple of bs: the last block
  is padded (the padding multiplies nothing).
* The CUDA backend can reuse the same packing for its own int4 GEMM kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_Q = 15  # 4-bit unsigned


@dataclass(frozen=True)
class Int4Weight:
    """A [N, K] weight quantized to 4 bits per value, blockwise along K, packed for MatMulNBits."""

    packed: torch.Tensor  # uint8 [N, n_blocks, block_size // 2]
    scales: torch.Tensor  # [N, n_blocks], the activation dtype
    zero_points: torch.Tensor | None  # uint8 [N, ceil(n_blocks / 2)]; None means 8 (symmetric)
    in_features: int  # K
    block_size: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def n_blocks(self) -> int:
        return self.packed.shape[1]

    @classmethod
    def from_float(cls, w: torch.Tensor, block_size: int = 32, symmetric: bool = False) -> "Int4Weight":
        q, scales, zp = quantize_int4(w, block_size, symmetric)
        return cls.from_quantized(q, scales, None if symmetric else zp, block_size)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                       block_size: int) -> "Int4Weight":
        """Pack q [N, K] (values 0..15), scales [N, n_blocks] and zero points [N, n_blocks] (or None)."""
        _check_block_size(block_size)
        n, k = q.shape
        nb = _n_blocks(k, block_size)
        if scales.shape != (n, nb) or (zero_points is not None and zero_points.shape != (n, nb)):
            raise ValueError(f"scales/zero points must be [{n}, {nb}] for K={k}, block_size={block_size}")
        zp = None if zero_points is None else pack_nibbles(zero_points.to(torch.uint8))
        return cls(pack_int4(q, block_size), scales, zp, k, block_size)

    def dequantize(self) -> torch.Tensor:
        """The float [N, K] weight these bits stand for (the reference for MatMulNBits)."""
        q = unpack_nibbles(self.packed.reshape(self.out_features, -1))[:, : self.in_features]
        if self.zero_points is None:
            zp = torch.full((self.out_features, self.n_blocks), 8, dtype=torch.uint8)
        else:
            zp = unpack_nibbles(self.zero_points)[:, : self.n_blocks]
        per_k = lambda t: t.repeat_interleave(self.block_size, dim=1)[:, : self.in_features]  # noqa: E731
        return (q.float() - per_k(zp).float()) * per_k(self.scales.float())


def _check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"MatMulNBits needs a power-of-two block_size >= 16, got {block_size}")


def _n_blocks(k: int, block_size: int) -> int:
    return (k + block_size - 1) // block_size


def quantize_int4(w: torch.Tensor, block_size: int = 32, symmetric: bool = False):
    """Round w [N, K] to 4 bits per block of K: returns (q [N, K] uint8, scales [N, nb], zero points [N, nb]).

    Asymmetric: each block's [min, max] (widened to include 0) maps onto 0..15.
    Symmetric: zero point 8, scale = max|w| / 7 (codes 1..15 used).
    """
    _check_block_size(block_size)
    n, k = w.shape
    nb = _n_blocks(k, block_size)
    wf = torch.nn.functional.pad(w.float(), (0, nb * block_size - k)).reshape(n, nb, block_size)
    if symmetric:
        scale = wf.abs().amax(-1) / 7
        zp = torch.full_like(scale, 8)
    else:
        lo, hi = wf.amin(-1).clamp(max=0), wf.amax(-1).clamp(min=0)
        scale = (hi - lo) / MAX_Q
        zp = torch.where(scale > 0, (-lo / scale).round(), torch.zeros_like(scale)).clamp(0, MAX_Q)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (wf / safe[..., None]).round() + zp[..., None]
    q = q.clamp(0, MAX_Q).to(torch.uint8).reshape(n, nb * block_size)[:, :k]
    return q, scale.to(w.dtype), zp.to(torch.uint8)


def pack_nibbles(v: torch.Tensor) -> torch.Tensor:
    """[R, C] uint8 values 0..15 -> [R, ceil(C / 2)] bytes, element 2j low nibble, 2j+1 high."""
    if v.dtype != torch.uint8 or (v.numel() and int(v.max()) > MAX_Q):
        raise ValueError("4-bit values must be uint8 in 0..15")
    if v.shape[1] % 2:
        v = torch.nn.functional.pad(v, (0, 1))
    pairs = v.reshape(v.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: [R, B] bytes -> [R, 2B] values."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def pack_int4(q: torch.Tensor, block_size: int) -> torch.Tensor:
    """q [N, K] (0..15) -> uint8 [N, n_blocks, block_size // 2], the MatMulNBits B input."""
    n, k = q.shape
    nb = _n_blocks(k, block_size)
    padded = torch.nn.functional.pad(q.to(torch.uint8), (0, nb * block_size - k))
    return pack_nibbles(padded).reshape(n, nb, block_size // 2)


def matmul_nbits_node(b, x, weight: Int4Weight, name: str, bias=None, accuracy_level: int = 0):
    """Emit y = x @ dequant(W)^T (+ bias) as one com.microsoft.MatMulNBits node; returns y.

    b is the exporter's GraphBuilder and x an onnx-ir value [..., K] of the scales'
    dtype. accuracy_level 0 computes in x's dtype; 4 lets ORT quantize x to int8
    (faster on CPU, less exact).
    """
    packed = b.weight(f"{name}_q4", weight.packed)
    scales = b.weight(f"{name}_scales", weight.scales.reshape(-1))
    zp = b.weight(f"{name}_zp", weight.zero_points.reshape(-1)) if weight.zero_points is not None else None
    return matmul_nbits(b, x, packed, scales, zp, bias, k=weight.in_features, n=weight.out_features, bits=4,
                        block_size=weight.block_size, accuracy_level=accuracy_level)


def matmul_nbits(b, x, packed, scales, zero_points, bias, *, k: int, n: int, bits: int, block_size: int,
                 accuracy_level: int = 0):
    """One com.microsoft.MatMulNBits node over onnx-ir values already in its layout; returns y [..., N].

    packed uint8 [N, n_blocks, block_size * bits / 8]; scales [N * n_blocks] in x's dtype;
    zero_points None (the midpoint 2**(bits - 1)) or uint8 [N * ceil(n_blocks * bits / 8)]
    (8 / bits blocks a byte below 8 bits, one byte a block at 8); bias None or [N] in x's dtype.
    """
    import onnx_ir as ir

    from ._builder import MS_DOMAIN

    y = b.op("MatMulNBits", x, packed, scales, zero_points, None, bias, domain=MS_DOMAIN, K=k, N=n, bits=bits,
             block_size=block_size, accuracy_level=accuracy_level)
    y.dtype = scales.dtype
    if x.shape is not None:
        y.shape = ir.Shape([*x.shape[:-1], n])
    return y
