"""Where a transformer's decoder layers are, for the rewrites that change a model before capture
(passes/ssm: attention to state-space layers; passes/prune/heads.py: attention heads)."""

from __future__ import annotations

import torch.nn as nn

from flashc.errors import FlashcError


def decoder_layers(model: nn.Module, who: str) -> list[tuple[str, nn.Module]]:
    """(path, layer) of the model's decoder layers: the longest ModuleList whose items all have a
    self_attn module. `who` names the rewrite asking, for the error when there is none."""
    best: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and all(
                hasattr(m, "self_attn") for m in module):
            best = [(f"{path}.{i}", m) for i, m in enumerate(module)]
    if not best:
        raise FlashcError(f"{who}: found no decoder layers in {type(model).__name__} (a ModuleList of layers each "
                          "with a self_attn module, as Llama, Mistral, Mixtral, Qwen and Gemma have): flashc does "
                          "not know where this model's attention is")
    return best
