"""Token generation on a compiled decode step: greedy or sampled, with a resident KV cache.

`generate(step, input_ids, max_new_tokens, ...)` drives any callable with the decode-step
signature of flashc.decode, `step(input_ids[B, 1], cache_position[1], *kv) -> logits`,
usually `CompiledModel.generate`. The prompt is fed one token per step (the step graph is
the only graph an artifact holds), then each new token is chosen from the last logits.
Tokens stay on the step's device: nothing waits for the host between steps except the
end-of-sequence check, which runs only when an `eos_token_id` is given.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from flashc.errors import InputError


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: argmax at temperature 0, else sampled.

    top_k keeps the k most likely tokens, top_p the smallest set whose probability
    reaches p (nucleus sampling); both apply before drawing.
    """
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise InputError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {top_p}")
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_scores, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_scores, -1) >= top_p  # keeps the token that crosses p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(step: Callable[..., torch.Tensor], input_ids: torch.Tensor, max_new_tokens: int,
             kv_cache: Sequence[torch.Tensor], *, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, eos_token_id: int | None = None,
             progress: bool = False) -> torch.Tensor:
    """input_ids[B, P] -> [B, P + n] with n <= max_new_tokens new tokens.

    kv_cache: the step's cache tensors, zeroed or not (positions >= P are overwritten
    before they are read). Stops early once every sequence has produced eos_token_id.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise InputError(f"input_ids must be [batch, prompt_len] with prompt_len >= 1, got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    cache_len = kv_cache[0].shape[2]
    prompt_len = input_ids.shape[1]
    if prompt_len + max_new_tokens > cache_len:
        raise InputError(f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens does not fit the static "
                         f"KV cache of {cache_len} positions; compile with a larger cache_len "
                         f"(flashc compile ... --signature decode --cache-len N)")
    device = kv_cache[0].device
    ids = input_ids.to(device)
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    positions = torch.arange(cache_len, device=device)
    out = [ids]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    logits = None
    steps = range(prompt_len + max_new_tokens - 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="generate", unit="tok")
    token = ids[:, :1]
    for t in steps:
        logits = step(token, positions[t:t + 1], *kv_cache)
        if t + 1 < prompt_len:
            token = ids[:, t + 1:t + 2]
            continue
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        token = nxt[:, None].to(ids.dtype)
        out.append(token)
        if eos_token_id is not None and bool(done.all()):
            break
    return torch.cat(out, 1)
