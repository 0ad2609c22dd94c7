"""The ONNX backend: export, onnx.checker, ONNX Runtime numerics, fused-kernel mapping, errors,
the decode step (past/present KV), int4."""

from __future__ import annotations

import collections
import inspect
import sys

import pytest
import torch
import torch.nn.functional as F
from flashc_testing import FAMILIES, fresh_ids, rel_err

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")

import flashc  # noqa: E402
from flashc.backends.onnx import OnnxRuntimeModel, export_onnx, lowers  # noqa: E402
from flashc.backends.onnx.int4 import Int4Weight, quantize_int4  # noqa: E402
from flashc.backends.onnx.runtime import SHARED_PRESENT_KEY, resolve_providers  # noqa: E402
from flashc.capture import capture  # noqa: E402
from flashc.decode import DecodeStep, decode_example_inputs  # noqa: E402
from flashc.errors import FlashcError, InputError, UnsupportedOpError  # noqa: E402
from flashc.pass_manager import PassContext, PassManager  # noqa: E402
from flashc.pipelines import pipeline  # noqa: E402
from flashc.profiles import PROFILES  # noqa: E402

TOL = 1e-4
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


def test_backend_lower_save_load(tiny_models, tmp_path):
    from flashc.backends.onnx.backend import OnnxBackend

    model = tiny_models["qwen2-tiny"]
    program = _optimize(model, (fresh_ids("qwen2-tiny"),), 2)
    backend = OnnxBackend()
    run = backend.lower(program, PROFILES["cpu"], {})
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
    assert loaded.program.meta["signature"] == "decode" and loaded.executable.in_place
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
