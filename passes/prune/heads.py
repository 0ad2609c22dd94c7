"""prune_heads: query heads of least importance removed from a model's attention layers.

Why on the model, before capture, and not on the graph: a captured graph holds the head
count as literal sizes (q_proj's output viewed as [B, S, heads, head_dim], the GQA repeat,
the attention's output reshaped back), spread over several nodes whose forms change with
the fusion level, and a decode step's KV cache layout is part of its input signature. On
the nn.Module the count lives in a few places that Hugging Face's Llama-family attention
reads at run time: q_proj's rows (`view(*input_shape, -1, head_dim)` infers the head count
from them), o_proj's columns, and `num_key_value_groups` (what `repeat_kv` / SDPA's GQA
repeat each key/value head by). So the rewrite works on a deep copy of the model (the
caller's model is untouched) and flashc.compile captures the result like the
attention-to-SSM rewrite's.

What goes (Wanda-style importance, Sun et al. 2023, arXiv:2306.11695, summed per head as in
the structured "Wanda-sp" of An et al. 2024, arXiv:2312.11983): head h of a layer scores

    score_h = sum_{j in h's slice} ||x_j|| * sum_o |W_o[o, j]|

with x o_proj's input (the attention's per-head outputs) over the calibration text.

* With grouped-query attention (kv heads < q heads) only QUERY heads go, the same number
  in every group of a layer, so key/value heads, `repeat_kv` and the KV cache (a user's
  cache layout) stay as they are. heads-X% removes floor(X * layers * group size) query
  heads per group position over the model, in units of "one more query head from every
  group of one layer" (within a group, the heads of least score go first). How many units
  each layer gives is MEASURED, not read from the scores: every candidate (layer i losing
  k heads per group, that layer alone) is applied to the model (o_proj's input zeroed on
  those heads' channels, which is exactly what removing them computes) and its damage, the
  mean KL divergence of the logits from the unpruned model's over the first DAMAGE_TOKENS
  calibration tokens, recorded; units then go greedily to the layer whose next unit adds
  the least measured damage. Scores alone misallocate: they compare heads within a layer,
  but their shares of a layer's total say nothing about how much that layer matters to the
  output (on mixtral-ref the shares were all near 0.4-0.5 and picked other layers than the
  least damaging ones, bench/RESULTS.md, session 9). A group keeps at least one query head.
* Without GQA (as many kv heads as q heads) a query head is its own group: dropping it
  drops its key and value heads too, so the KV cache shrinks. That is done only when every
  layer drops the same number (floor(X * heads)), with the model's config updated
  (num_attention_heads, num_key_value_heads), so decode caches are built for the new layout.

`config.num_attention_heads` is set to the new count when every layer has it (head_dim is
pinned in the config first, since Hugging Face derives it from hidden_size and the head
count when it is unset); when layers differ it is left as it was (each attention module
carries its own count, and Hugging Face's Llama-family code reads the config's count only
when it builds a layer) and the result says so.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from flashc.errors import FlashcError
from flashc.passes.decoder_layers import decoder_layers
from flashc.passes.prune.config import PruneConfig
from flashc.passes.prune.masks import pruned_count
from flashc.passes.quantize.calibration import CalibrationData

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
WINDOW = 256  # calibration tokens per window (shorter when the model has fewer positions)
# Calibration tokens each candidate removal's damage is measured on, run BATCH windows at a
# time (a batch's logits are held four times over, as log-probabilities, probabilities and their
# differences: 2 x 255 x 49152 floats each on mixtral-ref, 100 MB).
DAMAGE_TOKENS = 2048
BATCH = 2


@dataclass
class HeadSite:
    """One attention layer and its head layout."""

    index: int
    path: str
    attention: nn.Module
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@dataclass
class HeadsResult:
    """The pruned model (a copy) and, per layer, what went."""

    model: nn.Module
    config: PruneConfig
    layers: list[dict] = field(default_factory=list)
    calibration: str = ""
    config_note: str = ""
    warnings: list[str] = field(default_factory=list)  # the calibration data's
    seconds: float = 0.0

    @property
    def heads_before(self) -> int:
        return sum(r["heads_before"] for r in self.layers)

    @property
    def heads_after(self) -> int:
        return sum(r["heads_after"] for r in self.layers)

    @property
    def sparsity(self) -> float:
        """The share of query heads removed."""
        return 1 - self.heads_after / self.heads_before if self.heads_before else 0.0

    def rows(self) -> list[list[str]]:
        """The report's table (compile's `rewrites`): one row per layer, then the totals."""
        from flashc.cost_model import human_bytes

        rows = []
        for r in self.layers:
            kv = (f"{r['kv_heads_before']} kv heads kept" if r["kv_heads_before"] == r["kv_heads_after"]
                  else f"kv heads {r['kv_heads_before']} -> {r['kv_heads_after']}")
            rows.append([r["layer"], f"{r['heads_before']} -> {r['heads_after']} query heads ({kv}), dropped "
                         f"{r['dropped'] or 'none'}, importance removed {r['importance_removed']:.1%}, "
                         f"q/k/v/o {human_bytes(r['bytes_before'])} -> {human_bytes(r['bytes_after'])}"
                         + _damage_text(r.get("damage", []))])
        before = sum(r["bytes_before"] for r in self.layers)
        after = sum(r["bytes_after"] for r in self.layers)
        cache = ("KV cache unchanged" if all(r["kv_heads_before"] == r["kv_heads_after"] for r in self.layers)
                 else "KV cache smaller (key/value heads dropped with their query heads)")
        rows.append(["all layers", f"{self.heads_before} -> {self.heads_after} query heads ({self.sparsity:.1%} "
                     f"removed), attention weights {human_bytes(before)} -> {human_bytes(after)}; {cache}"])
        rows.append(["calibration", self.calibration])
        if self.config_note:
            rows.append(["config", self.config_note])
        rows += [["warning", w] for w in self.warnings]
        return rows


def head_sites(model: nn.Module) -> list[HeadSite]:
    """The model's attention layers in order, each checked to be one whose heads flashc can
    prune (Hugging Face's Llama-family form); anything else is refused naming the layer."""
    layers = decoder_layers(model, "heads")
    sites = []
    for index, (path, layer) in enumerate(layers):
        attention = getattr(layer, "self_attn", None)
        where = f"layer {index} ({path}.self_attn, {type(attention).__name__})"
        missing = [p for p in PROJECTIONS if not isinstance(getattr(attention, p, None), nn.Linear)]
        if missing:
            raise FlashcError(f"heads: {where} has no nn.Linear {', '.join(missing)}: head pruning slices separate "
                              "q/k/v/o projections (fused qkv projections and other attention forms are not "
                              "supported)")
        head_dim, groups = getattr(attention, "head_dim", None), getattr(attention, "num_key_value_groups", None)
        if not (isinstance(head_dim, int) and isinstance(groups, int) and head_dim > 0 and groups > 0):
            raise FlashcError(f"heads: {where} has no integer head_dim and num_key_value_groups attributes: flashc "
                              "prunes heads of Hugging Face-style attention, which infers the head count from "
                              "q_proj and repeats key/value heads by num_key_value_groups; this attention's layout "
                              "is not one flashc knows")
        q, k, v, o = (getattr(attention, p) for p in PROJECTIONS)
        heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
        if (q.out_features % head_dim or k.out_features % head_dim or v.out_features != k.out_features
                or heads != kv_heads * groups or o.in_features != q.out_features):
            raise FlashcError(f"heads: {where}: q/k/v/o shapes ({q.out_features}, {k.out_features}, "
                              f"{v.out_features} outputs; o_proj {o.in_features} inputs) do not agree with "
                              f"head_dim {head_dim} and {groups} query heads per key/value head: the attention's "
                              "layout is not one flashc knows")
        sites.append(HeadSite(index, f"{path}.self_attn", attention, heads, kv_heads, head_dim))
    layouts = {(s.heads, s.kv_heads, s.head_dim) for s in sites}
    if len(layouts) > 1:
        raise FlashcError(f"heads: the model's attention layers have different head layouts {sorted(layouts)} "
                          "(heads, kv heads, head_dim): flashc prunes models whose layers share one")
    return sites


def head_scores(model: nn.Module, sites: list[HeadSite], tokens: torch.Tensor, config: PruneConfig,
                progress: bool = True) -> tuple[list[torch.Tensor], str]:
    """Each layer's Wanda-style head scores [heads] over windows of the calibration tokens, and
    a description of what was run."""
    window = _window(model)
    tokens = tokens.reshape(-1)[: config.calibration_tokens]
    count = tokens.numel() // window
    if count * window < config.min_calibration_tokens:
        raise FlashcError(f"calibration data too small: {tokens.numel()} tokens give {count} windows of {window} "
                          f"({count * window} tokens); head pruning needs at least {config.min_calibration_tokens} "
                          f"(PruneConfig.min_calibration_tokens): give more text")
    device = next(model.parameters()).device
    squares = [torch.zeros(s.attention.o_proj.in_features, dtype=torch.float64, device=device) for s in sites]
    rows = [0]

    def hook(i):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            squares[i].add_(x.double().pow(2).sum(0))
            if i == 0:
                rows[0] += x.shape[0]
        return record

    handles = [s.attention.o_proj.register_forward_pre_hook(hook(i)) for i, s in enumerate(sites)]
    batches = tokens[: count * window].reshape(count, window).to(device)
    try:
        with torch.no_grad():
            for start in tqdm(range(0, count, 8), desc="calibrating heads", unit="batch", disable=not progress):
                _run(model, batches[start:start + 8])
    finally:
        for h in handles:
            h.remove()
    scores = []
    for s, sq in zip(sites, squares):
        norms = (sq / max(rows[0], 1)).sqrt().float()  # ||x_j|| over the calibration rows, per channel
        channel = norms * s.attention.o_proj.weight.detach().abs().float().sum(0)
        scores.append(channel.reshape(s.heads, s.head_dim).sum(1).cpu())
    return scores, f"{count * window} tokens in {count} windows of {window}"


def prune_heads(model: nn.Module, config: PruneConfig | str, calibration: CalibrationData,
                progress: bool = True) -> HeadsResult:
    """A copy of model with heads-X% of its query heads removed (see the module docstring);
    the input model is not changed."""
    config = PruneConfig.parse(config)
    if config.method != "heads":
        raise ValueError(f"prune_heads removes attention heads; {config.spec} is another pass's")
    start = time.perf_counter()
    sites = head_sites(model)
    if calibration is None or calibration.tokens is None:
        raise FlashcError(f"pruning {config.spec} runs the model on calibration text: give text or token ids"
                          + ("" if calibration is None else f", not per-input tensors ({calibration.description})"))
    plan = _plan(sites, config)  # refuses an impossible spec before the calibration run
    pruned = copy.deepcopy(model)
    sites = head_sites(pruned)
    scores, described = head_scores(pruned, sites, calibration.tokens, config, progress)
    order = _order(sites, scores)
    damage, measured = {}, ""
    if plan.choice:  # the layers could give their heads in more than one way: measure each candidate
        candidates = {(i, k): _dropped(order[i], k) for i in range(len(sites)) for k in range(1, sites[0].group)}
        damage, measured = measure_damage(pruned, sites, candidates, calibration.tokens, config, progress)
    per_layer = _allocate(plan, len(sites), sites[0].group, damage)
    result = HeadsResult(pruned, config, calibration=f"{calibration.description}: {described}" + measured,
                         warnings=list(calibration.warnings))
    for i, (site, score) in enumerate(zip(sites, scores)):
        dropped = set(_dropped(order[i], per_layer[i]))
        row = _rewrite(site, score, [h for h in range(site.heads) if h not in dropped])
        row["damage"] = [{"per_group": k, **damage[i, k]} for k in range(1, site.group) if (i, k) in damage]
        result.layers.append(row)
    result.config_note = _update_config(pruned, sites)
    _check_runs(pruned, sites, calibration.tokens)
    result.seconds = time.perf_counter() - start
    return result


def measure_damage(model: nn.Module, sites: list[HeadSite], candidates: dict[tuple[int, int], list[int]],
                   tokens: torch.Tensor, config: PruneConfig, progress: bool = True
                   ) -> tuple[dict[tuple[int, int], dict], str]:
    """What each candidate removal does to the model, that layer alone: candidates maps
    (layer, heads per group) to the query heads that layer would lose. Each is applied by
    zeroing o_proj's input on those heads' channels (what the removal computes) and scored on
    the first DAMAGE_TOKENS calibration tokens against the unpruned model: "kl", the mean
    KL(unpruned || pruned) of the next-token distributions, and "loss_increase", the relative
    increase of the next-token loss (with "heads", the candidate's). Returns them and a
    description for the report."""
    window = _window(model)
    tokens = tokens.reshape(-1)[: min(config.calibration_tokens, DAMAGE_TOKENS)]
    count = max(1, tokens.numel() // window)
    window = min(window, tokens.numel())
    device = next(model.parameters()).device
    batches = tokens[: count * window].reshape(count, window).to(device).split(BATCH)
    keys = sorted(candidates)
    masks = {}
    for i, k in keys:
        d = sites[i].head_dim
        mask = torch.ones(sites[i].attention.o_proj.in_features, device=device)
        for h in candidates[i, k]:
            mask[h * d:(h + 1) * d] = 0
        masks[i, k] = mask
    kl = dict.fromkeys(keys, 0.0)
    loss = dict.fromkeys([None, *keys], 0.0)
    positions = 0
    bar = tqdm(total=len(batches) * (len(keys) + 1), desc="heads: damage per layer", unit="run",
               disable=not progress)
    with torch.no_grad(), bar:
        for ids in batches:
            reference = torch.log_softmax(_logits(model, ids)[:, :-1].float(), -1)
            probs = reference.exp().flatten()
            targets = ids[:, 1:].unsqueeze(-1)
            loss[None] -= float(reference.gather(-1, targets).sum())
            bar.update()
            for i, k in keys:
                handle = sites[i].attention.o_proj.register_forward_pre_hook(
                    lambda module, args, mask=masks[i, k]: (args[0] * mask.to(args[0].dtype),))
                try:
                    logp = torch.log_softmax(_logits(model, ids)[:, :-1].float(), -1)
                finally:
                    handle.remove()
                # KL(p || q) = sum p (log p - log q), as one dot product: the difference of the two sums
                # (p log p - p log q) cancels to a few digits in float32 when the removal does little
                kl[i, k] += float(torch.dot(probs, (reference - logp).flatten()))
                loss[i, k] -= float(logp.gather(-1, targets).sum())
                bar.update()
            positions += targets.numel()
    damage = {key: {"heads": candidates[key], "kl": kl[key] / positions, "loss_increase": loss[key] / loss[None] - 1}
              for key in keys}
    described = (f"; damage of each of {len(keys)} candidate removals (one layer alone) measured on "
                 f"{count * window} tokens in {count} windows of {window}: KL of the logits from the unpruned "
                 "model's")
    return damage, described


# ---------------------------------------------------------------------------- choice


@dataclass
class _Plan:
    units: int  # GQA: query heads per group position removed over all layers; no GQA: heads every layer loses
    choice: bool  # whether the units can be spread over the layers in more than one way (measured if so)


def _plan(sites: list[HeadSite], config: PruneConfig) -> _Plan:
    site = sites[0]
    layers, group = len(sites), site.group
    if group == 1:  # no GQA: a query head is its own key/value group, and every layer keeps the same count
        drop = pruned_count(config.sparsity, site.heads)
        if config.sparsity > 0 and drop == 0:
            raise FlashcError(f"pruning {config.spec}: {site.heads} heads per layer (no grouped-query attention, "
                              f"so every layer must lose the same number) and {config.sparsity:.0%} of them rounds "
                              f"to none; the smallest step is heads-{100 / site.heads:.4g}%")
        if drop >= site.heads:
            raise FlashcError(f"pruning {config.spec} would remove every head of each layer; keep at least one")
        return _Plan(drop, choice=False)
    total = pruned_count(config.sparsity, layers * group)  # query heads per group position, over all layers
    if config.sparsity > 0 and total == 0:
        raise FlashcError(f"pruning {config.spec}: {layers} layers with groups of {group} query heads per key/value "
                          f"head; {config.sparsity:.0%} of them rounds to no head (heads are removed one per group "
                          f"of a layer at a time); the smallest step is heads-{100 / (layers * group):.4g}%")
    if total > layers * (group - 1):
        raise FlashcError(f"pruning {config.spec} would remove every query head of a group of {group} (each "
                          f"key/value head keeps at least one query head): ask for at most "
                          f"heads-{100 * (group - 1) / group:.4g}%")
    return _Plan(total, choice=0 < total < layers * (group - 1))


def _order(sites: list[HeadSite], scores: list[torch.Tensor]) -> list[list[list[int]]]:
    """Per layer, per group (without GQA: one group of all heads), its query heads by ascending score."""
    site = sites[0]
    size = site.heads if site.group == 1 else site.group
    return [[_by_score(s, range(g * size, (g + 1) * size)) for g in range(site.heads // size)] for s in scores]


def _dropped(groups: list[list[int]], count: int) -> list[int]:
    """The heads a layer loses when `count` go from each of its groups (least score first)."""
    return sorted(h for g in groups for h in g[:count])


def _allocate(plan: _Plan, layers: int, group: int, damage: dict[tuple[int, int], dict]) -> list[int]:
    """Heads each layer loses per group. Without GQA, plan.units everywhere; with it, plan.units
    units given one at a time to the layer whose next unit adds the least measured damage (KL
    with k+1 heads per group gone minus with k; ties to the earlier layer); with no choice to
    make (none or all units), the same count everywhere."""
    if group == 1:
        return [plan.units] * layers
    if not plan.choice:
        return [plan.units // layers] * layers
    taken = [0] * layers

    def added(i: int) -> float:
        return damage[i, taken[i] + 1]["kl"] - (damage[i, taken[i]]["kl"] if taken[i] else 0.0)

    for _ in range(plan.units):
        i = min((i for i in range(layers) if taken[i] < group - 1), key=lambda i: (added(i), i))
        taken[i] += 1
    return taken


def _by_score(score: torch.Tensor, heads=None) -> list[int]:
    """Heads (all, or those given) by ascending score; on a tie the later head comes first."""
    heads = range(score.shape[0]) if heads is None else heads
    return sorted(heads, key=lambda h: (float(score[h]), -h))


# --------------------------------------------------------------------------- rewrite


def _rewrite(site: HeadSite, score: torch.Tensor, keep: list[int]) -> dict:
    """Slice one attention's projections to the kept query heads (and, without GQA, their key
    and value heads); returns its report row."""
    attention, d = site.attention, site.head_dim
    before = sum(_nbytes(getattr(attention, p)) for p in PROJECTIONS)
    dropped = sorted(set(range(site.heads)) - set(keep))
    rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep])
    kv_heads = site.kv_heads
    if dropped:
        attention.q_proj = _rows(attention.q_proj, rows)
        attention.o_proj = _columns(attention.o_proj, rows)
        if site.group == 1:  # each query head is its own key/value head: they go together
            attention.k_proj = _rows(attention.k_proj, rows)
            attention.v_proj = _rows(attention.v_proj, rows)
            kv_heads = len(keep)
        attention.num_key_value_groups = len(keep) // kv_heads
        for name, value in (("num_heads", len(keep)), ("num_key_value_heads", kv_heads)):
            if isinstance(getattr(attention, name, None), int):  # older transformers kept these on the module
                setattr(attention, name, value)
    total = float(score.sum())
    removed = float(score[dropped].sum()) / total if dropped and total > 0 else 0.0
    return {"layer": site.path, "heads_before": site.heads, "heads_after": len(keep), "kv_heads_before": site.kv_heads,
            "kv_heads_after": kv_heads, "dropped": dropped, "importance_removed": removed,
            "bytes_before": before, "bytes_after": sum(_nbytes(getattr(attention, p)) for p in PROJECTIONS)}


def _rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(rows), bias=linear.bias is not None, device=linear.weight.device,
                    dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[rows.to(linear.weight.device)])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[rows.to(linear.bias.device)])
    return new.requires_grad_(linear.weight.requires_grad)


def _columns(linear: nn.Linear, columns: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(columns), linear.out_features, bias=linear.bias is not None, device=linear.weight.device,
                    dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, columns.to(linear.weight.device)])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new.requires_grad_(linear.weight.requires_grad)


def _update_config(model: nn.Module, sites: list[HeadSite]) -> str:
    """Make the model's config describe the pruned attention where it can; returns a note
    for the report when it cannot."""
    config = getattr(model, "config", None)
    if config is None:
        return ""
    counts = {s.attention.q_proj.out_features // s.head_dim for s in sites}
    kv_counts = {s.attention.k_proj.out_features // s.head_dim for s in sites}
    if len(kv_counts) > 1:  # _plan drops the same number everywhere without GQA: never happens
        raise FlashcError(f"heads: layers would keep different numbers of key/value heads {sorted(kv_counts)}; "
                          "the KV cache needs one")
    if getattr(config, "head_dim", None) is None:  # else derived from hidden_size / num_attention_heads
        config.head_dim = sites[0].head_dim
    config.num_key_value_heads = kv_counts.pop()
    if len(counts) == 1:
        config.num_attention_heads = counts.pop()
        return ""
    return (f"config.num_attention_heads left at {config.num_attention_heads}: layers keep different numbers of "
            f"query heads ({sorted(counts)}), each attention module carries its own")


def _check_runs(model: nn.Module, sites: list[HeadSite], tokens: torch.Tensor) -> None:
    """Run the pruned model once: an attention that reads a head count flashc did not rewrite
    fails here, with its name, instead of in capture."""
    ids = tokens.reshape(-1)[: min(16, tokens.numel())].reshape(1, -1).to(next(model.parameters()).device)
    try:
        with torch.no_grad():
            _run(model, ids)
    except RuntimeError as e:
        names = ", ".join(sorted({type(s.attention).__name__ for s in sites}))
        raise FlashcError(f"heads: the model with pruned heads fails to run ({e}); its attention ({names}) reads a "
                          "head count flashc does not rewrite, so its heads cannot be pruned this way") from None


# ----------------------------------------------------------------------------- helpers


def _damage_text(damage: list[dict]) -> str:
    """A report row's measured damage: KL and loss increase per heads-per-group removed."""
    if not damage:
        return ""
    runs = "; ".join(f"{d['per_group']} per group ({d['heads']}): KL {d['kl']:.4g}, loss {d['loss_increase']:+.2%}"
                     for d in damage)
    return f"; damage measured with this layer alone pruned: {runs}"


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = _run(model, ids)
    return out.logits if hasattr(out, "logits") else out


def _run(model: nn.Module, ids: torch.Tensor):
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedModel = ()
    if isinstance(model, PreTrainedModel):
        return model(input_ids=ids, use_cache=False)
    return model(ids)


def _window(model: nn.Module) -> int:
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(WINDOW, positions) if isinstance(positions, int) and positions > 0 else WINDOW


def _nbytes(linear: nn.Linear) -> int:
    return sum(p.numel() * p.element_size() for p in linear.parameters())
