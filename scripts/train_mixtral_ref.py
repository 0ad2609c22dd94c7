#!/usr/bin/env python3
"""Train flashc's small Mixtral-family reference MoE language model.

A ``transformers.MixtralForCausalLM`` (default: hidden 128, 8 layers, 8 experts,
top-2, ~19M parameters, embeddings tied) is trained from scratch on the Python
standard library source of the running interpreter (docstrings, comments and
code; every ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` except
``site-packages`` and the files flashc's evaluation texts were cut from), tokenized
with the SmolLM2 tokenizer (vocab 49152). About 5% of the files (chosen by a hash
of their path) are held out; validation perplexity on them is measured with
``flashc.evaluation.perplexity``.

Writes to ``--out``: ``model*.safetensors`` (bf16, every file < 16 MB),
``config.json``, ``generation_config.json`` (if any), the tokenizer (JSON) and
``MODEL_CARD.md``. Load the result with ``flashc.pretrained.load_mixtral_ref(out)``.

    python scripts/train_mixtral_ref.py --out flashc/data/mixtral-ref            # GPU, minutes
    python scripts/train_mixtral_ref.py --steps 3 --seq 64 --out /tmp/m --device cpu  # smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

try:  # run from a checkout without `pip install -e .`
    import flashc  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MAX_FILE_BYTES = 16_000_000  # "each file < 16 MB"
SHARD_SIZE = "12MB"  # safetensors shard target; the largest single tensor is checked below


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    p.add_argument("--batch", type=int, default=32, help="sequences per step (default 32)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--out", type=Path, required=True, help="output directory (created; files overwritten)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default 2e-3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of --steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=128, help="hidden size (<= 162 keeps the bf16 tied embedding < 16 MB)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=512, help="expert intermediate size")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="directory with a saved SmolLM2 tokenizer (tokenizer.json); default: flashc.pretrained.load_smollm2_tokenizer()")
    p.add_argument("--val-windows", type=int, default=64, help="max perplexity windows on the held-out split")
    p.add_argument("--no-progress", action="store_true", help="disable tqdm progress bars")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- data


def stdlib_files() -> tuple[Path, list[str]]:
    """(stdlib root, sorted relative paths of the training corpus files)."""
    from flashc.evaluation import EVAL_SOURCE_FILES

    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = set(EVAL_SOURCE_FILES)
    rels = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if parts[0] in ("site-packages", "dist-packages") or "__pycache__" in parts or rel in excluded:
            continue
        rels.append(rel)
    if not rels:
        raise RuntimeError(f"No Python standard library sources found under {root}")
    return root, sorted(rels)


def is_validation(rel: str) -> bool:
    """About 1 file in 20, chosen by a hash of its relative path (stable everywhere)."""
    return hashlib.sha256(rel.encode()).digest()[0] % 20 == 0


def tokenize_files(tokenizer, root: Path, rels: list[str], need: int | None, desc: str, progress: bool) -> tuple[np.ndarray, int, int]:
    """Tokenize files in the given order, joined by EOS, until ``need`` tokens (None: all).

    Returns (token ids, number of files used, number of characters used).
    """
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    chunks: list[np.ndarray] = []
    total = 0
    n_files = 0
    n_chars = 0
    bar = tqdm(total=need if need else None, desc=desc, unit="tok", disable=not progress)
    for i in range(0, len(rels), 16):
        texts = []
        for rel in rels[i : i + 16]:
            try:
                texts.append((root / rel).read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError):
                continue
        if not texts:
            continue
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            arr = np.asarray(ids + [eos], dtype=np.int32)
            chunks.append(arr)
            total += arr.size
            bar.update(arr.size)
        n_files += len(texts)
        n_chars += sum(len(t) for t in texts)
        if need is not None and total >= need:
            break
    bar.close()
    if not chunks:
        raise RuntimeError(f"{desc}: no readable files")
    return np.concatenate(chunks), n_files, n_chars


# --------------------------------------------------------------------------- model


def build_config(args: argparse.Namespace, vocab: int, tokenizer):
    from transformers import MixtralConfig

    if args.hidden % args.heads:
        raise SystemExit(f"--hidden {args.hidden} must be divisible by --heads {args.heads}")
    return MixtralConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=max(2048, args.seq),
        rope_theta=10000.0,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        tie_word_embeddings=True,
        router_aux_loss_coef=0.01,
        output_router_logits=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import MixtralForCausalLM

    from flashc.evaluation import perplexity
    from flashc.pretrained import load_smollm2_tokenizer

    progress = not args.no_progress
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed_everything(args.seed)
    t_start = time.time()

    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer), local_files_only=True)
    else:
        tokenizer = load_smollm2_tokenizer()
    if len(tokenizer) != 49152:
        raise SystemExit(f"expected the SmolLM2 tokenizer (vocab 49152), got vocab {len(tokenizer)}")
    vocab = len(tokenizer)
    root, rels = stdlib_files()
    train_rels = [r for r in rels if not is_validation(r)]
    val_rels = [r for r in rels if is_validation(r)]
    random.Random(args.seed).shuffle(train_rels)  # deterministic file order
    val_stride = args.seq // 2
    need_train = args.steps * args.batch * (args.seq + 1)
    need_val = args.val_windows * val_stride + args.seq
    train_ids, n_train_files, n_train_chars = tokenize_files(tokenizer, root, train_rels, need_train, "tokenize train", progress)
    val_ids, n_val_files, n_val_chars = tokenize_files(tokenizer, root, val_rels, need_val, "tokenize val", progress)
    if train_ids.size < args.seq + 2:
        raise SystemExit(f"training corpus too small ({train_ids.size} tokens) for --seq {args.seq}")
    print(f"corpus: {root} -- train {n_train_files} files / {train_ids.size:,} tokens, "
          f"val {n_val_files} files / {val_ids.size:,} tokens", flush=True)

    config = build_config(args, vocab, tokenizer)
    model = MixtralForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: MixtralForCausalLM {n_params / 1e6:.2f}M parameters on {device}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    gen = torch.Generator().manual_seed(args.seed)
    data = torch.from_numpy(train_ids.astype(np.int64))
    use_bf16 = device.type == "cuda"

    model.train()
    t_train = time.time()
    losses: list[float] = []
    bar = tqdm(range(args.steps), desc="train", unit="step", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, warmup, args.lr)
        starts = torch.randint(0, data.numel() - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[s : s + args.seq] for s in starts.tolist()]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(input_ids=batch, labels=batch, output_router_logits=True)
        loss = out.loss
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        if not progress and (step % 100 == 0 or step == args.steps - 1):
            print(f"step {step} loss {losses[-1]:.4f}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t_train

    # Validation with flashc.evaluation on the held-out files, in the saved precision.
    model.eval()
    model.to(torch.bfloat16)
    val_model = model.float() if device.type == "cpu" else model
    val_tensor = torch.from_numpy(val_ids.astype(np.int64)).to(device)
    val = perplexity(lambda x: val_model(input_ids=x).logits, val_tensor, window=args.seq, stride=val_stride,
                     limit=args.val_windows, progress=progress)
    print(f"validation: ppl {val.ppl:.3f} (nll {val.nll:.4f}, {val.n_tokens} tokens, {val.n_windows} windows)", flush=True)

    save(model, tokenizer, args, {
        "n_params": n_params, "train_s": train_s, "total_s": time.time() - t_start, "device": device,
        "train_files": n_train_files, "train_tokens": int(train_ids.size), "train_chars": n_train_chars,
        "val_files": n_val_files, "val_tokens": int(val_ids.size), "val": val, "root": root,
        "final_loss": float(np.mean(losses[-20:])) if losses else float("nan"), "first_loss": losses[0] if losses else float("nan"),
    })
    print(f"wrote {args.out}", flush=True)
    return 0


def save(model, tokenizer, args: argparse.Namespace, info: dict) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    model = model.to(torch.bfloat16).cpu()
    biggest = max(p.numel() * p.element_size() for p in model.parameters())
    if biggest >= MAX_FILE_BYTES:
        raise SystemExit(f"largest tensor is {biggest / 1e6:.1f} MB in bf16 (>= 16 MB): lower --hidden")
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, max_shard_size=SHARD_SIZE, safe_serialization=True)
    tokenizer.save_pretrained(out)
    files = sorted(out.glob("*.safetensors"))
    too_big = [f.name for f in files if f.stat().st_size >= MAX_FILE_BYTES]
    if too_big:
        raise SystemExit(f"weight files over 16 MB: {too_big}")
    (out / "MODEL_CARD.md").write_text(model_card(args, info, files))
    (out / "training_args.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, indent=2))


def model_card(args: argparse.Namespace, info: dict, files: list[Path]) -> str:
    import transformers

    val = info["val"]
    gpu = torch.cuda.get_device_name(info["device"]) if info["device"].type == "cuda" else platform.processor() or "cpu"
    cmd = " ".join(["python scripts/train_mixtral_ref.py"] + sys.argv[1:]) if sys.argv[0].endswith("train_mixtral_ref.py") else "(called from Python)"
    return f"""# flashc Mixtral reference model

A small Mixtral-family mixture-of-experts causal LM (`transformers.MixtralForCausalLM`)
trained from scratch by `scripts/train_mixtral_ref.py`, as a real-weight reference for
flashc's MoE code paths. It is a toy: it models Python source, nothing else.

## Architecture
- parameters: {info['n_params']:,} (input/output embeddings tied)
- hidden {args.hidden}, layers {args.layers}, attention heads {args.heads} (KV heads {args.kv_heads}), head dim {args.hidden // args.heads}
- experts {args.experts}, top-{args.top_k} routing, expert FFN {args.ffn}, SiLU-gated
- vocabulary 49152 (SmolLM2 tokenizer, saved alongside), RoPE theta 10000
- weights stored in bfloat16 safetensors: {', '.join(f'{f.name} ({f.stat().st_size / 1e6:.1f} MB)' for f in files)}

## Data
- Python {platform.python_version()} standard library sources under `{info['root']}`
  (`*.py`, excluding site-packages and the files flashc's evaluation texts come from:
  `flashc.evaluation.EVAL_SOURCE_FILES`), files joined with the EOS token.
- split by SHA-256 of each file's relative path: 1 in 20 held out for validation.
- training: {info['train_files']} files, {info['train_chars']:,} characters, {info['train_tokens']:,} tokens
  (tokenized in a seeded shuffled file order until steps x batch x (seq+1) tokens were reached, or all files)
- validation: {info['val_files']} files, {info['val_tokens']:,} tokens

## Training
- command: `{cmd}`
- steps {args.steps}, batch {args.batch} x seq {args.seq}; random crops (seeded, seed {args.seed})
- AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), peak lr {args.lr}, linear warm-up then cosine to 10%, grad clip 1.0
- router load-balancing aux loss coefficient 0.01; bf16 autocast on CUDA, fp32 on CPU
- loss: first step {info['first_loss']:.3f}, mean of last 20 steps {info['final_loss']:.3f}
- device: {info['device']} ({gpu}); torch {torch.__version__}, transformers {transformers.__version__}
- wall time: training {info['train_s']:.1f} s, total (tokenize + train + validate + save) {info['total_s']:.1f} s

## Validation perplexity
Measured with `flashc.evaluation.perplexity` on the held-out split in the saved bf16 weights
(computed in bf16 on GPU, fp32 on CPU): window {val.window}, stride {val.stride},
{val.n_windows} windows, {val.n_tokens:,} scored tokens:

**perplexity {val.ppl:.3f}** (mean NLL {val.nll:.4f} nats/token)
"""


if __name__ == "__main__":
    sys.exit(main())
