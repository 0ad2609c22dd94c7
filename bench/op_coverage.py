"""Which models written as users write them compile on which CPU target, and whether they compute
what eager computes: small modules over the ops of vision, sequence and tabular models (convolution,
pooling, recurrent layers, sorting, scatter, masks) and tiny Hugging Face families built from their
configs, each compiled for each target and run on fresh inputs against eager.

    python bench/op_coverage.py                          # modules x cpu, onnx-cpu, tvm-cpu
    python bench/op_coverage.py --hf --targets onnx-cpu  # Hugging Face families too

A cell is `ok` with the relative error (under 1e-4), `WRONG` with it, `refused` with the op flashc
names (a clear UnsupportedOpError), or the error type of anything else. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


class Fn(nn.Module):
    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for name, m in modules.items():
            setattr(self, name, m)

    def forward(self, *args):
        return self.fn(self, *args)


def image():
    return (torch.randn(2, 3, 16, 16),)


def sequence():
    return (torch.randn(2, 8, 12),)


def _causal_softmax(s, x):
    scores = (x @ x.transpose(-1, -2)).masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, -1)


MODULES = {
    "conv, batch norm, pooling": (lambda: Fn(lambda s, x: F.adaptive_avg_pool2d(F.relu(s.bn(s.c(x))), 1).flatten(1),
                                             c=nn.Conv2d(3, 8, 3, padding=1), bn=nn.BatchNorm2d(8)), image),
    "max pool, nearest upsample": (lambda: Fn(lambda s, x: F.interpolate(F.max_pool2d(x, 2), scale_factor=2)), image),
    "bilinear resize": (lambda: Fn(lambda s, x: F.interpolate(x, size=(20, 20), mode="bilinear")), image),
    "group norm": (lambda: Fn(lambda s, x: s.g(x), g=nn.GroupNorm(1, 3)), image),
    "transposed conv": (lambda: Fn(lambda s, x: s.c(x), c=nn.ConvTranspose2d(3, 4, 2, stride=2)), image),
    "pixel shuffle": (lambda: Fn(lambda s, x: F.pixel_shuffle(torch.cat([x, x, x, x], 1), 2)), image),
    "pad, unfold": (lambda: Fn(lambda s, x: F.unfold(F.pad(x, (1, 1, 1, 1)), 3)), image),
    "LSTM": (lambda: Fn(lambda s, x: s.l(x)[0], l=nn.LSTM(12, 16, batch_first=True)), sequence),
    "GRU": (lambda: Fn(lambda s, x: s.l(x)[0], l=nn.GRU(12, 16, batch_first=True)), sequence),
    "causal conv1d": (lambda: Fn(lambda s, x: s.c(F.pad(x, (2, 0)))[..., :12], c=nn.Conv1d(8, 8, 3, groups=8)),
                      sequence),
    "multi-head attention": (lambda: Fn(lambda s, x: s.a(x, x, x, need_weights=False)[0],
                                        a=nn.MultiheadAttention(12, 3, batch_first=True)), sequence),
    "transformer encoder layer": (lambda: Fn(lambda s, x: s.t(x), t=nn.TransformerEncoderLayer(
        12, 3, 24, batch_first=True, dropout=0.0)), sequence),
    "masked softmax (-inf)": (lambda: Fn(_causal_softmax), sequence),
    "topk, sort": (lambda: Fn(lambda s, x: torch.topk(x, 3).values + torch.sort(x).values[..., :3]), sequence),
    "argsort, cumsum, gather": (lambda: Fn(lambda s, x: torch.gather(torch.cumsum(x, -1), -1, torch.argsort(x, -1))),
                                sequence),
    "scatter_add": (lambda: Fn(lambda s, x: torch.zeros(2, 8, 12).scatter_add(-1, torch.argsort(x, -1), x)), sequence),
    "einsum": (lambda: Fn(lambda s, x: torch.einsum("bij,bkj->bik", x, x)), sequence),
    "where, masked_fill": (lambda: Fn(lambda s, x: torch.where(x > 0, x, x * 0.1).masked_fill(x < -1, -5.0)),
                           sequence),
    "layer norm, tanh GELU": (lambda: Fn(lambda s, x: F.gelu(s.ln(x), approximate="tanh"), ln=nn.LayerNorm(12)),
                              sequence),
    "logsumexp, std, var": (lambda: Fn(lambda s, x: torch.logsumexp(x, -1) + x.std(-1) + x.var(-1, unbiased=False)),
                            sequence),
    "mish, softplus, hardswish": (lambda: Fn(lambda s, x: F.mish(x) + F.softplus(x) + F.silu(x) + F.hardswish(x)),
                                  sequence),
    "argmax, one_hot": (lambda: Fn(lambda s, x: F.one_hot(x.argmax(-1), 12).float() * x), sequence),
    "flip, roll": (lambda: Fn(lambda s, x: torch.flip(x, [-1]) + torch.roll(x, 2, -1)), sequence),
    "clamp, round, floor": (lambda: Fn(lambda s, x: torch.round(torch.clamp(x * 3, -2, 2)) + x.abs().sqrt().floor()),
                            sequence),
    "integer // % div": (lambda: Fn(lambda s, i: (i // 3) * 2 + (i % 3) + torch.div(i, 4, rounding_mode="floor")),
                         lambda: (torch.randint(-20, 20, (3, 5)),)),
    "embedding bag": (lambda: Fn(lambda s, i: s.e(i), e=nn.EmbeddingBag(50, 8, mode="mean")),
                      lambda: (torch.randint(0, 50, (4, 5)),)),
}


def _hf_models() -> dict:
    import transformers as T

    v, small = 128, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)

    def causal(cfg, cls):
        return lambda: (cls(cfg).eval(), lambda: (torch.randint(0, v, (1, 12)),), {})

    t5 = T.T5Config(vocab_size=v, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8)
    return {
        "HF gpt2": causal(T.GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=64),
                          T.GPT2LMHeadModel),
        "HF gpt-neox": causal(T.GPTNeoXConfig(vocab_size=v, intermediate_size=64, **small), T.GPTNeoXForCausalLM),
        "HF phi": causal(T.PhiConfig(vocab_size=v, intermediate_size=64, **small), T.PhiForCausalLM),
        "HF falcon": causal(T.FalconConfig(vocab_size=v, **small), T.FalconForCausalLM),
        "HF opt": causal(T.OPTConfig(vocab_size=v, ffn_dim=64, word_embed_proj_dim=32, **small), T.OPTForCausalLM),
        "HF bloom": causal(T.BloomConfig(vocab_size=v, hidden_size=32, n_layer=2, n_head=4), T.BloomForCausalLM),
        "HF mpt": causal(T.MptConfig(vocab_size=v, d_model=32, n_layers=2, n_heads=4), T.MptForCausalLM),
        "HF gemma2": causal(T.Gemma2Config(vocab_size=v, num_key_value_heads=2, intermediate_size=64, head_dim=8,
                                           **small), T.Gemma2ForCausalLM),
        "HF qwen3": causal(T.Qwen3Config(vocab_size=v, num_key_value_heads=2, intermediate_size=64, head_dim=8,
                                         **small), T.Qwen3ForCausalLM),
        "HF bert": causal(T.BertConfig(vocab_size=v, intermediate_size=64, **small), T.BertModel),
        "HF t5 (decoder_input_ids)": lambda: (T.T5ForConditionalGeneration(t5).eval(),
                                              lambda: (torch.randint(0, v, (1, 12)),),
                                              {"decoder_input_ids": torch.randint(0, v, (1, 5))}),
    }


def _main_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out[0]


def cell(model, make_inputs, kwargs: dict, target: str) -> str:
    import flashc
    from flashc.errors import UnsupportedOpError

    try:
        cm = flashc.compile(model, target, make_inputs(), example_kwargs=kwargs or None)
        errors = []
        for _ in range(2):
            inputs = make_inputs()
            fresh = {k: torch.randint_like(v, 0, 100) if not v.is_floating_point() else torch.randn_like(v)
                     for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
            with torch.no_grad():
                want = _main_tensor(model(*inputs, **{**kwargs, **fresh}))
                got = _main_tensor(cm(*inputs, **fresh))
            w, g = want.double(), got.double()
            errors.append(((g - w).norm() / (w.norm() + 1e-30)).item())
        err = max(errors)
        return f"ok {err:.0e}" if err < 1e-4 else f"**WRONG** {err:.0e}"
    except UnsupportedOpError as e:
        ops = re.findall(r"^\s+(\S+), node", str(e), re.M)
        return "refused: " + ", ".join(dict.fromkeys(ops)) if ops else "refused"
    except Exception as e:  # what the table is for: anything but ok and a clear refusal shows up
        return f"{type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=["cpu", "onnx-cpu", "tvm-cpu"])
    parser.add_argument("--hf", action="store_true", help="tiny Hugging Face families too")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    rows = {name: lambda make=make, inputs=inputs: (make().eval(), inputs, {})
            for name, (make, inputs) in MODULES.items()}
    if args.hf:
        rows.update(_hf_models())
    print("| model | " + " | ".join(args.targets) + " |")
    print("|---" * (len(args.targets) + 1) + "|")
    for name, build in rows.items():
        model, make_inputs, kwargs = build()
        cells = [cell(model, make_inputs, kwargs, t) for t in args.targets]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
