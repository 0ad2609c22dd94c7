"""The decode-step signature: one token in, logits out, a static KV cache passed as inputs.

`DecodeStep` wraps a Hugging Face causal LM so that its forward takes
`(input_ids[B, T], cache_position[T], k_0, v_0, k_1, v_1, ...)` with each cache tensor
`[B, kv_heads, max_cache_len, head_dim]` (T = 1 for decoding; more for a prefill chunk or a
verify step). cache_position may also be [B, T], a position per sequence: sequences of one
batch then have their own lengths, and each writes its keys and values at its own slots. The captured graph writes the new token's key
and value into those tensors in place (index_copy_ at cache_position) and attends over
the whole cache with a mask that hides positions after cache_position: the same
graph serves every step, which is what CUDA graphs and static kernels need.

The step hands the model its own position ids and mask (`flashc.ops.decode_mask`) and
its own cache writes, so the traced graph does not depend on how a transformers
release tracks cache lengths; the fusion pipeline turns that attention into
`flashc.decode_attention`. transformers passes a ready-made 4-D mask to the attention
unchanged, so the step gives it in the form the model's attention implementation reads
(`MASK_FORMS`): SDPA takes it as boolean, eager and flex attention add it to the scores.

With hidden=True the step also returns the model's last hidden state [B, T, H], what its
output embedding (the LM head) reads, for drafters that work on the target's features
(flashc.draft_head).
"""

from __future__ import annotations

import torch

from flashc.errors import CaptureError


class DecodeStep(torch.nn.Module):
    """model(input_ids, cache_position, *kv_cache) -> logits, updating kv_cache in place;
    with hidden=True -> (logits, last_hidden), last_hidden [B, T, H] being the LM head's input."""

    def __init__(self, model: torch.nn.Module, max_cache_len: int, hidden: bool = False) -> None:
        super().__init__()
        self.model = model
        self.max_cache_len = max_cache_len
        self.config = model.config
        self.hidden = hidden

    def input_names(self) -> list[str]:
        """Names of the flat inputs, for the compiled model's signature."""
        return decode_input_names(self.model)

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor, *kv_cache: torch.Tensor):
        from transformers import StaticCache

        from flashc.ops import decode_mask

        cache = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
        states = state_layers(self.model)
        want = sum(1 if i in states else 2 for i in range(len(cache.layers)))
        if len(kv_cache) != want:
            raise CaptureError(f"decode step expects {want} cache tensors (k and v per attention layer, one state "
                               f"per state-space layer), got {len(kv_cache)}")
        window = getattr(self.config, "sliding_window", None)
        if window is not None and window < self.max_cache_len:
            raise CaptureError(f"the decode step keeps a full static cache: a sliding window of {window} "
                               f"tokens is shorter than cache_len={self.max_cache_len}; use cache_len <= {window}")
        tensors = iter(kv_cache)
        for i, layer in enumerate(cache.layers):
            if i in states:  # a state-space layer reads and writes its state; its cache layer stays unused
                states[i].bind_state(next(tensors), cache_position)
            else:
                _bind_layer(layer, next(tensors), next(tensors), cache_position)
        # Position ids and the mask are given explicitly, so the model's own bookkeeping
        # (which differs between transformers releases) plays no part in what is traced.
        batch, steps = input_ids.shape
        if cache_position.dim() == 2:  # a position per sequence and token: sequences of different lengths
            keys = torch.arange(self.max_cache_len, device=cache_position.device)
            visible = (keys <= cache_position.unsqueeze(-1)).unsqueeze(1)
            position_ids = cache_position
        else:
            visible = decode_mask(cache_position, self.max_cache_len)[None, None].expand(batch, 1, steps, -1)
            position_ids = cache_position.unsqueeze(0).expand(batch, -1)
        mask = attention_mask_for(self.model, visible)
        seen: list[torch.Tensor] = []
        hook = None
        if self.hidden:  # the head's own input, whatever the model calls it (hidden_states[-1] is not
            # the normed state in every family): lm_head(last_hidden) is then the logits by construction
            head = self.model.get_output_embeddings()
            if head is None:
                raise CaptureError(f"hidden=True: {type(self.model).__name__} has no output embeddings "
                                   "(get_output_embeddings() is None), so there is no LM head input to return")
            hook = head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                             cache_position=cache_position, past_key_values=cache, use_cache=True)
        finally:
            for layer in states.values():
                layer.bind_state(None)
            if hook is not None:
                hook.remove()
        if not self.hidden:
            return out.logits
        if len(seen) != 1 or seen[0].shape[:2] != input_ids.shape:
            raise CaptureError(f"hidden=True: the LM head of {type(self.model).__name__} ran {len(seen)} time(s) "
                               "or not on every token; the step returns one hidden state per token fed")
        return out.logits, seen[0]


# How each attention implementation of transformers reads a ready-made 4-D mask, as its
# mask builders in transformers.masking_utils make it: `sdpa_mask` is boolean (True where
# visible); `eager_mask` is additive (0 where visible, the dtype's min elsewhere), and so is
# a tensor given to flex attention (integrations/flex_attention.py adds it in `score_mod`).
# Flash attention reads a 2-D padding mask, not a 4-D one: the step does not support it.
MASK_FORMS = {"sdpa": "boolean", "eager": "additive", "flex_attention": "additive"}


def attention_mask_for(model: torch.nn.Module, visible: torch.Tensor) -> torch.Tensor:
    """The boolean mask `visible` in the form `model`'s attention implementation reads.

    Additive masks are in the model's dtype, as transformers' `eager_mask` makes them: a
    boolean mask added to the scores would shift the visible ones by 1 and hide nothing.
    """
    implementation = getattr(model.config, "_attn_implementation", None)
    form = MASK_FORMS.get(implementation)
    if form is None:
        raise CaptureError(f"the decode step does not know the mask form of attention implementation "
                           f"{implementation!r} ({type(model).__name__}); it supports {', '.join(MASK_FORMS)}: "
                           f"load the model with attn_implementation=\"sdpa\" or call "
                           f"model.set_attn_implementation(\"sdpa\")")
    if form == "boolean":
        return visible
    dtype = _model_dtype(model)
    return torch.where(visible, torch.zeros((), dtype=dtype, device=visible.device), torch.finfo(dtype).min)


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's activations: that of its first floating-point weight."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _bind_layer(layer, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor) -> None:
    """Point a StaticCache layer at our tensors and make its update write at cache_position."""
    layer.keys, layer.values = k, v
    layer.batch_size, layer.num_heads = k.shape[:2]
    layer.k_head_dim, layer.v_head_dim = k.shape[-1], v.shape[-1]
    layer.dtype, layer.device = k.dtype, k.device
    layer.cumulative_length = cache_position.reshape(-1)[0].clone()
    layer.is_initialized = True

    def update(key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if cache_position.dim() == 2:  # [B, T]: each sequence writes at its own positions
            where = cache_position[:, None, :, None]
            k.scatter_(2, where.expand(-1, k.shape[1], -1, k.shape[3]), key_states)
            v.scatter_(2, where.expand(-1, v.shape[1], -1, v.shape[3]), value_states)
        else:
            k.index_copy_(2, cache_position, key_states)
            v.index_copy_(2, cache_position, value_states)
        return k, v

    layer.update = update


def kv_cache_shape(model: torch.nn.Module, batch: int, max_cache_len: int) -> tuple[int, int, int, int]:
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return (batch, heads, max_cache_len, head_dim)


def state_layers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The model's state-space layers (the attention-to-SSM rewrite's) by layer index: these
    carry a fixed-size state [B, H, d, d] instead of a KV cache."""
    from flashc.passes.ssm.layer import SSMAttention

    return {m.layer_index: m for m in model.modules() if isinstance(m, SSMAttention)}


def empty_kv_cache(model: torch.nn.Module, batch: int, max_cache_len: int, device=None) -> list[torch.Tensor]:
    """Zeroed cache tensors, layer by layer: k and v in the model's dtype for an attention
    layer, the fp32 state for a state-space layer."""
    dtype = next(model.parameters()).dtype
    shape = kv_cache_shape(model, batch, max_cache_len)
    states = state_layers(model)
    out = []
    for i in range(model.config.num_hidden_layers):
        if i in states:
            out.append(torch.zeros(states[i].state_shape(batch), dtype=torch.float32, device=device))
        else:
            out += [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2)]
    return out


def decode_example_inputs(model: torch.nn.Module, batch: int, max_cache_len: int, device=None, tokens: int = 1,
                          per_sequence: bool = False) -> tuple:
    """Example inputs of a step feeding `tokens` tokens per sequence; per_sequence gives each
    sequence its own positions (cache_position [batch, tokens]), else one vector [tokens]."""
    ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
    pos = torch.arange(tokens, device=device)
    if per_sequence:
        pos = pos.expand(batch, -1).contiguous()
    return (ids, pos, *empty_kv_cache(model, batch, max_cache_len, device))


def decode_input_names(model: torch.nn.Module) -> list[str]:
    names = ["input_ids", "cache_position"]
    states = state_layers(model)
    for i in range(model.config.num_hidden_layers):
        names += [f"ssm_state_{i}"] if i in states else [f"k_cache_{i}", f"v_cache_{i}"]
    return names
