"""Compile flashc's interpreter-only kernel variants (and the dense GEMV, whose epilogue they share) for
sm_90 without a GPU; run by tests/codegen/test_compile_sm90.py in a process without TRITON_INTERPRET.
Prints one line a variant, exits 1 if any failed."""

from __future__ import annotations

import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flashc.codegen import (triton_gemv, triton_gemv_wq, triton_gla, triton_moe, triton_sparse_gemv,
                            triton_sparse_gemv_wq, triton_ssm)

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = {"eps", "k_scale", "inv_tau"}


def compile_variant(fn, pointers: dict[str, str], constexprs: dict, num_warps: int = 4) -> None:
    """Compile fn with its pointer arguments typed by `pointers`, float scalars by name, the rest i32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    kernel = triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=TARGET, options={"num_warps": num_warps})
    assert kernel.asm.get("cubin"), "no cubin"


def variants():
    sparse_ptrs = {"X": "*bf16", "T": "*bf16", "W": "*bf16", "BIAS": "*bf16", "P": "*fp32", "Y": "*bf16",
                   "S": "*i32", "G": "*bf16", "R": "*bf16"}
    for compact, norm, one_split, per_feature, rows in itertools.product(
            [True, False], [True, False], [True, False], [True, False], [1, 4]):
        yield (f"sparse_gemv compact={compact} norm={norm} one_split={one_split} per_feature={per_feature} "
               f"rows={rows}", triton_sparse_gemv._sparse_gemv_kernel, sparse_ptrs,
               dict(PER_FEATURE=per_feature, HAS_NORM=norm, HAS_RES=one_split, NORM_BLOCK=512, COMPACT=compact,
                    PREFETCH=False, RANGE=1024 if compact else 1, HAS_BIAS=True, ONE_SPLIT=one_split, DOT=False,
                    IEEE=False, EVEN_N=True, BLOCK_M=rows, BLOCK_N=256, BLOCK_K=16, PDL=True))
    for norm, rows, even in itertools.product([True, False], [1, 4], [True, False]):
        yield (f"sparse_gemv prefetch norm={norm} rows={rows} even_n={even}", triton_sparse_gemv._sparse_gemv_kernel,
               sparse_ptrs,
               dict(PER_FEATURE=False, HAS_NORM=norm, HAS_RES=False, NORM_BLOCK=512, COMPACT=False, PREFETCH=True,
                    RANGE=1, HAS_BIAS=True, ONE_SPLIT=False, DOT=False, IEEE=False, EVEN_N=even, BLOCK_M=rows,
                    BLOCK_N=128, BLOCK_K=32, PDL=True))
    for prefetch in (False, True):
        yield (f"sparse_gemv dot norm prefetch={prefetch}", triton_sparse_gemv._sparse_gemv_kernel, sparse_ptrs,
               dict(PER_FEATURE=False, HAS_NORM=True, HAS_RES=False, NORM_BLOCK=512, COMPACT=False,
                    PREFETCH=prefetch, RANGE=1, HAS_BIAS=False, ONE_SPLIT=False, DOT=True, IEEE=False, EVEN_N=True,
                    BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, PDL=True))
    sparse_wq_ptrs = {"X": "*bf16", "T": "*bf16", "QW": "*i32", "S": "*bf16", "ZP": "*i32", "BIAS": "*bf16",
                      "XS": "*bf16", "G": "*bf16", "R": "*bf16", "Y": "*bf16", "P": "*fp32"}
    for prefetch, skip, norm, rows in itertools.product([False, True], [False, True], [True, False], [1, 2]):
        if skip and rows == 2:
            continue
        yield (f"sparse_gemv_wq int4 prefetch={prefetch} skip={skip} norm={norm} rows={rows}",
               triton_sparse_gemv_wq._sparse_gemv_wq_kernel, sparse_wq_ptrs,
               dict(BITS=4, GROUP=128, HAS_ZP=norm, PER_FEATURE=not norm, HAS_NORM=norm, HAS_XSCALE=norm,
                    HAS_BIAS=True, HAS_RES=not prefetch, ONE_SPLIT=not prefetch, DOT=False, IEEE=False,
                    PREFETCH=prefetch, SKIP=skip, EVEN_N=rows == 1, NORM_BLOCK=512, ROWS=rows, WORDS=128,
                    BLOCK_K=16, PDL=True))
    for bits in (8, 2):
        yield (f"sparse_gemv_wq int{bits} prefetch", triton_sparse_gemv_wq._sparse_gemv_wq_kernel, sparse_wq_ptrs,
               dict(BITS=bits, GROUP=64, HAS_ZP=True, PER_FEATURE=False, HAS_NORM=True, HAS_XSCALE=False,
                    HAS_BIAS=False, HAS_RES=False, ONE_SPLIT=False, DOT=False, IEEE=False, PREFETCH=True,
                    SKIP=False, EVEN_N=True, NORM_BLOCK=512, ROWS=1, WORDS=128, BLOCK_K=16, PDL=True))
    for bits, prefetch in itertools.product([4, 8], [False, True]):
        yield (f"sparse_gemv_wq int{bits} dot prefetch={prefetch}", triton_sparse_gemv_wq._sparse_gemv_wq_kernel,
               sparse_wq_ptrs,
               dict(BITS=bits, GROUP=128, HAS_ZP=True, PER_FEATURE=prefetch, HAS_NORM=True, HAS_XSCALE=True,
                    HAS_BIAS=False, HAS_RES=False, ONE_SPLIT=False, DOT=True, IEEE=False, PREFETCH=prefetch,
                    SKIP=False, EVEN_N=not prefetch, NORM_BLOCK=512, ROWS=16, WORDS=32, BLOCK_K=32, PDL=True))
    for act, res, norm in itertools.product([0, 1, 2], [True, False], [True, False]):  # gemv's and sparse_gemv's
        yield (f"gemv split sum act={act} residual={res} norm={norm}", triton_gemv.sum_splits_kernel,
               {"P": "*fp32", "S": "*fp32", "BIAS": "*bf16", "R": "*bf16", "Y": "*bf16"},
               dict(HAS_NORM=norm, HAS_BIAS=True, HAS_RES=res, ACT=act, BLOCK=1024, PDL=True))
    for act, mode, split in itertools.product([0, 1, 2], ["elementwise", "dot", "rowloop"], [False, True]):
        if split and mode == "rowloop":
            continue
        yield (f"gemv act={act} {mode} split={split}", triton_gemv._gemv_kernel,
               {"X": "*bf16", "W": "*bf16", "BIAS": "*bf16", "G": "*bf16", "R": "*bf16", "Y": "*bf16",
                "P": "*fp32", "S": "*fp32"},
               dict(HAS_BIAS=True, HAS_NORM=True, HAS_RES=act == 0, ACT=act, DOT=mode == "dot",
                    ROWLOOP=mode == "rowloop", IEEE=False, EVEN=True, SPLIT=split, BLOCK_M=16 if mode == "dot" else 4,
                    BLOCK_N=64, BLOCK_K=128, PDL=True))
    for mode, split, (flat, xvec) in itertools.product(["elementwise", "dot"], [False, True],  # int4
                                                       [(False, False), (True, False), (True, True)]):
        if xvec and mode == "dot":
            continue
        yield (f"gemv_wq int4 {mode} split={split} flat={flat} xvec={xvec}", triton_gemv_wq._gemv_wq_kernel,
               {"X": "*bf16", "QW": "*i32", "S": "*bf16", "ZP": "*u8", "BIAS": "*bf16", "G": "*bf16", "XS": "*bf16",
                "R": "*bf16", "Y": "*bf16", "P": "*fp32", "PSQ": "*fp32"},
               dict(BITS=4, GROUP=128, HAS_ZP=True, HAS_BIAS=False, HAS_NORM=True, HAS_XSCALE=False, HAS_RES=False,
                    ACT=1, DOT=mode == "dot", IEEE=False, EVEN=True, SPLIT=split, BLOCK_M=16 if mode == "dot" else 2,
                    BLOCK_N=32 if mode == "dot" else 8, SUB=128, SUBS=4 if mode == "dot" else 8, STAGES=2,
                    PREFETCH=False, FLAT=flat, XVEC=xvec, PDL=True))
    mix_ptrs = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DT": "*bf16", "A_LOG": "*fp32", "S_IN": "*fp32",
                "Y": "*bf16", "S_OUT": "*fp32", "KEEP": "*fp32", "GATE": "*bf16", "DT_BIAS": "*bf16"}
    for keep, bias, block in itertools.product([True, False], [True, False], [64, 128]):
        yield (f"ssm mix step keep={keep} dt_bias={bias} d={block}", triton_ssm._ssm_mix_step_kernel, mix_ptrs,
               dict(BLOCK=block, HAS_KEEP=keep, HAS_DT_BIAS=bias, PDL=True))
    for keep, block in itertools.product([True, False], [64, 128]):
        yield (f"gla mix step keep={keep} d={block}", triton_gla._gla_mix_step_kernel, mix_ptrs,
               dict(BLOCK=block, HAS_KEEP=keep, PDL=True))
    for threshold in (True, False):
        yield (f"moe gemm swiglu threshold={threshold}", triton_moe._moe_gemm_kernel,
               {"A": "*bf16", "W": "*bf16", "OUT": "*bf16", "ROWS": "*i32", "BLOCK_EXPERT": "*i32",
                "ROUTE_W": "*fp32", "THRESHOLD": "*bf16"},
               dict(SWIGLU=True, HAS_THRESHOLD=threshold, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, EVEN_NK=True,
                    IEEE=False))


def main() -> int:
    failed = 0
    for name, fn, pointers, constexprs in variants():
        try:
            compile_variant(fn, pointers, constexprs)
            print(f"ok   {name}")
        except Exception as e:  # noqa: BLE001  (every failure is reported, then the exit code says it)
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:1500]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
