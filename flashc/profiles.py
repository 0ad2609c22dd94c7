"""Hardware profiles: data about a chip that passes, the cost model and reports read.

Figures are datasheet values (dense, no sparsity) unless marked measured; sources are
noted per profile. `detect()` builds a profile for the machine flashc runs on.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch

from flashc.errors import unknown_name

TFLOPS = 1e12
TBPS = 1e12


@dataclass(frozen=True)
class HardwareProfile:
    """Peak rates, memory system and features of one chip (per device)."""

    name: str
    kind: str  # "gpu", "cpu" or "lpu"
    peak_flops: dict[str, float]  # by dtype name: bfloat16, float16, float32, float8, int8
    memory_bandwidth: float  # bytes/s of main memory (HBM, DRAM, or SRAM for an LPU)
    memory_bytes: float
    sm_count: int = 0
    smem_per_sm: int = 0
    l2_bytes: int = 0
    compute_capability: tuple[int, int] | None = None
    features: frozenset[str] = field(default_factory=frozenset)  # fp8, sparsity_2_4, wgmma, tma
    # Fixed cost of one kernel (launch + tail); a hundred-odd kernels per decoded token
    # make this as large as the arithmetic (see shared design notes, H100 2026-11-25).
    kernel_overhead_s: float = 4e-6
    source: str = ""

    def flops_for(self, dtype: torch.dtype) -> float:
        name = str(dtype).removeprefix("torch.")
        if name in self.peak_flops:
            return self.peak_flops[name]
        if "float8" in name:
            return self.peak_flops.get("float8", self.peak_flops.get("bfloat16", 0.0))
        if not dtype.is_floating_point:
            return self.peak_flops.get("int8", self.peak_flops.get("float32", 0.0))
        return self.peak_flops.get("float32", 0.0)

    def summary(self) -> dict:
        d = asdict(self)
        d["features"] = sorted(self.features)
        return d


PROFILES: dict[str, HardwareProfile] = {
    "cpu": HardwareProfile(
        name="cpu", kind="cpu",
        # A 2-core AVX2 x86 server slice: 2 cores x 2.5 GHz x 32 fp32 FLOP/cycle.
        peak_flops={"float32": 160e9, "bfloat16": 160e9, "float16": 80e9},
        memory_bandwidth=20e9, memory_bytes=24 * 2**30, kernel_overhead_s=10e-6,
        source="estimate for this project's 2-core development machines",
    ),
    "a100": HardwareProfile(
        name="a100", kind="gpu",
        peak_flops={"bfloat16": 312 * TFLOPS, "float16": 312 * TFLOPS, "float32": 19.5 * TFLOPS,
                    "tf32": 156 * TFLOPS, "int8": 624 * TFLOPS},
        memory_bandwidth=2.039 * TBPS, memory_bytes=80 * 2**30, sm_count=108, smem_per_sm=164 * 1024,
        l2_bytes=40 * 2**20, compute_capability=(8, 0), features=frozenset({"sparsity_2_4"}),
        source="NVIDIA A100 datasheet (SXM4 80GB)",
    ),
    "h100": HardwareProfile(
        name="h100", kind="gpu",
        peak_flops={"bfloat16": 989 * TFLOPS, "float16": 989 * TFLOPS, "float32": 67 * TFLOPS,
                    "tf32": 494 * TFLOPS, "float8": 1979 * TFLOPS, "int8": 1979 * TFLOPS},
        memory_bandwidth=3.35 * TBPS, memory_bytes=80 * 2**30, sm_count=132, smem_per_sm=228 * 1024,
        l2_bytes=50 * 2**20, compute_capability=(9, 0),
        features=frozenset({"fp8", "sparsity_2_4", "wgmma", "tma"}),
        source="NVIDIA H100 datasheet (SXM5); measured on the lent H100 2026-11: 798 TFLOP/s bf16 "
               "matmul, ~3.0 TB/s copy",
    ),
    "h200": HardwareProfile(
        name="h200", kind="gpu",
        peak_flops={"bfloat16": 989 * TFLOPS, "float16": 989 * TFLOPS, "float32": 67 * TFLOPS,
                    "tf32": 494 * TFLOPS, "float8": 1979 * TFLOPS, "int8": 1979 * TFLOPS},
        memory_bandwidth=4.8 * TBPS, memory_bytes=141 * 2**30, sm_count=132, smem_per_sm=228 * 1024,
        l2_bytes=50 * 2**20, compute_capability=(9, 0),
        features=frozenset({"fp8", "sparsity_2_4", "wgmma", "tma"}),
        source="NVIDIA H200 datasheet (SXM); measured on a lent H200 2026-10: 788 TFLOP/s bf16, ~4.3 TB/s copy",
    ),
    "l4": HardwareProfile(
        name="l4", kind="gpu",
        peak_flops={"bfloat16": 121 * TFLOPS, "float16": 121 * TFLOPS, "float32": 30.3 * TFLOPS,
                    "float8": 242 * TFLOPS, "int8": 242 * TFLOPS},
        memory_bandwidth=0.3 * TBPS, memory_bytes=24 * 2**30, sm_count=58, smem_per_sm=100 * 1024,
        l2_bytes=48 * 2**20, compute_capability=(8, 9), features=frozenset({"fp8", "sparsity_2_4"}),
        source="NVIDIA L4 datasheet",
    ),
    "lpu-v1": HardwareProfile(
        name="lpu-v1", kind="lpu",
        # An SRAM-only deterministic dataflow chip in the style of Groq's first LPU:
        # 230 MB on-die SRAM at 80 TB/s, 188 TFLOP/s fp16, 750 TOPS int8; no DRAM.
        peak_flops={"float16": 188 * TFLOPS, "bfloat16": 188 * TFLOPS, "float32": 47 * TFLOPS,
                    "int8": 750 * TFLOPS},
        memory_bandwidth=80 * TBPS, memory_bytes=230e6, kernel_overhead_s=0.0,
        features=frozenset({"deterministic", "sram_only"}),
        source="GroqChip public product brief (v1)",
    ),
}


def get_profile(name: str | HardwareProfile) -> HardwareProfile:
    """The built-in profile called `name` ('detect' builds one for this machine)."""
    if isinstance(name, HardwareProfile):
        return name
    if name == "detect":
        return detect()
    if name not in PROFILES:
        raise unknown_name("hardware profile", name, list(PROFILES) + ["detect"])
    return PROFILES[name]


# The built-in profile of a GPU, by the name CUDA reports ("NVIDIA H100 80GB HBM3"): the one
# table flashc detects hardware with (the profile of a compile, and the tuning tables of
# codegen/tuning.py, which the CUDA backend hands the profile it runs on).
GPU_NAMES = (("H200", "h200"), ("H100", "h100"), ("A100", "a100"), ("L4", "l4"))


def profile_name_for_gpu(device_name: str) -> str | None:
    """The built-in profile for a GPU's name, or None. "L4" must not match "L40S": names
    are compared as whole words ("H100" also inside "H100-SXM5")."""
    words = device_name.replace("-", " ").split()
    for needle, name in GPU_NAMES:
        if needle in words or (needle != "L4" and needle in device_name):
            return name
    return None


def detect(device: int | None = None) -> HardwareProfile:
    """A profile for the local device: the matching built-in GPU profile, or the CPU's."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device if device is not None else 0)
        known = profile_name_for_gpu(props.name)
        if known is not None:
            return PROFILES[known]
        base = PROFILES["h100"] if props.major >= 9 else PROFILES["a100"]
        return HardwareProfile(
            name=f"detected:{props.name}", kind="gpu", peak_flops=base.peak_flops,
            memory_bandwidth=base.memory_bandwidth, memory_bytes=props.total_memory,
            sm_count=props.multi_processor_count, compute_capability=(props.major, props.minor),
            source=f"detected {props.name}; rates assumed from {base.name}",
        )
    cores = os.cpu_count() or 1
    cpu = PROFILES["cpu"]
    scale = cores / 2
    return HardwareProfile(
        name="cpu", kind="cpu", peak_flops={k: v * scale for k, v in cpu.peak_flops.items()},
        memory_bandwidth=cpu.memory_bandwidth, memory_bytes=cpu.memory_bytes,
        kernel_overhead_s=cpu.kernel_overhead_s, source=f"detected {cores} CPU cores; {cpu.source}",
    )
