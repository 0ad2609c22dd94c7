"""Tuning space (as data) and an on-disk autotuner for flashc's Triton kernels.

Why this module exists
----------------------
Triton kernels are parameterised by meta-parameters (block sizes, ``num_warps``,
``num_stages``) whose best values depend on the GPU and on the problem shape.
flashc keeps those choices *out of the kernels*:

* ``TUNING_SPACE`` lists, per hardware profile (``"h100"``, ``"a100"``, ``"h200"``,
  ``"l4"``, ``"default"``), the candidate configs of every kernel, ordered by
  preference: the first candidate that fits is the untuned default.
* ``HARDWARE`` holds the few facts about each profile the launchers need
  (multiprocessor count, shared memory per block).
* :func:`autotune` times every candidate on the real GPU (``triton.testing.do_bench``,
  median) and remembers the winner in a JSON cache, ``$FLASHC_CACHE/tuning.json``
  (default ``~/.cache/flashc``).  The cache key is
  ``(profile, kernel name, shape bucket, sha256 of the kernel source)`` so editing
  a kernel invalidates its old results instead of silently reusing them.
* :func:`get_config` is what launchers call at run time: the cached winner if
  there is one, else the first candidate that fits.  It never times anything.
* :func:`export_tuning` / :func:`import_tuning` move results between machines
  (e.g. inside a compiled artifact).

On a machine without CUDA (or under ``TRITON_INTERPRET=1``) :func:`autotune`
returns the first candidate without timing and writes nothing, unless the caller
passes its own ``bench_fn`` (the tests do, to exercise the cache on CPU).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import inspect
import json
import math
import os
import tempfile
import threading
import warnings
from typing import Any, Callable, Iterable, Mapping

__all__ = [
    "HARDWARE",
    "TUNING_SPACE",
    "PROFILES",
    "CACHE_VERSION",
    "autotune",
    "cuda_graph_bench",
    "cache_key",
    "cache_path",
    "cached_config",
    "candidates",
    "clear_memory_cache",
    "compile_workers",
    "detect_profile",
    "export_tuning",
    "get_config",
    "graph_bench_for",
    "hardware",
    "import_tuning",
    "kernel_source_hash",
    "register_kernel_source",
    "shape_bucket",
]

CACHE_VERSION = 1

# ---------------------------------------------------------------------------
# Hardware facts per profile.  Numbers from the vendors' datasheets / CUDA
# occupancy tables (max opt-in shared memory per block).
# ---------------------------------------------------------------------------
HARDWARE: dict[str, dict[str, int]] = {
    "h100": {"sm_count": 132, "smem_per_block": 227 * 1024},
    "h200": {"sm_count": 132, "smem_per_block": 227 * 1024},
    "a100": {"sm_count": 108, "smem_per_block": 163 * 1024},
    "l4": {"sm_count": 58, "smem_per_block": 99 * 1024},
    "default": {"sm_count": 80, "smem_per_block": 96 * 1024},
}


def _cfgs(*rows: dict) -> list[dict]:
    return [dict(r) for r in rows]


# Candidate configs per kernel.  Field meaning (consumed by the launchers):
#   rms_norm / add_rms_norm : BLOCK_M rows per program, MAX_BLOCK_N = longest row
#                             chunk kept in registers (longer rows loop), num_warps.
#   rotary                  : BLOCK_S sequence positions per program, num_warps.
#   glu                     : BLOCK_M rows x BLOCK_F columns per program, num_warps.
#   attention               : FlashAttention-2 tile BLOCK_M (queries) x BLOCK_N (keys),
#                             num_warps, num_stages (software pipelining depth).
#   decode_attention        : BLOCK_N keys per iteration, MIN_SPLIT_LEN = fewest keys a
#                             split may own (Flash-Decoding), num_warps, num_stages.
#   moe                     : grouped GEMM tile BLOCK_M (token, expert) pairs of one expert
#                             x BLOCK_N output columns, BLOCK_K reduction step, num_warps,
#                             num_stages; one config serves both expert GEMMs.
# The order is the order of preference when nothing is tuned; launchers skip
# candidates that don't fit the shape (e.g. shared memory at large head dims).
_NORM_FAST = _cfgs(
    {"BLOCK_M": 1, "MAX_BLOCK_N": 8192, "num_warps": 8},
    {"BLOCK_M": 1, "MAX_BLOCK_N": 8192, "num_warps": 4},
    {"BLOCK_M": 1, "MAX_BLOCK_N": 16384, "num_warps": 16},
    {"BLOCK_M": 2, "MAX_BLOCK_N": 4096, "num_warps": 8},
    {"BLOCK_M": 4, "MAX_BLOCK_N": 2048, "num_warps": 4},
    {"BLOCK_M": 8, "MAX_BLOCK_N": 1024, "num_warps": 4},
)
_NORM_SMALL = _cfgs(
    {"BLOCK_M": 1, "MAX_BLOCK_N": 4096, "num_warps": 4},
    {"BLOCK_M": 1, "MAX_BLOCK_N": 8192, "num_warps": 8},
    {"BLOCK_M": 4, "MAX_BLOCK_N": 1024, "num_warps": 4},
)
_ROTARY = _cfgs(
    {"BLOCK_S": 16, "num_warps": 4},
    {"BLOCK_S": 32, "num_warps": 4},
    {"BLOCK_S": 64, "num_warps": 8},
    {"BLOCK_S": 8, "num_warps": 2},
)
_GLU = _cfgs(
    {"BLOCK_M": 1, "BLOCK_F": 2048, "num_warps": 8},
    {"BLOCK_M": 1, "BLOCK_F": 1024, "num_warps": 4},
    {"BLOCK_M": 4, "BLOCK_F": 512, "num_warps": 4},
    {"BLOCK_M": 2, "BLOCK_F": 4096, "num_warps": 16},
)
# Hopper: large query tiles with 8 warps and a 3-4 deep cp.async/TMA pipeline
# follow the FlashAttention-2 paper (Dao, 2023, sec. 3.3) and Triton's fused
# attention tutorial settings for sm90.
_ATTN_HOPPER = _cfgs(
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
)
_ATTN_AMPERE = _cfgs(
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
)
_ATTN_SMALL = _cfgs(
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1},
)
_DECODE = _cfgs(
    # FUSED_COMBINE: one launch, the last split program of a (batch, kv head) pair combines
    # the pair's splits (saves the ~2 us launch of the combine kernel; that program reads
    # all G x splits partials, so longer splits are offered too).  Without it, two launches.
    {"BLOCK_N": 64, "MIN_SPLIT_LEN": 64, "num_warps": 4, "num_stages": 2, "FUSED_COMBINE": True},
    {"BLOCK_N": 64, "MIN_SPLIT_LEN": 256, "num_warps": 4, "num_stages": 2, "FUSED_COMBINE": True},
    {"BLOCK_N": 32, "MIN_SPLIT_LEN": 64, "num_warps": 2, "num_stages": 2, "FUSED_COMBINE": True},
    {"BLOCK_N": 128, "MIN_SPLIT_LEN": 512, "num_warps": 4, "num_stages": 3, "FUSED_COMBINE": True},
    {"BLOCK_N": 64, "MIN_SPLIT_LEN": 128, "num_warps": 8, "num_stages": 3, "FUSED_COMBINE": True},
    # short splits first: at batch 1 a (batch, kv head) pair is one program per split, and a
    # split of one or two tiles keeps the latency of a step's attention to a load round trip
    {"BLOCK_N": 64, "MIN_SPLIT_LEN": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_N": 32, "MIN_SPLIT_LEN": 64, "num_warps": 2, "num_stages": 2},
    {"BLOCK_N": 64, "MIN_SPLIT_LEN": 256, "num_warps": 4, "num_stages": 2},
    {"BLOCK_N": 128, "MIN_SPLIT_LEN": 512, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 32, "MIN_SPLIT_LEN": 128, "num_warps": 4, "num_stages": 2},
    {"BLOCK_N": 64, "MIN_SPLIT_LEN": 128, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 16, "MIN_SPLIT_LEN": 64, "num_warps": 2, "num_stages": 1},
)
# Decode (a handful of tokens) is bound by reading the routed experts' weights, so the
# defaults keep BLOCK_M at the 16-row minimum of tl.dot and stream long BLOCK_K slabs
# of weights through a deep pipeline; the larger BLOCK_M tiles are there for prefill.
_MOE_HOPPER = _cfgs(
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
)
_MOE_SMALL = _cfgs(
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
)
# MoE with packed int4/int8 experts (codegen/triton_moe_wq): fields as moe's, BLOCK_K in codes,
# plus DOT (dequantize to x's dtype and use tl.dot; else elementwise, BLOCK_M <= 16) and SPLIT_K
# (K splits of the down GEMM, summed in a fixed order). Decode: one pair a block (a second pair
# of the same expert runs beside it and mostly reads L2); 64 weight rows of 4 warps give each
# thread 4 rows a chunk of activations, ~3.6 SASS instructions a code for gate|up and ~4.4 for
# down (int4, offline sm_90 compiles, 162 registers; num_stages 2: cp.async, 239 registers);
# the down GEMM (N = H = 4096 on Mixtral-8x7B, 3.5x narrower than gate|up) is split in K for
# programs enough. Elementwise tiles beyond 128 bytes a thread and stage are skipped (8-bit at
# BLOCK_K 256 and num_stages 2 spills). Beyond ELEMENTWISE_TOKENS tokens: the DOT tiles, the
# tallest that an expert's pairs fill.
_MOE_WQ_HOPPER = _cfgs(
    {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1, "SPLIT_K": 4},
    {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 2, "SPLIT_K": 4},
    {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1, "SPLIT_K": 2},
    {"BLOCK_M": 2, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 1, "SPLIT_K": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "DOT": True},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "DOT": True},
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "DOT": True, "SPLIT_K": 2},
)
_MOE_WQ_SMALL = _cfgs(
    {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1, "SPLIT_K": 4},
    {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1, "SPLIT_K": 2},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2, "DOT": True},
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2, "DOT": True},
)

# Decode GEMV (codegen/triton_gemv): up to 8 rows stream [BLOCK_N, BLOCK_K] weight tiles with
# elementwise FMAs; DOT configs pad the rows to 16 and use tl.dot with the weight tile as the
# wide operand (several rows: elementwise FMAs run out of issue slots). Narrow BLOCK_N keeps enough
# programs in flight on 2048-wide outputs; the last candidate is the unfused library path
# (cuBLAS), so the fused kernel is used only where it measured faster.
_GEMV = _cfgs(
    {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 1},
    {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1},
    {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1},
    {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 8, "num_stages": 1},
    {"BLOCK_N": 2, "BLOCK_K": 1024, "num_warps": 2, "num_stages": 1},
    {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 8, "num_stages": 1},
    {"library": True},
)
_GEMV_ROWS = _cfgs(
    {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "DOT": True},
    {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "DOT": True},
    {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3, "DOT": True},
    {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4, "DOT": True},
    {"BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 8, "num_stages": 3, "DOT": True},
    {"BLOCK_N": 4, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1},
    # DOT tiles over K ranges (SPLIT_K, partials summed by a second kernel): N / BLOCK_N programs alone leave an
    # H100's 132 SMs with 32-128 programs on 2048-wide outputs (session 18's batch-16 SSM step ran its 16-row
    # projections on cuBLAS at 1.7x their weight floor); untimed when added
    {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "DOT": True, "SPLIT_K": 4},
    {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "DOT": True, "SPLIT_K": 8},
    {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3, "DOT": True, "SPLIT_K": 4},
    {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4, "DOT": True, "SPLIT_K": 2},
    # one-row tiles (the one-row list's winners on smollm2-135m: 2-4 rows of W, K whole) reading W once for all
    # rows, each multiplied in turn (codegen/triton_gemv.py ROWLOOP); on an H100 they won none of smollm2-135m's
    # 8 verify shapes (best: third, 4.51 us against a DOT tile's 4.30; bench/RESULTS.md session 17), larger untimed
    {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1, "ROWLOOP": True},
    {"BLOCK_N": 2, "BLOCK_K": 1024, "num_warps": 2, "num_stages": 1, "ROWLOOP": True},
    {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 1, "ROWLOOP": True},
    # each row as the one-row product runs it (codegen/triton_gemv.py): on an H100 (2026-12-06) a 6-row verify
    # step's DOT tiles took 2.7-6.3 us a matrix of smollm2-135m where one row took 1.7-2.7 us (N / BLOCK_N
    # programs: 32 for a 1024-row matrix)
    {"ROWWISE": True},
    {"library": True},
)

# Weight-only quantized decode GEMV (codegen/triton_gemv_wq): BLOCK_K codes a row per iteration
# (1024 = 8 int4 groups of 128: a warp's 32 lanes x 4 words side by side along K), so a thread
# holds BLOCK_N / num_warps rows of 4 words; more rows a thread share the activations' loads and
# conversions (~2.9 SASS instructions a weight at 8 rows, 3.4 at 4: offline sm_90 compiles). An
# int4 row is a quarter of a bf16 row's bytes, hence wider BLOCK_N than _GEMV; num_stages > 1
# streams the words through shared memory (cp.async) that many iterations ahead. Narrow tiles
# keep enough programs on 2048-wide outputs; the library path is the last candidate. Each
# candidate is a ~1 s compile per fold combination, so the lists stay short.
_GEMV_WQ = _cfgs(
    {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1},
    {"BLOCK_N": 32, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1},
    {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 32, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 2},
    {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 2, "num_stages": 1},
    {"BLOCK_N": 64, "BLOCK_K": 1024, "num_warps": 8, "num_stages": 2},
    {"BLOCK_N": 16, "BLOCK_K": 2048, "num_warps": 4, "num_stages": 1},
    # more programs and more bytes in flight a program for the small matrices: on an H100 (2026-12-06) the
    # tuned tiles above read llama-3-8b's 4096-row qkv and o_proj at 3.1x their floor (256-384 programs of
    # 8-16 KB steps on 132 SMs) against 1.9x for the 28672-row gate|up
    {"BLOCK_N": 8, "BLOCK_K": 2048, "num_warps": 4, "num_stages": 1},
    {"BLOCK_N": 4, "BLOCK_K": 2048, "num_warps": 2, "num_stages": 1},
    {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 3},
    # "flat": the words loaded as one contiguous run a row and reshaped (triton_gemv_wq's FLAT): a warp's lanes
    # along K, rows across warps, so a code position's activations reach 4 threads a value instead of 16. Nsight
    # Compute on an H100 (2026-12-06, session 20) found these tiles bound by L1/shared-memory traffic (70-89%
    # busy, DRAM 7-41%); whole-row tiles (BLOCK_K 4096), tried for bytes in flight, were 3x slower and are gone
    {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1, "flat": True},
    {"BLOCK_N": 32, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1, "flat": True},
    {"BLOCK_N": 16, "BLOCK_K": 2048, "num_warps": 4, "num_stages": 1, "flat": True},
    {"BLOCK_N": 8, "BLOCK_K": 2048, "num_warps": 4, "num_stages": 1, "flat": True},
    # and the activations loaded once a step as 16-byte vectors, split into code positions ("xvec",
    # triton_gemv_wq's XVEC, 4 bits): 2 LDG.128 a thread a step instead of 18 strided 2-byte loads
    {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1, "flat": True, "xvec": True},
    {"BLOCK_N": 32, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1, "flat": True, "xvec": True},
    {"BLOCK_N": 16, "BLOCK_K": 2048, "num_warps": 4, "num_stages": 1, "flat": True, "xvec": True},
    {"BLOCK_N": 8, "BLOCK_K": 2048, "num_warps": 4, "num_stages": 1, "flat": True, "xvec": True},
    # or the next step's words loaded into registers before this step's arithmetic ("prefetch": two steps in
    # flight a thread; offline sm_90 compiles, int4: 8 x 1024 at 128 registers with norm + GLU, 80 with norm)
    {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1, "prefetch": True},
    {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1, "prefetch": True},
    {"BLOCK_N": 8, "BLOCK_K": 2048, "num_warps": 4, "num_stages": 1, "prefetch": True},
    {"library": True},
)
# Hopper (h100, h200): the untuned default, the flat and xvec tiles and the library path. Every int4 one-row shape
# timed on an H100 went to an xvec tile (llama-3-8b's five, session 21; llama-3.2-1b's qkv and o_proj, session 27,
# where the other tiles ran 12-63% slower than the winner, flat first), and each candidate is a ~1 s compile a
# shape: 22 of them made a first-time user's int4 compile of the 1B model tune for over two minutes (session 27).
# The flat tiles stay for int8, where xvec does not apply (triton_gemv_wq runs an xvec config as its flat tile).
_GEMV_WQ_HOPPER = [_GEMV_WQ[0]] + [c for c in _GEMV_WQ[1:] if c.get("flat") or c.get("library")]
# Several rows: the elementwise path spends one FMA a row per weight and spills from 4 rows, so
# the DOT configs (codes dequantized to x's dtype, tl.dot with the rows padded to 16: ~6-6.9 SASS
# instructions a weight, offline sm_90 compiles) take over from 3 rows; BLOCK_N >= 64 for Hopper's
# wgmma (16-32 rows a program compiled to mma.sync at 14-29 instructions a weight). The two
# elementwise configs (5.3-5.8 at 2 rows) are timed for 2 rows only (triton_gemv_wq.tune_gemv_wq).
_GEMV_WQ_ROWS = _cfgs(
    {"BLOCK_N": 64, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2, "DOT": True},
    {"BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3, "DOT": True},
    {"BLOCK_N": 128, "BLOCK_K": 512, "num_warps": 8, "num_stages": 2, "DOT": True},
    {"BLOCK_N": 128, "BLOCK_K": 256, "num_warps": 8, "num_stages": 3, "DOT": True},
    # narrower DOT tiles (mma.sync): a 2048-row matrix in 64-128 programs instead of 16-32. On an H100
    # (2026-12-06) llama-3.2-1b int4 at batch 8 stepped in 3.3x its batch-1 time (0.57x llama.cpp's batched
    # kernels), where the weights, read once, dominate both
    {"BLOCK_N": 32, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2, "DOT": True},
    {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3, "DOT": True},
    # the same over K ranges (SPLIT_K): on an H100 (2026-12-06, session 19) llama-3-8b int4 at batch 8 stepped in
    # 9.5 ms against bf16's 6.5, its DOT tiles at 3-4x the one-row kernel's time (down 111.9 us against 29.5):
    # 128-512 programs of 4 warps, one or two warps a scheduler for the dequantizing arithmetic; untimed
    {"BLOCK_N": 32, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2, "DOT": True, "SPLIT_K": 4},
    {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3, "DOT": True, "SPLIT_K": 4},
    {"BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3, "DOT": True, "SPLIT_K": 4},
    {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3, "DOT": True, "SPLIT_K": 8},
    {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 2, "num_stages": 1},
    {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 2},
    {"ROWWISE": True},  # each row as the one-row product runs it (as _GEMV_ROWS's)
    {"library": True},
)

# Prefill W8A8 GEMM with its epilogue fused (codegen/int8_matmul): BLOCK_M x BLOCK_N output tiles,
# BLOCK_K int8 codes (bytes) a step, GROUP_M row tiles sharing weight tiles in L2. K-steps of 128
# bytes fill a 128-byte shared-memory swizzle row. Offline compiles for sm_90 (Triton 3.9, and 3.6 as on the
# GPU machine, pointers and sizes 16-divisible as the JIT specializes them): every Hopper tile below is an
# s8 wgmma loop with no spills (116-210 registers, 64-144 KiB of shared memory); on
# sm_80/89 (mma.sync) 128-row tiles of 4 warps, or of 8 warps 256 wide, spill 0.5 KiB a thread,
# so those lists leave them out. The library path (torch._int_mm, then the dequantize kernel) comes
# first: a shape nobody measured runs what ran before this kernel; a tile that does not fit the
# profile's shared memory is skipped (int8_matmul._fits).
_INT8_MM_HOPPER = _cfgs(
    {"library": True},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    # the largest tile above won every llama-3-8b prefill GEMM on an H100 (2026-12-06: 60% of the int8 peak on
    # gate|up, 27.2 ms a prefill against 22.5 ms for cuBLAS's FP8): deeper and taller ones (offline sm_90
    # compiles: wgmma, 188-217 registers, no spills, 120-192 KiB of shared memory)
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 5},
)
_INT8_MM_AMPERE = _cfgs(
    {"library": True},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
)
_INT8_MM_SMALL = _cfgs(
    {"library": True},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
)

TUNING_SPACE: dict[str, dict[str, list[dict]]] = {
    "h100": {
        "rms_norm": _NORM_FAST,
        "add_rms_norm": _NORM_FAST,
        "rotary": _ROTARY,
        "glu": _GLU,
        "attention": _ATTN_HOPPER,
        "decode_attention": _DECODE,
        "moe": _MOE_HOPPER,
        "moe_wq": _MOE_WQ_HOPPER,
        "gemv": _GEMV,
        "gemv_rows": _GEMV_ROWS,
        "gemv_wq": _GEMV_WQ_HOPPER,
        "gemv_wq_rows": _GEMV_WQ_ROWS,
        "int8_matmul": _INT8_MM_HOPPER,
    },
    "h200": {
        "rms_norm": _NORM_FAST,
        "add_rms_norm": _NORM_FAST,
        "rotary": _ROTARY,
        "glu": _GLU,
        "attention": _ATTN_HOPPER,
        "decode_attention": _DECODE,
        "moe": _MOE_HOPPER,
        "moe_wq": _MOE_WQ_HOPPER,
        "gemv": _GEMV,
        "gemv_rows": _GEMV_ROWS,
        "gemv_wq": _GEMV_WQ_HOPPER,
        "gemv_wq_rows": _GEMV_WQ_ROWS,
        "int8_matmul": _INT8_MM_HOPPER,
    },
    "a100": {
        "rms_norm": _NORM_FAST,
        "add_rms_norm": _NORM_FAST,
        "rotary": _ROTARY,
        "glu": _GLU,
        "attention": _ATTN_AMPERE,
        "decode_attention": _DECODE,
        "moe": _MOE_SMALL,
        "moe_wq": _MOE_WQ_SMALL,
        "gemv": _GEMV,
        "gemv_rows": _GEMV_ROWS,
        "gemv_wq": _GEMV_WQ,
        "gemv_wq_rows": _GEMV_WQ_ROWS,
        "int8_matmul": _INT8_MM_AMPERE,
    },
    "l4": {
        "rms_norm": _NORM_SMALL,
        "add_rms_norm": _NORM_SMALL,
        "rotary": _ROTARY,
        "glu": _GLU[1:] + _GLU[:1],
        "attention": _ATTN_SMALL,
        "decode_attention": _DECODE,
        "moe": _MOE_SMALL,
        "moe_wq": _MOE_WQ_SMALL,
        "gemv": _GEMV,
        "gemv_rows": _GEMV_ROWS,
        "gemv_wq": _GEMV_WQ,
        "gemv_wq_rows": _GEMV_WQ_ROWS,
        "int8_matmul": _INT8_MM_SMALL,
    },
    "default": {
        "rms_norm": _NORM_SMALL,
        "add_rms_norm": _NORM_SMALL,
        "rotary": _ROTARY,
        "glu": _GLU[1:] + _GLU[:1],
        "attention": _ATTN_SMALL,
        "decode_attention": _DECODE,
        "moe": _MOE_SMALL,
        "moe_wq": _MOE_WQ_SMALL,
        "gemv": _GEMV,
        "gemv_rows": _GEMV_ROWS,
        "gemv_wq": _GEMV_WQ,
        "gemv_wq_rows": _GEMV_WQ_ROWS,
        "int8_matmul": _INT8_MM_SMALL,
    },
}

PROFILES = tuple(TUNING_SPACE)


def hardware(profile_name: str) -> dict[str, int]:
    """Hardware facts of ``profile_name`` (unknown names fall back to ``"default"``)."""
    return dict(HARDWARE.get(profile_name, HARDWARE["default"]))


def candidates(kernel_name: str, profile_name: str = "default") -> list[dict]:
    """Candidate configs of ``kernel_name`` for ``profile_name`` (copies, safe to mutate).

    Unknown profiles fall back to ``"default"``; an unknown kernel is an error
    that lists the known ones.
    """
    space = TUNING_SPACE.get(profile_name, TUNING_SPACE["default"])
    if kernel_name not in space:
        raise KeyError(
            f"no tuning space for kernel {kernel_name!r} in profile {profile_name!r}; "
            f"known kernels: {sorted(space)}"
        )
    return [dict(c) for c in space[kernel_name]]


# ---------------------------------------------------------------------------
# Profile detection
# ---------------------------------------------------------------------------
_profile_memo: dict[Any, str] = {}
# The profile the CUDA backend runs its kernels for (set around its calls: `use_profile`).
_active_profile: contextvars.ContextVar[str | None] = contextvars.ContextVar("flashc_kernel_profile", default=None)


@contextlib.contextmanager
def use_profile(name: str):
    """Kernels launched inside pick their configs from the tuning tables of profile `name`
    (the CUDA backend hands its executable's profile down this way, instead of each kernel
    detecting the device again)."""
    token = _active_profile.set(name)
    try:
        yield
    finally:
        _active_profile.reset(token)


_row_invariant: contextvars.ContextVar[bool] = contextvars.ContextVar("flashc_row_invariant", default=False)


@contextlib.contextmanager
def row_invariant(on: bool = True):
    """Kernels launched inside compute every row of a multi-row call exactly as a one-row call of the
    same shape computes it: the one-row call's tuned config, one row a program (codegen/triton_gemv.py's
    ROWWISE; the norms' and decode attention's one-row configs and splits). A speculative verify step
    run so equals, bit for bit, the decode steps it stands for (flashc.generation, exact_verify)."""
    token = _row_invariant.set(bool(on))
    try:
        yield
    finally:
        _row_invariant.reset(token)


def row_invariant_active() -> bool:
    return _row_invariant.get()


def detect_profile(device: Any = None) -> str:
    """Name of the tuning profile for ``device`` (a torch device, index or None).

    Inside `use_profile(name)`, that name. Otherwise the device's built-in profile
    (flashc.profiles.profile_name_for_gpu: the one detection table); CPU tensors, no CUDA,
    or an unknown GPU give ``"default"``. Memoised per device (``get_device_name`` is slow-ish).
    """
    active = _active_profile.get()
    if active is not None:
        return active
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of flashc
        return "default"
    if device is not None and not isinstance(device, int):
        device = torch.device(device)
        if device.type != "cuda":
            return "default"
        device = device.index
    if not torch.cuda.is_available():
        return "default"
    if device is None:
        device = torch.cuda.current_device()
    if device in _profile_memo:
        return _profile_memo[device]
    from flashc.profiles import profile_name_for_gpu

    profile = profile_name_for_gpu(torch.cuda.get_device_name(device)) or "default"
    _profile_memo[device] = profile
    return profile


# ---------------------------------------------------------------------------
# Kernel source hashes
# ---------------------------------------------------------------------------
_SOURCE_HASHES: dict[str, str] = {}


def _source_text(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    # triton JITFunction / InterpretedFunction keep the Python function in .fn
    fn = getattr(obj, "fn", obj)
    src = getattr(obj, "src", None)
    if isinstance(src, str):
        return src
    return inspect.getsource(fn)


def kernel_source_hash(*sources: Any) -> str:
    """sha256 (hex) over the source text of ``sources`` (strings, functions or Triton kernels)."""
    h = hashlib.sha256()
    for s in sources:
        h.update(_source_text(s).encode())
        h.update(b"\0")
    return h.hexdigest()


def register_kernel_source(kernel_name: str, *sources: Any) -> str:
    """Record the source of ``kernel_name`` (every jit function it launches).

    Called by the kernel modules at import, so :func:`autotune` and
    :func:`get_config` can key the cache by the code that actually runs.
    Returns the hash.
    """
    digest = kernel_source_hash(*sources)
    _SOURCE_HASHES[kernel_name] = digest
    return digest


def _resolve_source_hash(kernel_name: str, kernel_source: Any) -> str:
    if kernel_source is not None:
        if isinstance(kernel_source, (list, tuple)):
            return kernel_source_hash(*kernel_source)
        return kernel_source_hash(kernel_source)
    if kernel_name in _SOURCE_HASHES:
        return _SOURCE_HASHES[kernel_name]
    raise KeyError(
        f"no kernel source known for {kernel_name!r}: pass kernel_source= to autotune "
        f"or call register_kernel_source({kernel_name!r}, kernel) first; "
        f"registered: {sorted(_SOURCE_HASHES)}"
    )


# ---------------------------------------------------------------------------
# Shape buckets and cache keys
# ---------------------------------------------------------------------------
def _bucket_int(v: int) -> int:
    if v <= 0:
        return v
    return 1 << (int(v) - 1).bit_length()


def shape_bucket(key: Mapping[str, Any]) -> str:
    """Canonical string of a shape key.

    Integers are rounded up to a power of two so that nearby shapes share a
    tuning result (sequence lengths vary at every call; tuning each exactly
    would never hit the cache).  Booleans, strings and other values are kept
    as they are.  Keys are sorted so the dict order does not matter.
    """
    parts = []
    for name in sorted(key):
        v = key[name]
        if isinstance(v, bool):
            s = "1" if v else "0"
        elif isinstance(v, int):
            s = str(_bucket_int(v))
        else:
            s = str(v)
        parts.append(f"{name}={s}")
    return ",".join(parts)


def cache_key(profile_name: str, kernel_name: str, key: Mapping[str, Any], source_hash: str) -> str:
    """The JSON cache key: ``profile|kernel|bucket|sha256``."""
    return f"{profile_name}|{kernel_name}|{shape_bucket(key)}|{source_hash}"


# ---------------------------------------------------------------------------
# On-disk cache
# ---------------------------------------------------------------------------
_lock = threading.Lock()
# path -> {"entries": {...}} ; loaded lazily, kept for the process lifetime.
_memory: dict[str, dict[str, dict]] = {}
# (path, profile, kernel, bucket, hash) -> (tuned config or None, candidates) for get_config.
_resolved: dict[tuple, dict] = {}


def cache_path() -> str:
    """``$FLASHC_CACHE/tuning.json`` (default ``~/.cache/flashc/tuning.json``)."""
    root = os.environ.get("FLASHC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flashc")
    return os.path.join(root, "tuning.json")


def clear_memory_cache() -> None:
    """Forget what was read from disk (the next lookup re-reads the file)."""
    with _lock:
        _memory.clear()
        _resolved.clear()


def _read_file(path: str, quiet: bool = False) -> dict[str, dict]:
    """Entries stored at ``path``; a missing file is empty, a corrupt one warns (unless ``quiet``) and is empty."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError) as e:
        if not quiet:
            warnings.warn(
                f"flashc tuning cache {path} is unreadable ({e}); ignoring it and re-tuning", RuntimeWarning, stacklevel=3
            )
        return {}
    if not isinstance(raw, dict) or not isinstance(raw.get("entries"), dict):
        if not quiet:
            warnings.warn(
                f"flashc tuning cache {path} has an unexpected layout (expected an object with 'entries'); "
                "ignoring it and re-tuning",
                RuntimeWarning,
                stacklevel=3,
            )
        return {}
    entries = {}
    for k, v in raw["entries"].items():
        if isinstance(v, dict) and isinstance(v.get("config"), dict):
            entries[k] = v
    return entries


def _entries(path: str) -> dict[str, dict]:
    if path not in _memory:
        _memory[path] = _read_file(path)
    return _memory[path]


def _write_file(path: str, entries: Mapping[str, dict]) -> None:
    """Write atomically: a temp file in the same folder, then ``os.replace``."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tuning.", suffix=".json.tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": CACHE_VERSION, "entries": dict(entries)}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _store(path: str, new_entries: Mapping[str, dict]) -> None:
    with _lock:
        # Merge with what is on disk now, so concurrent tuners don't erase each other.
        on_disk = _read_file(path, quiet=True)
        merged = {**_entries(path), **on_disk, **new_entries}
        _write_file(path, merged)
        _memory[path] = merged
        _resolved.clear()


# ---------------------------------------------------------------------------
# Benchmarking
# ---------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _can_time_on_gpu() -> bool:
    if _interpreting():
        return False
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available()


def cuda_graph_bench(fn: Callable[[], Any], calls: int = 24, reps: int = 7) -> float:
    """Median milliseconds per call of ``fn`` replayed from a CUDA graph of ``calls`` calls.

    How kernels of a captured decode step run: back to back, with no Python launch
    overhead between them (which ``do_bench`` would count for a candidate that is
    several launches, such as an unfused library path).
    """
    import torch

    from .cuda_graphs import capture

    fn()  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # the graph owns its cuBLAS workspace: a later graph must not inherit one from this
    # throwaway graph's pool (codegen/cuda_graphs.py says why)
    with capture(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return sorted(times)[len(times) // 2]


def graph_bench_for(t: Any) -> Callable[[Callable[[], Any]], float] | None:
    """`cuda_graph_bench` for kernels on CUDA tensor ``t``; None (autotune's default) otherwise.

    For the kernels of a decode step, which run from a CUDA graph: ``do_bench`` would
    time a multi-launch candidate with its Python launch overhead.
    """
    return cuda_graph_bench if getattr(t, "is_cuda", False) and not _interpreting() else None


def _default_bench(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of flashc

        class _Null:
            def update(self, n=1):
                pass

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass

        return _Null()
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


# ---------------------------------------------------------------------------
# Compiling candidates side by side
# ---------------------------------------------------------------------------
def compile_workers() -> int:
    """Threads that compile a kernel's candidates before they are timed (``FLASHC_COMPILE_WORKERS``, default
    ``min(16, cores)``; 0 or 1 compiles each candidate when it is first timed, one after another)."""
    raw = os.environ.get("FLASHC_COMPILE_WORKERS", "").strip()
    if raw:
        try:
            return max(0, int(raw))
        except ValueError:
            raise ValueError(f"FLASHC_COMPILE_WORKERS must be an integer, got {raw!r}") from None
    return min(16, os.cpu_count() or 1)


def _record_compiles(cands: list[dict], run_fn: Callable[[dict], Any]) -> list[tuple[Any, str]]:
    """The Triton compiles running each candidate would start, without compiling or launching them.

    Triton asks ``knobs.runtime.jit_cache_hook`` before every compile of a kernel it has not
    compiled yet; a hook that answers True makes the launch return without compiling or running
    it. Each candidate's ``run_fn`` is called under such a hook (for this thread only; other
    threads keep the hook that was there), and the hook keeps what ``JITFunction.preload`` needs to
    compile the same specialization later. Work ``run_fn`` does besides Triton launches (allocating
    outputs, library calls) runs as usual; what a skipped kernel would have written is never read
    by anything but the rest of this throwaway call.
    """
    try:
        from triton import knobs
    except ImportError:  # pragma: no cover - older Triton: compile while timing
        return []
    runtime = knobs.runtime
    previous = runtime.jit_cache_hook
    me = threading.get_ident()
    seen: dict[Any, tuple[Any, str]] = {}

    def hook(*args, **kwargs):
        if threading.get_ident() != me:
            return previous(*args, **kwargs) if previous else None
        compile_args = kwargs.get("compile") or {}
        data = compile_args.get("specialization_data")
        fn = getattr(kwargs.get("fn"), "jit_function", None)
        if data is None or fn is None:
            return previous(*args, **kwargs) if previous else None
        seen.setdefault((id(fn), data), (fn, data))
        return True

    runtime.jit_cache_hook = hook
    try:
        for cfg in cands:
            try:
                run_fn(dict(cfg))
            except Exception:  # the timing pass reports a candidate that fails
                pass
    finally:
        runtime.jit_cache_hook = previous
    return list(seen.values())


def _precompile(cands: list[dict], run_fn: Callable[[dict], Any], workers: int) -> int:
    """Compile the Triton kernels of every candidate on ``workers`` threads; how many were compiled.

    Timing then finds each kernel in Triton's cache. A compile that fails here is left for the
    timing pass, which records the candidate's error as it always has.
    """
    specs = _record_compiles(cands, run_fn)
    if len(specs) < 2:
        return 0
    from concurrent.futures import ThreadPoolExecutor

    import torch

    device = torch.cuda.current_device() if torch.cuda.is_available() else None

    def compile_one(spec) -> bool:
        fn, data = spec
        try:  # a thread starts on device 0: compile for the device the candidates ran on
            with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
                fn.preload(data)
            return True
        except Exception:
            return False

    with ThreadPoolExecutor(max_workers=min(workers, len(specs)), thread_name_prefix="flashc-compile") as pool:
        return sum(pool.map(compile_one, specs))


def autotune(
    kernel_name: str,
    key: Mapping[str, Any],
    candidates: Iterable[Mapping[str, Any]],
    run_fn: Callable[[dict], Any],
    profile_name: str = "default",
    *,
    kernel_source: Any = None,
    bench_fn: Callable[[Callable[[], Any]], float] | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Pick the fastest of ``candidates`` for ``kernel_name`` at shape ``key``.

    ``run_fn(config)`` must launch the kernel once with ``config``.  Each
    candidate is timed with ``bench_fn(lambda: run_fn(config))`` (default:
    ``triton.testing.do_bench``, median of repeated runs).  A candidate that
    raises (e.g. Triton's out-of-resources error) is skipped.  The winner is
    stored in ``$FLASHC_CACHE/tuning.json`` under
    ``(profile_name, kernel_name, shape_bucket(key), sha256(kernel source))``
    and returned by later calls without running anything (unless ``force``).

    ``kernel_source`` is the kernel's source (string, function, Triton kernel or
    a list of them); by default the source registered by the kernel module.

    Without CUDA or under ``TRITON_INTERPRET=1`` and with no ``bench_fn``,
    timing would be meaningless: the first candidate is returned and nothing is
    written.
    """
    cands = [dict(c) for c in candidates]
    if not cands:
        raise ValueError(f"autotune({kernel_name!r}): no candidate configs given")
    if bench_fn is None:
        if not _can_time_on_gpu():
            return dict(cands[0])
        bench_fn = _default_bench

    source_hash = _resolve_source_hash(kernel_name, kernel_source)
    ckey = cache_key(profile_name, kernel_name, key, source_hash)
    path = cache_path()
    if not force:
        with _lock:
            hit = _entries(path).get(ckey)
        if hit is not None:
            return dict(hit["config"])

    workers = compile_workers()
    if workers > 1 and len(cands) > 1 and _can_time_on_gpu():
        _precompile(cands, run_fn, workers)

    timings: list[tuple[float, dict]] = []
    errors: list[str] = []
    bar = _progress(len(cands), f"flashc tune {kernel_name}", progress)
    try:
        for cfg in cands:
            try:
                ms = float(bench_fn(lambda cfg=cfg: run_fn(dict(cfg))))
                if not math.isfinite(ms):
                    raise RuntimeError(f"non-finite time {ms}")
            except Exception as e:  # a config that does not compile/fit is just not a winner
                errors.append(f"{cfg}: {type(e).__name__}: {e}")
                ms = math.inf
            timings.append((ms, cfg))
            bar.update(1)
            best = min(timings, key=lambda t: t[0])
            if math.isfinite(best[0]):
                bar.set_postfix_str(f"best {best[0]:.4f} ms")
    finally:
        bar.close()

    best_ms, best_cfg = min(timings, key=lambda t: t[0])
    if not math.isfinite(best_ms):
        raise RuntimeError(
            f"autotune({kernel_name!r}, {dict(key)}): every candidate failed:\n  " + "\n  ".join(errors)
        )
    generated = [(t, c) for t, c in timings if not c.get("library")]
    if generated and not any(math.isfinite(t) for t, _ in generated):
        # the unfused library path still runs (correct, slower): say why the kernel could not
        warnings.warn(f"flashc: every generated {kernel_name} kernel failed for {dict(key)}; the unfused "
                      f"library path runs instead (slower). First error: {errors[0][:600]}", stacklevel=2)
    _store(
        path,
        {
            ckey: {
                "config": best_cfg,
                "ms": best_ms,
                "timings": [{"config": c, "ms": (t if math.isfinite(t) else None)} for t, c in timings],
            }
        },
    )
    return dict(best_cfg)


def cached_config(kernel_name: str, key: Mapping[str, Any], profile_name: str = "default") -> dict | None:
    """The tuned config of ``kernel_name`` at ``key`` if the cache has one, else None."""
    source_hash = _SOURCE_HASHES.get(kernel_name, "")
    if not source_hash:
        return None
    with _lock:
        hit = _entries(cache_path()).get(cache_key(profile_name, kernel_name, key, source_hash))
    return dict(hit["config"]) if hit is not None else None


def get_config(
    kernel_name: str,
    key: Mapping[str, Any],
    profile_name: str = "default",
    fits: Callable[[dict], bool] | None = None,
) -> dict:
    """Config a launcher should use: the tuned one if cached, else the first candidate that ``fits``.

    Never times anything.  The cache lookup is memoised in-process (``fits`` is
    applied on every call); :func:`autotune` and :func:`import_tuning` clear the memo.
    """
    memo_key = (cache_path(), profile_name, kernel_name, shape_bucket(key), _SOURCE_HASHES.get(kernel_name, ""))
    with _lock:
        memo = _resolved.get(memo_key)
    if memo is None:
        memo = (cached_config(kernel_name, key, profile_name), candidates(kernel_name, profile_name))
        with _lock:
            _resolved[memo_key] = memo
    tuned, cands = memo
    if tuned is not None and (fits is None or fits(dict(tuned))):
        return dict(tuned)
    for c in cands:
        if fits is None or fits(dict(c)):
            return dict(c)
    return dict(cands[0])


def export_tuning() -> dict:
    """All tuning results of this machine's cache, as a JSON-serialisable dict."""
    path = cache_path()
    with _lock:
        entries = json.loads(json.dumps(_entries(path)))
    return {"version": CACHE_VERSION, "entries": entries}


def import_tuning(data: Mapping[str, Any], *, overwrite: bool = True) -> int:
    """Merge results exported by :func:`export_tuning` into the cache; returns how many were taken.

    With ``overwrite=False`` entries already present locally are kept.
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("entries"), Mapping):
        raise ValueError(
            "import_tuning expects the dict made by export_tuning(): {'version': int, 'entries': {...}}, "
            f"got {type(data).__name__} with keys {sorted(data) if isinstance(data, Mapping) else '-'}"
        )
    if data.get("version", CACHE_VERSION) != CACHE_VERSION:
        raise ValueError(f"tuning data version {data.get('version')!r} != supported {CACHE_VERSION}")
    path = cache_path()
    with _lock:
        existing = _entries(path)
    taken = {}
    for k, v in data["entries"].items():
        if not (isinstance(v, Mapping) and isinstance(v.get("config"), Mapping)):
            raise ValueError(f"tuning entry {k!r} has no 'config' dict: {v!r}")
        if overwrite or k not in existing:
            taken[k] = json.loads(json.dumps(v))
    if taken:
        _store(path, taken)
    return len(taken)
