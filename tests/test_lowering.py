"""The lowering table and the one lowering path (flashc/lowering.py)."""

import pytest
import torch

from flashc.backends.cuda import KERNELS, CudaBackend
from flashc.backends.eager import EagerBackend
from flashc.capture import capture
from flashc.errors import UnsupportedOpError
from flashc.lowering import LoweringTable, unsupported_op_error
from flashc.targets import TARGETS


class Model(torch.nn.Module):
    def forward(self, x):
        return torch.special.erfcx(x) + torch.cumsum(x, -1) + torch.special.erfcx(x * 2)


def test_fallbacks_come_from_the_table_with_counts_and_where():
    program = capture(Model(), (torch.randn(3, 4),))
    table = LoweringTable("toy", {"aten.add": "emit add", "aten.mul": "emit mul"})
    fallbacks = {f.op: f for f in table.fallbacks(program)}
    assert set(fallbacks) == {"aten.special_erfcx", "aten.cumsum"}
    assert fallbacks["aten.special_erfcx"].count == 2
    assert "test_lowering.py" in fallbacks["aten.cumsum"].where
    assert LoweringTable("toy", namespaces=frozenset({"aten"})).fallbacks(program) == []


def test_the_unsupported_op_error_lists_each_op_once_with_where_and_why():
    program = capture(Model(), (torch.randn(3, 4),))
    nodes = [n for n in program.op_nodes() if "erfcx" in str(n.target)]
    err = unsupported_op_error("toy", [(nodes[0], "no kernel"), (nodes[1], "no kernel")])
    assert isinstance(err, UnsupportedOpError)
    text = str(err)
    assert text.count("aten.special_erfcx") == 1 and "no kernel" in text and "test_lowering.py" in text
    assert "targets that run every op: cpu, eager" in text


def test_every_target_declares_options_and_a_table():
    """Each backend's declaration is complete (the TVM table needs TVM; it is read on demand)."""
    for name, target in TARGETS.items():
        backend = target.backend()
        assert isinstance(backend.Options(), object), name
        if name.startswith("tvm"):
            pytest.importorskip("tvm")
        assert isinstance(backend.lowering, LoweringTable), name
        assert backend.lowering.lowers("getitem")


def test_the_cuda_table_is_the_generated_kernels_and_aten():
    table = CudaBackend.lowering
    assert all(table.lowers(op) for op in KERNELS)
    assert table.lowers("aten.linear") and not table.lowers("transformers.grouped_mm_fallback")
    assert EagerBackend.lowering.lowers("flashc.gemv")
