"""Compile a decoder written by hand in torch.nn at levels 0-3: errors vs eager, and what was fused.

No Hugging Face needed: nn.RMSNorm, rotary, F.scaled_dot_product_attention and a SwiGLU MLP written
as plain PyTorch are recognized and fused into flashc ops.

    python examples/compile_handwritten_model.py            # 4 layers, 128 tokens
    python examples/compile_handwritten_model.py --quick    # 2 layers, 16 tokens (also FLASHC_EXAMPLES_QUICK=1)
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import flashc

TOLERANCE = 1e-4  # float32: fused ops only reorder sums


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.norm1, self.norm2 = heads, nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x, cos, sin):
        (b, s, d), h = x.shape, self.norm1(x)
        q, k, v = (p(h).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, d))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Decoder(nn.Module):
    def __init__(self, vocab=512, dim=128, heads=4, layers=2):
        super().__init__()
        self.embed, self.blocks = nn.Embedding(vocab, dim), nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(dim), nn.Linear(dim, vocab, bias=False)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, dim // heads, 2) / (dim // heads)))

    def forward(self, ids):
        freqs = torch.outer(torch.arange(ids.shape[1], dtype=torch.float32), self.inv_freq)
        angles, x = torch.cat((freqs, freqs), dim=-1)[None, None], self.embed(ids)
        for block in self.blocks:
            x = block(x, angles.cos(), angles.sin())
        return self.head(self.norm(x))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("FLASHC_EXAMPLES_QUICK") == "1")
    layers, seq_len = (2, 16) if parser.parse_args().quick else (4, 128)
    torch.manual_seed(0)
    model, ids = Decoder(layers=layers).eval(), torch.randint(0, 512, (1, seq_len))
    with torch.no_grad():
        want = model(ids)
    print(f"{'level':>5}  {'max rel. error':>14}  fused (from cm.report().fused())")
    ok = True
    for level in range(4):
        cm = flashc.compile(model, target="cpu", example_inputs=(ids,), level=level)
        error = ((cm(ids) - want).abs().max() / want.abs().max()).item()
        fused = {k: v for k, v in cm.report().fused().items() if v}
        print(f"{level:>5}  {error:>14.2e}  {', '.join(f'{k} x{v}' for k, v in fused.items()) or '-'}")
        ok &= error <= TOLERANCE
    expected = {"rms_norm": 2 * layers + 1, "attention": layers, "rotary": 2 * layers, "swiglu": layers, "qkv": layers}
    missed = {k: v for k, v in expected.items() if fused.get(k, 0) < v}
    print(f"-O3 fusions expected at least {expected}; missed: {missed or 'none'}")
    print("RESULT", "ok" if ok and not missed else "FAILED")
    return 0 if ok and not missed else 1


if __name__ == "__main__":
    sys.exit(main())
