"""The TVM backend on CPU (llvm): numerics of all five families, weight layout, errors,
artifacts (atomic export, runtime-only load), default CPU schedules and threads, a CUDA
build without a GPU, tuning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from flashc_testing import FAMILIES, fresh_ids, rel_err

pytest.importorskip("tvm", reason="Apache TVM is not installed: pip install apache-tvm==0.27.0.post1 "
                                  "apache-tvm-ffi==0.1.14.post0")

from flashc.backends import tvm as flashc_tvm  # noqa: E402
from flashc.backends.tvm import (  # noqa: E402
    TvmBackend, TvmModel, build_tvm, load_tvm_artifact, lower_to_relax, weight_transposes,
)
from flashc.capture import capture  # noqa: E402
from flashc.errors import FlashcError, InputError, UnsupportedOpError  # noqa: E402
from flashc.ir import op_name  # noqa: E402
from flashc.pass_manager import PassContext, PassManager  # noqa: E402
from flashc.pipelines import pipeline  # noqa: E402
from flashc.profiles import PROFILES  # noqa: E402

TOL = 1e-4
CASES = [(f, 3) for f in FAMILIES] + [("llama-tiny", 0)]


def _optimize(model, inputs, level):
    program = capture(model, inputs, {"use_cache": False})
    PassManager(pipeline(level)).run(program, PassContext(PROFILES["cpu"]))
    return program


@pytest.fixture(scope="module")
def programs(tiny_models):
    """Optimized Programs, built once per (family, level)."""
    cache = {}

    def get(family, level):
        if (family, level) not in cache:
            cache[family, level] = _optimize(tiny_models[family], (fresh_ids(family, seed=0),), level)
        return cache[family, level]

    return get


@pytest.mark.parametrize("family,level", CASES, ids=[f"{f}-O{lv}" for f, lv in CASES])
def test_build_export_load_matches_program_and_hf(tiny_models, programs, family, level, tmp_path):
    program = programs(family, level)
    ops = {op_name(n) for n in program.op_nodes()}
    if level == 3:  # the flashc ops are what this test exercises
        assert {"flashc.rms_norm", "flashc.attention", "flashc.rotary"} <= ops
        assert ("flashc.moe" in ops) == (family == "mixtral-tiny")
    build = build_tvm(program, "llvm")
    assert weight_transposes(build.relax_module) == 0
    build.export(tmp_path / "art")
    manifest = json.loads((tmp_path / "art" / "model.json").read_text())
    assert manifest["target"]["kind"] == "llvm" and manifest["signature"]["inputs"][0]["name"] == "input_ids"
    model = TvmModel.load(tmp_path / "art")
    for _ in range(2):  # fresh ids each time; the second call must not disturb the first's outputs
        ids = fresh_ids(family)
        got = model(ids)
        kept = got[0].clone()
        ref = program.run_flat(ids)
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            assert g.shape == r.shape and g.dtype == r.dtype
            assert rel_err(g, r) < TOL
        with torch.no_grad():
            hf = tiny_models[family](ids, use_cache=False).logits
        assert rel_err(got[0], hf) < TOL
    model(fresh_ids(family))
    assert torch.equal(kept, got[0])


def test_weights_are_stored_in_the_layout_their_op_reads(programs):
    program = programs("mixtral-tiny", 3)
    lowered = lower_to_relax(program)
    linears = [n for n in program.op_nodes() if op_name(n) == "aten.linear"]
    moes = [n for n in program.op_nodes() if op_name(n) == "flashc.moe"]
    assert linears and moes
    for node in linears:
        w = node.args[1]
        stored = lowered.weights[w.name + ".T"]
        assert torch.equal(stored, program.params[w.name].t()) and stored.is_contiguous()
    for node in moes:
        gate_up, down = (program.params[a.name] for a in node.args[2:4])
        e, f2, h = gate_up.shape
        cols, rows = lowered.weights[node.args[2].name + ".cols"], lowered.weights[node.args[3].name + ".rows"]
        assert cols.shape == (h, e * f2) and rows.shape == (e * f2 // 2, h)
        assert torch.equal(cols[:, f2:2 * f2], gate_up[1].t())  # expert 1's block of columns
        assert torch.equal(rows[f2 // 2:f2], down[1].t())  # expert 1's block of rows


def test_weight_transpose_count_sees_frontend_transposes():
    """The check above can fail: TVM's own frontend with params as inputs transposes weights per call."""
    from tvm.relax.frontend.torch import from_exported_program

    lin = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
    x = torch.randn(3, 8)
    mod = from_exported_program(torch.export.export(lin, (x,)), keep_params_as_input=True)
    assert weight_transposes(mod) == 2
    assert weight_transposes(lower_to_relax(capture(lin, (x,))).module) == 0


class _Unsupported(torch.nn.Module):
    def forward(self, x):
        return torch.logcumsumexp(x, dim=-1) * 2  # LINE_OF_UNSUPPORTED_OP


def test_unsupported_op_names_op_and_source_line():
    program = capture(_Unsupported(), (torch.randn(2, 5),))
    with pytest.raises(UnsupportedOpError) as e:
        build_tvm(program, "llvm")
    msg = str(e.value)
    import inspect

    lines, start = inspect.getsourcelines(_Unsupported.forward)
    line = start + next(i for i, l in enumerate(lines) if "LINE_OF_UNSUPPORTED_OP" in l)
    assert "aten.logcumsumexp" in msg
    assert f"test_tvm.py:{line}" in msg
    assert "eager" in msg
    assert not TvmBackend().lowering.lowers("aten.logcumsumexp") and TvmBackend().lowering.lowers("flashc.moe")


def test_wrong_input_and_missing_tvm(programs, tmp_path, monkeypatch):
    build = build_tvm(programs("llama-tiny", 3), "llvm")
    model = build.load()
    with pytest.raises(InputError, match="input_ids"):
        model(torch.zeros(1, 8, dtype=torch.int64))
    with pytest.raises(InputError):
        model(torch.zeros(1, 16, dtype=torch.int32))
    monkeypatch.setitem(sys.modules, "tvm", None)
    with pytest.raises(FlashcError, match="pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post0"):
        flashc_tvm.import_tvm()


def test_export_is_atomic_and_runtime_only_load_works(programs, tmp_path, monkeypatch):
    program = programs("qwen2-tiny", 3)
    build = build_tvm(program, "llvm")
    art = tmp_path / "art"
    build.export(art)
    before = sorted(p.name for p in art.iterdir())

    def broken_manifest():
        raise RuntimeError("disk full")

    monkeypatch.setattr(build, "manifest", broken_manifest)
    with pytest.raises(RuntimeError, match="disk full"):
        build.export(art)
    assert sorted(p.name for p in art.iterdir()) == before  # the old artifact is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temporary left behind
    monkeypatch.undo()
    build.export(art)  # replacing an existing artifact works

    ids = fresh_ids("qwen2-tiny")
    torch.save((ids, program.run_flat(ids)[0]), tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        "from flashc.backends.tvm import load_tvm_artifact\n"
        f"model = load_tvm_artifact({str(art)!r})\n"
        f"ids, ref = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "out = model(ids)[0]\n"
        "import tvm\n"
        "assert tvm._RUNTIME_ONLY and 'tvm.relax' not in sys.modules, 'compiler loaded'\n"
        "print(((out.double() - ref.double()).norm() / ref.double().norm()).item())\n"
    )
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.strip().splitlines()[-1]) < TOL


def test_runtime_only_load_runs_contrib_topk(programs, tmp_path):
    """MoE routing on the CPU calls tvm.contrib.sort.topk, which TVM's runtime alone lacks
    until libtvm_runtime_extra.so is loaded."""
    program = programs("mixtral-tiny", 3)
    build_tvm(program, "llvm").export(tmp_path / "art")
    ids = fresh_ids("mixtral-tiny")
    torch.save((ids, program.run_flat(ids)[0]), tmp_path / "io.pt")
    code = (
        "import torch\n"
        "from flashc.backends.tvm import load_tvm_artifact\n"
        f"ids, ref = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"out = load_tvm_artifact({str(tmp_path / 'art')!r})(ids)[0]\n"
        "print(((out.double() - ref.double()).norm() / ref.double().norm()).item())\n"
    )
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.strip().splitlines()[-1]) < TOL


def _scheduled_functions(program):
    """The fused TIR functions of program's CPU build after flashc's default schedules."""
    import tvm
    from tvm.s_tir import dlight as dl

    from flashc.backends.tvm.build import _fuse
    from flashc.backends.tvm.cpu_schedules import schedule_rules

    target = tvm.target.Target(flashc_tvm.make_target("llvm"))
    mod = _fuse(tvm, lower_to_relax(program).module, target)
    with target:
        mod = dl.ApplyDefaultSchedule(*schedule_rules())(mod)
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def test_cpu_schedules_tile_every_matmul(programs):
    """Every fused function of llama-tiny gets a schedule but the bounds check of the token
    ids (their min and max: a serial loop over 16 ids); matmuls a parallel, vectorized,
    register-tiled one (an accumulator in local scope)."""
    functions = _scheduled_functions(programs("llama-tiny", 3))
    assert sorted(n for n, f in functions.items() if "tirx.is_scheduled" not in f.attrs) == ["max", "min"]
    matmuls = {n: f.script() for n, f in functions.items() if "matmul" in n}
    assert len(matmuls) >= 5
    for name, text in matmuls.items():
        assert "T.parallel" in text and "T.vectorized" in text and 'scope="local"' in text, name


def test_matmul_axes_name_each_iterator():
    from tvm import te

    from flashc.backends.tvm.cpu_schedules import matmul_axes

    def block_of(out, *inputs):
        import tvm

        func = te.create_prim_func([*inputs, out])
        sch = tvm.s_tir.Schedule(func)
        return sch.get(sch.get_sblock(out.op.name))

    k = te.reduce_axis((0, 32), name="k")
    a, b = te.placeholder((4, 16, 32), name="a"), te.placeholder((4, 32, 8), name="b")
    bmm = te.compute((4, 16, 8), lambda s, i, j: te.sum(a[s, i, k] * b[s, k, j], axis=k), name="bmm")
    assert matmul_axes(block_of(bmm, a, b)) == ["S", "I", "J", "K"]
    x, w = te.placeholder((1, 32), name="x"), te.placeholder((32, 8), name="w")
    gemv = te.compute((1, 8), lambda i, j: te.sum(x[i, k] * w[k, j], axis=k), name="gemv")
    assert matmul_axes(block_of(gemv, x, w)) == ["T", "J", "K"]
    rows = te.compute((16,), lambda i: te.sum(a[0, i, k], axis=k), name="rows")
    assert matmul_axes(block_of(rows, a)) is None


class _GatedMlp(torch.nn.Module):
    """silu(x W1^T) * (x W2^T) W3^T unfused (-O0 shape): a matmul epilogue reading the
    matmul's result twice (x * sigmoid(x)) and another input."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = torch.nn.Linear(48, 80, bias=False), torch.nn.Linear(48, 80, bias=False)
        self.w3 = torch.nn.Linear(80, 48)

    def forward(self, x):
        return self.w3(torch.nn.functional.silu(self.w1(x)) * self.w2(x))


@pytest.mark.parametrize("rows", [1, 17, 64])
def test_cpu_schedules_keep_numerics_of_odd_tiles_and_epilogues(rows):
    """Row counts that tile evenly (64), need a partial tile (17) or none (1, a GEMV)."""
    torch.manual_seed(rows)
    model = _GatedMlp().eval()
    x = torch.randn(1, rows, 48)
    with torch.no_grad():
        ref = model(x)
    assert rel_err(build_tvm(capture(model, (x,)), "llvm").load()(x)[0], ref) < TOL


@pytest.mark.parametrize("shape", [(5, 9, 24), (2, 3, 5, 64), (4, 13, 24)])
def test_cpu_schedules_tile_several_row_axes_in_boxes(shape):
    """Rows over several axes (batch x sequence), the inner one not a multiple of the tile: a tile
    straddling an inner row had its accumulator written back over rows it had not computed (a
    Linear on [5, 9, 24] was 63% off; a 1x1 stride-2 transposed convolution failed to build)."""
    torch.manual_seed(len(shape))
    x = torch.randn(shape)
    model = torch.nn.Linear(shape[-1], 40).eval()
    with torch.no_grad():
        ref = model(x)
    assert rel_err(build_tvm(capture(model, (x,)), "llvm").load()(x)[0], ref) < TOL
    conv = torch.nn.ConvTranspose2d(4, 6, 1, stride=2).eval()
    image = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        ref = conv(image)
    assert rel_err(build_tvm(capture(conv, (image,)), "llvm").load()(image)[0], ref) < TOL


def test_cpu_schedule_tiles_vectorizes_and_parallelizes_a_matmul_exactly():
    """The 128x256x512 matmul under `MatmulTiles`: the schedule applies (parallel outer
    loop, vector lanes, unrolled register tile) and the result matches numpy. Its speed
    against TVM's plain loops is measured by bench/tvm_cpu_schedules.py, not here."""
    import numpy as np
    import tvm
    from tvm import te

    from flashc.backends.tvm.cpu_schedules import MatmulTiles

    k = te.reduce_axis((0, 256), name="k")
    a, b = te.placeholder((128, 256), name="a"), te.placeholder((256, 512), name="b")
    c = te.compute((128, 512), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
    func = te.create_prim_func([a, b, c])
    target = tvm.target.Target(flashc_tvm.make_target("llvm"))
    sch = MatmulTiles().apply(func, target, False)
    assert sch is not None
    text = sch.mod["main"].script()
    assert "T.parallel" in text and "T.vectorized" in text
    rng = np.random.default_rng()
    host = [rng.standard_normal(s).astype("float32") for s in ((128, 256), (256, 512), (128, 512))]
    args = [tvm.runtime.tensor(x) for x in host]
    tvm.compile(sch.mod, target=target)["main"](*args)
    expected = host[0].astype("float64") @ host[1].astype("float64")
    np.testing.assert_allclose(args[2].numpy(), expected, rtol=1e-4, atol=1e-3)


def test_row_reductions_reduce_a_vector_of_partial_results():
    """Softmax rows: max and sum over 16-lane partial results (rfactor), within float32
    rounding of numpy's softmax."""
    import numpy as np
    import tvm
    from tvm import te, topi

    from flashc.backends.tvm.cpu_schedules import RowReductions, polynomial_exp

    x = te.placeholder((3, 40, 96), name="x")
    func = te.create_prim_func([x, topi.nn.softmax(x, axis=-1)])
    target = tvm.target.Target(flashc_tvm.make_target("llvm"))
    sch = RowReductions().apply(func, target, False)
    text = sch.mod["main"].script()
    assert text.count("_rf_update") == 2 and "T.vectorized" in text
    data = (np.random.default_rng(0).standard_normal((3, 40, 96)) * 4).astype("float32")
    out = tvm.runtime.tensor(np.zeros_like(data))
    tvm.compile(polynomial_exp()(sch.mod), target=target)["main"](tvm.runtime.tensor(data), out)
    ref = np.exp(data - data.max(-1, keepdims=True))
    np.testing.assert_allclose(out.numpy(), ref / ref.sum(-1, keepdims=True), rtol=2e-6, atol=1e-8)


def test_polynomial_exp_is_within_2_ulp_and_keeps_inf_nan():
    import numpy as np
    import tvm
    from tvm import te

    from flashc.backends.tvm.cpu_schedules import polynomial_exp

    n = 1 << 16
    x = te.placeholder((n,), name="x")
    mod = tvm.IRModule({"main": te.create_prim_func([x, te.compute((n,), lambda i: te.exp(x[i]))])})
    data = np.concatenate([np.linspace(-87, 88, n - 5), [-np.inf, np.inf, np.nan, -200.0, 0.0]]).astype("float32")
    out = tvm.runtime.tensor(np.zeros(n, "float32"))
    tvm.compile(polynomial_exp()(mod), target="llvm")["main"](tvm.runtime.tensor(data), out)
    got, ref = out.numpy()[:-5].astype("float64"), np.exp(data[:-5].astype("float64"))
    assert (np.abs(got - ref) / np.spacing(ref.astype("float32"))).max() <= 2.0
    special = out.numpy()[-5:]
    assert special[0] == 0 and special[1] == np.inf and np.isnan(special[2]) and special[3] == 0 and special[4] == 1


def test_cpu_threads_default_to_physical_cores(monkeypatch):
    """TVM alone takes half the logical CPUs on x86 (1 thread on a 2-vCPU machine)."""
    import tvm

    from flashc.backends.tvm.common import cpu_cores
    from flashc.backends.tvm.runtime import _device

    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    _device(tvm, "cpu")
    assert os.environ["TVM_NUM_THREADS"] == str(cpu_cores())
    monkeypatch.setenv("TVM_NUM_THREADS", "1")  # an explicit choice stays
    _device(tvm, "cpu")
    assert os.environ["TVM_NUM_THREADS"] == "1"


def test_cuda_build_without_gpu_carries_cuda_source(programs, tmp_path):
    build = build_tvm(programs("llama-tiny", 3), "cuda", arch="sm_90")
    build.export(tmp_path / "cuda")
    data = (tmp_path / "cuda" / "model.so").read_bytes()
    assert data.count(b'extern "C" __global__') >= 10  # dlight-scheduled kernels, as CUDA source
    manifest = json.loads((tmp_path / "cuda" / "model.json").read_text())
    assert manifest["target"] == {"kind": "cuda", "arch": "sm_90"}
    with pytest.raises(FlashcError):  # a CUDA artifact never loads on the CPU
        load_tvm_artifact(tmp_path / "cuda", "cpu")
    with pytest.raises(FlashcError, match="only supported for target 'llvm'"):
        build_tvm(programs("llama-tiny", 3), "cuda", arch="sm_90", tune_trials=4)


def test_metaschedule_tuning_of_a_small_linear(tmp_path):
    """4 trials on one fused linear: the record is used, saved with the artifact and re-applied."""
    lin = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.SiLU()).eval()
    x = torch.randn(4, 32)
    program = capture(lin, (x,))
    build = build_tvm(program, "llvm", tune_trials=4, work_dir=tmp_path / "work")
    assert build.tuning["trials"] == 4 and build.tuning["tasks"] == 1
    assert build.tuning["tuned_functions"] == ["fused_matmul_add_silu"]
    build.export(tmp_path / "art")
    records = (tmp_path / "art" / "tuning" / "database_tuning_record.json").read_text().strip().splitlines()
    assert len(records) >= 1
    out = load_tvm_artifact(tmp_path / "art")(x)[0]
    assert rel_err(out, program.run_flat(x)[0]) < TOL
    again = build_tvm(program, "llvm", tuning_database=tmp_path / "art" / "tuning")
    assert again.tuning["tuned_functions"] == ["fused_matmul_add_silu"]
    assert rel_err(again.load()(x)[0], program.run_flat(x)[0]) < TOL


def test_backend_protocol_lower_save_load(programs, tmp_path):
    program = programs("gemma-tiny", 3)
    backend = TvmBackend("llvm")
    executable = backend.lower(program, PROFILES["cpu"], backend.Options())
    ids = fresh_ids("gemma-tiny")
    assert rel_err(executable(ids)[0], program.run_flat(ids)[0]) < TOL
    info = backend.save_payload(executable, tmp_path)
    loaded = backend.load_payload(program, tmp_path, info)
    assert rel_err(loaded(ids)[0], program.run_flat(ids)[0]) < TOL
    again = tmp_path / "again"
    backend.save_payload(loaded, again)  # a loaded artifact saves again (copied)
    assert (again / "tvm" / "model.so").exists()


def test_tvm_cuda_refuses_unfused_attention():
    """-O0 keeps transformers' SDPA, which tvm-cuda got wrong on the GPU: a clear error, not NaN."""
    import flashc
    from flashc import zoo
    from flashc.errors import FlashcError

    model = zoo.build("llama-tiny")
    with pytest.raises(FlashcError, match="-O2 or -O3"):
        flashc.compile(model, "tvm-cuda", zoo.example_inputs("llama-tiny", 1, 8), level=0)


def test_half_precision_linears_and_attention_accumulate_in_float32():
    """A float16 linear over 4096 inputs and attention over 512 keys: each sum in float32 as PyTorch's does
    (a float16 sum was 2.8e-2 off eager on two llama-3.2-1b layers), so TVM's error against a float64 truth
    stays near eager float16's own."""
    torch.manual_seed(0)

    class LinearThenAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4096, 256, bias=False)

        def forward(self, x, k, v):
            q = self.proj(x).reshape(1, 4, 1, 64)
            return self.proj(x), torch.nn.functional.scaled_dot_product_attention(q, k, v)

    model = LinearThenAttention().half().eval()
    x = torch.randn(1, 4096).half()
    k, v = torch.randn(1, 4, 512, 64).half(), torch.randn(1, 4, 512, 64).half()
    program = capture(model, (x, k, v))
    PassManager(pipeline(3)).run(program, PassContext(PROFILES["cpu"]))
    got = build_tvm(program, "llvm").load()(x, k, v)
    with torch.no_grad():
        truth = model.double()(x.double(), k.double(), v.double())
        eager = model.half()(x, k, v)
    for out, want, ref in zip(got, truth, eager):
        assert rel_err(out.double(), want) < 3 * max(rel_err(ref.double(), want), 1e-4)


def test_a_decode_step_writes_its_cache_and_generates_what_the_cpu_target_does():
    """DecodeStep writes each token's keys and values into the cache inputs in place: the module returns
    the caches' new values and the runtime writes them into the caller's tensors, so generation over a
    TVM step is token for token the cpu target's (greedy; a fresh random prompt)."""
    import flashc
    from flashc import zoo
    from flashc.decode import DecodeStep, decode_example_inputs

    model = zoo.build("llama-tiny", seed=0)
    inputs = decode_example_inputs(model, 1, 48)
    tvm_step = flashc.compile(DecodeStep(model, max_cache_len=48), target="tvm-cpu", example_inputs=inputs)
    cpu_step = flashc.compile(DecodeStep(model, max_cache_len=48), target="cpu", example_inputs=inputs)
    prompt = fresh_ids("llama-tiny", batch=1, seq_len=7)
    want = cpu_step.generate(prompt, max_new_tokens=12, ignore_eos=True)
    assert torch.equal(tvm_step.generate(prompt, max_new_tokens=12, ignore_eos=True), want)


def test_decode_attention_lowers_to_a_mask_over_the_cache():
    """flashc.decode_attention (what -O3 makes of a decode step's masked attention over a static cache):
    query s attends the keys j <= cache_position[s], every slot read."""
    import flashc.ops  # noqa: F401  (registers torch.ops.flashc)

    class Step(torch.nn.Module):
        def forward(self, q, k, v, pos):
            return torch.ops.flashc.decode_attention(q, k, v, pos, 0.125)

    q, k, v = torch.randn(2, 4, 3, 64), torch.randn(2, 2, 40, 64), torch.randn(2, 2, 40, 64)
    pos = torch.tensor([17, 18, 19])
    got = build_tvm(capture(Step(), (q, k, v, pos)), "llvm").load()(q, k, v, pos)[0]
    keys = torch.arange(40)
    mask = (keys[None, :] <= pos[:, None])[None, None]
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1), attn_mask=mask, scale=0.125)
    assert rel_err(got.double(), want) < TOL
