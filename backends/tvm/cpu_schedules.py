"""Default schedules for CPU (llvm) builds: what dlight's GPU rules do for CUDA, for the
kernels flashc's Relax modules fuse into (matmuls with their epilogues, row reductions,
elementwise and layout kernels). Imported by build.py when it builds; needs TVM's compiler.

TVM's CPU pipeline schedules nothing: every fused function runs as the serial loop nest
that legalization wrote, reduction innermost and striding across the weight (a
128x128x512 matmul ran at 0.9 GFLOP/s on the 2-core development machine; llama-tiny
prefill took 79 ms against 2.2 ms in eager PyTorch). These rules take milliseconds at
build time and measure nothing:

- MatmulTiles: a register-blocked GEMM. Each task of one parallel loop owns an mr x nr
  tile of C in vector registers (nr = 2 SIMD vectors, mr rows: 2 * mr accumulators) and
  walks K once; per k it loads nr weights and broadcasts each of the mr activations
  into 2 FMAs. Weights are read in the [K, N] layout flashc stores them in, so every
  load is a contiguous row. The fused epilogue (bias, residual, scale, activation) runs
  on the tile as it is written back.
- RowReductions: softmax and RMS-norm rows in parallel, each reduction over a vector of
  partial results (rfactor), elementwise steps vectorized.
- Elementwise: outer loops in parallel and the innermost loop vectorized, for every
  other spatial kernel (rotary, SwiGLU, transposes, gathers, casts).
- polynomial_exp: fp32 exp (and sigmoid, which lowers to it) as arithmetic that LLVM
  vectorizes. LLVM turns a vector exp into one libm expf call per lane: softmax and
  SiLU were 13% and 4% of SmolLM2's 512-token prefill.

A rule that cannot schedule a function returns None and the function keeps its serial
loops, so a schedule is never required for a build to succeed. Functions already
scheduled (from a MetaSchedule database) are skipped by ApplyDefaultSchedule.
"""

from __future__ import annotations

import tvm_ffi
from tvm import DataType, s_tir, tirx
from tvm.ir import Op
from tvm.ir.expr import Call, TensorLoad
from tvm.s_tir.dlight.analysis import get_root_block, normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width
from tvm.tirx import Div, FloorDiv, FloorMod, Mod
from tvm.tirx.analysis import undefined_vars

# Rows of a matmul tile, by SIMD register count: 8 rows x 2 vectors = 16 accumulators of
# AVX-512's 32 registers; 4 x 2 = 8 of AVX2's 16. On the development machine (znver4,
# 2 threads) the 8 x 32 fp32 tile ran a 128x576x1536 matmul in 1.04 ms (223 GFLOP/s;
# eager PyTorch 1.59 ms); 4 x 64, 6 x 64 and 12 x 32 tiles were slower.
TILE_ROWS = {32: 8, 16: 4}
# Rows of A kept in L2 while the weight panels stream past: mc * K floats at most this
# many (512 KiB, half of a Zen 4 or Sapphire Rapids core's L2).
L2_BLOCK_ELEMENTS = 128 * 1024
# Kernels with less work than this (elements, or multiply-adds for a matmul) run on one
# thread: waking the thread pool costs more than they take.
MIN_PARALLEL_WORK = 32 * 1024


# exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] with ln 2
# split in two (Cody-Waite) so r is exact, exp(r) by Cephes' expf polynomial
# (1 + r + r^2 * P(r)). Measured against float64 over [-100, 100]: at most 1.01 ulp for
# normal results (libm's expf: 0.5 ulp), 4.3x faster than the libm loop on 4M floats.
_LOG2E = 1.44269504088896341
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
             5.0000001201e-1)
_EXP_MAX = 88.72283935546875  # above: +inf
_EXP_MIN = -103.97207708  # below: 0 (exp underflows float32 there)


def schedule_rules() -> list:
    """The CPU rules in the order ApplyDefaultSchedule tries them on each function."""
    return [MatmulTiles(), RowReductions(), Elementwise()]


def polynomial_exp():
    """A pass rewriting fp32 exp and sigmoid in every PrimFunc to vectorizable arithmetic."""

    def rewrite(call):
        if not (isinstance(call.op, Op) and str(call.ty) == "float32"):
            return call
        if call.op.name == "tirx.exp":
            return exp_f32(call.args[0])
        if call.op.name == "tirx.sigmoid":
            one = tirx.const(1.0, "float32")
            return one / (one + exp_f32(-call.args[0]))
        return call

    @tirx.transform.prim_func_pass(opt_level=0, name="flashc.PolynomialExp")
    def polynomial_exp_pass(func, _mod, _ctx):
        return tvm_ffi.structural_map(func, [(Call, rewrite)], order="post")

    return polynomial_exp_pass


def exp_f32(x):
    """exp(x) for a float32 TIR expression, as arithmetic (see _EXP_POLY); inf, -inf and NaN
    map as in libm, results below float32's normal range flush to 0 under x = -103.97."""
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    i32 = lambda v: tirx.const(v, "int32")  # noqa: E731
    clamped = tirx.max(tirx.min(x, f32(_EXP_MAX)), f32(_EXP_MIN))
    n = tirx.floor(clamped * f32(_LOG2E) + f32(0.5))
    r = clamped - n * f32(_LN2_HI) - n * f32(_LN2_LO)
    poly = f32(_EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        poly = poly * r + f32(c)
    exp_r = poly * (r * r) + r + f32(1.0)
    # 2^n as two powers of two, each a valid float32 exponent for n in [-150, 128]
    ni = tirx.Cast("int32", n)
    half = tirx.shift_right(ni, i32(1))

    def pow2(e):
        return tirx.reinterpret("float32", tirx.shift_left(e + i32(127), i32(23)))

    out = exp_r * pow2(half) * pow2(ni - half)
    out = tirx.Select(x < f32(_EXP_MIN), f32(0.0), out)
    out = tirx.Select(x > f32(_EXP_MAX), f32(float("inf")), out)
    return tirx.Select(tirx.isnan(x), x, out)


def _schedulable(func, rule: CPUScheduleRule, target: Target) -> bool:
    """Whether a rule may try func. Not when inlining could put a constant zero under a
    division: TVM then fails to fold `c / 0` while it prints the schedule's next error
    message, inside C++, and the process aborts (seen with `1 / (x * 0.0)`)."""
    return isinstance(func, tirx.PrimFunc) and rule.is_target_available(target) and not _divides_by_zero(func)


def _divides_by_zero(func) -> bool:
    """Whether a division or modulo in func has a constant zero divisor or reads a buffer
    that every store fills with the constant zero."""
    stores: list[tuple] = []
    divisors: list = []

    def store(s):
        stores.append((s.buffer, s.value))
        return s

    def divide(d):
        divisors.append(d.b)
        return d

    rules = [(tirx.BufferStore, store)] + [(kind, divide) for kind in (Div, FloorDiv, FloorMod, Mod)]
    tvm_ffi.structural_map(func, rules, order="post")

    def zero(value) -> bool:
        return isinstance(value, (tirx.IntImm, tirx.FloatImm)) and value.value == 0

    def zero_buffer(buffer) -> bool:
        values = [v for b, v in stores if b.same_as(buffer)]
        return bool(values) and all(zero(v) for v in values)

    return any(zero(d) or (isinstance(d, TensorLoad) and zero_buffer(d.source)) for d in divisors)


class MatmulTiles(CPUScheduleRule):
    """Register-tiled, vectorized, parallel schedule for a function with one matmul-like
    reduction block C[s, i, j] += A[s, i, k] * B[s, k, j] and injective blocks around it."""

    def apply(self, func, target: Target, _tunable: bool):
        if not _schedulable(func, self, target):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if blocks is None:
            return None
        reductions = [b for b in blocks if not b.is_injective()]
        if len(reductions) != 1 or any(k not in "SR" for b in blocks for k in b.dom_kind()):
            return None
        main = reductions[0]
        kinds = matmul_axes(sch.get(main.block_rv))
        if kinds is None or any(e is None for e in _extents(main)):
            return None
        try:
            self._schedule(sch, main, kinds, target)
        except s_tir.ScheduleError:
            return None
        return sch

    def _schedule(self, sch, main, kinds: list[str], target: Target) -> None:
        block = main.block_rv
        _inline_intermediates(sch, keep=block)
        groups: dict[str, list] = {kind: [] for kind in "TSIJK"}
        extents: dict[str, list[int]] = {kind: [] for kind in "TSIJK"}
        for it, kind, extent in zip(main.iters, kinds, _extents(main)):
            groups[kind].append(it.loop_rv)
            extents[kind].append(extent)
        size = {kind: _product(extents[kind]) for kind in "TSIJK"}
        sch.reorder(*groups["T"], *groups["S"], *groups["I"], *groups["J"], *groups["K"])
        batch = groups["T"] + groups["S"]
        i, j, k = (sch.fuse(*groups[kind]) if groups[kind] else None for kind in "IJK")

        lanes = _vector_lanes(target, _dtype_bits(sch.get(block).writes[0].source.dtype))
        nr = _tile(size["J"], 2 * lanes)
        jo, ji = sch.split(j, [None, nr])
        if i is not None:
            preferred = TILE_ROWS[_registers(target)]
            mr = _tile(size["I"], preferred) if len(extents["I"]) == 1 else _box_tile(extents["I"], preferred)
            io, ii = sch.split(i, [None, mr])
            tiles = _extent(sch, io)
            tiles_in_l2 = max(1, L2_BLOCK_ELEMENTS // size["K"] // mr)
            io_l2, io_tile = sch.split(io, [None, _largest_divisor(tiles, tiles_in_l2)])
            # the weight's column panels (jo) stream past an L2-resident block of rows of A (io_l2)
            sch.reorder(*batch, io_l2, jo, io_tile, k, ii, ji)
            outer = sch.fuse(*batch, io_l2, jo, io_tile)
        else:  # one row (decode): a GEMV over the [K, N] weight
            ii = None
            sch.reorder(*batch, jo, k, ji)
            outer = sch.fuse(*batch, jo) if batch else jo

        acc = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(acc, outer, preserve_unit_loops=True)
        _inline_into_producer(sch, acc)

        if _product(size.values()) >= MIN_PARALLEL_WORK:
            sch.parallel(outer)
        if ii is not None:
            sch.unroll(ii)
        sch.vectorize(ji)
        init = sch.decompose_reduction(block, k)
        for stage in (init, acc):
            loops = sch.get_loops(stage)
            sch.vectorize(loops[-1])
            if ii is not None and len(loops) >= 2:
                sch.unroll(loops[-2])
        for rest in _root_blocks(sch):  # epilogue blocks that could not be inlined
            if not any(_same(sch, rest, b) for b in (block, acc, init)):
                parallel_vectorize(sch, rest, target)


def matmul_axes(block) -> list[str] | None:
    """Per block iterator, its role in C[s, i, j] += A[s, i, k] * B[s, k, j]: 'T' (extent 1),
    'S' (batch: in A, B and C), 'I' (A and C), 'J' (B and C), 'K' (reduced, in A and B); None
    when the block is not such a matmul (needs j and k; i may be absent, as in a GEMV)."""
    if len(block.reads) != 2 or len(block.writes) != 1:
        return None
    try:
        a, b, c = (_indexing_vars(r.region) for r in (*block.reads, block.writes[0]))
    except ValueError:
        return None
    kinds = []
    for iv in block.iter_vars:
        v = iv.var
        if isinstance(iv.dom.extent, tirx.IntImm) and iv.dom.extent.value == 1:
            kinds.append("T")
        elif iv.iter_type == tirx.IterVar.DataPar:
            where = (v in a, v in b, v in c)
            kind = {(True, True, True): "S", (True, False, True): "I", (False, True, True): "J"}.get(where)
            if kind is None:
                return None
            kinds.append(kind)
        elif iv.iter_type == tirx.IterVar.CommReduce and v in a and v in b and v not in c:
            kinds.append("K")
        else:
            return None
    return kinds if "J" in kinds and "K" in kinds else None


def _indexing_vars(region) -> set:
    """The variables indexing a buffer access of single elements, each index one variable or
    a constant (ValueError otherwise: a convolution's x[y + ry] is no matmul operand, and
    tiling it as one left loops of unknown extent to unroll, which TVM refused to build)."""
    found: set = set()
    for r in region:
        if not (isinstance(r.extent, tirx.IntImm) and r.extent.value == 1):
            raise ValueError("not an elementwise access")
        names = undefined_vars(r.min)
        if len(names) > 1 or (names and not isinstance(r.min, tirx.Var)):
            raise ValueError("an index that is not one variable")
        found |= set(names)
    return found


class RowReductions(CPUScheduleRule):
    """Reductions along rows with the elementwise blocks around them (softmax, RMS norm):
    rows in parallel, every block computed row by row, each reduction over a vector of
    lanes partial results (rfactor; the lanes are then reduced once) and the elementwise
    blocks vectorized. dlight's cpu.Reduction reduces one element at a time, a chain of
    dependent maxes or adds: a [3, 1536, 512] softmax took 2.4 ms there, 1.2 ms here."""

    def apply(self, func, target: Target, _tunable: bool):
        if not _schedulable(func, self, target):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if blocks is None or len(blocks) < 2 or not blocks[-1].is_injective():
            return None
        kinds = [b.dom_kind() for b in blocks]
        if all(b.is_injective() for b in blocks) or any(not k or k[0] != "S" or "O" in k for k in kinds):
            return None
        if any(e is None for b in blocks for e in _extents(b)):
            return None
        rows_rank = min(len(k) - len(k.lstrip("S")) for k in kinds)  # leading spatial axes all share
        rows = {_product(_extents(b)[:rows_rank]) for b in blocks}
        if len(rows) != 1:  # normalization dropped unit axes unevenly: no common row loop
            return None
        try:
            self._schedule(sch, blocks, rows_rank, target)
        except s_tir.ScheduleError:
            return None
        return sch

    def _schedule(self, sch, blocks, rows_rank: int, target: Target) -> None:
        last = blocks[-1].block_rv
        lanes = _vector_lanes(target, _dtype_bits(sch.get(last).writes[0].source.dtype))
        factored = []
        for b in blocks:
            extent = _extents(b)[-1]
            if b.dom_kind().endswith("SR") and b.dom_kind().count("R") == 1 and extent % lanes == 0 and extent > lanes:
                _, lane = sch.split(b.iters[-1].loop_rv, [None, lanes])
                rank = len(sch.get(b.block_rv).writes[0].source.shape)
                factored.append(sch.rfactor(lane, factor_axis=rank))  # lanes innermost: contiguous
        order = _root_blocks(sch)  # program order, the rfactor blocks included
        loops = sch.get_loops(last)
        rows = sch.fuse(*loops[:rows_rank]) if rows_rank > 1 else loops[0]
        if _product(_extents(blocks[-1])) >= MIN_PARALLEL_WORK:
            sch.parallel(rows)
        for block in reversed(order[:-1]):
            sch.compute_at(block, rows, preserve_unit_loops=True)
        for block in order:
            if any(_same(sch, block, f) for f in factored):
                # compute_at orders the loops as the rfactor block's iterators: lanes first, the
                # row's units, the reduction last; reduce over the row with a vector of lanes
                lane, *_, reduce = sch.get_loops(block)[1:]
                sch.reorder(reduce, lane)
                sch.vectorize(lane)
                init = sch.decompose_reduction(block, reduce)
                sch.vectorize(sch.get_loops(init)[-1])
            elif _is_spatial(sch, block) and len(sch.get_loops(block)) > 1:
                # only loops inside the row: vectorizing the row loop itself (a block whose
                # output has one value per row, as x.mean(-1)) would vectorize the loops
                # of every block computed at it, reductions included, and gave every row
                # the last row's result
                _vectorize_innermost(sch, block, lanes)


class Elementwise(CPUScheduleRule):
    """Spatial-only functions: producers inlined, then each remaining block with its outer
    loops fused and parallel and its innermost loop vectorized."""

    def apply(self, func, target: Target, _tunable: bool):
        if not _schedulable(func, self, target):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if blocks is None or not all(b.is_injective() for b in blocks):
            return None
        try:
            _inline_intermediates(sch)
            for block in _root_blocks(sch):
                parallel_vectorize(sch, block, target)
        except s_tir.ScheduleError:
            return None
        return sch


def parallel_vectorize(sch, block, target: Target) -> None:
    """Vectorize the innermost spatial loop of a block (see _vectorize_innermost) and run the
    fused loops outside it in parallel when the block has enough elements."""
    loops = sch.get_loops(block)
    stmt = sch.get(block)
    if not loops or not stmt.writes or not _is_spatial(sch, block) or any(_extent(sch, lp) is None for lp in loops):
        return
    total = _product(_extent(sch, loop) for loop in loops)
    outer = _vectorize_innermost(sch, block, _vector_lanes(target, _dtype_bits(stmt.writes[0].source.dtype)))
    if outer and total >= MIN_PARALLEL_WORK:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def _vectorize_innermost(sch, block, lanes: int) -> list:
    """Vectorize the innermost loop of a spatial block by lanes (split when it is a multiple
    of lanes, whole when it is at most lanes long); returns the loops left outside."""
    loops = sch.get_loops(block)
    inner, outer = loops[-1], list(loops[:-1])
    extent = _extent(sch, inner)
    if extent is not None and extent % lanes == 0 and extent > lanes:
        rest, vector = sch.split(inner, [None, lanes])
        sch.vectorize(vector)
        return outer + [rest]
    if extent is not None and 2 <= extent <= lanes:
        sch.vectorize(inner)
        return outer
    return outer + [inner]


def _inline_intermediates(sch, keep=None) -> None:
    """compute_inline every spatial block (but keep) whose result only feeds other blocks,
    so a chain of elementwise ops becomes one block reading the original inputs."""
    progress = True
    while progress:
        progress = False
        for block in _root_blocks(sch):
            if (keep is not None and _same(sch, block, keep)) or not _is_spatial(sch, block):
                continue
            try:
                sch.compute_inline(block)
                progress = True
            except s_tir.ScheduleError:  # an output block, or not inlinable
                continue


def _inline_into_producer(sch, block) -> None:
    """reverse_compute_inline the chain of sole consumers of block into it (a matmul's
    epilogue into its write-back). Only a consumer whose one producer is block and that
    is block's one consumer: TVM also accepts a consumer whose producer feeds another
    block and then leaves that block reading a buffer nobody writes."""
    while _writes_intermediate(sch, block):
        consumers = sch.get_consumers(block)
        if len(consumers) != 1 or len(sch.get_producers(consumers[0])) != 1:
            return
        try:
            sch.reverse_compute_inline(consumers[0])
        except s_tir.ScheduleError:
            return


def _writes_intermediate(sch, block) -> bool:
    """Whether block writes only buffers allocated inside the function (not its outputs)."""
    allocated = sch.get(get_root_block(sch)).alloc_buffers
    return all(any(w.source.same_as(b) for b in allocated) for w in sch.get(block).writes)


def _is_spatial(sch, block) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def _root_blocks(sch) -> list:
    return list(sch.get_child_blocks(get_root_block(sch)))


def _same(sch, a, b) -> bool:
    return sch.get(a).same_as(sch.get(b))


def _extents(block_info) -> list[int | None]:
    """Static extents of a block's iterators (normalize_prim_func gives ints), None if symbolic."""
    return [d if isinstance(d, int) else int(d.value) if isinstance(d, tirx.IntImm) else None
            for d in block_info.dom()]


def _extent(sch, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent.value) if isinstance(extent, tirx.IntImm) else None


def _dtype_bits(dtype) -> int:
    return DataType(str(dtype)).bits


def _vector_lanes(target: Target, dtype_bits: int) -> int:
    bits = llvm_get_vector_width(target)
    return max(2, (bits if bits > 0 else 128) // dtype_bits)


def _registers(target: Target) -> int:
    """SIMD registers: 32 with AVX-512 or on AArch64, else 16 (SSE, AVX2)."""
    wide = llvm_get_vector_width(target) >= 512 or "aarch64" in str(target.attrs.get("mtriple", ""))
    return 32 if wide else 16


def _product(values) -> int:
    result = 1
    for v in values:
        result *= v
    return result


def _largest_divisor(n: int, at_most: int) -> int:
    return next(d for d in range(min(n, at_most), 0, -1) if n % d == 0)


def _box_tile(extents: list[int], preferred: int) -> int:
    """A tile of several fused axes (extents outer to inner) that is a box of the unfused ones:
    whole runs of the inner axes times a divisor of the next, at most preferred. A tile that
    straddled an inner row would have its accumulator written back over the whole rows it
    touches, values it never computed among them (TVM compacts the local buffer to the tile):
    a Linear on a [5, 9, 24] input came out wrong."""
    tile = 1
    for extent in reversed(extents):
        if tile * extent > preferred:
            return tile * _largest_divisor(extent, preferred // tile)
        tile *= extent
    return tile


def _tile(n: int, preferred: int) -> int:
    """A tile for an axis of n: all of it when n <= preferred; else the largest divisor of n
    that is at least half of preferred; else preferred (the last tile then has a predicate)."""
    if n <= preferred:
        return n
    divisor = _largest_divisor(n, preferred)
    return divisor if 2 * divisor >= preferred else preferred
