"""The CUDA backend: Triton kernels for flashc's fused ops, cuBLAS/PyTorch for the
rest, and the whole forward replayed as one CUDA graph.

The backend's late passes (`cuda_rewrites`, run by the PassManager) turn decode-sized
matmuls (a few rows) into `flashc.gemv` ops that also do the RMSNorm before them, the
activation and the residual add after them, and a decode step's rotary + cache writes
into one `flashc.rotary_kv_write`; larger matmuls stay on cuBLAS through torch, except those
with 2:4-pruned weights (`cuda_semi_structured`: `flashc.linear_24`, on the sparse tensor cores
where tuning measured them faster). Lowering
copies that graph, moves weights to the GPU and points each flashc op of the `KERNELS`
table at its generated kernel (flashc.codegen). The first call autotunes each generated kernel on the shapes it meets,
the GEMVs against the unfused cuBLAS path (results cached on disk and saved in the
artifact), then, with static input shapes, captures the
forward into a CUDA graph, so a call costs one graph launch instead of a hundred-odd
kernel launches. Inputs the graph writes in place (a decode step's KV cache) stay
resident: the graph works on the caller's tensors directly.

Ahead-of-time use: on a machine without a GPU, `lower` records what would be lowered
and the artifact saves normally; running it there raises a clear error, and `flashc.load`
on a GPU machine lowers it then.
"""

from __future__ import annotations

import copy
import importlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx

from flashc.errors import ArtifactError, FlashcError, InputError
from flashc.aliasing import written_placeholders
from flashc.ir import Program, op_name
from flashc.lowering import LoweringTable
from flashc.profiles import PROFILES, HardwareProfile, detect

INSTALL_TRITON = "pip install triton (CUDA builds of torch ship it)"


@dataclass(frozen=True)
class Kernel:
    """How the CUDA backend runs one flashc op: a launcher taking the op's arguments, and an
    autotuner taking the same arguments (None: nothing to tune), results cached on disk by
    codegen.tuning. Both import their Triton module on first use."""

    launch: Callable
    tune: Callable | None = None


def _codegen(name: str):
    try:
        return importlib.import_module(f"flashc.codegen.{name}")
    except ImportError as e:
        raise FlashcError(f"the CUDA backend needs Triton ({e}); install it: {INSTALL_TRITON}") from None


def _attention(q, k, v, mask, is_causal, scale):
    if mask is not None:  # the generated kernel handles causal/none; other masks use the reference
        return torch.ops.flashc.attention.default(q, k, v, mask, is_causal, scale)
    return _codegen("triton_attention").attention(q, k, v, is_causal, scale)


def _tune_attention(q, k, v, mask, is_causal, scale):
    if mask is None:
        _codegen("triton_attention").tune_attention(q, k, v, is_causal, scale)


def _chunk_fits(q, k_cache, v_cache, cache_position) -> bool:
    """Whether several new queries run the prefill kernel with per-query key bounds (a prompt
    chunk, a verify step); else the reference, which computes the same numbers."""
    return (q.shape[-1] == k_cache.shape[-1] == v_cache.shape[-1] and cache_position.dim() in (1, 2)
            and cache_position.shape[-1] == q.shape[2])


# A verify step's few queries (k drafts + 1) at batch 1 run the split-KV decode kernel, each query a
# sequence of its own over the same cache (stride-0 views, no copies): on an H100 (2026-12-06, smollm2-135m
# shapes) the prefill kernel took 8.9 us a layer for 6 queries (one program a head, the keys walked in
# series) where one decode query took 3.7 us; the tuner's kernel timings put the verify step at about twice a
# decode step
QUERIES_AS_SEQUENCES = 16


def _queries_as_sequences(q, k_cache, v_cache, cache_position) -> bool:
    return (q.shape[0] == 1 and 1 < q.shape[2] <= QUERIES_AS_SEQUENCES and _chunk_fits(q, k_cache, v_cache,
                                                                                         cache_position)
            and (cache_position.dim() == 1 or cache_position.shape[0] == 1))


def _as_sequences(q, k_cache, v_cache, cache_position):
    """q [1, Hq, T, D] -> ([T, Hq, 1, D], caches [T, Hkv, L, D], lengths - 1 [T]): views, nothing copied."""
    t = q.shape[2]
    return (q[0].transpose(0, 1).unsqueeze(2), k_cache.expand(t, *k_cache.shape[1:]),
            v_cache.expand(t, *v_cache.shape[1:]), cache_position.reshape(t))


def _decode_attention(q, k_cache, v_cache, cache_position, scale):
    ta = _codegen("triton_attention")
    if q.shape[2] != 1:  # several new queries per step: query i sees keys j <= cache_position[i]
        if _queries_as_sequences(q, k_cache, v_cache, cache_position):
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            qs, ks, vs, pos = _as_sequences(q, k_cache, v_cache, cache_position)
            ta.decode_attention(qs, ks, vs, pos, scale, out=out[0].transpose(0, 1).unsqueeze(2), len_offset=1)
            return out
        if _chunk_fits(q, k_cache, v_cache, cache_position):
            return ta.chunk_attention(q, k_cache, v_cache, cache_position, scale)
        return torch.ops.flashc.decode_attention.default(q, k_cache, v_cache, cache_position, scale)
    # key j is visible iff j <= position: length = position + 1, the same for every sequence
    return ta.decode_attention(q, k_cache, v_cache, cache_position.expand(q.shape[0]), scale, len_offset=1)


def _tune_decode_attention(q, k_cache, v_cache, cache_position, scale):
    ta = _codegen("triton_attention")
    if q.shape[2] == 1:
        ta.tune_decode_attention(q, k_cache, v_cache, (cache_position + 1).expand(q.shape[0]), scale)
    elif _queries_as_sequences(q, k_cache, v_cache, cache_position):
        qs, ks, vs, pos = _as_sequences(q, k_cache, v_cache, cache_position)
        ta.tune_decode_attention(qs, ks, vs, pos + 1, scale)
    elif _chunk_fits(q, k_cache, v_cache, cache_position):
        ta.tune_attention(q, k_cache, v_cache, True, scale, positions=cache_position)


def _geglu(g, u, approximate):
    if approximate == "tanh":
        return _codegen("triton_mlp").geglu(g, u)
    return torch.ops.flashc.geglu.default(g, u, approximate)


def _tune_geglu(g, u, approximate):
    if approximate == "tanh":
        _codegen("triton_mlp").tune_glu(torch.cat([g, u], -1), "gelu_tanh")


def _gemv_wq(x, qweight, bias, norm_weight, eps, residual, glu, scales, zero_points, input_scale, bits):
    return _codegen("triton_gemv_wq").gemv_wq(x, qweight, scales, zero_points, bits, bias, input_scale,
                                              norm_weight, eps, residual, glu)


def _tune_gemv_wq(x, qweight, bias, norm_weight, eps, residual, glu, scales, zero_points, input_scale, bits):
    _codegen("triton_gemv_wq").tune_gemv_wq(x, qweight, scales, zero_points, bits, bias, input_scale,
                                            norm_weight, eps, residual, glu)


def _sparse_gemv_wq(x, threshold, qweight_t, bias, norm_weight, eps, residual, glu, scales_t, zero_points_t,
                    input_scale, bits):
    return _codegen("triton_sparse_gemv_wq").sparse_gemv_wq(x, threshold, qweight_t, scales_t, zero_points_t, bits,
                                                            bias, input_scale, norm_weight, eps, residual, glu)


def _tune_sparse_gemv_wq(x, threshold, qweight_t, bias, norm_weight, eps, residual, glu, scales_t, zero_points_t,
                         input_scale, bits):
    _codegen("triton_sparse_gemv_wq").tune_sparse_gemv_wq(x, threshold, qweight_t, scales_t, zero_points_t, bits,
                                                          bias, input_scale, norm_weight, eps, residual, glu)


def _tune_linear_wq(x, qweight, scales, zero_points, bias, input_scale, bits):
    """Decode-sized products are tuned (most become gemv_wq before this); prefill's are dequantize + cuBLAS."""
    gemv_wq = _codegen("triton_gemv_wq")
    if x.numel() // max(1, x.shape[-1]) <= gemv_wq.MAX_ROWS:
        gemv_wq.tune_gemv_wq(x, qweight, scales, zero_points, bits, bias, input_scale)


def _rotary_kv_write(k, v, cos, sin, k_cache, v_cache, positions, interleaved=False):
    _codegen("triton_rotary").rotary_kv_write(k, v, cos, sin, k_cache, v_cache, positions, interleaved=interleaved)


def _rotary_qkv_write(q, k, v, cos, sin, k_cache, v_cache, positions, interleaved=False):
    return _codegen("triton_rotary").rotary_qkv_write(q, k, v, cos, sin, k_cache, v_cache, positions,
                                                      interleaved=interleaved)


# flashc op -> its generated kernel. ATen ops run as cuBLAS / PyTorch CUDA library kernels.
KERNELS: dict[str, Kernel] = {
    "flashc.rms_norm": Kernel(lambda x, w, eps: _codegen("triton_norm").rms_norm(x, w, eps),
                              lambda x, w, eps: _codegen("triton_norm").tune_rms_norm(x, w, eps)),
    "flashc.add_rms_norm": Kernel(lambda x, r, w, eps: _codegen("triton_norm").add_rms_norm(x, r, w, eps),
                                  lambda x, r, w, eps: _codegen("triton_norm").tune_rms_norm(x, w, eps, residual=r)),
    "flashc.rotary": Kernel(lambda x, c, s: _codegen("triton_rotary").rotary(x, c, s),
                            lambda x, c, s: _codegen("triton_rotary").tune_rotary(x, c, s)),
    "flashc.rotary_interleaved": Kernel(lambda x, c, s: _codegen("triton_rotary").rotary(x, c, s, interleaved=True),
                                        lambda x, c, s: _codegen("triton_rotary").tune_rotary(x, c, s, True)),
    # the GLU kernel reads rows with any row stride: the halves of a merged gate|up
    # projection go in as they are, without copies
    "flashc.swiglu": Kernel(lambda g, u: _codegen("triton_mlp").swiglu(g, u),
                            lambda g, u: _codegen("triton_mlp").tune_glu(torch.cat([g, u], -1), "silu")),
    "flashc.geglu": Kernel(_geglu, _tune_geglu),
    "flashc.attention": Kernel(_attention, _tune_attention),
    "flashc.decode_attention": Kernel(_decode_attention, _tune_decode_attention),
    "flashc.moe": Kernel(lambda x, logits, gate_up, down, top_k, normalize: _codegen("triton_moe").moe(
        x, logits, gate_up, down, top_k, normalize), lambda *args: _codegen("triton_moe").tune_moe(*args)),
    # online pruning's experts (passes/prune/activations.py): flashc.moe's kernels, the intermediate
    # pruned in kernel 1's epilogue; device-only routing, so the forward keeps its CUDA graph
    "flashc.moe_sparse": Kernel(lambda *args: _codegen("triton_moe").moe_sparse(*args),
                                lambda *args: _codegen("triton_moe").tune_moe_sparse(*args)),
    # written by the late passes (backends/cuda_rewrites.py)
    "flashc.gemv": Kernel(lambda *args: _codegen("triton_gemv").gemv(*args),
                          lambda *args: _codegen("triton_gemv").tune_gemv(*args)),
    "flashc.gemv_wq": Kernel(_gemv_wq, _tune_gemv_wq),
    "flashc.sparse_gemv": Kernel(lambda *args: _codegen("triton_sparse_gemv").sparse_gemv(*args),
                                 lambda *args: _codegen("triton_sparse_gemv").tune_sparse_gemv(*args)),
    # the same on a weight-only quantized layer, its codes K-major (the late pass converts them once)
    "flashc.sparse_gemv_wq": Kernel(_sparse_gemv_wq, _tune_sparse_gemv_wq),
    # 2:4-pruned prefill linears (backends/cuda_semi_structured.py): sparse tensor cores where measured faster
    "flashc.linear_24": Kernel(lambda *args: _codegen("semi_structured").linear_24(*args),
                               lambda *args: _codegen("semi_structured").tune_linear_24(*args)),
    # weight-only quantized linears (passes/quantize) read their packed weights directly
    "flashc.linear_wq": Kernel(lambda *args: _codegen("triton_gemv_wq").linear_wq(*args), _tune_linear_wq),
    "flashc.moe_wq": Kernel(lambda *args: _codegen("triton_moe_wq").moe_wq(*args),
                            lambda *args: _codegen("triton_moe_wq").tune_moe_wq(*args)),
    # weights and activations quantized (passes/quantize: SmoothQuant W8A8, FP8): int8 / fp8 library GEMMs;
    # prefill's W8A8 products on the fused int8 GEMM (codegen/int8_matmul.py) where tuning measured it faster
    "flashc.linear_w8a8": Kernel(lambda *args: _codegen("quantized_matmul").linear_w8a8(*args),
                                 lambda *args: _codegen("quantized_matmul").tune_linear_w8a8(*args)),
    "flashc.linear_fp8": Kernel(lambda *args: _codegen("quantized_matmul").linear_fp8(*args)),
    # their inputs quantized by the norm or GLU producing them (late pass FuseQuantizedInputs)
    "flashc.rms_norm_quant": Kernel(lambda *args: _codegen("norm_quant").rms_norm_quant(*args)),
    "flashc.add_rms_norm_quant": Kernel(lambda *args: _codegen("norm_quant").add_rms_norm_quant(*args)),
    "flashc.glu_quant": Kernel(lambda *args: _codegen("norm_quant").glu_quant(*args)),
    "flashc.linear_w8a8_q": Kernel(lambda *args: _codegen("quantized_matmul").linear_w8a8_q(*args),
                                   lambda *args: _codegen("quantized_matmul").tune_linear_w8a8_q(*args)),
    "flashc.linear_fp8_q": Kernel(lambda *args: _codegen("quantized_matmul").linear_fp8_q(*args)),
    "flashc.moe_a8": Kernel(lambda *args: _codegen("quantized_matmul").moe_a8(*args)),
    # AQLM (passes/quantize/aqlm.py): codes and codebooks read directly for decode, dequantized for prefill
    "flashc.linear_aqlm": Kernel(lambda *args: _codegen("aqlm_gemv").linear_aqlm(*args)),
    # QuIP (passes/quantize/quip.py): the randomized Hadamard rotations around a linear_wq
    "flashc.hadamard": Kernel(lambda x, signs: _codegen("hadamard").hadamard(x, signs)),
    # the attention-to-SSM rewrite's layers (passes/ssm): a recurrent step at T = 1, chunked scan above
    "flashc.ssm_scan": Kernel(lambda q, k, v, g, state: _codegen("triton_ssm").ssm_scan_triton(q, k, v, g, state)),
    "flashc.ssm_mix": Kernel(lambda *args: _codegen("triton_ssm").ssm_mix_triton(*args)),
    "flashc.gla_mix": Kernel(lambda q, k, v, gate, state, heads, kv_heads, tau, eps: _codegen(
        "triton_gla").gla_mix_triton(q, k, v, gate, state, heads, kv_heads, tau, eps)),
    # the same writing the layer's state buffer in place (backends/cuda_rewrites.py: FuseStateWrites)
    "flashc.ssm_mix_into": Kernel(lambda *args: _codegen("triton_ssm").ssm_mix_into_triton(*args)),
    "flashc.gla_mix_into": Kernel(lambda *args: _codegen("triton_gla").gla_mix_into_triton(*args)),
    "flashc.rotary_kv_write": Kernel(_rotary_kv_write),
    "flashc.rotary_qkv_write": Kernel(_rotary_qkv_write),
}


# What a row-invariant program may hold (CudaOptions.row_invariant): flashc ops whose kernels compute every
# row as a one-row call does under codegen.tuning.row_invariant, and ATen ops that act on each element or only
# move data
ROW_INVARIANT_FLASHC = frozenset({
    "flashc.gemv", "flashc.gemv_wq", "flashc.rms_norm", "flashc.add_rms_norm", "flashc.rotary",
    "flashc.rotary_interleaved", "flashc.rotary_kv_write", "flashc.rotary_qkv_write", "flashc.decode_attention",
    "flashc.swiglu", "flashc.geglu"})
ROW_INVARIANT_ATEN = frozenset(f"aten.{n}" for n in (
    "embedding", "view", "reshape", "_unsafe_view", "transpose", "permute", "unsqueeze", "squeeze", "expand", "slice",
    "select", "cat", "stack", "split", "split_with_sizes", "chunk", "clone", "contiguous", "to", "_to_copy", "alias",
    "detach", "mul", "add", "sub", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "tanh", "sigmoid", "silu", "gelu",
    "cos", "sin", "where", "index_copy_", "index_copy", "index_put_", "index_select", "copy_", "fill_", "full",
    "zeros", "ones", "arange", "lift_fresh_copy", "type_as", "flatten", "view_as_real", "view_as_complex",
    "_assert_tensor_metadata"))


def _check_row_invariant(program: Program) -> None:
    """Refuse, under CudaOptions.row_invariant, a lowered program holding an op whose kernel is not computed
    row by row (a fused MoE, a GEMM): it would compute other numbers than its one-row counterpart."""
    other = sorted({op_name(n) for n in program.graph.nodes if n.op == "call_function"}
                   - ROW_INVARIANT_FLASHC - ROW_INVARIANT_ATEN - {"getitem"})
    if other:
        raise InputError(f"row_invariant: the program holds {', '.join(other)}, whose kernels do not compute "
                         "each row as a one-row call does; compile without it (with exact_verify: speculation then "
                         "agrees with plain decoding up to the dtype's rounding)")


@dataclass(frozen=True)
class CudaOptions:
    cuda_graphs: bool = True  # replay the forward as one CUDA graph (static input shapes)
    tune: bool = True  # autotune each generated kernel on the first call's shapes
    # every row of a multi-row call computed as a one-row call computes it (codegen.tuning.row_invariant):
    # a speculative verify step bit-identical to the decode steps it replaces (flashc.generation's
    # exact_verify), at the cost of reading each weight once a row
    row_invariant: bool = False


class CudaBackend:
    name = "cuda"
    Options = CudaOptions
    lowering = LoweringTable("cuda", KERNELS, namespaces=frozenset({"aten"}))

    def late_passes(self, profile: HardwareProfile, options: CudaOptions) -> list:
        from flashc.backends.cuda_rewrites import (FuseKvWrites, FuseQuantizedInputs, FuseSmallMatmuls,
                                                   FuseSparseMatmuls, FuseStateWrites)
        from flashc.backends.cuda_semi_structured import FuseSemiStructuredMatmuls

        # more rows than the GEMV kernel takes stay on cuBLAS (codegen/triton_gemv.py measures why);
        # sparsified inputs' linears become sparse GEMVs before the rest become dense ones; of the
        # larger ones, those with 2:4-pruned weights may run on the sparse tensor cores
        max_rows = _codegen("triton_gemv").MAX_ROWS
        # last: W8A8 / FP8 linears' inputs quantized by the norms and GLUs producing them
        return [FuseKvWrites(), FuseStateWrites(), FuseSparseMatmuls(max_rows), FuseSmallMatmuls(max_rows),
                FuseSemiStructuredMatmuls(max_rows), FuseQuantizedInputs(_codegen("norm_quant").MAX_K)]

    def lower(self, program: Program, profile: HardwareProfile, options: CudaOptions,
              save_tuning: Callable[[bytes], None] | None = None):
        if options.row_invariant:
            _check_row_invariant(program)
        if not torch.cuda.is_available():
            def no_gpu(*args):
                raise FlashcError(f"this model was compiled for {profile.name} on a machine without a GPU; "
                                  "save it and run it with flashc.load on a machine with an NVIDIA GPU")

            no_gpu.row_invariant = options.row_invariant  # saved with the artifact (save_payload)
            return no_gpu
        _check_memory(program)
        # The device is detected once, here (flashc.profiles: the one table). The compile's
        # profile drives the passes and the cost model; kernels pick their configs for the
        # GPU they run on, handed to them as a tuning profile (codegen.tuning.use_profile).
        local = detect(torch.cuda.current_device())
        if local.name != profile.name:
            warnings.warn(f"compiling for profile {profile.name!r} but the local GPU is {local.name!r}; "
                          "kernels are tuned for the local device", stacklevel=3)
        kernel_profile = local.name if local.name in PROFILES else "default"
        return CudaExecutable(program, use_cuda_graph=options.cuda_graphs, tune=options.tune,
                              save_tuning=save_tuning, kernel_profile=kernel_profile,
                              row_invariant=options.row_invariant)

    def save_payload(self, executable, directory: Path) -> dict[str, Any]:
        try:
            from flashc.codegen.tuning import export_tuning
        except ImportError:
            return {}
        import json

        (directory / "tuning.json").write_text(json.dumps(export_tuning(), sort_keys=True))
        info = {"tuning": "tuning.json"}
        if getattr(executable, "row_invariant", False):  # what the executable computes: kept with it
            (directory / "cuda_options.json").write_text(json.dumps({"row_invariant": True}))
            info["options"] = "cuda_options.json"
        return info

    def load_payload(self, program: Program, directory: Path, info: dict[str, Any]):
        """Lower a loaded artifact; tuning it carries is used, tuning done at its first call is saved back."""
        tuning_name = info.get("tuning", "tuning.json")
        if (directory / tuning_name).exists():
            import json

            from flashc.codegen.tuning import import_tuning

            import_tuning(json.loads((directory / tuning_name).read_text()))
        from flashc.profiles import get_profile

        def save_tuning(data: bytes) -> None:
            import hashlib

            from flashc.artifact import swap_file

            name = f"tuning-{hashlib.sha256(data).hexdigest()[:12]}.json"
            if name != tuning_name:
                swap_file(directory.parent, f"{directory.name}/{tuning_name}", f"{directory.name}/{name}", data,
                          lambda manifest: manifest.setdefault("payload", {}).update(tuning=name))

        if program.meta.profile is None:  # flashc.load sets it from the manifest
            raise FlashcError("the CUDA backend loads a program with the profile it was compiled for; this one "
                              "has none: load artifacts with flashc.load")
        options = CudaOptions()
        if "options" in info:  # the options that change what the executable computes (save_payload)
            import json

            try:
                saved = json.loads((directory / info["options"]).read_text())
                options = CudaOptions(row_invariant=bool(saved["row_invariant"]))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ArtifactError(f"{directory / str(info['options'])}: unreadable CUDA options ({e}); "
                                    "the artifact is damaged: compile the model again") from None
        return self.lower(program, get_profile(program.meta.profile), options, save_tuning)


def _save_tuning(save: Callable[[bytes], None]) -> None:
    """Write the tuning results into the artifact the model came from, so its next load does not tune."""
    import json

    from flashc.codegen.tuning import export_tuning

    try:
        save(json.dumps(export_tuning(), sort_keys=True).encode())
    except OSError as e:
        warnings.warn(f"could not save kernel tuning into the artifact ({e}); the next load will tune again",
                      stacklevel=3)


def _check_memory(program: Program) -> None:
    """Refuse early, with the estimate, when the model cannot fit the GPU's free memory."""
    weights = sum(t.numel() * t.element_size() for t in program.params.values() if t.device.type != "cuda")
    inputs = sum(math.prod(s.shape) * torch.empty((), dtype=s.dtype).element_size() for s in program.inputs)
    largest = 0
    for node in program.op_nodes():
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            largest = max(largest, val.numel() * val.element_size())
    need = weights + 2 * inputs + 4 * largest  # inputs and their static copies; a few live activations
    free, total = torch.cuda.mem_get_info()
    if need > free:
        raise FlashcError(f"not enough GPU memory: this model needs about {need / 2**30:.1f} GiB "
                          f"(weights {weights / 2**30:.1f} GiB, inputs {inputs / 2**30:.2f} GiB, largest activation "
                          f"{largest / 2**30:.2f} GiB) but {free / 2**30:.1f} of {total / 2**30:.1f} GiB are free; "
                          "use a smaller batch or sequence length, fewer layers, or a GPU with more memory")


def _to_cuda_args(x):
    if isinstance(x, torch.device) and x.type == "cpu":
        return torch.device("cuda")
    return x


class CudaExecutable:
    """The lowered graph on the GPU; replayed from a CUDA graph after the first call."""

    def __init__(self, program: Program, use_cuda_graph: bool = True, tune: bool = True,
                 save_tuning: Callable[[bytes], None] | None = None, kernel_profile: str = "default",
                 row_invariant: bool = False) -> None:
        self.kernel_profile = kernel_profile  # the tuning tables the kernels read (codegen.tuning)
        self.row_invariant = row_invariant  # CudaOptions.row_invariant
        _codegen("triton_gemv")  # a clear error now if Triton is missing
        graph = copy.deepcopy(program.graph)
        # inputs the graph writes in place (a decode step's KV cache): under a CUDA graph a
        # GPU tensor passed at capture becomes the graph's own buffer (the cache stays
        # resident: no copies while the caller passes the same tensor); other tensors are
        # copied into the static buffer before a replay and back after it
        written = set(written_placeholders(graph))
        user = [n for n in graph.nodes if n.op == "placeholder"][len(program.params):]
        self.mutated_inputs = [i for i, n in enumerate(user) if n in written]
        self._ops: dict[str, str] = {}  # node name -> flashc op it launches a generated kernel for
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            node.args = fx.node.map_aggregate(node.args, _to_cuda_args)
            node.kwargs = fx.node.map_aggregate(node.kwargs, _to_cuda_args)
            name = op_name(node)
            if name in KERNELS:
                node.target = KERNELS[name].launch
                self._ops[node.name] = name
        self.module = fx.GraphModule(torch.nn.Module(), graph)
        foreign = sorted({op_name(n) for n in graph.nodes if n.op == "call_function" and n.name not in self._ops
                          and op_name(n).split(".")[0] not in ("aten", "flashc", "getitem")})
        if foreign and use_cuda_graph:
            # ops of other libraries may synchronise with the host (e.g. .tolist()), which
            # a CUDA graph cannot hold: run those graphs kernel by kernel instead
            warnings.warn(f"CUDA graphs disabled: the graph calls {', '.join(foreign)}", stacklevel=3)
            use_cuda_graph = False
        self.weight_names = [n.name for n in program.param_nodes()]
        self.weights = [program.params[name].to("cuda") for name in self.weight_names]
        self.use_cuda_graph = use_cuda_graph
        self.tune = tune  # autotune the generated kernels on the first call's shapes
        self.save_tuning = save_tuning  # an artifact's writer: the results of that tuning go back there
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_in: list[torch.Tensor] = []
        self._static_out: list[torch.Tensor] = []

    def share_weights_from(self, other: "CudaExecutable") -> int:
        """Hold `other`'s device tensor for every weight equal to it by name, shape, dtype, layout
        and value, freeing this executable's copy (a generation model's entries: one set of
        weights on the GPU). Before the first call only: a captured CUDA graph has the
        addresses of its weights baked in. Returns how many were shared."""
        if self._graph is not None:
            raise RuntimeError("share_weights_from: this executable has captured its CUDA graph already")
        theirs = dict(zip(other.weight_names, other.weights))
        shared = 0
        for i, (name, mine) in enumerate(zip(self.weight_names, self.weights)):
            t = theirs.get(name)
            if (t is not None and t is not mine and t.shape == mine.shape and t.dtype == mine.dtype
                    and t.stride() == mine.stride() and torch.equal(t, mine)):
                self.weights[i] = t
                shared += 1
        return shared

    def run_eager(self, *args: torch.Tensor) -> list[torch.Tensor]:
        from flashc.codegen.tuning import row_invariant, use_profile

        with use_profile(self.kernel_profile), row_invariant(self.row_invariant):
            out = self.module(*self.weights, *[a.to("cuda", non_blocking=True) for a in args])
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def autotune(self, *args: torch.Tensor) -> int:
        """Run the graph once, tuning each generated kernel on the shapes it meets; returns
        how many kernels were tuned. Results land in codegen.tuning's on-disk cache (and an
        artifact's payload), so a later compile or load of the same shapes does not tune."""
        ops = self._ops
        tuned = 0

        class Tuning(fx.Interpreter):
            def call_function(self, target, a, kw):
                nonlocal tuned
                op = ops.get(self._node_name)
                tune = KERNELS[op].tune if op is not None else None
                if tune is not None:
                    tune(*a, **kw)
                    tuned += 1
                return super().call_function(target, a, kw)

            def run_node(self, n):
                self._node_name = n.name
                return super().run_node(n)

        with torch.no_grad():
            from flashc.codegen.tuning import row_invariant, use_profile

            with use_profile(self.kernel_profile), row_invariant(self.row_invariant):
                Tuning(self.module).run(*self.weights, *[a.to("cuda") for a in args])
        torch.cuda.synchronize()
        return tuned

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        if self.tune:
            self.tune = False
            try:
                self.autotune(*[a.clone() if i in self.mutated_inputs else a for i, a in enumerate(args)])
            except Exception as e:  # untuned kernels are slower, not wrong: keep going
                warnings.warn(f"kernel autotuning failed ({type(e).__name__}: {str(e)[:200]}); "
                              "running with default configs", stacklevel=2)
            else:
                if self.save_tuning is not None:
                    _save_tuning(self.save_tuning)
        if not self.use_cuda_graph:
            return self.run_eager(*args)
        if self._graph is None:
            try:
                self._capture(args)
            except RuntimeError as e:  # an op that cannot be captured: keep running eagerly
                warnings.warn(f"CUDA graph capture failed ({str(e).splitlines()[0][:200]}); "
                              "running kernel by kernel", stacklevel=2)
                self.use_cuda_graph, self._graph = False, None
                torch.cuda.synchronize()
                return self.run_eager(*args)
        for static, a in zip(self._static_in, args):
            if a.data_ptr() != static.data_ptr():
                static.copy_(a, non_blocking=True)
        self._graph.replay()
        for i in self.mutated_inputs:
            if args[i].data_ptr() != self._static_in[i].data_ptr():
                args[i].copy_(self._static_in[i], non_blocking=True)
        return [o.clone() for o in self._static_out]

    def _capture(self, args) -> None:
        resident = set(self.mutated_inputs)
        self._static_in = [a if i in resident and a.is_cuda and a.is_contiguous() else a.to("cuda").clone()
                           for i, a in enumerate(args)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # Warm up (Triton compiles, cuBLAS initializes outside the capture) on copies of the
        # inputs the graph writes: a write that is not idempotent (a recurrent state, a counter
        # in a buffer) must happen once per call, not once per warm-up run as well
        warm = [a.clone() if i in resident else a for i, a in enumerate(self._static_in)]
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                self.run_eager(*warm)
        del warm
        torch.cuda.current_stream().wait_stream(stream)
        from flashc.codegen.cuda_graphs import capture

        # What the replays touch is owned here: weights, static inputs and outputs by this
        # object, the KV cache by the caller, the atomic tickets by triton_attention, every
        # temporary and the cuBLAS workspace by the graph's private pool (a workspace
        # inherited from another capture, e.g. the tuner's, is freed under the graph by the
        # next torch._C._cuda_clearCublasWorkspaces(): codegen/cuda_graphs.py)
        self._graph = torch.cuda.CUDAGraph()
        with capture(self._graph), torch.no_grad():
            self._static_out = self.run_eager(*self._static_in)
