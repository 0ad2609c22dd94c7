"""flashc.codegen.tuning: the tuning space as data, the on-disk autotune cache, export/import."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from flashc.codegen import tuning

KERNELS = ("rms_norm", "add_rms_norm", "rotary", "glu", "attention", "decode_attention", "moe")
SRC_A = "def kernel(x):\n    return x + 1\n"
SRC_B = "def kernel(x):\n    return x + 2\n"
CANDS = [{"BLOCK": 16, "num_warps": 2}, {"BLOCK": 32, "num_warps": 4}, {"BLOCK": 64, "num_warps": 8}]
KEY = {"M": 1000, "H": 4096, "dtype": "bfloat16"}


class FakeBench:
    """Stands in for do_bench on CPU: runs the candidate once and reports a chosen time per BLOCK."""

    def __init__(self, ms_by_block, fail_blocks=()):
        self.ms_by_block = ms_by_block
        self.fail_blocks = set(fail_blocks)
        self.runs: list[dict] = []

    def run_fn(self, cfg):
        self.runs.append(cfg)
        if cfg["BLOCK"] in self.fail_blocks:
            raise RuntimeError("out of resources (simulated)")
        self.last = cfg

    def __call__(self, fn):
        fn()
        return self.ms_by_block[self.last["BLOCK"]]


def _tune(bench, source=SRC_A, key=KEY, **kw):
    return tuning.autotune("my_kernel", key, CANDS, bench.run_fn, "h100", kernel_source=source, bench_fn=bench, **kw)


def test_space_is_complete_for_every_profile():
    for profile in ("h100", "a100", "h200", "l4", "default"):
        assert profile in tuning.PROFILES
        hw = tuning.hardware(profile)
        assert hw["sm_count"] > 0 and hw["smem_per_block"] > 0
        for kernel in KERNELS:
            cands = tuning.candidates(kernel, profile)
            assert cands and all(isinstance(c, dict) and c for c in cands)
            assert all(c.get("num_warps", 4) in (1, 2, 4, 8, 16) for c in cands)
    assert tuning.candidates("attention", "no-such-gpu") == tuning.candidates("attention", "default")
    with pytest.raises(KeyError, match="known kernels"):
        tuning.candidates("no_such_kernel", "h100")
    # candidates are copies: mutating them does not change the space
    tuning.candidates("rotary", "h100")[0]["BLOCK_S"] = -1
    assert tuning.candidates("rotary", "h100")[0]["BLOCK_S"] != -1


def test_shape_bucket_rounds_ints_to_powers_of_two_and_ignores_order():
    assert tuning.shape_bucket({"M": 1000, "H": 4096, "causal": True, "dtype": "fp16"}) == "H=4096,M=1024,causal=1,dtype=fp16"
    assert tuning.shape_bucket({"b": 3, "a": 1}) == tuning.shape_bucket({"a": 1, "b": 4})
    assert tuning.shape_bucket({"a": 5}) != tuning.shape_bucket({"a": 9})


def test_no_gpu_returns_first_candidate_without_timing_or_writing(monkeypatch):
    monkeypatch.setattr(tuning, "_can_time_on_gpu", lambda: False)
    calls = []
    best = tuning.autotune("my_kernel", KEY, CANDS, calls.append, "h100", kernel_source=SRC_A)
    assert best == CANDS[0] and calls == []
    assert not os.path.exists(tuning.cache_path())


def test_autotune_picks_fastest_writes_cache_and_hits_it(tmp_path):
    bench = FakeBench({16: 3.0, 32: 1.0, 64: 2.0})
    best = _tune(bench)
    assert best == CANDS[1]
    assert len(bench.runs) == 3

    path = tuning.cache_path()
    assert path == str(tmp_path / "flashc_cache" / "tuning.json")
    data = json.load(open(path))
    (key,) = data["entries"]
    sha = hashlib.sha256(SRC_A.encode() + b"\0").hexdigest()
    assert key == f"h100|my_kernel|{tuning.shape_bucket(KEY)}|{sha}"
    assert sha in key and "my_kernel" in key and "h100" in key
    assert data["entries"][key]["config"] == CANDS[1]
    assert data["entries"][key]["ms"] == 1.0
    assert [t["ms"] for t in data["entries"][key]["timings"]] == [3.0, 1.0, 2.0]
    # atomic write leaves no temp file behind
    assert os.listdir(os.path.dirname(path)) == ["tuning.json"]

    # second call: cache hit, run_fn is not called
    assert _tune(bench) == CANDS[1]
    assert len(bench.runs) == 3
    # same bucket (M=900 rounds to 1024 like M=1000): hit
    assert _tune(bench, key={**KEY, "M": 900}) == CANDS[1]
    assert len(bench.runs) == 3
    # a fresh process (memory cache dropped) reads the file: still a hit
    tuning.clear_memory_cache()
    assert _tune(bench) == CANDS[1]
    assert len(bench.runs) == 3


def test_changed_kernel_source_retunes():
    bench = FakeBench({16: 3.0, 32: 1.0, 64: 2.0})
    _tune(bench, SRC_A)
    bench.ms_by_block = {16: 0.5, 32: 1.0, 64: 2.0}
    assert _tune(bench, SRC_B) == CANDS[0]
    assert len(bench.runs) == 6
    assert len(json.load(open(tuning.cache_path()))["entries"]) == 2
    assert _tune(bench, SRC_A) == CANDS[1]  # the old source's result is still there


def test_force_retunes():
    bench = FakeBench({16: 3.0, 32: 1.0, 64: 2.0})
    _tune(bench)
    bench.ms_by_block = {16: 3.0, 32: 1.0, 64: 0.1}
    assert _tune(bench, force=True) == CANDS[2]
    assert _tune(bench) == CANDS[2]
    assert len(bench.runs) == 6


@pytest.mark.parametrize("garbage", ["{not json", '["a list"]', '{"entries": 5}', "\udcff"])
def test_corrupted_cache_warns_and_retunes(garbage):
    path = tuning.cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(garbage)
    bench = FakeBench({16: 3.0, 32: 1.0, 64: 2.0})
    with pytest.warns(RuntimeWarning, match="tuning cache"):
        assert _tune(bench) == CANDS[1]
    assert len(bench.runs) == 3
    assert len(json.load(open(path))["entries"]) == 1  # rewritten as valid JSON


def test_failing_candidates_are_skipped_and_all_failing_is_an_error():
    bench = FakeBench({16: 3.0, 32: 1.0, 64: 2.0}, fail_blocks={32})
    assert _tune(bench) == CANDS[2]
    bench = FakeBench({16: 3.0, 32: 1.0, 64: 2.0}, fail_blocks={16, 32, 64})
    with pytest.raises(RuntimeError, match="every candidate failed"):
        _tune(bench, source=SRC_B)
    with pytest.raises(ValueError, match="no candidate"):
        tuning.autotune("my_kernel", KEY, [], bench.run_fn, kernel_source=SRC_A, bench_fn=bench)


def test_unknown_source_is_an_error():
    bench = FakeBench({16: 1.0, 32: 1.0, 64: 1.0})
    with pytest.raises(KeyError, match="register_kernel_source"):
        tuning.autotune("never_registered", KEY, CANDS, bench.run_fn, bench_fn=bench)


def test_progress_bar_is_shown(capsys):
    bench = FakeBench({16: 3.0, 32: 1.0, 64: 2.0})
    _tune(bench, progress=True)
    assert "flashc tune my_kernel" in capsys.readouterr().err


def test_export_import_roundtrip(tmp_path, monkeypatch):
    bench = FakeBench({16: 3.0, 32: 1.0, 64: 2.0})
    _tune(bench)
    exported = tuning.export_tuning()
    assert exported["version"] == tuning.CACHE_VERSION and len(exported["entries"]) == 1
    json.dumps(exported)  # serialisable as is

    monkeypatch.setenv("FLASHC_CACHE", str(tmp_path / "other_machine"))
    tuning.clear_memory_cache()
    assert tuning.export_tuning()["entries"] == {}
    assert tuning.import_tuning(exported) == 1
    assert os.path.exists(tuning.cache_path())
    assert _tune(bench) == CANDS[1]
    assert len(bench.runs) == 3  # hit: nothing re-run after import
    assert tuning.import_tuning(exported, overwrite=False) == 0
    with pytest.raises(ValueError, match="export_tuning"):
        tuning.import_tuning({"nope": 1})
    with pytest.raises(ValueError, match="no 'config'"):
        tuning.import_tuning({"version": tuning.CACHE_VERSION, "entries": {"k": {"ms": 1}}})


def test_get_config_uses_tuned_result_for_registered_kernel():
    pytest.importorskip("triton", reason="kernel sources are registered when the Triton modules import")
    from flashc.codegen import triton_norm  # noqa: F401  (registers rms_norm's source)

    key = {"H": 256, "M": 64, "dtype": "float32"}
    assert tuning.cached_config("rms_norm", key, "h100") is None
    default = tuning.get_config("rms_norm", key, "h100")
    assert default == tuning.candidates("rms_norm", "h100")[0]
    cands = tuning.candidates("rms_norm", "h100")
    times = {i: 5.0 - i * 0.5 for i in range(len(cands))}  # the last candidate is fastest

    def bench(fn):
        fn()
        return times[bench.idx]

    def run_fn(cfg):
        bench.idx = cands.index(cfg)

    best = tuning.autotune("rms_norm", key, cands, run_fn, "h100", bench_fn=bench)
    assert best == cands[-1]
    assert tuning.get_config("rms_norm", key, "h100") == cands[-1]
    assert tuning.cached_config("rms_norm", key, "h100") == cands[-1]
    assert tuning.cached_config("rms_norm", key, "a100") is None
    assert tuning.get_config("rms_norm", key, "a100") == tuning.candidates("rms_norm", "a100")[0]
    # a fits() that rejects the tuned config falls back to the first fitting candidate
    assert tuning.get_config("rms_norm", key, "h100", fits=lambda c: c != cands[-1]) == cands[0]


def test_tune_launchers_without_gpu_return_a_candidate(device):
    """tune_* helpers run end to end; without a GPU they return the first fitting candidate untimed."""
    pytest.importorskip("triton", reason="Triton is not installed")
    if device.type == "cuda":
        pytest.skip("timing on a real GPU is exercised by the benchmark scripts, not unit tests")
    from flashc.codegen import triton_attention as ta
    from flashc.codegen import triton_mlp as tm
    from flashc.codegen import triton_norm as tn
    from flashc.codegen import triton_rotary as tr

    x = torch.randn(4, 64)
    assert tn.tune_rms_norm(x, torch.ones(64)) in tuning.candidates("rms_norm", "default")
    assert tm.tune_glu(torch.randn(4, 64)) in tuning.candidates("glu", "default")
    assert tr.tune_rotary(torch.randn(1, 2, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8)) in tuning.candidates("rotary", "default")
    q = torch.randn(1, 2, 8, 16)
    assert ta.tune_attention(q, q, q) in tuning.candidates("attention", "default")
    assert ta.tune_decode_attention(q[:, :, :1], q, q, torch.tensor([8], dtype=torch.int32)) in tuning.candidates(
        "decode_attention", "default"
    )
    assert not os.path.exists(tuning.cache_path())


def test_detect_profile_for_cpu_is_default():
    assert tuning.detect_profile(torch.device("cpu")) == "default"
    assert tuning.detect_profile("cpu") == "default"


def test_modules_import_without_triton_and_launchers_say_why():
    """With Triton missing, references still work and launchers raise TritonUnavailable (checked in a subprocess)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        from flashc.codegen import triton_norm, triton_rotary, triton_mlp, triton_attention, tuning
        from flashc.codegen._triton_common import HAS_TRITON, TritonUnavailable
        assert not HAS_TRITON
        x = torch.randn(2, 8)
        assert triton_norm.reference_rms_norm(x, torch.ones(8)).shape == (2, 8)
        try:
            triton_norm.rms_norm(x, torch.ones(8))
        except TritonUnavailable as e:
            assert "needs Triton" in str(e), e
        else:
            raise AssertionError("no error")
        assert tuning.candidates("attention", "h100")
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_the_backend_hands_its_profile_to_the_kernels():
    """Inside use_profile, every kernel's lookup reads that profile, whatever the device; the
    previous profile comes back after (nested too)."""
    with tuning.use_profile("h200"):
        assert tuning.detect_profile(torch.device("cpu")) == "h200"
        with tuning.use_profile("l4"):
            assert tuning.detect_profile(None) == "l4"
        assert tuning.detect_profile(0) == "h200"
    assert tuning.detect_profile("cpu") == "default"


def test_a_kernel_that_never_compiles_is_said_not_hidden_behind_the_library_path():
    """Every generated candidate failing (e.g. a Triton version that rejects the kernel) leaves the
    library path as the winner: the result stays correct, and a warning gives the first error."""
    cands = CANDS + [{"BLOCK": 128, "library": True}]
    bench = FakeBench({16: 1.0, 32: 1.0, 64: 1.0, 128: 5.0}, fail_blocks=(16, 32, 64))
    with pytest.warns(UserWarning, match="every generated my_kernel kernel failed.*out of resources"):
        best = tuning.autotune("my_kernel", KEY, cands, bench.run_fn, "h100", kernel_source=SRC_A, bench_fn=bench)
    assert best.get("library")
    some_fail = FakeBench({16: 1.0, 32: 2.0, 64: 1.0, 128: 5.0}, fail_blocks=(16,))
    import warnings as w

    with w.catch_warnings():
        w.simplefilter("error")
        best = tuning.autotune("my_kernel", {**KEY, "M": 7}, cands, some_fail.run_fn, "h100", kernel_source=SRC_A,
                               bench_fn=some_fail)
    assert best == CANDS[2]


class FakeJit:
    """Stands in for a Triton JITFunction: `launch` asks the jit_cache_hook as Triton does before compiling."""

    def __init__(self):
        self.compiled: dict[str, str] = {}  # specialization -> thread that compiled it

    def launch(self, spec: str) -> bool:
        """True if the kernel ran (compiling it first when needed), False if the hook skipped it."""
        from triton import knobs

        if spec not in self.compiled:
            hook = knobs.runtime.jit_cache_hook
            info = type("Info", (), {"jit_function": self})()
            if hook and hook(key=spec, repr=spec, fn=info, compile={"key": spec, "specialization_data": spec},
                             is_manual_warmup=False, already_compiled=False):
                return False
            self.preload(spec)
        return True

    def preload(self, spec: str) -> None:
        import threading

        self.compiled.setdefault(spec, threading.current_thread().name)


def test_candidates_compile_side_by_side_before_timing(monkeypatch):
    """autotune first runs every candidate under Triton's jit_cache_hook to learn what each would compile (nothing
    compiles or launches then), compiles those on worker threads, and times them afterwards: no compile is left."""
    knobs = pytest.importorskip("triton.knobs", reason="Triton is not installed")
    monkeypatch.setattr(tuning, "_can_time_on_gpu", lambda: True)
    monkeypatch.setenv("FLASHC_COMPILE_WORKERS", "3")
    jit = FakeJit()
    timed: list[tuple[int, bool]] = []

    def run_fn(cfg):
        ran = jit.launch(f"BLOCK={cfg['BLOCK']}")
        jit.launch("sum_splits")  # a second kernel the candidates share: compiled once
        return ran

    def bench(fn):
        compiled_before = len(jit.compiled)
        assert fn() is True
        timed.append((len(jit.compiled) - compiled_before, True))
        return 1.0

    assert tuning.compile_workers() == 3
    tuning.autotune("my_kernel", KEY, CANDS, run_fn, "h100", kernel_source=SRC_A, bench_fn=bench)
    assert sorted(jit.compiled) == ["BLOCK=16", "BLOCK=32", "BLOCK=64", "sum_splits"]
    assert all(name.startswith("flashc-compile") for name in jit.compiled.values())
    assert timed == [(0, True)] * 3  # timing compiled nothing
    assert knobs.runtime.jit_cache_hook is None  # the hook is handed back


def test_the_recording_hook_is_for_the_tuning_thread_only(monkeypatch):
    """Another thread compiling while candidates are recorded gets the hook that was installed before."""
    knobs = pytest.importorskip("triton.knobs", reason="Triton is not installed")
    import threading

    asked = []
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda **kw: asked.append(kw["key"]))
    other = FakeJit()
    ran_elsewhere = []

    def run_fn(cfg):
        thread = threading.Thread(target=lambda: ran_elsewhere.append(other.launch("elsewhere")))
        thread.start()
        thread.join()
        FakeJit().launch(f"BLOCK={cfg['BLOCK']}")

    specs = tuning._record_compiles([dict(c) for c in CANDS], run_fn)
    assert sorted(data for _, data in specs) == ["BLOCK=16", "BLOCK=32", "BLOCK=64"]
    assert ran_elsewhere == [True] * 3 and asked == ["elsewhere"]  # compiled once there, through the old hook
    assert knobs.runtime.jit_cache_hook is not None and knobs.runtime.jit_cache_hook(key="x") is None


def test_compile_workers_reads_the_environment(monkeypatch):
    monkeypatch.setenv("FLASHC_COMPILE_WORKERS", "0")
    assert tuning.compile_workers() == 0
    monkeypatch.setenv("FLASHC_COMPILE_WORKERS", "many")
    with pytest.raises(ValueError, match="FLASHC_COMPILE_WORKERS"):
        tuning.compile_workers()
    monkeypatch.delenv("FLASHC_COMPILE_WORKERS")
    assert 1 <= tuning.compile_workers() <= 16


def test_a_cold_gpu_tuning_compiles_every_candidate_before_timing_it(device, monkeypatch):
    """On a GPU: after the side-by-side compiles, timing the GEMV's candidates compiles nothing more."""
    if device.type != "cuda":
        pytest.skip("needs a GPU: Triton compiles for it")
    knobs = pytest.importorskip("triton.knobs", reason="Triton is not installed")
    from flashc.codegen import triton_gemv

    monkeypatch.setenv("FLASHC_COMPILE_WORKERS", "4")
    x = torch.randn(1, 320, device=device, dtype=torch.bfloat16)  # a shape no other test compiles
    w = torch.randn(448, 320, device=device, dtype=torch.bfloat16)
    late = []
    real = tuning._precompile

    def precompile_then_watch(cands, run_fn, workers):
        n = real(cands, run_fn, workers)
        knobs.runtime.jit_cache_hook = lambda **kw: late.append(kw["repr"])
        return n

    monkeypatch.setattr(tuning, "_precompile", precompile_then_watch)
    try:
        cfg = triton_gemv.tune_gemv(x, w)
    finally:
        knobs.runtime.jit_cache_hook = None
    assert late == []
    y = triton_gemv.gemv(x, w, config=cfg)  # the winner computes the product
    torch.testing.assert_close(y.double(), x.double() @ w.double().T, rtol=2e-2, atol=5e-2)
