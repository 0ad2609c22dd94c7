"""Ops a backend does not lower, written as PyTorch's decompositions of them (passes/decompose.py):
the pass on its own (what it splices in computes what the op computed, it leaves what it cannot
decompose safely), and models whose ops only their decompositions lower, on onnx-cpu and tvm-cpu
against eager on fresh inputs."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flashc
from flashc.capture import capture
from flashc.errors import UnsupportedOpError
from flashc.ir import op_name
from flashc.pass_manager import PassContext, PassManager
from flashc.passes.decompose import DecomposeUnlowered
from flashc.profiles import get_profile
from flashc_testing import rel_err


class Fn(nn.Module):
    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for name, m in modules.items():
            setattr(self, name, m)

    def forward(self, *args):
        return self.fn(self, *args)


def _decomposed(model, inputs, rejected: set[str]):
    """(program after the pass, its record) with the ops named in `rejected` not lowered."""
    program = capture(model, inputs)
    records = PassManager([DecomposeUnlowered(lambda node: op_name(node) not in rejected)]).run(
        program, PassContext(get_profile("cpu")))
    return program, records[0]


def _ops(program) -> set[str]:
    return {op_name(n) for n in program.op_nodes()}


def _run(program, *inputs):
    """The program's graph called on its weights and these inputs."""
    given = iter(inputs)
    return program.graph_module(*[program.params[n.name] if n.name in program.params else next(given)
                                  for n in program.placeholders()])


def test_composite_ops_become_their_decompositions_and_compute_the_same():
    model = Fn(lambda s, x: (x.std(-1, keepdim=True) + torch.argsort(x, -1).float(), torch.sort(x, 0)[0]))
    program, record = _decomposed(model, (torch.randn(4, 7),), {"aten.std", "aten.var", "aten.argsort"})
    assert record.stats == {"aten.std": 1, "aten.argsort": 1}  # its var decomposed in turn
    assert not _ops(program) & {"aten.std", "aten.var", "aten.argsort"}
    for _ in range(2):
        x = torch.randn(4, 7)
        for got, want in zip(_run(program, x), model(x)):
            assert rel_err(got, want) < 1e-6


def test_multi_output_op_users_read_the_decomposition():
    """A decomposition returning several tensors replaces the op's getitem users."""
    model = Fn(lambda s, x: torch.var_mean(x, -1, correction=0)[1] * 2 + torch.var_mean(x, -1, correction=0)[0])
    program, record = _decomposed(model, (torch.randn(3, 5),), {"aten.var_mean"})
    assert record.stats.get("aten.var_mean", 0) >= 1 and "aten.var_mean" not in _ops(program)
    x = torch.randn(3, 5)
    got = _run(program, x)
    assert rel_err(got[0] if isinstance(got, (list, tuple)) else got, model(x)) < 1e-6


def test_what_cannot_be_decomposed_safely_is_left():
    """An in-place op the backend cannot write with copy_ (it writes its argument) and one_hot (its
    decomposition checks the class values: a backend would drop the check) stay as they are."""
    model = Fn(lambda s, x, i: (x.add_(1), F.one_hot(i, 5)))
    program, record = _decomposed(model, (torch.randn(3), torch.tensor([0, 4, 2])),
                                  {"aten.add_", "aten.one_hot", "aten.copy_"})
    assert not record.changed and {"aten.add_", "aten.one_hot"} <= _ops(program)


def test_an_unlowered_in_place_op_becomes_a_copy_of_its_functional_op():
    """x.add_(1) where the backend lowers add and copy_: x.copy_(x.add(1)), the same write at the same point;
    the input is written and the result returned as eager does (split_write)."""
    model = Fn(lambda s, x: (x.add_(1) * 2, x.sum()))
    program, record = _decomposed(model, (torch.randn(3),), {"aten.add_"})
    assert record.changed and "aten.add_" not in _ops(program) and {"aten.add", "aten.copy_"} <= _ops(program)
    x = torch.randn(3)
    mine, theirs = x.clone(), x.clone()
    for g, r in zip(_run(program, mine), model(theirs)):
        assert torch.equal(g, r)
    assert torch.equal(mine, theirs)


def _check(model, inputs, target, tol=1e-5):
    model = model.eval()
    cm = flashc.compile(model, target, inputs)
    decomposed = [r for r in cm.records if r.name == "decompose_unlowered"]
    for _ in range(2):
        fresh = tuple(torch.randn_like(a) for a in inputs)
        with torch.no_grad():
            assert rel_err(cm(*fresh), model(*fresh)) < tol
    return cm, decomposed


NEED_DECOMPOSITION = {  # ops neither flashc nor onnxscript's torchlib lowers whole
    "argsort": (Fn(lambda s, x: torch.gather(torch.cumsum(x, -1), -1, torch.argsort(x, -1))), (2, 8, 12)),
    "std_var": (Fn(lambda s, x: torch.logsumexp(x, -1) + x.std(-1) + x.var(-1, unbiased=False)), (2, 8, 12)),
}


@pytest.mark.parametrize("name", sorted(NEED_DECOMPOSITION))
def test_onnx_runs_ops_through_their_decompositions(name):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, shape = NEED_DECOMPOSITION[name]
    cm, records = _check(model, (torch.randn(shape),), "onnx-cpu")
    assert records and records[0].stats and records[0].stage == "backend"
    assert "decompose_unlowered" in str(cm.report())


def test_onnx_transposed_convolution():
    pytest.importorskip("onnxruntime")
    for conv in (nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
                 nn.ConvTranspose1d(4, 6, 2, stride=2, groups=2, bias=False)):
        shape = (2, 3, 9, 9) if isinstance(conv, nn.ConvTranspose2d) else (2, 4, 10)
        _check(Fn(lambda s, x: s.c(x), c=conv), (torch.randn(shape),), "onnx-cpu")


def test_onnx_refusals_stay_clear():
    """embedding_bag with offsets passed in (their checks would be lost; torchlib's function builds
    a sequence ONNX Runtime rejects) is refused naming the op and the reason."""
    pytest.importorskip("onnxruntime")
    with pytest.raises(UnsupportedOpError, match="aten.embedding_bag.*offsets passed in"):
        flashc.compile(Fn(lambda s, i, o: s.e(i, o), e=nn.EmbeddingBag(50, 8, mode="mean")), "onnx-cpu",
                       (torch.randint(0, 50, (7,)), torch.tensor([0, 3, 3])))


def test_onnx_artifact_with_a_decomposed_op_loads(tmp_path):
    pytest.importorskip("onnxruntime")
    model, shape = NEED_DECOMPOSITION["argsort"]
    cm = flashc.compile(model, "onnx-cpu", (torch.randn(shape),))
    cm.save(tmp_path / "a")
    loaded = flashc.load(tmp_path / "a")
    x = torch.randn(shape)
    assert rel_err(loaded(x), model(x)) < 1e-6


def test_tvm_runs_ops_through_their_decompositions():
    pytest.importorskip("tvm")
    model = Fn(lambda s, x: F.pixel_shuffle(F.mish(x) + F.softplus(x) + x.std(-1, keepdim=True), 2))
    _, records = _check(model, (torch.randn(2, 8, 6, 6),), "tvm-cpu")
    assert records and "aten.pixel_shuffle" in records[0].stats  # TVM 0.27's own converter fails


def test_tvm_runs_recurrent_layers_through_their_decompositions():
    """TVM 0.27's LSTM/GRU converters return one tensor for PyTorch's tuple; their decompositions
    (oneDNN off while tracing: else they pick `mkldnn_rnn`) run: two layers, both directions, a given
    initial state, every output read."""
    pytest.importorskip("tvm")
    lstm = Fn(lambda s, x, h, c: (lambda o, hc: torch.cat([o[:, -1], hc[0][-1], hc[1][0]], -1))(*s.l(x, (h, c))),
              l=nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True))
    _, records = _check(lstm, (torch.randn(2, 7, 6), torch.randn(4, 2, 5), torch.randn(4, 2, 5)), "tvm-cpu")
    assert records and "aten.lstm" in records[0].stats
    gru = Fn(lambda s, x: (lambda o, h: o.sum(0) + h[-1])(*s.l(x)), l=nn.GRU(6, 5, num_layers=2))
    _, records = _check(gru, (torch.randn(7, 2, 6),), "tvm-cpu")
    assert records and "aten.gru" in records[0].stats
    rnn = Fn(lambda s, x: s.l(x)[0], l=nn.RNN(6, 5, num_layers=2, nonlinearity="relu"))  # the frontend: 1 layer
    _, records = _check(rnn, (torch.randn(7, 2, 6),), "tvm-cpu")
    assert records and "aten.rnn_relu" in records[0].stats


def test_a_decomposition_writing_its_own_intermediate_is_spliced_as_the_functional_op():
    """rms_norm's decomposition adds eps in place to the mean it just made: that write becomes
    `add`, so the norm runs at -O0 on TVM (at -O2 it is flashc.rms_norm)."""
    pytest.importorskip("tvm")
    model = nn.RMSNorm(5)
    model.weight.data.uniform_(0.5, 1.5)
    cm = flashc.compile(model.eval(), "tvm-cpu", (torch.randn(2, 3, 5),), level=0)
    assert [r.stats for r in cm.records if r.name == "decompose_unlowered"] == [{"aten.rms_norm": 1}]
    x = torch.randn(2, 3, 5)
    assert rel_err(cm(x), model(x)) < 1e-6


def test_tvm_decomposes_the_overloads_its_frontend_lacks():
    """TVM's frontend converts conv2d.default, not conv2d.padding (padding='same'): that overload is
    decomposed (explicit padding); upsample_linear1d's decomposition clamps integer indices from one
    side, which TVM's frontend wrote with an infinity it cannot build."""
    pytest.importorskip("tvm")
    model = Fn(lambda s, x: F.interpolate(s.c(x).flatten(2), size=13, mode="linear"),
               c=nn.Conv2d(3, 4, 4, padding="same", dilation=2))
    _, records = _check(model, (torch.randn(2, 3, 7, 6),), "tvm-cpu")
    assert records and {"aten.conv2d", "aten.upsample_linear1d"} <= set(records[0].stats)


@pytest.mark.parametrize("target", ["onnx-cpu", "tvm-cpu"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bags_become_scatters_where_the_graph_makes_the_offsets(target, mode):
    """2-D input (offsets made in the graph): each position's bag, rows summed, averaged over the
    non-padding entries or maxed into it; a bag of padding only is 0, per-sample weights scale rows."""
    pytest.importorskip("onnxruntime" if target == "onnx-cpu" else "tvm")
    bags = nn.EmbeddingBag(20, 6, mode=mode, padding_idx=3)
    model = Fn(lambda s, i, w: s.e(i) + (s.f(i, per_sample_weights=w) if mode == "sum" else 0), e=bags,
               f=nn.EmbeddingBag(20, 6, mode="sum")).eval()
    inputs = (torch.randint(0, 20, (4, 5)), torch.randn(4, 5))
    cm = flashc.compile(model, target, inputs)
    assert "aten.embedding_bag" in [r for r in cm.records if r.name == "decompose_unlowered"][0].stats
    for ids in (torch.randint(0, 20, (4, 5)), torch.tensor([[3] * 5, [3, 1, 3, 2, 0]] * 2)):
        w = torch.randn(4, 5)
        with torch.no_grad():
            assert rel_err(cm(ids, w), model(ids, w)) < 1e-6


def test_a_decomposition_into_ops_still_not_lowered_is_not_spliced():
    """digamma's decomposition is prims.digamma: left whole, so the refusal names the model's op."""
    model = Fn(lambda s, x: torch.digamma(x.abs() + 1))
    program, record = _decomposed(model, (torch.randn(4),), {"aten.digamma", "prims.digamma"})
    assert not record.changed and "aten.digamma" in _ops(program)


def test_a_copy_keeps_input_names_fx_would_change():
    """Late passes run on a copy of the program; a forward argument named `input` (a builtin, which
    fx renames when it copies a node) must keep its name there, where inputs are looked up."""
    program = capture(nn.AdaptiveAvgPool2d(1), (torch.randn(1, 4, 3, 3),))
    assert [n.name for n in program.clone().placeholders()] == [s.name for s in program.inputs] == ["input"]


def test_view_ops_become_the_views_eager_makes():
    """movedim (a view op) and meshgrid (whose results are expands of its inputs) decompose through their
    CompositeImplicitAutograd kernels, what eager runs: the results are views, so a write through one
    reaches the tensor it views, and a later write to that tensor shows through it, as in eager."""

    def body(_, s, x):
        v = torch.movedim(x, 0, 1)
        v[0] += 1  # writes x[:, 0]
        g = torch.meshgrid(s, x[0], indexing="xy")
        before = g[1] * 1
        x.mul_(2)  # g[1] views x[0]: it sees this
        return v * 1, g[0] * 1, before, g[1] * 1

    model = Fn(body)
    program, record = _decomposed(model, (torch.randn(3), torch.randn(2, 3)), {"aten.movedim", "aten.meshgrid"})
    assert record.stats == {"aten.movedim": 1, "aten.meshgrid": 1}
    for _ in range(2):
        s, x = torch.randn(3), torch.randn(2, 3)
        got, x_got = _run(program, s, x.clone()), x.clone()
        want = model(s, x_got)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)


class Losses(nn.Module):
    """cross_entropy with its options and mse_loss: torchlib's and TVM's converters ignored label smoothing,
    gave reduction 'none' and 'sum' wrong (TVM) and an invalid graph for probability targets (ONNX); both
    backends now run PyTorch's decomposition of them."""

    def forward(self, logits, labels, probs, a, b):
        ignored = labels.masked_fill(labels == 0, -100)
        return (F.cross_entropy(logits, labels), F.cross_entropy(logits, labels, label_smoothing=0.25),
                F.cross_entropy(logits, labels, reduction="none"), F.cross_entropy(logits, labels, reduction="sum"),
                F.cross_entropy(logits, ignored, weight=torch.linspace(0.5, 2.0, 5)), F.cross_entropy(logits, probs),
                F.mse_loss(a, b), F.mse_loss(a, b, reduction="none"))


@pytest.mark.parametrize("target", ["onnx-cpu", "tvm-cpu"])
def test_losses_run_through_their_decompositions(target):
    pytest.importorskip("onnxruntime" if target == "onnx-cpu" else "tvm")
    make = lambda: (torch.randn(9, 5) * 3, torch.randint(0, 5, (9,)), torch.randn(9, 5).softmax(-1),
                    torch.randn(3, 4), torch.randn(3, 4))
    model = Losses()
    cm = flashc.compile(model, target, make(), level=2)
    for _ in range(2):
        inputs = make()
        for got, want in zip(cm(*inputs), model(*inputs), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
