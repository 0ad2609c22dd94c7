"""Resolve a MODEL argument (zoo name or path/to/file.py:factory) into a model and inputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from flashc.compiled import ModelSource
from flashc.errors import FlashcError
from flashc.ir import dtype_from_name


def is_factory(spec: str) -> bool:
    return ":" in spec and spec.split(":")[0].endswith(".py")


def load_factory(spec: str):
    path, _, name = spec.rpartition(":")
    file = Path(path)
    if not file.exists():
        raise FlashcError(f"{file}: no such file (MODEL is a zoo name or path/to/file.py:factory)")
    mod_spec = importlib.util.spec_from_file_location(f"flashc_user_{file.stem}", file)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise FlashcError(f"{file} has no callable {name!r}")
    return factory


def build_model(source: ModelSource, device: str = "cpu") -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The eager model a source names, with seeded example inputs of its recorded shape."""
    from flashc import zoo

    dtype = dtype_from_name(source.dtype)
    if source.signature == "decode":
        from flashc.decode import DecodeStep, decode_example_inputs

        base = build_model(ModelSource(source.kind, source.name, source.dtype, source.seed, source.batch,
                                       source.seq_len), device)[0]
        return DecodeStep(base, source.cache_len), decode_example_inputs(base, source.batch, source.cache_len, device)
    if source.kind == "zoo":
        model = zoo.build(source.name, dtype=dtype, device=device, seed=source.seed)
        return model, zoo.example_inputs(source.name, source.batch, source.seq_len, source.seed)
    if source.kind == "factory":
        torch.manual_seed(source.seed)
        made = load_factory(source.name)()
        if isinstance(made, tuple):
            model, inputs = made
            inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        else:
            model = made
            vocab = getattr(getattr(model, "config", None), "vocab_size", None)
            if vocab is None:
                raise FlashcError(f"{source.name} returned a model without config.vocab_size: "
                                  "return (model, example_inputs) from the factory")
            g = torch.Generator().manual_seed(source.seed)
            inputs = (torch.randint(0, vocab, (source.batch, source.seq_len), generator=g),)
        return model.to(dtype).eval(), inputs
    raise FlashcError(f"cannot rebuild a model from source kind {source.kind!r} (an in-memory module)")


def resolve(spec: str, dtype: str = "float32", batch: int = 1, seq_len: int = 16, seed: int = 0,
            device: str = "cpu", signature: str = "prefill",
            cache_len: int = 0) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], ModelSource]:
    if signature == "decode" and cache_len <= 0:
        raise FlashcError("a decode signature needs --cache-len N (the static KV cache length)")
    source = ModelSource("factory" if is_factory(spec) else "zoo", spec, dtype, seed, batch, seq_len,
                         signature, cache_len)
    model, inputs = build_model(source, device)
    return model, inputs, source
