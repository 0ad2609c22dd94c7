"""Finding a model's attention layers and putting `SSMAttention` in their place.

The rewrite works on the model itself (the nn.Module), before capture: the new layers are
trained (distilled) in PyTorch, and the model that comes out is captured and compiled like
any other, with one `flashc.ssm_scan` node a converted layer. A layer is recognized when
it has q/k/v/o projections that are nn.Linear and shapes that agree with the model's config
(heads, key-value heads, head size); anything else is refused with the layer's name and
the reason, before any work.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.nn as nn

from flashc.errors import FlashcError
from flashc.passes.decoder_layers import decoder_layers
from flashc.passes.ssm.gla import GLAAttention
from flashc.passes.ssm.layer import SSMAttention

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# The state-space layer kinds the rewrite builds, by SSMConfig.kind: the first is the default.
LAYER_KINDS = {"mamba2": SSMAttention, "gla": GLAAttention}


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer: where it sits (`parent.name`) and its head layout."""

    index: int
    path: str
    parent: nn.Module
    name: str
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def module(self) -> nn.Module:
        return getattr(self.parent, self.name)


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """The model's self-attention layers in order, each checked to be convertible."""
    layers = decoder_layers(model, "ssm")
    config = getattr(model, "config", None)
    sites = []
    for index, (path, layer) in enumerate(layers):
        attention = getattr(layer, "self_attn", None)
        where = f"layer {index} ({path}.self_attn)"
        if attention is None:
            raise FlashcError(f"ssm: {where}: the decoder layer has no self_attn module, so flashc cannot tell "
                              "which module is its attention")
        if isinstance(attention, SSMAttention):
            raise FlashcError(f"ssm: {where} is already a state-space layer")
        missing = [p for p in PROJECTIONS if not isinstance(getattr(attention, p, None), nn.Linear)]
        if missing:
            raise FlashcError(f"ssm: {where} ({type(attention).__name__}) has no nn.Linear {', '.join(missing)}: "
                              "the rewrite maps q/k/v/o projections onto the SSM's C/B/x/output projections, "
                              "so it needs all four (fused qkv projections are not supported)")
        heads = _int(getattr(config, "num_attention_heads", None))
        kv_heads = _int(getattr(config, "num_key_value_heads", None)) or heads
        head_dim = _int(getattr(attention, "head_dim", None)) or _int(getattr(config, "head_dim", None))
        if heads is None:
            raise FlashcError(f"ssm: {where}: the model has no config.num_attention_heads to split the projections "
                              "into heads")
        if head_dim is None:
            head_dim = attention.q_proj.out_features // heads
        shapes = {"q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim}
        for p, want in shapes.items():
            got = getattr(attention, p).out_features
            if got != want:
                raise FlashcError(f"ssm: {where}: {p} has {got} outputs, but the config's heads say {want}: "
                                  "the attention's layout is not one flashc knows")
        if attention.o_proj.in_features != heads * head_dim or heads % kv_heads:
            raise FlashcError(f"ssm: {where}: o_proj takes {attention.o_proj.in_features} inputs for {heads} heads "
                              f"of {head_dim} ({kv_heads} key-value heads): the attention's layout is not one "
                              "flashc knows")
        sites.append(AttentionSite(index, f"{path}.self_attn", layer, "self_attn", heads, kv_heads, head_dim))
    return sites


def convert(model: nn.Module, layers: list[int], kind: str = "mamba2") -> nn.Module:
    """A copy of model with the attention of each listed layer replaced by a state-space layer
    of `kind` (LAYER_KINDS: "mamba2", SSMAttention; "gla", GLAAttention) built from it (the
    input model is left as it was)."""
    if kind not in LAYER_KINDS:
        raise FlashcError(f"ssm: unknown layer kind {kind!r}; known: {', '.join(LAYER_KINDS)}")
    layer_class = LAYER_KINDS[kind]
    sites = attention_sites(model)
    bad = [i for i in layers if not 0 <= i < len(sites)]
    if bad:
        raise FlashcError(f"ssm: layer(s) {bad} do not exist: the model has {len(sites)} attention layers "
                          f"(0..{len(sites) - 1})")
    student = copy.deepcopy(model)
    for site in attention_sites(student):
        if site.index in layers:
            setattr(site.parent, site.name, layer_class(site.module, site.heads, site.kv_heads, site.head_dim,
                                                        site.index))
    return student


def ssm_layers(model: nn.Module) -> list[SSMAttention]:
    """The model's converted layers (every kind), in order."""
    return [m for m in model.modules() if isinstance(m, SSMAttention)]


def _int(value) -> int | None:
    return int(value) if isinstance(value, int) and value > 0 else None
