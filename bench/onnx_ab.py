"""Interleaved A/B on the CPU: flashc ONNX exports (-O3 with and without contrib ops, -O2) vs
torch.onnx.export of the unoptimized model, 128 tokens. Rounds alternate between variants so
machine noise hits all of them alike; prints median and min per call.

    python bench/onnx_ab.py [MODEL [ROUNDS CALLS]]     (default: llama-tiny 20 10)
"""
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import torch, time, statistics, flashc, tempfile
from pathlib import Path
from flashc import zoo
from cpu_bench import torch_onnx_baseline
torch.set_num_threads(2)
name = sys.argv[1] if len(sys.argv) > 1 else "llama-tiny"
rounds, calls = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (20, 10)
m = zoo.build(name); ids = zoo.example_inputs(name, 1, 128)[0]
variants = {}
for co in (True, False):
    cm = flashc.compile(m, "onnx-cpu", ids, level=3, options={"contrib_ops": co})
    variants[f"flashc onnx contrib={co}"] = (lambda cm=cm: cm.executable(ids))
cm2 = flashc.compile(m, "onnx-cpu", ids, level=2)
variants["flashc onnx -O2"] = lambda: cm2.executable(ids)
variants["torch.onnx"] = torch_onnx_baseline(m, ids, Path(tempfile.mkdtemp()) / "m.onnx")
res = {k: [] for k in variants}
for _ in range(rounds):
    for k, fn in variants.items():
        fn()
        t = time.perf_counter()
        for _ in range(calls): fn()
        res[k].append((time.perf_counter() - t) / calls * 1e3)
for k, v in res.items(): print(f"{k:28s} median {statistics.median(v):.3f} ms  min {min(v):.3f}")
