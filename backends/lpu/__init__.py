"""The `lpu` target: plan a model onto statically scheduled, SRAM-only dataflow chips
(Groq-LPU-like, profile `lpu-v1`) and predict, with a simulator that runs the static
schedule, what they would do; the same simulator with GPU profiles (a100, h100, h200).

    hardware   chip and system profiles as data (built-ins and JSON files, validated)
    workload   the per-token ops of an optimized Program
    costs      how long one op takes on one chip (the physics, one place)
    partition  chip count from capacity; pipeline stages; tensor-parallel shards
    schedule   every op and transfer per chip, with start/end cycle, unit and link
    simulate   plan + schedule -> decode ms/token, TTFT, tokens/s, chips, utilization
    timeline   per-chip timeline PNG and sweep plots (matplotlib, optional)
    backend    LpuBackend: lower / save_payload / load_payload
    cli        `flashc simulate`
"""
