"""2:4 (semi-structured) sparse linears on the GPU's sparse tensor cores: ``flashc.linear_24``.

A weight with at most 2 nonzeros in every 4 consecutive inputs of a row (passes/prune's N:M
pruning) is packed once into the half of its values that are kept plus 2-bit positions, and
multiplied by the sparse tensor cores of sm80 and later (Mishra et al., "Accelerating Sparse
Deep Neural Networks", arXiv:2104.08378). PyTorch ships two such GEMMs, both reached through
its semi-structured tensor subclasses (torch.sparse): CUTLASS kernels
(``SparseSemiStructuredTensorCUTLASS``) and NVIDIA's cuSPARSELt
(``SparseSemiStructuredTensorCUSPARSELT``, where ``torch.backends.cusparselt.is_available()``).
Which of them, or the dense cuBLAS GEMM, is fastest depends on the shape (a few hundred rows
may not fill the sparse kernels' tiles; the packed weight halves the bytes read but not the
tensor-core issue rate of small tiles), so the choice is measured, per (M, N, K, dtype, bias):

* ``tune_linear_24`` (the CUDA backend's tuning step, before any CUDA graph is captured)
  packs the weight for each library that takes the shape, checks each one's product against
  the dense ``F.linear`` on the tuning call's real inputs (a candidate that differs by more
  than the GEMM's accumulation order allows is dropped, with a warning), then times the
  survivors and the dense GEMM from a CUDA graph (codegen.tuning.autotune: cached on disk,
  saved in the artifact). Packed forms that lost are freed unless a launch used them.
* ``linear_24`` reads the cached choice (``{"impl": "dense" | "cutlass" | "cusparselt"}``;
  dense when nothing is tuned) and runs it. The packed weight lives in a module cache keyed
  by the dense weight's identity (data pointer, shape, dtype, and the tensor object itself
  through a weak reference) and its version counter, for as long as that weight lives: a
  CUDA graph replay runs the captured sparse GEMM on the same packed tensors. Nothing is
  packed while a stream is capturing: a weight not packed yet runs dense there (correct, slower).

Numerics: the sparse GEMMs accumulate in fp32 like cuBLAS, so the result equals the dense
product up to the order of the sums (the dropped products are exact zeros). Inputs holding
inf or nan can differ (the dense GEMM adds 0 * inf = nan, the sparse one skips the product).
Memory: the packed weight (about 9/16 of the dense one for fp16/bf16) is held next to the
dense weight, which decode's GEMV kernels keep reading.
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from flashc.semi_structured_ops import is_2_4

from . import tuning

KERNEL = "linear_24"  # the tuning cache's name for the choice
DTYPES = (torch.float16, torch.bfloat16)
# The weight [N, K] each library packs: N and K multiples of these (torch.sparse's
# _DTYPE_SHAPE_CONSTRAINTS for fp16/bf16, the same in torch 2.4 through 2.13)
MULTIPLES = {"cutlass": (32, 64), "cusparselt": (16, 16)}
SPARSE_IMPLS = tuple(MULTIPLES)
# Largest relative (Frobenius) difference from the dense product a sparse library may show
# at tuning: both round one fp32 sum per output to the dtype (half an ulp each: 2^-9 bf16,
# 2^-12 fp16, relative), summed in another order; a wrong packing differs by O(1).
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def fits(impl: str, n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether library `impl` ("cutlass", "cusparselt") packs a [n, k] weight of dtype."""
    rows, cols = MULTIPLES[impl]
    return dtype in DTYPES and n >= rows and k >= cols and n % rows == 0 and k % cols == 0


def shape_fits(n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether some sparse library takes a [n, k] weight of dtype (what the late pass asks)."""
    return any(fits(impl, n, k, dtype) for impl in SPARSE_IMPLS)


def sparse_impls(device: torch.device, n: int, k: int, dtype: torch.dtype) -> list[str]:
    """The sparse libraries that can run a [n, k] weight of dtype on device: PyTorch's CUTLASS kernels
    on compute capability 8.x only (an H100 raises "Supported only on GPUs with compute capability
    8.x", 2026-12-06), cuSPARSELt on sm80 and later where PyTorch was built with it."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return []
    out = []
    if fits("cutlass", n, k, dtype) and torch.cuda.get_device_capability(device)[0] == 8:
        out.append("cutlass")
    if fits("cusparselt", n, k, dtype) and torch.backends.cusparselt.is_available():
        out.append("cusparselt")
    return out


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the sparse libraries can take these arguments at all (else: dense)."""
    return (x.is_cuda and weight.is_cuda and weight.dim() == 2 and x.dim() >= 1 and x.dtype == weight.dtype
            and x.dtype in DTYPES and x.shape[-1] == weight.shape[1] and x.numel() > 0
            and (bias is None or (bias.dim() == 1 and bias.shape[0] == weight.shape[0] and bias.dtype == x.dtype))
            and shape_fits(weight.shape[0], weight.shape[1], weight.dtype))


# ---------------------------------------------------------------------------
# Packed weights, one per (dense weight, library), alive while the dense weight is
# ---------------------------------------------------------------------------
@dataclass
class _Packed:
    weight: weakref.ref  # the dense weight this was packed from
    version: int  # its version counter then: an in-place write makes the packing stale
    sparse: Any  # a torch.sparse.SparseSemiStructuredTensor; None: this weight runs dense
    used: bool = False  # a launch ran it (a captured CUDA graph may read it: never freed early)


_PACKED: dict[tuple, _Packed] = {}
_RETIRED: list = []  # stale packings a launch used (a captured CUDA graph may read them)


def _key(weight: torch.Tensor, impl: str) -> tuple:
    return (impl, weight.device.index, weight.data_ptr(), weight.dtype, tuple(weight.shape), tuple(weight.stride()))


def _version(t: torch.Tensor) -> int:
    """t's in-place write counter (-1 for an inference tensor, which has none)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _forget(key: tuple, ref: weakref.ref) -> None:
    entry = _PACKED.get(key)
    if entry is not None and entry.weight is ref:
        del _PACKED[key]


def _pack(weight: torch.Tensor, impl: str):
    """The semi-structured tensor of `impl` for a 2:4 weight (the library's own packing)."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = SparseSemiStructuredTensorCUTLASS if impl == "cutlass" else SparseSemiStructuredTensorCUSPARSELT
    with warnings.catch_warnings():  # torch's once-per-process "prototype API" notice
        warnings.simplefilter("ignore", UserWarning)
        return cls.from_dense(weight.detach().contiguous())


def packed_weight(weight: torch.Tensor, impl: str):
    """The packed form of `weight` for library `impl`, packing it on first use; None when it
    cannot be (no 2:4 pattern, the library refused, or a stream is capturing a CUDA graph and
    it is not packed yet): the caller runs the dense product."""
    key = _key(weight, impl)
    entry = _PACKED.get(key)
    if entry is not None and entry.weight() is weight and entry.version == _version(weight):
        return entry.sparse
    if weight.is_cuda and torch.cuda.is_current_stream_capturing():
        return None  # packing launches kernels and syncs: never inside a capture
    if entry is not None and entry.used and entry.weight() is weight:
        # written in place since a launch ran the old packing: a CUDA graph captured then
        # still reads it (and still computes with the old values: a captured graph never asks
        # again, which is why the late pass leaves weights the graph writes dense), so keep it alive
        _RETIRED.append(entry.sparse)
    sparse = None
    if not is_2_4(weight):
        warnings.warn(f"flashc.linear_24: a weight {list(weight.shape)} has more than 2 nonzeros in some group of 4 "
                      "inputs; it runs as a dense GEMM (the compile's late pass checked the pattern: was the "
                      "weight changed after compiling?)", stacklevel=3)
    else:
        try:
            sparse = _pack(weight, impl)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            warnings.warn(f"flashc.linear_24: {impl} could not pack a weight {list(weight.shape)} {weight.dtype} "
                          f"({type(e).__name__}: {str(e)[:200]}); it runs as a dense GEMM", stacklevel=3)
    ref = weakref.ref(weight)
    _PACKED[key] = _Packed(ref, _version(weight), sparse)
    weakref.finalize(weight, _forget, key, ref)
    return sparse


def _release(weight: torch.Tensor, impl: str) -> None:
    """Free a packing no launch has used (a tuning candidate that lost)."""
    key = _key(weight, impl)
    entry = _PACKED.get(key)
    if entry is not None and not entry.used and entry.weight() is weight:
        del _PACKED[key]


# ---------------------------------------------------------------------------
# The products
# ---------------------------------------------------------------------------
def _sparse_linear(x: torch.Tensor, sparse, bias: torch.Tensor | None) -> torch.Tensor:
    """linear(x, W, bias) with W packed: rows flattened to 2-D (the libraries take no batch
    dims; they pad the rows to their tile multiple themselves), the result made row-major."""
    n, k = sparse.shape
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = F.linear(x2, sparse, bias)
    return y.contiguous().view(*x.shape[:-1], n)


def _run(x, weight, bias, impl: str) -> torch.Tensor:
    if impl != "dense":
        sparse = packed_weight(weight, impl)
        if sparse is not None:
            _PACKED[_key(weight, impl)].used = True
            return _sparse_linear(x, sparse, bias)
    return F.linear(x, weight, bias)


tuning.register_kernel_source(KERNEL, inspect.getsource(_sparse_linear), inspect.getsource(_pack),
                              f"torch {torch.__version__}")


def _tuning_key(x, weight, bias) -> dict:
    return {"M": x.numel() // x.shape[-1], "N": weight.shape[0], "K": weight.shape[1],
            "dtype": str(x.dtype).replace("torch.", ""), "bias": bias is not None}


def choice(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """The implementation linear_24 runs for these arguments: the tuned one, else "dense"."""
    if not _eligible(x, weight, bias):
        return "dense"
    hit = tuning.cached_config(KERNEL, _tuning_key(x, weight, bias), tuning.detect_profile(x.device))
    impl = (hit or {}).get("impl", "dense")
    return impl if impl in sparse_impls(x.device, weight.shape[0], weight.shape[1], weight.dtype) else "dense"


def linear_24(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
              impl: str | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a 2:4-patterned weight [N, K], on the implementation
    tuning chose for this shape (``impl`` overrides: "dense", "cutlass" or "cusparselt"; a
    library that cannot take the arguments falls back to dense)."""
    if impl is None:
        impl = choice(x, weight, bias)
    elif impl not in ("dense", *SPARSE_IMPLS):
        raise ValueError(f"linear_24: impl must be 'dense', 'cutlass' or 'cusparselt', got {impl!r}")
    elif impl != "dense" and (not _eligible(x, weight, bias)
                              or impl not in sparse_impls(x.device, weight.shape[0], weight.shape[1], weight.dtype)):
        impl = "dense"
    return _run(x, weight, bias, impl)


def relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (0 when both are zero; inf when shapes or finiteness differ)."""
    if got.shape != want.shape or not bool((got.isfinite() == want.isfinite()).all()):
        return math.inf
    finite = want.isfinite()
    g, w = got[finite].double(), want[finite].double()
    num, den = (g - w).norm().item(), w.norm().item()
    return 0.0 if num == 0 else num / den if den else math.inf


def tune_linear_24(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> dict:
    """Measure the dense GEMM and every sparse library that takes this shape on these inputs;
    cache the fastest (``{"impl": ...}``) and leave its packed weight ready for the launches.

    Each sparse candidate must first reproduce ``F.linear`` within ``TOLERANCE`` (the sums'
    order) on these inputs; one that does not is dropped with a warning. Timed as the
    executable runs them: replayed from a CUDA graph (a few calls: prefill outputs are large).
    """
    if not _eligible(x, weight, bias):
        return {"impl": "dense"}
    key = _tuning_key(x, weight, bias)
    profile = tuning.detect_profile(x.device)
    impls = sparse_impls(x.device, weight.shape[0], weight.shape[1], weight.dtype)
    hit = tuning.cached_config(KERNEL, key, profile)
    if hit is not None:
        if hit.get("impl") in impls:
            packed_weight(weight, hit["impl"])  # pack now, before any capture
        return hit
    want = F.linear(x, weight, bias)
    cands, packed = [{"impl": "dense"}], {}
    for impl in impls:
        sparse = packed_weight(weight, impl)
        if sparse is None:
            continue
        try:
            diff = relative_difference(_sparse_linear(x, sparse, bias), want)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            diff, why = math.inf, f"{type(e).__name__}: {str(e)[:200]}"
        else:
            why = f"relative difference {diff:.2e} from the dense product (at most {TOLERANCE[x.dtype]:.0e})"
        if not diff <= TOLERANCE[x.dtype]:
            warnings.warn(f"flashc.linear_24: {impl} is not used for {key}: {why}", stacklevel=2)
            _release(weight, impl)
            continue
        cands.append({"impl": impl})
        packed[impl] = sparse
    del want

    def run(cfg):  # not _run: a timed packing is not "used" (a loser is freed below)
        impl = cfg["impl"]
        return F.linear(x, weight, bias) if impl == "dense" else _sparse_linear(x, packed[impl], bias)

    bench = (lambda fn: tuning.cuda_graph_bench(fn, calls=4)) if tuning.graph_bench_for(x) else None
    best = tuning.autotune(KERNEL, key, cands, run, profile, bench_fn=bench)
    for impl in packed:
        if impl != best.get("impl"):
            _release(weight, impl)
    return best
