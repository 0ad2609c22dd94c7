"""Issue #13: a Llama-3.2-1B-shaped decoder written by hand, against Hugging Face's, through flashc.

    python bench/handwritten_decode.py --out $OUT            # GPU: decode b1 at context 1024, bf16
    python bench/handwritten_decode.py --check               # CPU, fp32: same logits as HF's DecodeStep
    python bench/handwritten_decode.py --cpu                 # CPU, fp32: fusions applied, why_not for the rest

The model is written as a user writes it in plain torch.nn: the KV cache in module buffers
written by slice assignment (`self.k_cache[:, :, pos] = k`), rotary on interleaved pairs
(stack/flatten), GQA by `repeat_interleave`, `F.scaled_dot_product_attention` with a boolean
mask over the whole static cache built from the position, RMSNorm with the float32 cast,
SwiGLU. It loads the weights of a zoo LlamaForCausalLM; Hugging Face's rope rotates halves
(pairs i, i + d/2), so the q/k projection rows are permuted into interleaved order (as the
Meta <-> HF conversion scripts do): q.k is unchanged and the logits are HF's.

GPU mode runs each variant in its own child process (a crash or a timeout costs one row),
with the floor (weights read once + the live KV cache, over the copy bandwidth measured in
that process) from bench/decode.py's helpers. Rows go to OUT/handwritten.jsonl, the table
to OUT/handwritten.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

MODEL = "llama-3.2-1b"
# The fusions issue #13 lists, and the keys of `cm.report().fused()` that count each.
FUSIONS = {"rotary": ("rotary",), "attention": ("attention",), "decode_attention": ("decode_attention",),
           "rms_norm": ("rms_norm", "add_rms_norm"), "swiglu": ("swiglu",),
           "merged projections": ("qkv", "gate_up")}
VARIANTS = ("eager", "reduce-overhead", "flashc-handwritten", "flashc-hf")
TARGET_VS_HF = 1.1  # issue #13: hand-written flashc within 1.1x of HF flashc
TARGET_VS_REDUCE_OVERHEAD = 2.0  # and at least 2x faster than torch.compile(mode="reduce-overhead")


# --- The model, as a user writes it -----------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def apply_rotary(x, cos, sin):
    """Rotate the pairs (2i, 2i + 1) of x [B, H, S, D] by the angles whose cos/sin are [S, D/2]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, head_dim, batch, max_seq_len, dtype):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def forward(self, x, pos, cos, sin, mask):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        self.k_cache[:, :, pos] = k
        self.v_cache[:, :, pos] = v
        rep = self.n_heads // self.n_kv_heads
        keys = self.k_cache.repeat_interleave(rep, dim=1)
        values = self.v_cache.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg, batch, max_seq_len, dtype):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                                   cfg.head_dim, batch, max_seq_len, dtype)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = FeedForward(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, pos, cos, sin, mask):
        h = x + self.attention(self.attention_norm(x), pos, cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Decode step: forward(tokens [B, 1], pos [1]) -> logits [B, 1, vocab]; the KV cache lives in buffers."""

    def __init__(self, cfg, batch: int, max_seq_len: int, inv_freq: torch.Tensor, dtype=torch.float32):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, batch, max_seq_len, dtype) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq.float())
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, tokens, pos):
        x = self.tok_embeddings(tokens)
        cos, sin = self.cos[pos].to(x.dtype), self.sin[pos].to(x.dtype)
        mask = torch.arange(self.max_seq_len, device=tokens.device)[None, :] <= pos[:, None]
        for layer in self.layers:
            x = layer(x, pos, cos, sin, mask)
        return self.output(self.norm(x))

    def caches(self) -> list[torch.Tensor]:
        """k, v of every layer, in the order of DecodeStep's cache inputs."""
        return [t for layer in self.layers for t in (layer.attention.k_cache, layer.attention.v_cache)]


def hf_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k projection rows from HF's rotate-half order to interleaved pairs: row 2i of a head
    takes HF's row i, row 2i + 1 HF's row i + d/2 (the inverse of convert_llama_weights_to_hf's permute)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


@torch.no_grad()
def from_hf(hf, batch: int, max_seq_len: int) -> Transformer:
    """The hand-written model with the weights of a Hugging Face LlamaForCausalLM (same device and dtype)."""
    cfg = hf.config
    p = next(hf.parameters())
    inv_freq = hf.model.rotary_emb.inv_freq.to("cpu")
    assert getattr(hf.model.rotary_emb, "attention_scaling", 1.0) == 1.0, "rope scaling with attention_scaling"
    with torch.device("meta"):
        model = Transformer(cfg, batch, max_seq_len, inv_freq.to("meta"))
    # to_empty and to() give a meta model new parameters: the output head is tied again after
    model = model.to_empty(device=p.device).to(p.dtype)
    if cfg.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq.float()).to(p.device)
    model.cos.copy_(angles.cos())
    model.sin.copy_(angles.sin())
    model.tok_embeddings.weight.copy_(hf.model.embed_tokens.weight)
    if not cfg.tie_word_embeddings:
        model.output.weight.copy_(hf.lm_head.weight)
    model.norm.weight.copy_(hf.model.norm.weight)
    for mine, theirs in zip(model.layers, hf.model.layers):
        a, t = mine.attention, theirs.self_attn
        a.wq.weight.copy_(hf_to_interleaved(t.q_proj.weight, cfg.num_attention_heads))
        a.wk.weight.copy_(hf_to_interleaved(t.k_proj.weight, cfg.num_key_value_heads))
        a.wv.weight.copy_(t.v_proj.weight)
        a.wo.weight.copy_(t.o_proj.weight)
        mine.attention_norm.weight.copy_(theirs.input_layernorm.weight)
        mine.ffn_norm.weight.copy_(theirs.post_attention_layernorm.weight)
        mine.feed_forward.w1.weight.copy_(theirs.mlp.gate_proj.weight)
        mine.feed_forward.w3.weight.copy_(theirs.mlp.up_proj.weight)
        mine.feed_forward.w2.weight.copy_(theirs.mlp.down_proj.weight)
    for t in model.caches():
        t.zero_()
    return model.eval()


def interleave_cache(t: torch.Tensor) -> torch.Tensor:
    """An HF key cache [B, H, L, D] (rotate-half order) in the interleaved order of the hand-written keys."""
    b, h, n, d = t.shape
    return t.view(b, h, n, 2, d // 2).transpose(-1, -2).reshape(b, h, n, d)


def build_pair(device: str, dtype: torch.dtype, layers: int | None, batch: int, cache_len: int, context: int):
    """(HF model, its DecodeStep, its cache inputs, the hand-written model): the same weights, the same
    random cache contents in the first `context` slots (HF keys permuted into the hand-written order)."""
    from flashc import zoo
    from flashc.decode import DecodeStep, empty_kv_cache

    hf = zoo.build(MODEL, dtype=dtype, device=device, num_layers=layers).eval()
    step = DecodeStep(hf, cache_len)
    mine = from_hf(hf, batch, cache_len)
    kv = empty_kv_cache(hf, batch, cache_len, device=device)
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for i, (theirs, ours) in enumerate(zip(kv, mine.caches())):
            filled = torch.randn(theirs[:, :, :context].shape, generator=g).to(device, dtype)
            theirs[:, :, :context] = filled
            ours.copy_(interleave_cache(theirs) if i % 2 == 0 else theirs)
    return hf, step, kv, mine


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def op_count(cm) -> int:
    return sum(1 for _ in cm.program.op_nodes())


def fusion_counts(cm) -> dict[str, int]:
    """`cm.report().fused()`, plus the decode_attention pass's rewrites, which fused() does not
    count (it sums the records of passes named fuse*/merge* only)."""
    report = cm.report()
    fused = dict(report.fused())
    for r in report.records:
        if r.name == "decode_attention":
            fused["decode_attention"] = fused.get("decode_attention", 0) + r.stats.get("decode_attention", 0)
    return {k: v for k, v in fused.items() if v}


def op_kinds(cm):
    from collections import Counter

    from flashc.ir import op_name

    return Counter(op_name(n) for n in cm.program.op_nodes())


# --- --check: the same function as HF's DecodeStep --------------------------------------------

def check(layers: int, context: int, steps: int = 3) -> int:
    """Hand-written vs HF's DecodeStep on the CPU in fp32, over a few steps (the caches advance)."""
    torch.manual_seed(0)
    cache_len = context + steps + 4
    hf, step, kv, mine = build_pair("cpu", torch.float32, layers, 1, cache_len, context)
    ids = torch.randint(0, hf.config.vocab_size, (1, 1))
    worst = 0.0
    with torch.no_grad():
        for s in range(steps):
            pos = torch.tensor([context + s])
            want = step(ids, pos, *kv)
            got = mine(ids, pos)
            err = rel_err(got, want)
            worst = max(worst, err)
            print(f"step {s} pos {context + s}: logits {tuple(got.shape)} rel. err {err:.2e} "
                  f"argmax {got[0, -1].argmax().item()} / {want[0, -1].argmax().item()}")
            ids = want[:, -1:].argmax(-1)
        k_err = max(rel_err(interleave_cache(kv[i]) if i % 2 == 0 else kv[i], c)
                    for i, c in enumerate(mine.caches()))
    print(f"{layers} layers, context {context}: worst logits rel. err {worst:.2e}, caches after {steps} steps "
          f"rel. err {k_err:.2e} (limit 1e-4)")
    ok = worst < 1e-4 and k_err < 1e-4
    print("check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


# --- --cpu: fusions of the hand-written form against HF's, cpu target ---------------------------

def cpu_compare(layers: int, context: int) -> int:
    import flashc

    torch.manual_seed(0)
    cache_len = context + 8
    hf, step, kv, mine = build_pair("cpu", torch.float32, layers, 1, cache_len, context)
    ids = torch.randint(0, hf.config.vocab_size, (1, 1))
    pos = torch.tensor([context])
    with torch.no_grad():
        ref = mine(ids, pos)  # eager hand-written; writes slot `context`, as every call below does
        hf_ref = step(ids, pos, *[t.clone() for t in kv])
    rows = {}
    for label, model, inputs in (("hand-written", mine, (ids, pos)), ("Hugging Face", step, (ids, pos, *kv))):
        t = time.perf_counter()
        cm = flashc.compile(model, "cpu", inputs, level=3)
        secs = time.perf_counter() - t
        out = cm(*inputs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        rows[label] = dict(cm=cm, err=rel_err(out, ref), fused=fusion_counts(cm), ops=op_count(cm), secs=secs)
    print(f"cpu target, -O3, fp32, {layers} layers, context {context} (cache {cache_len}); "
          f"eager HF vs eager hand-written rel. err {rel_err(hf_ref, ref):.1e}\n")
    print("| model | rel. err vs eager hand-written | ops left | fused | compile s |")
    print("| --- | --- | --- | --- | --- |")
    for label, r in rows.items():
        fused = ", ".join(f"{k} x{v}" for k, v in r["fused"].items()) or "none"
        print(f"| {label} | {r['err']:.1e} | {r['ops']} | {fused} | {r['secs']:.1f} |")
    print()
    print("| fusion | hand-written | Hugging Face |")
    print("| --- | --- | --- |")
    missing = []
    for fusion, keys in FUSIONS.items():
        cells = []
        for label in rows:
            n = sum(rows[label]["fused"].get(k, 0) for k in keys)
            cells.append(f"yes ({n})" if n else "no")
            if label == "hand-written" and not n:
                missing.append(fusion)
        print(f"| {fusion} | {cells[0]} | {cells[1]} |")
    print()
    mine_ops, hf_ops = op_kinds(rows["hand-written"]["cm"]), op_kinds(rows["Hugging Face"]["cm"])
    diff = {k: (mine_ops[k], hf_ops[k]) for k in sorted(set(mine_ops) | set(hf_ops)) if mine_ops[k] != hf_ops[k]}
    print("ops left where the two graphs differ (hand-written, HF): "
          + ", ".join(f"{k} {a}/{b}" for k, (a, b) in diff.items()))
    print()
    for fusion in missing:
        print(f"### why_not({fusion!r}), hand-written, -O3, cpu")
        name = fusion if fusion != "merged projections" else "merge_projections"
        try:
            print(flashc.why_not(mine, (ids, pos), name, level=3, profile="cpu"))
        except Exception as e:
            print(f"{type(e).__name__}: {e}")
            if fusion == "merged projections":
                print(unmerged_linears(rows["hand-written"]["cm"]))
        print()
    return 0


def unmerged_linears(cm) -> str:
    """For merge_projections, which why_not does not explain: the linears left that share an input."""
    from collections import defaultdict

    from flashc.ir import op_name

    groups = defaultdict(list)
    for n in cm.program.op_nodes():
        if op_name(n) == "aten.linear":
            groups[n.args[0]].append(n.args[1].name if hasattr(n.args[1], "name") else "?")
    shared = {x.name: ws for x, ws in groups.items() if len(ws) > 1}
    return (f"linears left that share an input: {shared}" if shared else
            f"no two linears left share an input ({sum(map(len, groups.values()))} linears)")


# --- GPU: ms per token, one child process per variant -----------------------------------------

def run_variant(variant: str, layers: int | None, context: int, out: Path) -> None:
    """Build the pair on the GPU, run `variant`, append its row to OUT/handwritten.jsonl."""
    import flashc
    from decode import _weights_read_per_step
    from gpu_bench import cuda_time, measured_ceilings
    from flashc.profiles import detect

    bw, _ = measured_ceilings()
    cache_len = context + 64
    hf, step, kv, mine = build_pair("cuda", torch.bfloat16, layers, 1, cache_len, context)
    ids = torch.randint(0, hf.config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(2)).cuda()
    pos = torch.tensor([context], device="cuda")
    dense, _ = _weights_read_per_step(hf)
    kv_bytes = sum(t.numel() * t.element_size() for t in kv) * (context + 1) / cache_len
    floor_ms = (dense + kv_bytes) / bw * 1e3
    row = dict(variant=variant, device=torch.cuda.get_device_name(0), copy_bw=bw, floor_ms=floor_ms,
               layers=hf.config.num_hidden_layers, context=context)
    with torch.no_grad():
        ref = mine(ids, pos).clone()
    try:
        t = time.perf_counter()
        with torch.no_grad():
            if variant == "eager":
                fn = lambda: mine(ids, pos)  # noqa: E731
            elif variant == "reduce-overhead":
                compiled = torch.compile(mine, mode="reduce-overhead")
                fn = lambda: compiled(ids, pos)  # noqa: E731
            else:
                model, inputs = (mine, (ids, pos)) if variant == "flashc-handwritten" else (step, (ids, pos, *kv))
                cm = flashc.compile(model, "h100", inputs, level=3, profile=detect())
                row.update(fused=fusion_counts(cm), ops=op_count(cm))
                fn = lambda: cm.executable(*inputs)[0]  # noqa: E731
            got = fn().clone()  # a CUDA graph's output is overwritten by the next call
            fn()
            torch.cuda.synchronize()
            row["compile_s"] = time.perf_counter() - t
            row["rel_err"] = rel_err(got, ref)
            ms = cuda_time(fn, warmup=5, iters=50)
        row.update(ms=ms, x_floor=ms / floor_ms)
    except Exception as e:
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    with open(out / "handwritten.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def gpu_table(out: Path) -> str:
    path = out / "handwritten.jsonl"
    rows = {r["variant"]: r for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}
    if not rows:
        return "(no rows)"
    r0 = next(iter(rows.values()))
    lines = [f"device: {r0['device']}; copy bandwidth {r0['copy_bw'] / 1e12:.2f} TB/s (measured in each variant's "
             f"process); {MODEL}, {r0['layers']} layers, bf16, random weights (the same in every row); decode b1 "
             f"at context {r0['context']}; floor = weights + live KV cache over the copy bandwidth", "",
             "| variant | ms/token | floor ms | x floor | rel. err vs eager | compile s | fused | ops left |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    labels = {"eager": "eager, hand-written", "reduce-overhead": "torch.compile reduce-overhead, hand-written",
              "flashc-handwritten": "flashc h100 -O3, hand-written", "flashc-hf": "flashc h100 -O3, HF DecodeStep"}
    for v in VARIANTS:
        r = rows.get(v)
        if r is None:
            lines.append(f"| {labels[v]} | not run (timed out or crashed before writing) | | | | | | |")
        elif "ms" not in r:
            lines.append(f"| {labels[v]} | failed: {r.get('error', '')[:120]} | {r['floor_ms']:.3f} | | | | | |")
        else:
            fused = ", ".join(f"{k} x{n}" for k, n in r.get("fused", {}).items()) or ("none" if "fused" in r else "")
            lines.append(f"| {labels[v]} | {r['ms']:.3f} | {r['floor_ms']:.3f} | {r['x_floor']:.2f} | "
                         f"{r['rel_err']:.1e} | {r['compile_s']:.1f} | {fused} | {r.get('ops', '')} |")
    ms = {v: r["ms"] for v, r in rows.items() if "ms" in r}
    lines.append("")
    if "flashc-handwritten" in ms and "flashc-hf" in ms:
        x = ms["flashc-handwritten"] / ms["flashc-hf"]
        lines.append(f"- target: hand-written flashc within {TARGET_VS_HF}x of HF flashc: {x:.2f}x "
                     f"({'met' if x <= TARGET_VS_HF else 'missed'})")
    if "flashc-handwritten" in ms and "reduce-overhead" in ms:
        x = ms["reduce-overhead"] / ms["flashc-handwritten"]
        lines.append(f"- target: hand-written flashc >= {TARGET_VS_REDUCE_OVERHEAD}x faster than reduce-overhead: "
                     f"{x:.2f}x ({'met' if x >= TARGET_VS_REDUCE_OVERHEAD else 'missed'})")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="CPU, fp32: hand-written logits equal HF's DecodeStep's")
    p.add_argument("--cpu", action="store_true", help="CPU, fp32: fusions of both forms with the cpu target")
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers (default: all; 2 on the CPU)")
    p.add_argument("--context", type=int, default=None, help="tokens in the cache (default 1024; 32 on the CPU)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--timeout", type=int, default=150, help="seconds per variant")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--one", help=argparse.SUPPRESS)  # child process: run this variant
    args = p.parse_args()
    if args.check or args.cpu:
        layers, context = args.layers or 2, args.context or 32
        return check(layers, context) if args.check else cpu_compare(layers, context)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    context = args.context or 1024
    if args.one:
        run_variant(args.one, args.layers, context, out)
        return 0
    (out / "handwritten.jsonl").unlink(missing_ok=True)
    for v in args.variants:
        cmd = [sys.executable, __file__, "--one", v, "--context", str(context), "--out", str(out)]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        try:
            subprocess.run(cmd, timeout=args.timeout, env=os.environ)
        except subprocess.TimeoutExpired:
            print(f"{v}: timed out after {args.timeout} s", flush=True)
    text = gpu_table(out)
    (out / "handwritten.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
