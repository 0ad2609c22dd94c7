"""Chip and system profiles for the planner and simulator, as data.

A `SystemProfile` says what one chip can do (memory, how fast its matrix units take in
weights, peak operations, vector throughput, fixed latency per dependent operation) and
how chips connect (links, bandwidth and latency per hop, chips per node). The same fields
describe a statically scheduled SRAM-only chip (`lpu-v1`) and a GPU (`a100`, `h100`,
`h200`), so the simulator predicts both on one footing.

Every figure carries its source in `sources` (field -> where it comes from). Built-in
profiles are written in the same form as a user's JSON profile file and pass through the
same validation (`profile_from_dict`), which names the field it refuses.

GPU profiles take the datasheet figures of `flashc.profiles.PROFILES` (memory size, peak
FLOP/s, the per-kernel overhead) and add what a simulator needs beyond a roofline: the
bandwidth and matmul rate measured on the lent machines (bench/RESULTS.md), NVLink, and
the launch cost a CUDA-graph replay with programmatic dependent launch (PDL) leaves, and
(field `operators`) the prefill operator times measured on the GPU when a table exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from flashc.backends.lpu.operators import builtin_table_path, load_operator_table, read_json
from flashc.errors import InputError, unknown_name

MiB = 2**20
GB = 1e9
TB = 1e12


@dataclass(frozen=True)
class SystemProfile:
    """One chip and how chips of its kind connect. Rates are per chip, in bytes/s or ops/s."""

    name: str
    kind: str  # "lpu" (statically scheduled, SRAM only) or "gpu"
    clock_hz: float  # the schedule counts cycles of this clock
    memory_bytes: float  # SRAM (lpu) or HBM (gpu) per chip: what weights, KV cache and activations must fit
    weight_bandwidth: float  # bytes/s the matrix units take weights (and KV cache) in at: the decode bound
    activation_bandwidth: float  # bytes/s of vector operands and results (SRAM for an lpu, HBM for a gpu)
    matrix_ops: Mapping[str, float]  # peak ops/s (a multiply-add counts 2) by compute dtype
    vector_ops: float  # elementwise ops/s (0: a gpu's elementwise kernels are bound by activation_bandwidth)
    matrix_latency_s: float  # fixed time of one matrix operation that the next one waits for
    vector_latency_s: float  # the same for one vector operation (lpu) or one kernel (gpu)
    links_per_chip: int
    link_bandwidth: float  # bytes/s per link and direction
    hop_latency_s: float  # time of one hop (lpu) or fixed cost of one collective (gpu)
    chips_per_node: int  # chips that reach each other in one hop
    links_per_peer: int  # links between two chips of one node
    hops_between_nodes: int  # hops of a transfer between chips of different nodes
    max_chips: int  # the largest system of this kind the model plans for
    static_schedule: bool  # every weight streams for every token: no data-dependent skipping (MoE experts)
    description: str = ""
    sources: Mapping[str, str] = field(default_factory=dict)
    # a GPU's measured operator table (JSON, backends/lpu/operators.py): prefill matmul and
    # attention times come from it; "" for none (every op from the rates above)
    operators: str = ""

    def cycles(self, seconds: float) -> int:
        """Whole cycles a duration takes (a partly used cycle counts)."""
        return int(math.ceil(seconds * self.clock_hz - 1e-9)) if seconds > 0 else 0

    def seconds(self, cycles: int) -> float:
        return cycles / self.clock_hz

    def ops_for(self, dtype: str) -> float:
        """Peak matrix ops/s for a compute dtype; a dtype the chip lacks runs at its bf16/fp16 rate."""
        if dtype in self.matrix_ops:
            return self.matrix_ops[dtype]
        for fallback in ("bfloat16", "float16"):
            if fallback in self.matrix_ops:
                return self.matrix_ops[fallback]
        return max(self.matrix_ops.values())

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["matrix_ops"] = dict(self.matrix_ops)
        out["sources"] = dict(self.sources)
        return out


# ---------------------------------------------------------------------------------------
# Validation: a profile is a flat JSON object; each field has a type and a range.

_KINDS = ("lpu", "gpu")
_NUMBERS = {  # field -> (lowest allowed, allowed to be 0)
    "clock_hz": (0, False), "memory_bytes": (0, False), "weight_bandwidth": (0, False),
    "activation_bandwidth": (0, False), "vector_ops": (0, True), "matrix_latency_s": (0, True),
    "vector_latency_s": (0, True), "link_bandwidth": (0, False), "hop_latency_s": (0, True),
}
_INTEGERS = {"links_per_chip": 0, "chips_per_node": 1, "links_per_peer": 0, "hops_between_nodes": 1,
             "max_chips": 1}


def profile_from_dict(data: Mapping[str, Any], where: str = "profile") -> SystemProfile:
    """A SystemProfile from a JSON-like dict; InputError names the first bad or missing field."""
    if not isinstance(data, Mapping):
        raise InputError(f"{where}: a profile is a JSON object of fields, got {type(data).__name__}")
    known = {f.name for f in fields(SystemProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        from flashc.errors import closest_names

        hint = closest_names(unknown[0], sorted(known))
        raise InputError(f"{where}: unknown field {unknown[0]!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f"; fields: {', '.join(sorted(known))}")
    required = [f.name for f in fields(SystemProfile) if f.name not in ("description", "sources", "operators")]
    for name in required:
        if name not in data:
            raise InputError(f"{where}: field {name!r} is missing")
    if not isinstance(data["name"], str) or not data["name"]:
        raise InputError(f"{where}: field 'name' must be a non-empty string, got {data['name']!r}")
    if data["kind"] not in _KINDS:
        raise InputError(f"{where}: field 'kind' must be one of {', '.join(_KINDS)}, got {data['kind']!r}")
    for name, (low, zero_ok) in _NUMBERS.items():
        _check_number(data[name], f"{where}: field {name!r}", low, zero_ok)
    for name, low in _INTEGERS.items():
        value = data[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"{where}: field {name!r} must be an integer >= {low}, got {value!r}")
    if not isinstance(data["static_schedule"], bool):
        raise InputError(f"{where}: field 'static_schedule' must be true or false, got {data['static_schedule']!r}")
    ops = data["matrix_ops"]
    if not isinstance(ops, Mapping) or not ops:
        raise InputError(f"{where}: field 'matrix_ops' must be an object of dtype -> ops/s, got {ops!r}")
    for dtype, value in ops.items():
        _check_number(value, f"{where}: field 'matrix_ops.{dtype}'", 0, False)
    lpu = data["kind"] == "lpu"  # a GPU's NVLink goes through a switch: links are not per peer
    if lpu and data["links_per_peer"] * (data["chips_per_node"] - 1) > data["links_per_chip"]:
        raise InputError(f"{where}: field 'links_per_peer': {data['links_per_peer']} links to each of "
                         f"{data['chips_per_node'] - 1} peers exceed links_per_chip={data['links_per_chip']}")
    if lpu and data["chips_per_node"] > 1 and data["links_per_peer"] < 1:
        raise InputError(f"{where}: field 'links_per_peer' must be >= 1 when a node has several chips")
    sources = data.get("sources", {})
    if not isinstance(sources, Mapping):
        raise InputError(f"{where}: field 'sources' must be an object of field -> text")
    operators = data.get("operators", "")
    if not isinstance(operators, str):
        raise InputError(f"{where}: field 'operators' must be the path of an operator table (JSON), got {operators!r}")
    if operators:
        if lpu:
            raise InputError(f"{where}: field 'operators': a measured operator table times GPU kernels; "
                             f"{data['name']} is an lpu profile")
        load_operator_table(operators)  # a bad table is refused here, naming its file and field
    return SystemProfile(**{**data, "matrix_ops": dict(ops), "sources": dict(sources),
                            "description": str(data.get("description", "")), "operators": operators})


def _check_number(value: Any, what: str, low: float, zero_ok: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{what} must be a finite number, got {value!r}")
    if value < low or (value == low and not zero_ok):
        raise InputError(f"{what} must be {'>=' if zero_ok else '>'} {low}, got {value!r}")


def load_profile_file(path: str | Path) -> SystemProfile:
    """Read and validate a user's JSON profile file (errors name the file and the field)."""
    path = Path(path)
    return profile_from_dict(read_json(path, "the profile file"), str(path))


# ---------------------------------------------------------------------------------------
# lpu-v1: Groq's first Tensor Streaming Processor (TSP), as published.
#   ISCA 2020: D. Abts et al., "Think Fast: A Tensor Streaming Processor (TSP) for
#     Accelerating Deep Learning Workloads".
#   ISCA 2022: D. Abts et al., "A Software-defined Tensor Streaming Multiprocessor for
#     Large-scale Machine Learning".

_TSP_CLOCK = 900e6
_TSP_MACS_PER_CYCLE = 4 * 320 * 320  # four 320x320 matrix planes
_TSP_INT8_OPS = 2 * _TSP_MACS_PER_CYCLE * _TSP_CLOCK  # 737 TOPS
_TSP_STREAM_BYTES_PER_CYCLE = 2 * 32 * 320  # 32 streams each way, one 320-byte vector per stream per cycle

LPU_V1: dict[str, Any] = {
    "name": "lpu-v1",
    "kind": "lpu",
    "description": "Groq TSP v1 (the first LPU): SRAM only, statically scheduled, 8-chip nodes",
    "clock_hz": _TSP_CLOCK,
    "memory_bytes": 220 * MiB,
    "weight_bandwidth": _TSP_STREAM_BYTES_PER_CYCLE * _TSP_CLOCK,
    "activation_bandwidth": 80 * TB,
    "matrix_ops": {"int8": _TSP_INT8_OPS, "float16": _TSP_INT8_OPS / 4, "bfloat16": _TSP_INT8_OPS / 4},
    "vector_ops": 5120 * _TSP_CLOCK,
    "matrix_latency_s": 320 / _TSP_CLOCK,
    "vector_latency_s": 0.0,
    "links_per_chip": 16,
    "link_bandwidth": 14 * GB,
    "hop_latency_s": 722e-9,
    "chips_per_node": 8,
    "links_per_peer": 1,
    "hops_between_nodes": 3,
    "max_chips": 10440,
    "static_schedule": True,
    "sources": {
        "clock_hz": "ISCA 2020: nominal clock 900 MHz",
        "memory_bytes": "ISCA 2020 and ISCA 2022: 220 MiB of SRAM per TSP",
        "weight_bandwidth": "ISCA 2020: 32 streams per direction, each moving one 320-byte vector per cycle; "
                            "64 x 320 B x 900 MHz = 18.4 TB/s. An upper bound: it assumes every stream "
                            "carries weights into the matrix units (activations and results share them)",
        "activation_bandwidth": "GroqChip product brief: 80 TB/s on-die memory bandwidth",
        "matrix_ops": "ISCA 2020: four 320x320 MACC planes at 900 MHz = 737 TOPS int8; GroqChip product "
                      "brief: 750 TOPS int8, 188 TFLOPS fp16, so fp16 runs at a quarter of the int8 rate. "
                      "No fp8 mode: fp8 weights compute at the fp16 rate",
        "vector_ops": "GroqChip product brief: 5,120 vector ALUs (16 per lane x 320 lanes), one op per cycle",
        "matrix_latency_s": "assumption from ISCA 2020's 320x320 weight-stationary planes: a vector's partial "
                            "sums cross the 320 rows of a plane before its result leaves, one row per cycle",
        "vector_latency_s": "not modeled (no published figure): vector ops cost their throughput only",
        "links_per_chip": "ISCA 2022; Linley Group, 'Groq Gets Connected' (2020): 16 chip-to-chip links",
        "link_bandwidth": "Linley Group 2020 (Abts, Linley Fall Processor Conference): 4 lanes x 28 Gb/s "
                          "cabled = 14 GB/s per link and direction",
        "hop_latency_s": "ISCA 2022: 722 ns per chip-to-chip hop",
        "chips_per_node": "ISCA 2022: a node is 8 fully connected TSPs",
        "links_per_peer": "Hot Chips 34 (2022) slides: 7 cable pairs per card, one to each peer of its node",
        "hops_between_nodes": "ISCA 2022: Dragonfly topology, minimal route local-global-local; 'less than "
                              "3 microseconds' end to end at 10,440 TSPs (3 hops x 722 ns = 2.2 us)",
        "max_chips": "ISCA 2022: systems of up to 10,440 TSPs",
        "static_schedule": "ISCA 2020/2022: the compiler fixes every instruction's cycle; which MoE experts a "
                           "token picks is known only at run time, so every expert's weights stream",
    },
}


# ---------------------------------------------------------------------------------------
# GPUs: flashc.profiles' datasheet figures plus what was measured on the lent machines.

# Kernels replayed from a CUDA graph: flashc.profiles' kernel_overhead_s (4 us: launch, ramp
# and tail; bench/RESULTS.md 2026-11-26 session 3 `gemv_shapes.py`: fused GEMV time = 1.05 x
# floor + 4.0 us, least squares over the eight batch-1 rows) less what programmatic dependent
# launch hides on Hopper: 1.195 -> 1.131 ms over ~105 launches of the llama-3.2-1b step on the
# H100 (RESULTS.md "Last H100 call"), 0.6 us per launch.
_PDL_HIDDEN_S = 0.6e-6

_GPU_EXTRA: dict[str, dict[str, Any]] = {
    "a100": {
        # no measurement on an A100: the H100's measured fraction of its datasheet is assumed
        "weight_bandwidth": (2.94 / 3.35, "assumed: the datasheet 2.039 TB/s x 0.88, the fraction the H100 "
                                          "reached (2.94 of 3.35 TB/s); no A100 was measured"),
        "matrix_fraction": (786 / 989, "assumed: datasheet x 0.79, the fraction of its datasheet the H100's "
                                       "bf16 matmul reached (786 of 989 TFLOP/s); no A100 was measured"),
        "clock_hz": (1.41e9, "NVIDIA A100 datasheet: boost clock 1410 MHz"),
        "pdl": False,
        "link_bandwidth": (300 * GB, "NVIDIA A100 datasheet: NVLink 600 GB/s, 300 GB/s per direction"),
        "hop_latency_s": (10e-6, "NVIDIA/nccl issue #583: all_reduce_perf, 2x A100-SXM4, 32 bytes in 10.1 us"),
    },
    "h100": {
        "weight_bandwidth": (2.94 / 3.35, "measured: copy bandwidth 2.90-2.98 TB/s on the lent H100 "
                                          "(bench/RESULTS.md 2026-11-26, 'On an H100'); 2.94 TB/s used"),
        "matrix_fraction": (786 / 989, "measured: bf16 matmul 772-801 TFLOP/s on the lent H100 "
                                       "(bench/RESULTS.md 2026-11-26, 'On an H100'); 786 used"),
        "clock_hz": (1.98e9, "NVIDIA H100 SXM5 datasheet: boost clock 1980 MHz"),
        "pdl": True,
        "link_bandwidth": (450 * GB, "NVIDIA H100 SXM5 datasheet: NVLink 900 GB/s, 450 GB/s per direction"),
        "hop_latency_s": (6e-6, "NVIDIA/nccl issue #1259: all_reduce_perf with CUDA graphs, 2x H100, ~6 us"),
    },
    "h200": {
        "weight_bandwidth": (4.15 / 4.8, "measured: copy bandwidth 4.05-4.21 TB/s on the lent H200 "
                                         "(bench/RESULTS.md 2026-11-26 session 3); 4.15 TB/s used"),
        "matrix_fraction": (788 / 989, "measured: 788 TFLOP/s bf16 on a lent H200 (flashc.profiles source)"),
        "clock_hz": (1.98e9, "NVIDIA H200 SXM datasheet: boost clock 1980 MHz"),
        "pdl": True,
        "link_bandwidth": (450 * GB, "NVIDIA H200 SXM datasheet: NVLink 900 GB/s, 450 GB/s per direction"),
        "hop_latency_s": (6e-6, "NVIDIA/nccl issue #1259 (H100 NVLink, same generation): ~6 us"),
    },
}

_GPU_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float8": "float8", "int8": "int8"}


def gpu_profile_dict(name: str) -> dict[str, Any]:
    """A GPU's SystemProfile fields, from flashc.profiles.PROFILES[name] and the measurements above."""
    from flashc.profiles import PROFILES

    base = PROFILES[name]
    extra = _GPU_EXTRA[name]
    bw_fraction, bw_source = extra["weight_bandwidth"]
    mm_fraction, mm_source = extra["matrix_fraction"]
    overhead = base.kernel_overhead_s - (_PDL_HIDDEN_S if extra["pdl"] else 0.0)
    ops = {k: v * mm_fraction for k, v in base.peak_flops.items() if k in _GPU_DTYPES}
    table = builtin_table_path(name)
    return {
        "name": name, "kind": "gpu", "description": f"NVIDIA {name.upper()} ({base.source})",
        "clock_hz": extra["clock_hz"][0],
        "memory_bytes": base.memory_bytes,
        "weight_bandwidth": base.memory_bandwidth * bw_fraction,
        "activation_bandwidth": base.memory_bandwidth * bw_fraction,
        "matrix_ops": ops,
        "vector_ops": 0.0,
        "matrix_latency_s": overhead,
        "vector_latency_s": overhead,
        "links_per_chip": 1,  # one port into the NVSwitch fabric, at the GPU's whole NVLink bandwidth
        "link_bandwidth": extra["link_bandwidth"][0],
        "hop_latency_s": extra["hop_latency_s"][0],
        "chips_per_node": 8,
        "links_per_peer": 1,
        "hops_between_nodes": 1,
        "max_chips": 8,
        "static_schedule": False,
        "operators": str(table) if table.exists() else "",
        "sources": {
            "memory_bytes": f"flashc.profiles['{name}'].memory_bytes ({base.source})",
            "weight_bandwidth": bw_source,
            "activation_bandwidth": "as weight_bandwidth: elementwise kernels stream at the copy bandwidth",
            "matrix_ops": f"{mm_source}; other dtypes scaled by the same fraction of flashc.profiles' peaks",
            "matrix_latency_s": (f"flashc.profiles kernel_overhead_s {base.kernel_overhead_s * 1e6:g} us per "
                                 "kernel (RESULTS.md gemv_shapes fit: 4.0 us)"
                                 + (" less 0.6 us that PDL hides (RESULTS.md, PDL on/off on the H100)"
                                    if extra["pdl"] else "; no PDL before Hopper")),
            "vector_latency_s": "as matrix_latency_s: every kernel pays it",
            "clock_hz": extra["clock_hz"][1] + " (the schedule's time unit only)",
            "link_bandwidth": extra["link_bandwidth"][1],
            "hop_latency_s": extra["hop_latency_s"][1] + " (fixed cost of one all-reduce)",
            "chips_per_node": "an HGX/DGX node: 8 GPUs on NVSwitch",
            "max_chips": "the simulator models tensor parallelism inside one NVLink node only",
            "static_schedule": "kernels read only the routed experts' weights (flashc's MoE kernel)",
            "operators": (f"prefill matmuls and attention timed alone on the GPU by bench/gpu_op_rates.py "
                          f"(backends/lpu/data/{table.name})" if table.exists()
                          else f"none: no backends/lpu/data/{table.name} yet; prefill runs at matrix_ops"),
        },
    }


BUILTIN = ("lpu-v1", "a100", "h100", "h200")


def get_system(name: str | SystemProfile) -> SystemProfile:
    """A built-in system profile by name, or one read from a JSON file (a path ending in .json)."""
    if isinstance(name, SystemProfile):
        return name
    if name.endswith(".json") or "/" in name:
        return load_profile_file(name)
    if name == "lpu-v1":
        return profile_from_dict(LPU_V1, "built-in profile lpu-v1")
    if name in _GPU_EXTRA:
        return profile_from_dict(gpu_profile_dict(name), f"built-in profile {name}")
    raise unknown_name("simulator profile", name, list(BUILTIN) + ["path/to/profile.json"])


def with_changes(profile: SystemProfile, **changes: Any) -> SystemProfile:
    """A copy of profile with some fields changed (what a sweep varies), validated again."""
    data = profile.to_dict()
    data.update(changes)
    return profile_from_dict(data, f"profile {profile.name} with {', '.join(changes)} changed")


__all__ = ["SystemProfile", "profile_from_dict", "load_profile_file", "get_system", "gpu_profile_dict",
           "with_changes", "LPU_V1", "BUILTIN"]
