"""lpu backend, planner and static schedule: no unit or link is used twice at once, every
dependency is respected, every chip's memory holds what the plan puts there, a single matmul
takes what a hand calculation says, and more chips never predict a slower pipeline."""

from __future__ import annotations

import math

import pytest

from flashc.backends.lpu.costs import decode_phase, prefill_phase
from flashc.backends.lpu.hardware import get_system, with_changes
from flashc.backends.lpu.partition import partition
from flashc.backends.lpu.schedule import build_schedule
from flashc.backends.lpu.simulate import simulate
from flashc.backends.lpu.workload import Op, Workload, capture_workload, kv_cache_bytes
from flashc.errors import InputError


@pytest.fixture(scope="module")
def tiny():
    """Workloads of two tiny zoo models, captured and optimized at -O3."""
    return {name: capture_workload(name) for name in ("llama-tiny", "mixtral-tiny")}


def small_lpu(memory_kib: int = 256, max_chips: int = 10440):
    """lpu-v1 with little SRAM, so that a tiny model spans several chips and nodes."""
    return with_changes(get_system("lpu-v1"), memory_bytes=memory_kib * 1024, max_chips=max_chips)


def plans(tiny):
    """Plans over tensor parallelism, several stages, nodes, micro-batches and an MoE."""
    lpu = small_lpu()
    out = []
    for name, tp, groups, batch in [("llama-tiny", 1, None, 1), ("llama-tiny", 2, None, 4),
                                    ("llama-tiny", 4, 6, 2), ("mixtral-tiny", 2, None, 1),
                                    ("mixtral-tiny", 8, None, 8), ("llama-tiny", 1, 20, 3)]:
        micro = max(1, batch // 2)
        out.append(partition(tiny[name], lpu, "bf16", tp, batch, 64, micro, groups))
    out.append(partition(tiny["llama-tiny"], get_system("h100"), "bf16", 2, 4, 64, 4))
    return out


def schedules(plan):
    decode = build_schedule(plan, [decode_phase(plan.microbatch, plan.context)] * 3)
    prefill = build_schedule(plan, [prefill_phase(1, 8, 8 * k) for k in range(3)])
    return [decode, prefill]


def test_plans_span_stages_nodes_and_tensor_parallelism(tiny):
    ps = plans(tiny)
    assert max(len(p.stages) for p in ps) > 8  # several stages
    assert any(p.chips > 8 for p in ps)  # several nodes of 8 chips
    assert {p.tp for p in ps} >= {1, 2, 4, 8}


def test_no_unit_or_link_is_used_twice_at_once(tiny):
    for plan in plans(tiny):
        for schedule in schedules(plan):
            by_resource = {}
            for t in schedule.tasks:
                assert t.end >= t.start >= 0
                by_resource.setdefault((t.chip, t.unit), []).append(t)
            links = [k for k in by_resource if k[1].startswith(("link:", "global:", "nvlink:"))]
            assert links, "the plan moves data between chips"
            for key, tasks in by_resource.items():
                tasks.sort(key=lambda t: t.start)
                for a, b in zip(tasks, tasks[1:]):
                    assert b.start >= a.end, f"{key}: {a.name} [{a.start},{a.end}) overlaps {b.name} [{b.start},{b.end})"


def test_every_dependency_is_respected(tiny):
    for plan in plans(tiny):
        for schedule in schedules(plan):
            tasks = schedule.tasks
            for t in tasks:
                for d in t.deps:
                    assert d < t.id and tasks[d].ready <= t.start, f"{t.name} starts before {tasks[d].name} is ready"
                if t.kind == "transfer":
                    assert t.ready >= t.end and t.dst != t.chip
            # every op reads each input op's result on its own chip: produced there or brought by a transfer
            producers = {}
            for t in tasks:
                if t.kind == "op":
                    producers.setdefault((t.op, t.microbatch), set()).add(t.chip)
            op_inputs = {o.index: o.inputs for o in plan.workload.ops}
            for t in tasks:
                if t.kind != "op":
                    continue
                reach = _ancestors(tasks, t)
                for src in op_inputs[t.op]:
                    assert any(tasks[a].kind == "op" and tasks[a].op == src for a in reach), \
                        f"{t.name} on chip {t.chip} does not wait for input op {src}"


def _ancestors(tasks, task):
    seen, stack = set(), list(task.deps)
    while stack:
        d = stack.pop()
        if d not in seen:
            seen.add(d)
            if tasks[d].kind != "op":  # through transfers and reductions to the op that made the data
                stack.extend(tasks[d].deps)
    return seen


def test_every_chip_holds_its_weights_kv_cache_and_activations(tiny):
    for plan in plans(tiny):
        per_chip_weights = {}
        for it in plan.items:
            for chip in plan.stages[it.stage].chips:
                per_chip_weights[chip] = per_chip_weights.get(chip, 0) + it.weight_bytes + it.kv_bytes
        for stage in plan.stages:
            assert stage.memory_bytes <= plan.profile.memory_bytes
            for chip in stage.chips:
                assert per_chip_weights[chip] + stage.activation_bytes <= plan.profile.memory_bytes
        # nothing is lost or counted twice: a split op's shards add up to its weights, a replicated
        # op's small weights (norms) are on every chip of its stage
        held = sum(it.weight_bytes * (it.shard.ways if it.shard.mode in ("column", "row", "experts", "vocab") else 1)
                   for it in plan.items)
        assert held == pytest.approx(plan.workload.weight_bytes("bf16"), rel=1e-9)


def _single_matmul(k: int, n: int) -> Workload:
    return Workload("matmul", [Op(0, "linear", "aten.linear", "matmul", 0, (), k=k, n=n, out_elements=n,
                                  in_elements=k)], 1, 1)


def test_single_matmul_time_matches_a_hand_calculation():
    lpu = get_system("lpu-v1")
    k, n = 640, 960
    sim = simulate(_single_matmul(k, n), lpu, "int8", batch=1, context=16, prompt=4096, build_prefill=True)
    # decode, one row: 640 x 960 int8 weights through 64 streams of 320 bytes per cycle, then
    # the 320-row matrix plane's latency; compute (2 x 640 x 960 ops at 737 TOPS) is shorter
    install = k * n * 1 / (64 * 320)  # 30 cycles
    cycles = math.ceil(install) + 320
    op = [t for t in sim.decode.tasks if t.kind == "op"]
    assert len(op) == 1 and op[0].end - op[0].start == cycles == 350
    assert sim.prediction.decode_ms == pytest.approx(cycles / 900e6 * 1e3)
    assert sim.prediction.tokens_per_s_per_user == pytest.approx(900e6 / cycles)
    # prefill of 4096 rows in one chunk is compute-bound: 2 x 4096 x 640 x 960 int8 ops at 4 x 320 x 320 MACs/cycle
    compute = 2 * 4096 * k * n / (2 * 4 * 320 * 320)  # 12288 cycles > 30 for the weights
    chunks = sim.prediction.prefill_chunks
    expected = chunks * (math.ceil(compute / chunks) + 320)  # one chunk after another on the one chip
    assert sim.prefill is not None and sim.prediction.ttft_s == pytest.approx(expected / 900e6, rel=1e-3)

    h100 = get_system("h100")
    gpu = simulate(_single_matmul(k, n), h100, "bf16", batch=1, context=16, prompt=1)
    # one kernel: weights + the activation row in and out over 2.94 TB/s, plus 4 - 0.6 us launch/tail
    seconds = (k * n * 2 + (k + n) * 2) / 2.94e12 + 3.4e-6
    assert gpu.prediction.decode_ms == pytest.approx(seconds * 1e3, rel=1e-3)


def test_more_chips_never_predict_a_slower_pipeline(tiny):
    lpu = small_lpu(memory_kib=256, max_chips=64)
    for name in ("llama-tiny", "mixtral-tiny"):
        for batch in (1, 4):
            fewest = simulate(tiny[name], lpu, "bf16", batch=batch, context=64, prompt=16).prediction.chips
            last = None
            for budget in sorted({fewest, fewest + 1, fewest + 3, 2 * fewest, 3 * fewest, 64}):
                p = simulate(tiny[name], lpu, "bf16", batch=batch, context=64, prompt=16, chips=budget).prediction
                assert p.chips <= budget
                if last is not None:
                    assert p.decode_ms <= last.decode_ms * (1 + 1e-9), (name, batch, budget)
                    assert p.tokens_per_s >= last.tokens_per_s * (1 - 1e-9)
                last = p
            assert last.decode_ms < simulate(tiny[name], lpu, "bf16", batch=batch, context=64,
                                             prompt=16).prediction.decode_ms or batch == 1


def test_a_model_that_fits_no_system_says_how_many_bytes_and_suggests_quantizing(tiny):
    work = tiny["llama-tiny"]
    need_bf16 = work.weight_bytes("bf16") + work.kv_bytes(1, 64)
    need_int4 = work.weight_bytes("int4") + work.kv_bytes(1, 64)
    # a system of 4 chips holding between the int4 and the bf16 size
    per_chip = (need_int4 + need_bf16) / 2 / 4
    lpu = with_changes(get_system("lpu-v1"), memory_bytes=per_chip, max_chips=4)
    with pytest.raises(InputError) as e:
        simulate(work, lpu, "bf16", batch=1, context=64, prompt=16)
    text = str(e.value)
    assert f"{need_bf16:.4g} bytes" in text and "quantize" in text
    assert f"at int4 it needs {need_int4:.4g} bytes" in text
    with pytest.raises(InputError, match="no precision flashc offers"):
        simulate(work, with_changes(lpu, memory_bytes=1024 * 1024 / 4 * 0.05), "bf16", batch=1, context=64, prompt=16)


def test_a_budget_below_the_fewest_chips_is_refused(tiny):
    lpu = small_lpu(memory_kib=256, max_chips=64)
    fewest = simulate(tiny["llama-tiny"], lpu, "bf16", batch=1, context=64, prompt=16).prediction.chips
    with pytest.raises(InputError, match=f"needs at least {fewest} "):
        simulate(tiny["llama-tiny"], lpu, "bf16", batch=1, context=64, prompt=16, chips=fewest - 1)


def test_static_schedule_streams_every_expert_and_a_gpu_only_the_routed_ones(tiny):
    moe = next(o for o in tiny["mixtral-tiny"].ops if o.kind == "moe")
    from flashc.backends.lpu.costs import Shard, op_cost

    lpu, gpu = get_system("lpu-v1"), get_system("h100")
    expert = 3 * moe.k * moe.ffn * 2
    assert op_cost(moe, decode_phase(1, 64), Shard(), lpu, "bf16").streamed_bytes == moe.experts * expert
    routed = op_cost(moe, decode_phase(1, 64), Shard(), gpu, "bf16").streamed_bytes
    assert routed == pytest.approx(moe.top_k * expert + 1 * moe.k * 2 * 2)  # top-k experts + activations
    assert kv_cache_bytes(next(o for o in tiny["mixtral-tiny"].ops if o.kind == "attention"), 2, 10) == \
        2 * 2 * 10 * 2 * 32 * 2  # k and v, batch 2, 10 tokens, 2 kv heads of 32, bf16
