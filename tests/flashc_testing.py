"""Helpers shared by the tests (importable through pytest's pythonpath = tests)."""

import os

import torch

FAMILIES = ["llama-tiny", "mistral-tiny", "mixtral-tiny", "gemma-tiny", "qwen2-tiny"]


def fresh_ids(name: str, batch: int = 1, seq_len: int = 16, seed: int | None = None) -> torch.Tensor:
    """Random token ids from a fresh seed each call unless one is given."""
    from flashc import zoo

    vocab = zoo.get_entry(name).config["vocab_size"]
    g = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    return torch.randint(0, vocab, (batch, seq_len), generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
