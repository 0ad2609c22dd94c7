"""Helpers shared by the tests (importable through pytest's pythonpath = tests)."""

import itertools
import os

import torch

FAMILIES = ["llama-tiny", "mistral-tiny", "mixtral-tiny", "gemma-tiny", "qwen2-tiny"]


def fresh_ids(name: str, batch: int = 1, seq_len: int = 16, seed: int | None = None) -> torch.Tensor:
    """Random token ids from a fresh seed each call unless one is given."""
    from flashc import zoo

    vocab = zoo.get_entry(name).config["vocab_size"]
    g = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    return torch.randint(0, vocab, (batch, seq_len), generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def assert_matches_eager(model, make_inputs, target="cpu", levels=(0, 1, 2, 3), calls=3, **compile_kwargs):
    """Compile model at each level and call it `calls` times on fresh inputs next to an eager
    copy: outputs (NaN/inf-aware), the caller's inputs after the call (in-place writes) and
    outputs held from earlier calls must agree, and compiling must leave model unchanged."""
    import copy

    import flashc
    from flashc.checking import tensor_difference
    from torch.utils import _pytree as pytree

    for level in levels:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        eager = copy.deepcopy(model)
        cm = flashc.compile(model, target, make_inputs(), level=level, **compile_kwargs)
        held = []
        for call in range(calls):
            args = make_inputs()
            mine, theirs = [a.clone() for a in args], [a.clone() for a in args]
            out = cm(*mine)
            with torch.no_grad():
                ref = eager(*theirs)
            held.append((out, pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, ref)))
            pairs = list(zip(pytree.tree_leaves(out), pytree.tree_leaves(ref))) + list(zip(mine, theirs))
            for got, want in pairs:
                _, why = tensor_difference(got, want)
                assert why is None, f"level {level}, call {call + 1}: {why}"
        for out, ref in held:  # a later call must not overwrite what an earlier one returned
            for got, want in zip(pytree.tree_leaves(out), pytree.tree_leaves(ref)):
                assert tensor_difference(got, want)[1] is None, f"level {level}: an output was overwritten"
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()), "compile changed the model"


def optimized_program(model, name: str, seq_len: int, level: int = 2):
    """A zoo model captured as flashc.compile captures it (a prefill without a cache, the zoo's
    example inputs of `seq_len` tokens) and run through `level`'s pipeline for the cpu profile:
    the graph the model-level passes (quantization, pruning) start from."""
    from flashc import zoo
    from flashc.capture import capture
    from flashc.pass_manager import PassContext, PassManager
    from flashc.pipelines import pipeline
    from flashc.profiles import get_profile

    program = capture(model, zoo.example_inputs(name, seq_len=seq_len), {"use_cache": False})
    PassManager(pipeline(level)).run(program, PassContext(get_profile("cpu")))
    return program


def interpreted() -> bool:
    """Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without CUDA)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_dtypes() -> list:
    """triton_dtypes as plain values, for kernel_cases: bf16 left out under Triton's CPU interpreter."""
    return [torch.float32, torch.float16] + ([] if interpreted() else [torch.bfloat16])


def triton_dtypes() -> list:
    """fp32, fp16 and bf16 as test parameters for Triton kernels that multiply with tl.dot: bf16 is skipped
    under Triton's CPU interpreter (TRITON_INTERPRET=1, set by tests/codegen/conftest.py without CUDA), which
    gets tl.dot on bf16 operands wrong (Triton 3.9: relative error ~1e9 on a 16x16 product; bf16 loads, stores
    and elementwise math are fine), so those run on GPUs only."""
    import pytest

    return [torch.float32, torch.float16,
            pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
                interpreted(), reason="Triton's CPU interpreter computes bf16 tl.dot wrongly"))]


def all_pairs(where=None, **factors: list) -> list[tuple]:
    """Rows (value tuples, in the order the factors are given) in which every value of each factor meets every
    value of each other factor at least once: pairwise testing. Faults in tiles, dtypes and options show up in
    the interplay of two of them far more often than of three, and the full product of four factors is 5-10x
    these rows. Greedy (the row that covers most uncovered pairs next, the first in product order on ties), so
    the rows are the same every run. where(row) -> False leaves a combination out (one the test skips): its
    pairs are covered by other rows where any has them."""
    values = [list(v) for v in factors.values()]
    product = [row for row in itertools.product(*(range(len(v)) for v in values))  # indices: values may be
               if where is None or where(*(v[i] for v, i in zip(values, row)))]     # unhashable (dicts)
    pairs = lambda row: {(i, row[i], j, row[j]) for i, j in itertools.combinations(range(len(row)), 2)}
    uncovered = set().union(*(pairs(row) for row in product)) if len(values) > 1 else set()
    rows = [] if uncovered else product
    while uncovered:
        best = max(product, key=lambda row: len(pairs(row) & uncovered))
        rows.append(best)
        uncovered -= pairs(best)
    return [tuple(v[i] for v, i in zip(values, row)) for row in rows]


def kernel_cases(where=None, **factors: list) -> list[tuple]:
    """A kernel test's cases: every combination on a GPU, pairwise (all_pairs) in Triton's CPU interpreter,
    where a case costs seconds and the suite's time on two CI cores is budgeted."""
    if not interpreted():
        return list(itertools.product(*factors.values()))
    return all_pairs(where, **factors)


def run_cli(*args, cwd=None):
    """`flashc ARGS` run in this process by flashc.cli.main, the `flashc` command's entry point: a
    CompletedProcess with its exit status, stdout and stderr. A subprocess costs seconds of importing torch and
    flashc per command; the tests about the process itself (the entry point, its exit status) still start one.
    The command's seeding does not reach the caller's random generator, and the working directory is restored."""
    import contextlib
    import io
    import subprocess

    from flashc.cli import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            os.chdir(cwd or here)
            code = main([str(a) for a in args])
        finally:
            os.chdir(here)
    return subprocess.CompletedProcess(["flashc", *map(str, args)], code, out.getvalue(), err.getvalue())
