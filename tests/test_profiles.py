"""Hardware profiles and the roofline cost model."""

import pytest
import torch

from flashc import zoo
from flashc.capture import capture
from flashc.cost_model import estimate, node_flops
from flashc.ir import op_name
from flashc.pass_manager import PassContext, PassManager
from flashc.pipelines import pipeline
from flashc.profiles import PROFILES, detect, get_profile


def test_builtin_profiles_have_sources_and_rates():
    for name in ("cpu", "a100", "h100", "h200", "l4", "lpu-v1"):
        p = get_profile(name)
        assert p.source and p.memory_bandwidth > 0 and p.flops_for(torch.bfloat16) > 0
    assert PROFILES["h100"].compute_capability == (9, 0) and "fp8" in PROFILES["h100"].features
    assert PROFILES["h200"].memory_bandwidth > PROFILES["h100"].memory_bandwidth


def test_detect_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("GPU present")
    p = detect()
    assert p.kind == "cpu" and p.peak_flops["float32"] > 0


def test_linear_flops_exact():
    m = torch.nn.Linear(64, 32, bias=False)
    program = capture(m, (torch.randn(5, 64),))
    from flashc.ir import propagate_shapes

    propagate_shapes(program)
    (lin,) = [n for n in program.op_nodes() if op_name(n) == "aten.linear"]
    assert node_flops(lin) == 2 * 5 * 64 * 32


def test_decode_estimate_reads_all_weights_once():
    model = zoo.build("llama-3.2-1b", dtype=torch.bfloat16, device="meta")
    program = capture(model, zoo.example_inputs("llama-3.2-1b", 1, 1), {"use_cache": False})
    PassManager(pipeline(2)).run(program, PassContext(PROFILES["h100"]))
    est = estimate(program, PROFILES["h100"])
    weights = sum(p.numel() * 2 for p in model.parameters())  # tied embedding counted once
    assert est.bytes == pytest.approx(weights, rel=0.02)
    floor = weights / PROFILES["h100"].memory_bandwidth
    assert floor < est.seconds < floor + est.kernels * PROFILES["h100"].kernel_overhead_s * 1.01


@pytest.mark.parametrize("device_name, profile", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100-SXM5-80GB", "h100"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-40GB", "a100"), ("NVIDIA L4", "l4"), ("NVIDIA L40S", None), ("NVIDIA L40", None),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_one_table_names_the_profile_of_a_gpu(device_name, profile):
    from flashc.profiles import profile_name_for_gpu

    assert profile_name_for_gpu(device_name) == profile
