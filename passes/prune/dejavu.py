"""PredictMlpSparsity: Deja Vu's contextual sparsity of MLPs, a learned predictor per MLP.

Liu et al., "Deja Vu: Contextual Sparsity for Efficient LLMs at Inference Time", ICML 2023
(arXiv:2310.17157), the MLP part (attention heads are not predicted here). In each dense gated
MLP, down(act(gate x) * up x) (swiglu or geglu, gate and up separate or merged; found as
ffn.py finds FFNs, so once fused: -O2 and above), the intermediate h = act(gate x) * up x is
multiplied per token by the mask of a low-rank predictor of the MLP's input x:

    h' = flashc.predicted_sparsify(h, x, A, B, threshold)      = h * ((x @ A) @ B > threshold)
    down(flashc.sparsify(h', 0))

A [K, r] and B [r, F] are trained on calibration activations to tell, token by token, the
neurons in the top (1 - sparsity) of |h| (the label) from the rest: binary cross-entropy,
Adam, a fixed seed, on three quarters of the sampled rows. The threshold is fixed, as TEAL's
are (no top-k at run time): the score that zeroes `sparsity` of the neurons on an eighth of the
rows, which training never saw (at run time every token is new to the predictor). The report's
numbers come from the last eighth: recall (the
share of the oracle's top set kept; a random mask keeps 1 - sparsity of it), mass recall (the
share of sum |h| kept, against the oracle's), the sparsity reached and the down projection's
relative output error.

What it saves: the down projection reads the kept neurons' columns only. The sparsify(., 0)
after the mask zeroes nothing the mask kept; it is the form the CUDA backend's late pass
(FuseSparseMatmuls) turns into flashc.sparse_gemv. Gate and up are still computed whole:
skipping a dropped neuron's gate and up rows before computing them needs an output-sparse GEMV,
which is not built. The predictor costs r (K + F) weight reads a token, counted in the rows'
reads. Unlike TEAL (online-X%), which thins the inputs of every linear layer, this thins one
linear in three of each MLP, so the same sparsity saves fewer reads.

Differences from Deja Vu's code: the predictor reads the MLP's own input (Deja Vu's reads an
earlier activation, to run ahead of the layer asynchronously); while training, the input is
standardized and each neuron has a bias, both folded into A and a per-neuron threshold (free at
run time); the loss weighs each neuron by |h| (train_predictor says why). A linear score sees
the gate's sign, not the size of |up x|: on smollm2-135m at 40% the held-out recall was 70-78%
(a random mask: 60%), the mass recall 78-94% (mean 82%; the oracle's mean 94%; 2026-12-06), and the
perplexity cost is well above TEAL's at the same sparsity (bench/prune_accuracy.py).

Left dense, and listed: MoE experts (a predictor per expert is not built: online-X% with
PruneConfig(experts=True) thins them), MLPs that are not gated (down(act(up x))), MLPs whose
weights the graph writes, or whose input it writes between gate/up and down.

Invariants kept: weights are never modified; every write stays where it was (the two new nodes
sit right before down and read values computed before it); shapes (`meta["val"]`) hold (both
new nodes have h's shape and dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from flashc.aliasing import MutationInfo
from flashc.errors import FlashcError
from flashc.ir import Program
from flashc.pass_manager import PassContext, PassResult
from flashc.passes.prune.config import PruneConfig
from flashc.passes.prune.ffn import GATED, UNARY, Ffn, match_ffn
from flashc.passes.prune.layers import CalibratedPrunePass, Skipped, calibration_run, moe_layer, nbytes, real_weights
from flashc.passes.prune.masks import pruned_count
from flashc.passes.quantize.calibration import ActivationSample, collect_statistics
from flashc.predictor_ops import predicted_mask

PREDICTED_SPARSIFY = torch.ops.flashc.predicted_sparsify.default
SPARSIFY = torch.ops.flashc.sparsify.default
MOES = (torch.ops.flashc.moe.default, torch.ops.flashc.moe_sparse.default)
MAX_RANK = 128  # the default rank's cap: PruneConfig.predictor_rank=None is min(128, K // 8)
# Adam's step size and the rows of a step. On smollm2-135m (layers 0, 15, 29 at 40%, rank 72), 400 steps
# at 3e-3, 400 at 1e-2 and 1000 at 3e-3 reached the same held-out recall within 0.3 points (2026-12-06).
LEARNING_RATE = 3e-3
BATCH_ROWS = 1024


@dataclass
class Predictor:
    """score(x) = (x @ a) @ b + offset [..., F]: a trained predictor with the input's
    standardization folded into a and its bias (and the input's centring) into offset."""

    a: torch.Tensor  # [K, r] float32
    b: torch.Tensor  # [r, F]
    offset: torch.Tensor  # [F]
    loss: float  # mean training loss of the last steps


@dataclass
class HeldOut:
    """How a mask did on held-out rows, against the oracle that keeps each token's top neurons."""

    recall: float  # share of the oracle's kept neurons the mask keeps
    mass_recall: float  # share of sum |h| the mask keeps
    oracle_mass_recall: float  # share of sum |h| the oracle keeps
    sparsity: float  # share of neurons the mask zeroes
    rel_error: float  # ||(h - mask h) W_down^T|| / ||h W_down^T||


class PredictMlpSparsity(CalibratedPrunePass):
    """dejavu-X%: X% of each gated MLP's intermediate neurons zeroed per token by a trained predictor."""

    name = "predict_mlp_sparsity"
    requires = ("shapes",)
    preserves = ("shapes", "canonical")
    changes_numerics = True

    methods = ("dejavu",)
    refusal = "PredictMlpSparsity is the dejavu method; {spec} is another pass's"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        config = self.config
        ffns, skipped = self._plan(program, MutationInfo.of(program.graph))
        details = [s.detail() for s in skipped]
        if not ffns and not skipped:
            raise FlashcError(f"pruning {config.spec} found no MLP (linear -> swiglu/geglu/gelu/relu/silu -> linear, "
                              "or a fused MoE) in the graph; gated MLPs are recognised once fused: compile at -O2 "
                              "or above")
        if not ffns or config.sparsity == 0:
            details += [self._dense_row(program, ffn, f"{config.spec}: nothing to zero") for ffn in ffns]
            return PassResult(False, {"mlps": 0, "skipped": len(skipped)}, details=details)
        samples = self._calibrate(program, ffns)
        rows = []
        bar = tqdm(ffns, desc="training Deja Vu predictors", unit="mlp", disable=not self.progress)
        for ffn in bar:
            rows.append(self._predict(program, ffn, samples[id(ffn)].tensor()))
            bar.set_postfix(recall=f"{rows[-1]['recall']:.1%}")
        details += rows
        details += [{"layer": "-", "op": "calibration", "status": "warning", "note": w}
                    for w in self.calibration.warnings]
        neurons = sum(r["neurons"] for r in rows)
        stats = {"mlps": len(rows), "skipped": len(skipped), "target": config.sparsity,
                 "sparsity": round(sum(r["sparsity"] * r["neurons"] for r in rows) / neurons, 4),
                 "recall": round(sum(r["recall"] for r in rows) / len(rows), 4),
                 "mass_recall": round(sum(r["mass_recall"] for r in rows) / len(rows), 4)}
        return PassResult(True, stats, details=details)

    def _plan(self, program: Program, mutations: MutationInfo) -> tuple[list[Ffn], list[Skipped]]:
        ffns, skipped = [], []
        for node in list(program.op_nodes()):
            if node.target in MOES:
                layer = moe_layer(program, node)
                if layer is not None:
                    gate_up, down = program.params[layer.gate_up.name], program.params[layer.down.name]
                    skipped.append(Skipped(layer.name, "moe experts", "MoE experts: a predictor per expert is not "
                                           "built (online-X% with PruneConfig(experts=True) sparsifies them)",
                                           node.args[4] * (gate_up[0].numel() + down[0].numel()),
                                           nbytes(gate_up) + nbytes(down)))
                continue
            if node.target not in GATED and node.target not in UNARY:
                continue
            ffn = match_ffn(program, node)
            if ffn is None:
                continue
            reason = None
            weights = [n.args[1] for n in (*ffn.readers, ffn.down)]
            if node.target in UNARY:
                reason = (f"not a gated MLP (down({ffn.kind}(up x))): Deja Vu's predictor is built for gated MLPs "
                          "here (online-X% or ffn-X% prune this one)")
            elif any(mutations.is_written(w) for w in weights):
                reason = "a weight is written in place by the graph"
            elif mutations.written_between(ffn.readers[0].args[0], ffn.readers[0], ffn.down):
                reason = "the MLP's input is written in place between gate/up and down (the predictor reads it)"
            if reason:
                tensors = [program.params[w.name] for w in weights]
                skipped.append(Skipped(ffn.name, f"mlp ({ffn.kind})", reason, sum(t.numel() for t in tensors),
                                       sum(nbytes(t) for t in tensors)))
            else:
                ffns.append(ffn)
        return ffns, skipped

    def _calibrate(self, program: Program, ffns: list[Ffn]) -> dict[int, ActivationSample]:
        """The MLPs' inputs x on sampled calibration rows (h is recomputed from them: F is 3-4 K)."""
        config = self.config
        params = [program.params[n.args[1].name] for f in ffns for n in (*f.readers, f.down)]
        device = real_weights(program, params, f"pruning ({config.spec})")
        calls = calibration_run(program, self.calibration, config, config.min_calibration_tokens,
                                "Deja Vu pruning", device)
        stride = max(1, -(-calls.rows // config.predictor_rows))
        samples, probes = {}, {}
        for ffn in ffns:
            samples[id(ffn)] = ActivationSample(stride, config.predictor_rows, 0)  # aten.linear's input
            probes.setdefault(ffn.readers[0], []).append(samples[id(ffn)])
        collect_statistics(program, probes, calls, progress=self.progress)
        return samples

    def _predict(self, program: Program, ffn: Ffn, x: torch.Tensor) -> dict:
        """Train the MLP's predictor, fix its threshold, measure it, and insert it; its report row."""
        config = self.config
        if x.shape[0] < 8:
            raise FlashcError(f"pruning {config.spec}: {ffn.name} got {x.shape[0]} calibration rows; a predictor "
                              "needs at least 8 (give more calibration text)")
        h = intermediate(program, ffn, x)
        fit, tune, measure = split_rows(x.shape[0])
        k, f = x.shape[1], h.shape[1]
        rank = predictor_rank(config.predictor_rank, k, f)
        predictor = train_predictor(x[fit], h[fit], config.sparsity, rank, config.predictor_steps)
        dtype = ffn.down.args[0].meta["val"].dtype
        a, b = predictor.a.to(dtype), predictor.b.to(dtype)
        threshold = fit_threshold(x[tune], a, b, predictor.offset, config.sparsity).to(dtype)
        down = program.params[ffn.down.args[1].name]
        held = held_out(predicted_mask(x[measure], a, b, threshold), h[measure], down, config.sparsity)
        param = self._insert(program, ffn, a, b, threshold)
        ins = sum(program.params[n.args[1].name].numel() for n in ffn.readers)
        before = ins + down.numel()
        after = ins + down.numel() * (1 - held.sparsity) + rank * (k + f)
        return {"layer": ffn.name, "op": f"mlp ({ffn.kind})", "status": "sparsified", "method": "dejavu",
                "pattern": config.pattern, "sparsity": held.sparsity, "calibrated": config.sparsity,
                "rank": rank, "neurons": f, "recall": held.recall, "mass_recall": held.mass_recall,
                "oracle_mass_recall": held.oracle_mass_recall, "train_loss": predictor.loss,
                "threshold_param": param, "params_before": before, "params_after": round(after),
                "rel_error": held.rel_error,
                "note": (f"rank {rank}: recall {held.recall:.1%} (random mask {1 - config.sparsity:.1%}), mass "
                         f"{held.mass_recall:.1%} (oracle {held.oracle_mass_recall:.1%}), {held.sparsity:.1%} "
                         f"held out; reads include the predictor's {rank * (k + f):,}")}

    def _insert(self, program: Program, ffn: Ffn, a: torch.Tensor, b: torch.Tensor, threshold: torch.Tensor
                ) -> str:
        """down(h) -> down(sparsify(predicted_sparsify(h, x, a, b, threshold), 0)); returns the name of
        the zero threshold's parameter (what reads of the down projection are keyed by, as online's are)."""
        graph = program.graph
        h, x = ffn.down.args[0], ffn.readers[0].args[0]
        base = ffn.down.args[1].name
        params = [program.add_param(f"{base}_predictor_{what}", value)
                  for what, value in (("a", a), ("b", b), ("threshold", threshold))]
        zero = program.add_param(f"{base}_sparsify_threshold", torch.zeros((), dtype=h.meta["val"].dtype,
                                                                            device=a.device))
        with graph.inserting_before(ffn.down):
            masked = graph.call_function(PREDICTED_SPARSIFY, (h, x, *params))
            sparse = graph.call_function(SPARSIFY, (masked, zero))
        for node in (masked, sparse):
            node.meta.update({k: v for k, v in ffn.down.meta.items() if k in ("stack_trace", "nn_module_stack")})
            node.meta["val"] = h.meta["val"]
        ffn.down.args = (sparse, *ffn.down.args[1:])
        return zero.name

    def _dense_row(self, program: Program, ffn: Ffn, note: str) -> dict:
        numel = sum(program.params[n.args[1].name].numel() for n in (*ffn.readers, ffn.down))
        return {"layer": ffn.name, "op": f"mlp ({ffn.kind})", "status": "dense", "method": "dejavu",
                "pattern": self.config.pattern, "sparsity": 0.0, "params_before": numel, "params_after": numel,
                "note": note}


def intermediate(program: Program, ffn: Ffn, x: torch.Tensor) -> torch.Tensor:
    """h = act(gate x) * up x [R, F] for calibration rows x [R, K], in float32 with the MLP's own
    weights and activation op (calibration keeps x only: h is 3-4 times wider)."""
    def linear(node: fx.Node) -> torch.Tensor:
        bias = node.args[2] if len(node.args) > 2 else None
        return F.linear(x, program.params[node.args[1].name].float(),
                        None if bias is None else program.params[bias.name].float())

    gate, up = linear(ffn.merged).chunk(2, dim=-1) if ffn.merged is not None else (linear(n) for n in ffn.ins)
    act = ffn.down.args[0]
    return act.target(gate, up, *act.args[2:], **act.kwargs)


def predictor_rank(asked: int | None, k: int, f: int) -> int:
    """PruneConfig.predictor_rank, or min(128, K // 8) when None; never more than min(K, F). The rank
    matters little: on smollm2-135m's layer 15 at 40% (K = 576), ranks 16, 32, 72, 128 and 576 gave
    held-out recall 70.3, 71.1, 72.0, 72.6 and 73.0% (unweighted loss, 2026-12-06); what limits it is
    that a linear score sees the gate's sign, not |up x|."""
    rank = asked if asked is not None else min(MAX_RANK, max(1, k // 8))
    return min(rank, k, f)


def split_rows(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of the sampled rows that train the predictor (three quarters), fix its threshold
    (an eighth) and measure it (the rest): a seeded random split, as TEAL's fit_held_split (rows
    are sampled at a fixed stride, so every other row could put each window's first token in one part)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    fit, tune = n * 3 // 4, n * 7 // 8
    return order[:fit].sort().values, order[fit:tune].sort().values, order[tune:].sort().values


def top_neurons(h: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The oracle [R, F] (bool): each row's F - pruned_count(sparsity, F) largest |h|."""
    keep = h.shape[-1] - pruned_count(sparsity, h.shape[-1])
    mask = torch.zeros(h.shape, dtype=torch.bool, device=h.device)
    return mask.scatter_(-1, h.abs().topk(keep, dim=-1).indices, True)


def train_predictor(x: torch.Tensor, h: torch.Tensor, sparsity: float, rank: int, steps: int,
                    seed: int = 0, weighted: bool = True) -> Predictor:
    """A predictor of top_neurons(h, sparsity) from x [R, K]: logits (z @ a) @ b + bias on the
    standardized input z, binary cross-entropy, Adam, `steps` batches of BATCH_ROWS rows drawn with a
    seeded generator. a starts random, b small, the bias at each neuron's base rate (log-odds).

    weighted: each entry's loss weighted by |h| over its mean, so that missing a large neuron costs
    more than missing one near the cut (Deja Vu weighs them alike). What the mask costs is the output
    error, and it comes from the large neurons dropped: on smollm2-135m at 40%, the down projections'
    held-out relative output error fell from 0.240 / 0.318 / 0.044 to 0.105 / 0.267 / 0.035 (layers 0,
    15, 29) while recall fell from 78.0 / 72.0 / 79.0% to 74.6 / 71.5 / 77.9%, and dejavu-25% / 40%
    cost +12.3% / +36.1% perplexity instead of +73.3% / +158.4% (bench/prune_accuracy.py, first 24
    windows per text; weights |h|^2 instead: +13.5% / +36.4%; 2026-12-06)."""
    device = x.device
    x, labels = x.float(), top_neurons(h, sparsity).float()
    weights = h.abs() / h.abs().mean().clamp_min(1e-30) if weighted else None
    n, k = x.shape
    f = labels.shape[1]
    mean, std = x.mean(0), x.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    z = (x - mean) / std
    g = torch.Generator().manual_seed(seed)
    base = labels.mean(0).clamp(1e-4, 1 - 1e-4)
    a = (torch.randn(k, rank, generator=g) / k ** 0.5).to(device).requires_grad_()
    b = (torch.randn(rank, f, generator=g) * 0.1 / rank ** 0.5).to(device).requires_grad_()
    bias = torch.log(base / (1 - base)).requires_grad_()
    optimizer = torch.optim.Adam([a, b, bias], lr=LEARNING_RATE)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(0, n, (min(BATCH_ROWS, n),), generator=g).to(device)
            loss = F.binary_cross_entropy_with_logits((z[rows] @ a) @ b + bias, labels[rows],
                                                      weight=None if weights is None else weights[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
    with torch.no_grad():
        offset = bias - ((mean / std) @ a) @ b  # (x - mean) / std @ a = x @ (a / std) - (mean / std) @ a
        last = float(torch.stack(losses[-20:]).mean())
        return Predictor((a / std[:, None]).detach(), b.detach(), offset.detach(), last)


def fit_threshold(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offset: torch.Tensor, sparsity: float
                  ) -> torch.Tensor:
    """The per-neuron threshold [F] (float32) under which (x @ a) @ b, computed as the op computes it
    (in a's dtype), zeroes pruned_count(sparsity) of the entries of rows x: t - offset, with t the
    score (plus offset) of the largest entry zeroed; -inf when none is."""
    scores = ((x.to(a.dtype) @ a) @ b).float() + offset
    count = pruned_count(sparsity, scores.numel())
    if count == 0:
        return torch.full_like(offset, -torch.inf)
    t = scores.flatten().kthvalue(count).values
    return t - offset


def held_out(kept: torch.Tensor, h: torch.Tensor, down: torch.Tensor, sparsity: float) -> HeldOut:
    """The mask kept [R, F] against the oracle on held-out rows h [R, F]; down [H, F] the down projection."""
    oracle = top_neurons(h, sparsity)
    magnitude = h.abs()
    total = float(magnitude.sum())
    w = down.float()
    out = float((h @ w.t()).norm())
    return HeldOut(recall=float((kept & oracle).sum() / oracle.sum().clamp_min(1)),
                   mass_recall=float((magnitude * kept).sum()) / total if total > 0 else 1.0,
                   oracle_mass_recall=float((magnitude * oracle).sum()) / total if total > 0 else 1.0,
                   sparsity=1 - float(kept.float().mean()),
                   rel_error=float(((h * ~kept) @ w.t()).norm()) / out if out > 0 else 0.0)
