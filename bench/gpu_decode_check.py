"""Correctness of the decode-step signature on the GPU: step-by-step vs a full forward.

    CUDA_LAUNCH_BLOCKING=1 python bench/gpu_decode_check.py
"""

import torch

import flashc
from flashc import zoo
from flashc.decode import DecodeStep, empty_kv_cache

for name in ("llama-tiny", "mixtral-tiny"):
    model = zoo.build(name, device="cuda")
    step = DecodeStep(model, 32)
    tokens = torch.randint(0, model.config.vocab_size, (1, 6), device="cuda")
    for label, fn in (("eager", step), ("flashc h100", None)):
        kv = empty_kv_cache(model, 1, 32, device="cuda")
        if fn is None:
            example = (tokens[:, :1], torch.tensor([0], device="cuda"), *empty_kv_cache(model, 1, 32, device="cuda"))
            cm = flashc.compile(step, "h100", example, level=3)
            fn = cm
        with torch.no_grad():
            outs = [fn(tokens[:, t:t + 1], torch.tensor([t], device="cuda"), *kv) for t in range(6)]
            full = model(tokens, use_cache=False).logits
        got = torch.cat(outs, 1)
        err = ((got - full).norm() / full.norm()).item()
        print(f"{name} {label}: decode vs full forward rel. err {err:.2e}", flush=True)
