"""Pruning: offline (magnitude, Wanda, SparseGPT; unstructured or N:M), online activation
sparsity (TEAL, or Deja Vu's learned predictor per MLP) and structured pruning (FFN channels,
attention heads, MoE experts), with calibration shared with quantization.

    from flashc.passes.prune import PruneConfig, prune_pass
    prune_pass(PruneConfig.parse("wanda-50%"), resolve_calibration("builtin", tokenizer))

One module per idea: config (PruneConfig), masks, magnitude, wanda, sparsegpt, teal (the
methods), layers (what the passes share), recover (distillation of the pruned weights against
the unpruned program, flashc.distill's loop), and the passes: weights (PruneWeights),
activations (SparsifyActivations: flashc.sparsify nodes), dejavu (PredictMlpSparsity: a trained
predictor's mask on each gated MLP's intermediate, flashc.predicted_sparsify), ffn
(PruneFfnChannels), experts (PruneExperts). Attention heads are pruned on the model before capture (heads:
prune_heads, which flashc.compile runs where it runs model-level rewrites), because a head
count is baked into a captured graph's view sizes.
"""

from __future__ import annotations

from flashc.errors import FlashcError
from flashc.passes.prune.activations import SparsifyActivations
from flashc.passes.prune.config import METHODS, NOT_IMPLEMENTED, SPECS, PruneConfig
from flashc.passes.prune.dejavu import PredictMlpSparsity
from flashc.passes.prune.experts import PruneExperts
from flashc.passes.prune.ffn import PruneFfnChannels
from flashc.passes.prune.heads import HeadsResult, prune_heads
from flashc.passes.prune.weights import PruneWeights

PASSES = {"magnitude": PruneWeights, "wanda": PruneWeights, "sparsegpt": PruneWeights,
          "online": SparsifyActivations, "dejavu": PredictMlpSparsity, "ffn": PruneFfnChannels,
          "experts": PruneExperts}
MODEL_REWRITES = ("heads",)  # methods that rewrite the nn.Module before capture (no graph pass)


def prune_pass(config: "PruneConfig | str", calibration=None, progress: bool = True):
    """The pass that does what config asks (calibration: CalibrationData, for every method
    but magnitude)."""
    config = PruneConfig.parse(config)
    if config.method in MODEL_REWRITES:
        raise FlashcError(f"pruning {config.spec} rewrites the model before capture, not a graph: call "
                          "flashc.passes.prune.prune_heads(model, config, calibration), or flashc.compile(prune=...)")
    if config.needs_calibration and calibration is None:
        raise FlashcError(f"pruning {config.spec} needs calibration data: pass calibration='builtin' (flashc's "
                          "built-in text), a text or .safetensors file, or token ids")
    return PASSES[config.method](config, calibration, progress)


def for_model(prune, calibration, model, source=None, quantize_reads_it: bool = False):
    """The pass flashc.compile(prune=..., calibration=...) runs: the spec parsed and the
    calibration data resolved for the model (its tokenizer when flashc knows one).
    quantize_reads_it: the same calibration= also feeds quantization, so a method that
    reads none (magnitude) does not refuse it."""
    from flashc.passes.quantize.calibration import calibration_for_model

    config = PruneConfig.parse(prune)
    if not config.needs_calibration:
        if calibration is not None and not quantize_reads_it:
            raise FlashcError(f"pruning {config.spec} reads no calibration data; drop calibration=, or choose "
                              "wanda, sparsegpt, online, dejavu or ffn")
        return prune_pass(config)
    return prune_pass(config, calibration_for_model(calibration, model, source))


def heads_for_model(prune, calibration, model, source=None) -> HeadsResult:
    """The head pruning flashc.compile(prune='heads-X%', calibration=...) runs on the model
    before capture: calibration resolved for the model as for_model resolves it."""
    from flashc.passes.quantize.calibration import calibration_for_model

    config = PruneConfig.parse(prune)
    if calibration is None:
        raise FlashcError(f"pruning {config.spec} needs calibration data: pass calibration='builtin' (flashc's "
                          "built-in text), a text file or token ids")
    return prune_heads(model, config, calibration_for_model(calibration, model, source))


__all__ = ["METHODS", "MODEL_REWRITES", "NOT_IMPLEMENTED", "PASSES", "HeadsResult", "PredictMlpSparsity",
           "PruneConfig", "PruneExperts", "PruneFfnChannels", "PruneWeights", "SPECS", "SparsifyActivations",
           "for_model", "heads_for_model", "prune_heads", "prune_pass"]
