"""The ONNX backend: export, onnx.checker, ONNX Runtime numerics, fused-kernel mapping, PyTorch's
semantics at the edges (NaN, signed zeros, division, indexing) against eager, errors, the decode
step (past/present KV), int4. In-place writes: test_onnx_in_place; fp16/bf16: test_onnx_precision."""

from __future__ import annotations

import collections
import inspect
import sys

import pytest
import torch
import torch.nn.functional as F
from flashc_testing import FAMILIES, fresh_ids, rel_err
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")

import flashc  # noqa: E402
from flashc.backends.onnx import OnnxRuntimeModel, export_onnx, lowers, table  # noqa: E402
from flashc.backends.onnx.int4 import Int4Weight, quantize_int4  # noqa: E402
from flashc.backends.onnx.runtime import SHARED_PRESENT_KEY, resolve_providers  # noqa: E402
from flashc.capture import capture  # noqa: E402
from flashc.decode import DecodeStep, decode_example_inputs  # noqa: E402
from flashc.errors import FlashcError, InputError, UnsupportedOpError  # noqa: E402
from flashc.pass_manager import PassContext, PassManager  # noqa: E402
from flashc.pipelines import pipeline  # noqa: E402
from flashc.profiles import PROFILES  # noqa: E402
from test_onnx_in_place import check_against_eager, line_of  # noqa: E402

TOL = 1e-4
aten = torch.ops.aten
# Fused kernels per 2-layer model at -O2/-O3: the first input norm stands alone, the
# other four norms take the residual add; q and k of each layer are rotated.
FUSED = {"RMSNormalization": 1, "com.microsoft.SkipSimplifiedLayerNormalization": 4,
         "com.microsoft.RotaryEmbedding": 4, "com.microsoft.GroupQueryAttention": 2}


def _optimize(model, inputs, level):
    program = capture(model, inputs, {"use_cache": False})
    PassManager(pipeline(level)).run(program, PassContext(PROFILES["cpu"]))
    return program


def _op_counts(path) -> collections.Counter:
    graph = onnx.load(str(path), load_external_data=False).graph
    return collections.Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in graph.node)


def _check_against_program_and_model(path, program, model, *inputs):
    onnx.checker.check_model(str(path))
    ort_model = OnnxRuntimeModel.load(path)
    got = ort_model(*inputs)
    ref = program.run_flat(*inputs)
    assert len(got) == len(ref)
    assert rel_err(got[0], ref[0]) < TOL
    with torch.no_grad():
        hf = model(inputs[0], attention_mask=inputs[1] if len(inputs) > 1 else None, use_cache=False).logits
    assert rel_err(got[0], hf) < TOL
    return ort_model


@pytest.mark.parametrize("family", FAMILIES)
def test_o3_export_matches_program_and_hf_with_fused_kernels(tiny_models, family, tmp_path):
    model = tiny_models[family]
    program = _optimize(model, (fresh_ids(family),), 3)
    path = export_onnx(program, tmp_path / "model.onnx")
    ort_model = _check_against_program_and_model(path, program, model, fresh_ids(family))
    assert ort_model.output_names == ["logits"]
    ops = _op_counts(path)
    for op, n in FUSED.items():
        assert ops[op] == n, f"{family}: {op} x{ops[op]}, expected {n}"
    assert ops["ReduceMean"] == 0, "an RMSNorm was decomposed instead of mapped to a fused kernel"
    assert not (tmp_path / "model.onnx.data").exists()


@pytest.mark.parametrize("family,level", [("llama-tiny", 0), ("llama-tiny", 1), ("mixtral-tiny", 0)])
def test_unfused_levels_export(tiny_models, family, level, tmp_path):
    """-O0 is the plain ATen graph: HF's mask construction, sdpa, and (Mixtral) the
    sort/histc/grouped-matmul expert routing of transformers."""
    model = tiny_models[family]
    program = _optimize(model, (fresh_ids(family),), level)
    path = export_onnx(program, tmp_path / "model.onnx")
    _check_against_program_and_model(path, program, model, fresh_ids(family))
    assert not any(op.startswith("com.microsoft") for op in _op_counts(path))


@pytest.mark.parametrize("family", ["llama-tiny", "mixtral-tiny"])
def test_standard_ops_only(tiny_models, family, tmp_path):
    """contrib_ops=False: the decomposed rms_norm/rotary/attention/moe lowerings alone."""
    model = tiny_models[family]
    program = _optimize(model, (fresh_ids(family),), 3)
    path = export_onnx(program, tmp_path / "model.onnx", contrib_ops=False)
    _check_against_program_and_model(path, program, model, fresh_ids(family))
    ops = _op_counts(path)
    assert not any(op.startswith("com.microsoft") for op in ops) and ops["RMSNormalization"] == 0
    assert ops["Expand"] == 0, "grouped-query attention should not repeat K/V"


def test_opset_21_rms_norm_decomposed_then_fused_by_ort(tiny_models, tmp_path):
    """Below opset 23 (no RMSNormalization) rms_norm is spelled so ORT fuses it at load."""
    import onnxruntime as ort

    model = tiny_models["llama-tiny"]
    program = _optimize(model, (fresh_ids("llama-tiny"),), 3)
    path = export_onnx(program, tmp_path / "model.onnx", opset=21)
    _check_against_program_and_model(path, program, model, fresh_ids("llama-tiny"))
    assert _op_counts(path)["RMSNormalization"] == 0
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert _op_counts(tmp_path / "optimized.onnx")["SimplifiedLayerNormalization"] == 1


def test_padding_mask_batch_and_external_data(tiny_models, tmp_path):
    """A runtime attention mask takes the standard attention path; weights go to external data."""
    model = tiny_models["llama-tiny"]
    ids = fresh_ids("llama-tiny", batch=2)
    mask = torch.ones(2, 16, dtype=torch.long)
    program = _optimize(model, (ids, mask), 3)
    path = export_onnx(program, tmp_path / "m" / "model.onnx", external_data=True)
    data = tmp_path / "m" / "model.onnx.data"
    assert data.exists() and data.stat().st_size > path.stat().st_size
    mask[1, 11:] = 0  # right padding: every query still sees a key
    ort_model = _check_against_program_and_model(path, program, model, fresh_ids("llama-tiny", batch=2), mask)
    ops = _op_counts(path)
    assert ops["com.microsoft.GroupQueryAttention"] == 0 and ops["Softmax"] == 2
    assert ops["com.microsoft.RotaryEmbedding"] == 4
    with pytest.raises(InputError, match="expected shape"):
        ort_model(fresh_ids("llama-tiny"), mask)


# --- ATen coverage beyond the LLM families ------------------------------------------------------

class Kitchen(torch.nn.Module):
    """ATen ops the five families do not use, each with PyTorch semantics worth checking."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.register_buffer("table", torch.randn(10, 8))

    def forward(self, x, idx):
        h = self.norm(x)
        leaky = torch.where(h > 0, h, 0.1 * h).clamp(-1.5, 1.5).masked_fill(h.abs() < 0.05, 0.0)
        shifted = idx - 5  # negative operands: floor division and remainder follow Python
        q = torch.floor_divide(shifted, 3) * 10 + torch.remainder(shifted, 3)
        rows = self.table[idx] + self.table[(idx * 7) % 10]
        values, index = torch.topk(h, 3, dim=-1)
        ordered, order = torch.sort(h, dim=-1, descending=True)
        a, b = torch.chunk(h, 2, dim=-1)
        scan = torch.cumsum(h, dim=-1) / (h.sum(-1, keepdim=True).abs() + 1)
        reduced = h.amax(-1) - h.mean(-1) + torch.argmax(h, -1).float()
        picked = torch.gather(h, -1, order[..., :2])
        counts = torch.zeros(4, 8).index_put((torch.tensor([1, 1, 3]),), torch.ones(3, 8), accumulate=True)
        return (leaky, q, rows, values, index, ordered, order, a * b, torch.unbind(h, 1)[0], torch.triu(h),
                scan, reduced, picked, counts, F.softmax(h, -1).max(-1).values, torch.diff(h, dim=-1),
                torch.rsqrt(h.pow(2) + 1), h.transpose(1, 2).contiguous(), h.sum())


def test_aten_op_semantics(tmp_path):
    module = Kitchen().eval()
    program = capture(module, (torch.randn(2, 5, 8), torch.randint(0, 10, (2, 5))))
    path = export_onnx(program, tmp_path / "kitchen.onnx")
    x, idx = torch.randn(2, 5, 8), torch.randint(0, 10, (2, 5))
    got, ref = OnnxRuntimeModel.load(path)(x, idx), program.run_flat(x, idx)
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert g.shape == r.shape and g.dtype == r.dtype, f"output {i}"
        assert torch.allclose(g, r, atol=1e-5, rtol=1e-5), f"output {i}: max diff {(g - r).abs().max()}"


class Indexing(nn.Module):
    """Advanced indexing with index tensors after a slice or apart (PyTorch moves the index dims
    first only when they are apart), assignments through them and a boolean mask, and layout ops."""

    def forward(self, x, i, j):
        y = x.clone()
        y[:, i, j] = 0.5
        y[i, :, :, j] += x[i, :, :, j]
        y[:, :, j] = y[:, :, j] * 2
        y[y > 1] = -1.0
        y.index_fill_(3, j.view(-1), 7.0)
        return (x[:, i, j], x[i, :, j], x[:, :, i], y, x.flip(0, -1), torch.stack([x[0], x[1]], 1),
                torch.outer(x[0, 0, 0], x[1, 1, 1]), x.repeat_interleave(2, dim=1), +x, x.square(),
                (x > 0) ^ (y > 0), i ^ j)


def _indexing_inputs():
    return torch.randn(2, 3, 4, 5), torch.randint(0, 2, (2,)), torch.randint(-4, 4, (3, 1))


def test_advanced_indexing_and_layout_ops():
    check_against_eager(Indexing(), _indexing_inputs, 0, atol=0, rtol=0)


class CacheWriteAtPosition(nn.Module):
    """A KV cache written the way models spell it: cache[:, :, pos] = new (index_put_ after a slice)."""

    def forward(self, new, cache, pos):
        cache[:, :, pos] = new
        return cache.sum(2)


def test_cache_written_at_position_after_a_slice():
    check_against_eager(CacheWriteAtPosition(), lambda: (torch.randn(2, 3, 1, 4), torch.randn(2, 3, 6, 4),
                                                         torch.randint(0, 6, (1,))), 0)


# --- PyTorch's semantics at the edges, against eager ------------------------------------------------

class PerRowNormWeight(nn.Module):
    """An RMSNorm look-alike whose weight is one value per row [S, 1]: not a per-channel gamma."""

    def __init__(self):
        super().__init__()
        self.w_row = nn.Parameter(torch.randn(5, 1))

    def forward(self, x, r):
        x = x + r
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.w_row, x


@pytest.mark.parametrize("level", [0, 2])
def test_norm_with_a_per_row_weight(level):
    check_against_eager(PerRowNormWeight(), lambda: (torch.randn(2, 5, 8), torch.randn(2, 5, 8)), level)


class SignedZeros(nn.Module):
    """x + 0.0 turns -0.0 into +0.0: ONNX Runtime's NoopElimination drops the Add unless told not to."""

    def forward(self, x):
        return 1 / (x * 0 + 0.0), 1 / (x + 0.0)


def test_adding_zero_keeps_ieee_signed_zeros():
    def inputs():
        x = torch.randn(3, 5)
        x[0, :3] = torch.tensor([-0.0, 0.0, -2.0])
        return (x,)

    cm = check_against_eager(SignedZeros(), inputs, 0, atol=0, rtol=0)
    x = inputs()[0]
    assert torch.equal(cm(x)[0], torch.full((3, 5), float("inf")))

class Division(nn.Module):
    """PyTorch's floor division is Python's (1.0 // 0.1 == 9.0, not floor(1.0 / 0.1) == 10.0),
    its remainder takes the divisor's sign from fmod, trunc keeps the sign of a zero."""

    def forward(self, x, y):
        return (x // y, torch.remainder(x, y), torch.div(x, y, rounding_mode="trunc"), x // 0.1, x % 0.1,
                torch.div(x, 0.1, rounding_mode="trunc"))


def _division_inputs(dtype=torch.float32):
    x, y = torch.randn(64) * 5, torch.randn(64) * 2
    x[:8] = torch.tensor([1.0, 0.3, -1.0, 0.0, -0.0, 7.0, -0.5, 2.0])
    y[:8] = torch.tensor([0.1, 0.1, 0.1, 0.0, 3.0, -0.0, 3.0, float("inf")])
    return x.to(dtype), y.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_floor_division_remainder_and_trunc_like_eager(dtype):
    cm = check_against_eager(Division(), lambda: _division_inputs(dtype), 0, atol=0, rtol=0)
    got = cm(*_division_inputs(dtype))
    assert got[3][0] == 9.0 and torch.signbit(got[0][4]) and torch.signbit(got[2][6])


class CausalAttention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("head_dim,gqa", [(12, 0), (16, 1)])
def test_group_query_attention_only_for_head_sizes_it_runs(head_dim, gqa):
    """ORT's GroupQueryAttention refuses a head size that is not a multiple of 8 at run time."""
    cm = check_against_eager(CausalAttention(), lambda: tuple(torch.randn(1, 2, 5, head_dim) for _ in range(3)), 2)
    assert _op_counts(cm.executable.path)["com.microsoft.GroupQueryAttention"] == gqa


class NanAware(nn.Module):
    """PyTorch's max/min/argmax/amax propagate NaN (and pick its first index); sign(NaN) is 0."""

    def forward(self, x):
        values, index = torch.max(x, -1)
        low, low_index = torch.min(x, 0)
        return (values, index, low, low_index, x.argmax(-1), x.argmin(), x.amax(-1), x.amin((0, 1)),
                torch.sign(x))


def _with_nans():
    x = torch.randn(4, 6)
    x[1, 2] = x[1, 4] = float("nan")
    x[2, 0] = float("inf")
    x[2, 5] = float("nan")
    x[3, 3] = -0.0
    return (x,)


def test_nan_in_reductions_and_sign():
    check_against_eager(NanAware(), _with_nans, 0, atol=0, rtol=0)


class MaskedAttention(nn.Module):
    def forward(self, q, k, v, mask, additive):
        return (F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                F.scaled_dot_product_attention(q, k, v, attn_mask=additive))


def _attention_inputs():
    mask = torch.rand(4, 6) > 0.3
    mask[1] = False  # a query that sees no key: PyTorch gives 0, a plain softmax NaN
    additive = torch.zeros(4, 6)
    additive[2] = float("-inf")
    return torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), mask, additive


def test_attention_rows_with_every_key_masked_are_zero_like_eager():
    check_against_eager(MaskedAttention(), _attention_inputs, 0)


class NormWithoutAffine(nn.Module):
    """LayerNormalization without bias: an empty trailing input crashes ONNX Runtime (segfault)."""

    def forward(self, x):
        return F.layer_norm(x, (8,))


def test_layer_norm_without_weight_and_bias():
    check_against_eager(NormWithoutAffine(), lambda: (torch.randn(3, 8),), 0)


class Gathers(nn.Module):
    def forward(self, x, index):
        return x.index_select(0, index), torch.gather(x, 1, index.view(1, -1).expand(3, -1))


def test_negative_gather_indices_are_an_error_like_eager():
    """index_select/gather refuse negative indices in PyTorch; ONNX's Gather would wrap them."""
    x = torch.randn(3, 5)
    cm = flashc.compile(Gathers(), target="onnx-cpu", example_inputs=(x, torch.tensor([0, 2])), level=0)
    assert all(torch.equal(g, r) for g, r in zip(cm(x, torch.tensor([2, 1])), Gathers()(x, torch.tensor([2, 1]))))
    with pytest.raises(IndexError):
        Gathers()(x, torch.tensor([-1, 0]))
    with pytest.raises(FlashcError, match="(?i)out of"):
        cm(x, torch.tensor([-1, 0]))

class Lookup(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(10, 4)

    def forward(self, ids):
        return self.table(ids)


@pytest.mark.parametrize("bad", [-1, 10])
def test_out_of_range_ids_are_an_error_like_eager(bad):
    module = Lookup()
    cm = flashc.compile(module, target="onnx-cpu", example_inputs=(torch.tensor([[1, 2]]),), level=0)
    ids = torch.tensor([[3, bad]])
    with pytest.raises(IndexError):
        module(ids)
    with pytest.raises(FlashcError) as err:
        cm(ids)
    msg = str(err.value)
    assert "embedding" in msg and "from table at" in msg and "out of data bounds" in msg
    assert err.value.__cause__ is not None


# --- errors ---------------------------------------------------------------------------------------

class SpectralMixer(torch.nn.Module):
    def forward(self, h):
        return torch.fft.rfft(h, dim=-1).abs()


class WithFFT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.mixer = SpectralMixer()

    def forward(self, x):
        return self.mixer(self.proj(x))


def test_unsupported_op_names_op_module_and_line(tmp_path):
    program = capture(WithFFT(), (torch.randn(2, 8),))
    line = next(i for i, text in enumerate(inspect.getsourcelines(SpectralMixer)[0]) if "rfft" in text)
    where = f"{__file__}:{inspect.getsourcelines(SpectralMixer)[1] + line}"
    with pytest.raises(UnsupportedOpError) as err:
        export_onnx(program, tmp_path / "fft.onnx")
    msg = str(err.value)
    assert "aten.fft_rfft" in msg and "mixer" in msg and where in msg and "cpu (eager)" in msg
    assert not (tmp_path / "fft.onnx").exists()
    assert lowers("aten.linear") and lowers("flashc.attention") and not lowers("aten.fft_rfft")


def test_missing_onnxruntime_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(FlashcError, match=r"pip install onnxruntime"):
        OnnxRuntimeModel.load(tmp_path / "any.onnx")


def test_cuda_provider_needs_onnxruntime_gpu():
    with pytest.raises(FlashcError, match="pip install onnxruntime-gpu"):
        resolve_providers("cuda", ["CPUExecutionProvider"])
    assert resolve_providers("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(None, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


class Small(nn.Module):
    def forward(self, x):
        return torch.relu(x) + 1


def test_a_failing_lowering_is_an_unsupported_op_error_with_its_cause(monkeypatch):
    def broken(ctx, node):
        return {}["missing"]

    monkeypatch.setitem(table.LOWERINGS, aten.relu.default, broken)
    with pytest.raises(UnsupportedOpError) as err:
        flashc.compile(Small(), target="onnx-cpu", example_inputs=(torch.randn(3),), level=0)
    msg = str(err.value)
    assert "aten.relu" in msg and "node relu" in msg and line_of(Small, "torch.relu") in msg
    assert isinstance(err.value.__cause__, KeyError)


class Float64Erf(nn.Module):
    def forward(self, x):
        return torch.erf(x)


def test_an_op_onnx_runtime_cannot_load_is_an_unsupported_op_error():
    """ONNX Runtime's CPU provider has no float64 Erf: refused at compile time, naming the node."""
    with pytest.raises(UnsupportedOpError) as err:
        flashc.compile(Float64Erf(), target="onnx-cpu", example_inputs=(torch.randn(4, dtype=torch.float64),),
                       level=0)
    msg = str(err.value)
    assert "Erf node erf" in msg and line_of(Float64Erf, "torch.erf") in msg and "target cpu" in msg
    assert err.value.__cause__ is not None


def test_backend_lower_save_load(tiny_models, tmp_path):
    from flashc.backends.onnx.backend import OnnxBackend

    model = tiny_models["qwen2-tiny"]
    program = _optimize(model, (fresh_ids("qwen2-tiny"),), 2)
    backend = OnnxBackend()
    run = backend.lower(program, PROFILES["cpu"], backend.Options())
    ids = fresh_ids("qwen2-tiny")
    ref = program.run_flat(ids)[0]
    assert rel_err(run(ids)[0], ref) < TOL
    (tmp_path / "payload").mkdir()
    info = backend.save_payload(run, tmp_path / "payload")
    assert rel_err(backend.load_payload(program, tmp_path / "payload", info)(ids)[0], ref) < TOL


# --- decode step: past/present KV caches ----------------------------------------------------------

DECODE_FAMILIES = ["llama-tiny", "mixtral-tiny", "gemma-tiny", "qwen2-tiny"]
CACHE_LEN = 16
STEPS = 6


@pytest.fixture(scope="module")
def decode_compiles(tiny_models):
    """The onnx-cpu compile of DecodeStep(model, CACHE_LEN) at -O3, by (family, batch), made on first use."""
    compiled = {}

    def get(family: str, batch: int):
        if (family, batch) not in compiled:
            model = tiny_models[family]
            compiled[family, batch] = flashc.compile(DecodeStep(model, CACHE_LEN), "onnx-cpu",
                                                     decode_example_inputs(model, batch, CACHE_LEN), level=3)
        return compiled[family, batch]

    return get


def _decode_against_eager(cm, model, family: str, kv: list[torch.Tensor]) -> None:
    """STEPS steps of cm on kv: logits equal the full forward, the caches equal the eager step's
    at 0..STEPS-1 and keep their earlier values after that."""
    batch = cm.inputs[0].shape[0]
    tokens = fresh_ids(family, batch=batch, seq_len=STEPS)
    before = [t.clone() for t in kv]
    ref_kv = [t.clone() for t in kv]
    step = DecodeStep(model, CACHE_LEN)
    logits = []
    with torch.no_grad():
        for t in range(STEPS):
            ids, pos = tokens[:, t:t + 1], torch.tensor([t])
            logits.append(cm(ids, pos, *kv))
            step(ids, pos, *ref_kv)
        full = model(tokens, use_cache=False).logits
    assert rel_err(torch.cat(logits, 1), full) < TOL
    for got, ref, old in zip(kv, ref_kv, before, strict=True):
        assert rel_err(got[:, :, :STEPS], ref[:, :, :STEPS]) < TOL
        assert torch.equal(got[:, :, STEPS:], old[:, :, STEPS:]), "a slot after the step's position was written"


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", DECODE_FAMILIES)
def test_decode_steps_match_full_forward_and_update_caches_in_place(tiny_models, decode_compiles, family, batch):
    """GroupQueryAttention takes each layer's cache write: past caches in, present caches out,
    which the runtime binds to the caller's tensors. Caches start random: stale slots must stay put."""
    cm = decode_compiles(family, batch)
    path = cm.executable.path
    onnx.checker.check_model(str(path))
    caches = [s.name for s in cm.inputs[2:]]
    assert cm.executable.output_names == ["output_0"] + [f"present.{name}" for name in caches]
    ops = _op_counts(path)
    assert ops["com.microsoft.GroupQueryAttention"] == 2
    assert ops["com.microsoft.RotaryEmbedding"] == 4  # tables of every cache slot, cache_position as position id
    proto = onnx.load(str(path), load_external_data=False)
    readers = {name: [n.op_type for n in proto.graph.node if name in n.input] for name in caches}
    assert readers == {name: ["GroupQueryAttention"] for name in caches}  # it writes them too
    assert {p.key: p.value for p in proto.metadata_props}[SHARED_PRESENT_KEY] == ",".join(caches)
    _decode_against_eager(cm, tiny_models[family], family, [torch.randn(s.shape) for s in cm.inputs[2:]])


def test_decode_standard_ops_and_strided_caches(tiny_models):
    """contrib_ops=False: ScatterElements cache writes and attention masked by cache_position over the
    whole cache. Caches that are not contiguous are staged and copied back."""
    model = tiny_models["qwen2-tiny"]
    cm = flashc.compile(DecodeStep(model, CACHE_LEN), "onnx-cpu", decode_example_inputs(model, 2, CACHE_LEN),
                        level=3, options={"contrib_ops": False})
    onnx.checker.check_model(str(cm.executable.path))
    ops = _op_counts(cm.executable.path)
    assert ops["ScatterElements"] == 4 and ops["LessOrEqual"] == 1
    assert not any(op.startswith("com.microsoft") for op in ops)
    kv = [torch.randn(*s.shape[:3], 2 * s.shape[3])[..., ::2] for s in cm.inputs[2:]]
    assert not kv[0].is_contiguous()
    _decode_against_eager(cm, model, "qwen2-tiny", kv)


def test_decode_unfused_level(tiny_models):
    """-O0 keeps transformers' mask construction and sdpa; the cache writes lower to ScatterElements."""
    model = tiny_models["llama-tiny"]
    cm = flashc.compile(DecodeStep(model, CACHE_LEN), "onnx-cpu", decode_example_inputs(model, 1, CACHE_LEN),
                        level=0)
    assert _op_counts(cm.executable.path)["ScatterElements"] == 4
    _decode_against_eager(cm, model, "llama-tiny", [torch.randn(s.shape) for s in cm.inputs[2:]])


def test_decode_generate_matches_cpu_target(tiny_models, decode_compiles):
    model = tiny_models["llama-tiny"]
    cm = decode_compiles("llama-tiny", 2)
    ref = flashc.compile(DecodeStep(model, CACHE_LEN), "cpu", decode_example_inputs(model, 2, CACHE_LEN), level=3)
    prompt = fresh_ids("llama-tiny", batch=2, seq_len=5)
    got = cm.generate(prompt, 8)
    assert got.shape == (2, 13) and torch.equal(got, ref.generate(prompt, 8))
    assert torch.equal(cm.generate(prompt, 8), got)  # the resident cache is reused: same answer


def test_decode_artifact_round_trip(decode_compiles, tmp_path):
    cm = decode_compiles("gemma-tiny", 1)
    loaded = flashc.load(cm.save(tmp_path / "decode"))
    assert loaded.program.meta.signature == "decode" and loaded.executable.in_place
    kv = [torch.randn(s.shape) for s in cm.inputs[2:]]
    kv_loaded = [t.clone() for t in kv]
    tokens = fresh_ids("gemma-tiny", seq_len=3)
    for t in range(3):
        ids, pos = tokens[:, t:t + 1], torch.tensor([t])
        assert torch.equal(cm(ids, pos, *kv), loaded(ids, pos, *kv_loaded))
    assert all(torch.equal(a, b) for a, b in zip(kv, kv_loaded, strict=True))
    assert torch.equal(loaded.generate(tokens, 4), cm.generate(tokens, 4))


class RunningState(torch.nn.Module):
    """Writes its inputs in place: a chain (mul_ then add_) read afterwards, and a write nothing reads."""

    def forward(self, x, state, count):
        state.mul_(0.5).add_(x)
        count.add_(1)
        return state.sum(-1)


class ReadThenWrite(torch.nn.Module):
    """Reads an input, then writes it: the write must not land in the input's buffer before the read."""

    def forward(self, x, state, count):
        before = state * 2
        state.add_(x)
        return before + state


@pytest.mark.parametrize("module,shared", [(RunningState, "state,count"), (ReadThenWrite, None)])
def test_inputs_written_in_place_become_present_outputs(module, shared, tmp_path):
    x, state, count = torch.randn(2, 4), torch.randn(2, 4), torch.zeros(3)
    program = capture(module(), (x, state.clone(), count.clone()))
    path = export_onnx(program, tmp_path / "state.onnx")
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props}.get(SHARED_PRESENT_KEY) == shared
    ort_model = OnnxRuntimeModel.load(path)
    written = ["state", "count"] if module is RunningState else ["state"]
    assert ort_model.output_names == ["output_0"] + [f"present.{name}" for name in written]
    assert ort_model.result_names == ["output_0"]
    ref_state, ref_count = state.clone(), count.clone()
    for _ in range(2):  # the second call reuses the binding
        got = ort_model(x, state, count)
        ref = module()(x, ref_state, ref_count)
    assert len(got) == 1 and torch.allclose(got[0], ref)
    assert torch.allclose(state, ref_state) and torch.equal(count, ref_count)


# --- int4 (MatMulNBits) ----------------------------------------------------------------------------

def _run_matmul_nbits(weight: Int4Weight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    import onnx_ir as ir
    import onnxruntime as ort

    from flashc.backends.onnx._builder import GraphBuilder
    from flashc.backends.onnx.int4 import matmul_nbits_node

    b = GraphBuilder(21)
    xv = ir.Value(name="x", shape=ir.Shape(x.shape), type=ir.TensorType(ir.DataType.FLOAT))
    y = matmul_nbits_node(b, xv, weight, "w", bias=b.weight("bias", bias) if bias is not None else None)
    y.name = "y"
    graph = ir.Graph([xv], [y], nodes=b.nodes, initializers=b.initializers, opset_imports=b.domains, name="w4")
    proto = ir.to_proto(ir.Model(graph, ir_version=10))
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


@pytest.mark.parametrize("n,k,block,zero_points", [(48, 128, 32, True), (40, 80, 32, True),
                                                   (24, 64, 16, False), (17, 200, 64, True)])
def test_matmul_nbits_matches_dequantized_matmul(n, k, block, zero_points):
    g = torch.Generator().manual_seed(n * k)
    nb = -(-k // block)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, nb, generator=g) * 0.1 + 0.01
    zp = torch.randint(0, 16, (n, nb), generator=g, dtype=torch.uint8) if zero_points else None
    weight = Int4Weight.from_quantized(q, scales, zp, block)
    per_k = lambda t: t.float().repeat_interleave(block, 1)[:, :k]  # noqa: E731
    w = (q.float() - (per_k(zp) if zero_points else 8.0)) * per_k(scales)
    assert torch.equal(weight.dequantize(), w)
    x, bias = torch.randn(3, 5, k, generator=g), torch.randn(n, generator=g)
    assert rel_err(_run_matmul_nbits(weight, x, bias), x @ w.t() + bias) < 1e-5


@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_int4_error_within_half_a_step(symmetric):
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    weight = Int4Weight.from_float(w, 32, symmetric=symmetric)
    _, scales, _ = quantize_int4(w, 32, symmetric)
    err = (weight.dequantize() - w).abs() / scales.repeat_interleave(32, 1)
    assert err.max() <= 0.5 + 1e-4
    assert weight.packed.shape == (64, 3, 16) and weight.packed.dtype == torch.uint8


class OneHot(nn.Module):
    def forward(self, i, x):
        return F.one_hot(i, 7) * x.shape[0], F.one_hot(x.argmax(-1), x.shape[-1]).float() * x


def test_one_hot_matches_eager_and_refuses_classes_out_of_range():
    """one_hot as a comparison with the class range; a class outside [0, C) is an error as in
    PyTorch (ONNX's OneHot would give it a row of zeros, and wrap negative ones)."""
    make = lambda: (torch.randint(0, 7, (3, 5)), torch.randn(4, 6))
    cm = flashc.compile(OneHot(), target="onnx-cpu", example_inputs=make())
    for _ in range(3):
        inputs = make()
        for got, want in zip(cm(*inputs), OneHot()(*inputs)):
            assert got.dtype == want.dtype and torch.equal(got, want)
    for bad in (7, -1):
        i, x = make()
        i[1, 2] = bad
        with pytest.raises(RuntimeError):
            OneHot()(i, x)
        with pytest.raises(FlashcError, match="one_hot.*out of data bounds"):
            cm(i, x)


class EmptyResults(nn.Module):
    """Outputs without elements (a diagonal past the edge, an empty split) and an input without them:
    their tensors may have no memory at all, which ONNX Runtime's binding refuses unless given an address."""

    def forward(self, x, nothing):
        return x.diagonal(2, 1, 2) * 2, x.split([2, 0], -1), nothing * 2, x.sum(-1) + nothing.sum()


def test_tensors_without_elements_in_and_out():
    check_against_eager(EmptyResults(), lambda: (torch.randn(4, 4, 2), torch.randn(0, 3)), 0)


class TorchlibShapesAndViews(nn.Module):
    """isnan / isinf / isfinite through torchlib, whose recording gave their results a 0-d shape (ONNX Runtime
    then refused the bound output); meshgrid and movedim, which torchlib lacks, through PyTorch's own
    decompositions of them (their results are views, as in eager)."""

    def forward(self, x, y):
        return (x.isnan(), x.isinf(), x.isfinite(), *torch.meshgrid(x[0], y[:, 0], indexing="xy"),
                torch.movedim(x.view(2, 2, 4), (0, 1), (2, 0)) * 2)


def test_torchlib_result_shapes_and_view_decompositions():
    def inputs():
        x = torch.randn(4, 4)
        x[0, 1], x[1, 2] = float("nan"), float("-inf")
        return x, torch.randn(3, 2)

    check_against_eager(TorchlibShapesAndViews(), inputs, 0)
