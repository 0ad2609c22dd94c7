"""Attention-to-SSM rewrite (issue #16): speed on the GPU, the same model with attention and with
every attention layer replaced by flashc's state-space layer.

    python bench/ssm_speed.py --out $OUT                       # llama-3.2-1b shapes, bf16, random weights
    python bench/ssm_speed.py --out $OUT --cases decode-b16-8k prefill-32k
    python bench/ssm_speed.py --out $OUT --kind mamba2 gla     # both layer kinds against attention

Speed only: random weights, the converted model untrained (training changes weights, not
shapes or kernels). Both variants are compiled by flashc for the GPU at -O3 with a cold tuning
cache, in this process, one case after the other:

* decode-bB-Ck: one token per sequence at batch B after C tokens of context; attention reads its
  KV cache (C positions), the SSM layers read and write a fixed state [B, H, d, d] fp32. The
  floor of each is its bytes a step (weights once, plus KV or state) over the copy bandwidth
  measured in the same run.
* prefill-Nk: N tokens of one sequence in one call (the forward signature).
* each row: ms, tokens/s, the SSM's speedup over attention, the memory a sequence's cache
  or state takes, and the compiled output's error against eager PyTorch on the same inputs.

Rows go to OUT/ssm_speed.jsonl, the table to OUT/ssm_speed.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import cuda_time, measured_ceilings, rel_err  # noqa: E402

CASES = ("decode-b16-8k", "decode-b1-1k", "decode-b1-32k", "prefill-32k")


def _case(text: str) -> str:
    import re

    if not re.fullmatch(r"decode-b\d+-\d+k|prefill-\d+k", text):
        raise argparse.ArgumentTypeError(f"{text!r}: a case is decode-bB-Nk or prefill-Nk, e.g. decode-b16-8k")
    return text


def _parse(case: str) -> tuple[str, int, int]:
    kind, *rest = case.split("-")
    if kind == "decode":
        return kind, int(rest[0][1:]), int(rest[1].rstrip("k")) * 1024
    return kind, 1, int(rest[0].rstrip("k")) * 1024


DEVICE = "cuda"  # --device cpu: a dry run of the script's logic (target cpu, timings meaningless)
PROFILE = False  # --profile


def _time(fn) -> float:
    if DEVICE == "cuda":
        return cuda_time(fn, 3, 20)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def _variants(model_name: str, layers: int | None, kinds: list[str]):
    from flashc import zoo
    from flashc.passes.ssm import attention_sites, convert, ssm_layers

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    model = zoo.build(model_name, dtype=dtype, device=DEVICE, num_layers=layers)
    every = list(range(len(attention_sites(model))))
    variants = {"attention": model}
    for kind in kinds:
        name = "ssm (all layers)" if kind == "mamba2" else f"{kind} (all layers)"
        converted = convert(model, every, kind).to(dtype)
        for layer in ssm_layers(converted):  # as flashc.compile(..., ssm=...) hands it over after training
            layer.fold_norm_weight()
        variants[name] = converted
    return variants


def _cache_bytes(inputs) -> int:
    return sum(t.numel() * t.element_size() for t in inputs[2:])


def run_case(case: str, models: dict, bw: float, out: Path, rows: list) -> None:
    import flashc
    from flashc.decode import DecodeStep, decode_example_inputs

    kind, batch, tokens = _parse(case)
    first = next(iter(models.values()))
    weight_bytes = sum(p.numel() * p.element_size() for p in first.parameters())
    times = {}
    for name, model in models.items():
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        row = {"case": case, "variant": name, "device": _device_name()}
        try:
            if kind == "decode":
                cache_len = tokens + 16
                fn_model = DecodeStep(model, cache_len)
                inputs = list(decode_example_inputs(model, batch, cache_len, device=DEVICE))
                for t in inputs[2:]:
                    t.normal_(std=0.1 if t.dtype == torch.float32 else 1.0)
                inputs[0] = torch.randint(0, model.config.vocab_size, (batch, 1), device=DEVICE)
                inputs[1] = torch.tensor([tokens], device=DEVICE)
                live = _cache_bytes(inputs) * ((tokens + 1) / cache_len if name == "attention" else 2)
                row["floor_ms"] = (weight_bytes + live) / bw * 1e3
                row["cache_mb_per_seq"] = _cache_bytes(inputs) / batch / 2**20
            else:
                fn_model = model
                inputs = [torch.randint(0, model.config.vocab_size, (1, tokens), device=DEVICE)]
            with torch.no_grad():  # eager on copies (a decode step writes its cache); the last 16 positions
                ref = fn_model(*[t.clone() for t in inputs])
                ref = (ref if isinstance(ref, torch.Tensor) else ref.logits)[:, -16:].float()
            t0 = time.perf_counter()
            cm = flashc.compile(fn_model, "h100" if DEVICE == "cuda" else "cpu", tuple(inputs), level=3, verify=False)
            run = (lambda: cm.executable(*inputs)[0]) if kind == "decode" else (lambda: cm(*inputs))
            with torch.no_grad():
                got = run()
                got = got if isinstance(got, torch.Tensor) else (got[0] if isinstance(got, tuple) else got.logits)
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                row["compile_s"] = time.perf_counter() - t0
                row["rel_err"] = rel_err(got[:, -16:].float(), ref)
                del got
                ms = _time(run)
            row.update(ms=ms, tokens_per_s=batch * (1 if kind == "decode" else tokens) / (ms / 1e3))
            if "floor_ms" in row:
                row["x_floor"] = ms / row["floor_ms"]
            times[name] = ms
            if PROFILE and kind == "decode" and DEVICE == "cuda":  # where the step's time goes, kernel by kernel
                from decode import profile_kernels  # bench/decode.py

                exe = cm.executable
                profile_kernels(lambda: exe.run_eager(*inputs), out, f"{case} {name}", weight_bytes, bw)
                exe = None
            cm = run = None  # free the compiled variant before the next one
        except Exception as e:  # a failed variant costs its row, not the run
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        if "attention" in times and name != "attention" and name in times:
            row["speedup"] = times["attention"] / times[name]
        rows.append(row)
        with open(out / "ssm_speed.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def _device_name() -> str:
    return torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"


def table(rows: list) -> str:
    head = ["case", "variant", "ms", "tokens/s", "x floor", "speedup", "cache or state MiB/seq", "rel err", "compile s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['variant']} | failed: {r['error'][:120]} |" + " |" * (len(head) - 3))
            continue
        lines.append("| " + " | ".join([
            r["case"], r["variant"], f"{r['ms']:.3f}", f"{r['tokens_per_s']:,.0f}",
            f"{r['x_floor']:.2f}" if "x_floor" in r else "-", f"{r['speedup']:.2f}x" if "speedup" in r else "-",
            f"{r['cache_mb_per_seq']:.2f}" if "cache_mb_per_seq" in r else "-", f"{r['rel_err']:.1e}",
            f"{r['compile_s']:.0f}"]) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers (default: all)")
    p.add_argument("--cases", nargs="+", default=list(CASES), type=_case,
                   help=f"decode-bB-Nk or prefill-Nk (default: {' '.join(CASES)})")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run of the script")
    p.add_argument("--kind", nargs="+", default=["mamba2"], choices=["mamba2", "gla"],
                   help="the state-space layer kind(s) to time against attention (default: mamba2)")
    p.add_argument("--profile", action="store_true", help="decode cases: a kernel profile per variant (kernels.md)")
    args = p.parse_args()
    global DEVICE, PROFILE
    DEVICE, PROFILE = args.device, args.profile
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bw = measured_ceilings()[0] if DEVICE == "cuda" else 20e9
    print(f"{_device_name()}: copy {bw / 1e12:.2f} TB/s", flush=True)
    models = _variants(args.model, args.layers, args.kind)
    rows: list = []
    for case in args.cases:
        run_case(case, models, bw, out, rows)
    text = (f"### attention vs SSM, {args.model}" + (f" ({args.layers} layers)" if args.layers else "")
            + f", bf16, {_device_name()}, copy {bw / 1e12:.2f} TB/s\n\n" + table(rows) + "\n")
    (out / "ssm_speed.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
