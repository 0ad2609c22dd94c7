"""Accuracy of quantization (flashc.passes.quantize: weight-only, W8A8, FP8) against the float model.

    python bench/quant_accuracy.py [--models mixtral-ref minilm-l6 smollm2-135m]
        [--schemes int4-rtn int4-gptq int4-awq int8-weight w8a8-smoothquant fp8] [--limit N] [--window 256] [--threads N]

Each quantized model is compiled by flashc.compile(..., quantize=SCHEME, calibration=the
built-in calibration text) for the cpu target and scored by flashc.evaluation: sliding-
window perplexity on the committed evaluation texts (prose, code) for causal LMs, mean /
min embedding cosine and neighbour-ranking agreement with the float encoder on the 100
committed sentences for minilm-l6. Prints one table per model, then the issue's targets
(flashc issue #14) with pass / MISS.

`smollm2-135m`'s weights come from a Q4_1 GGUF: they already sit on an asymmetric 4-bit
grid in blocks of 32, so its int4 numbers flatter every method; the accuracy targets are
taken on float-trained weights (mixtral-ref, minilm-l6). Its hidden size (576) is not a
multiple of 128, so it is measured at groups of 64 and 32 (see MODEL_SCHEMES).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

LM_MODELS = ("mixtral-ref", "smollm2-135m")
DEFAULT_SCHEMES = ("int4-rtn", "int4-gptq", "int4-awq", "int8-weight")
# SmolLM2's hidden size 576 is not a multiple of 128, so at g128 only its down projections
# would be quantized: it is measured at g64 (and g32, the block of its Q4_1 GGUF) instead.
MODEL_SCHEMES = {"smollm2-135m": ("int4-rtn-g32", "int4-rtn-g64", "int4-gptq-g64", "int4-awq-g64", "int8-weight")}


def weight_bytes(params: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in params.values())


def quant_record(cm):
    return next(r for r in cm.records if r.name == "quantize_weights")


def float_share(cm) -> tuple[int, int]:
    """(bytes the pass left in float, bytes it quantized) over the layers it saw."""
    rec = quant_record(cm)
    kept = sum(d["bytes_before"] for d in rec.details or [] if d.get("status") == "skipped")
    return kept, rec.stats.get("bytes_before", 0)


def lm_rows(name: str, schemes, limit: int | None, window: int) -> list[dict]:
    import flashc
    from flashc import zoo
    from flashc.accuracy import logits_fn_of
    from flashc.evaluation import load_eval_text, perplexity
    from flashc.passes.quantize import CalibrationData, QuantConfig

    model = zoo.build(name)
    tokenizer = zoo.tokenizer(name)
    texts = {kind: torch.tensor(tokenizer(load_eval_text(kind))["input_ids"]) for kind in ("prose", "code")}
    calibration = CalibrationData.builtin(tokenizer)
    example = (texts["code"][:window].unsqueeze(0),)

    def score(fn) -> dict[str, tuple[float, int]]:
        out = {}
        for kind, ids in texts.items():
            r = perplexity(fn, ids, window, window // 2, limit)
            out[kind] = (r.nll, r.n_tokens)
        return out

    t = time.perf_counter()
    base_cm = flashc.compile(model, "cpu", example, level=2)  # the float graph, same pipeline
    base = score(logits_fn_of(model))
    rows = [dict(model=name, scheme="float32", group="-", nll=base, bytes=weight_bytes(base_cm.program.params),
                 seconds=time.perf_counter() - t, kept=0, quantized=0)]
    for scheme in schemes:
        t = time.perf_counter()
        cfg = QuantConfig.parse(scheme)
        cm = flashc.compile(model, "cpu", example, level=2, quantize=cfg,
                            calibration=calibration if cfg.needs_calibration else None)
        compile_s = time.perf_counter() - t
        nll = score(logits_fn_of(cm))
        kept, quantized = float_share(cm)
        rows.append(dict(model=name, scheme=scheme, group=cfg.group_size or "channel", nll=nll,
                         bytes=weight_bytes(cm.program.params), seconds=time.perf_counter() - t,
                         compile_seconds=compile_s, kept=kept, quantized=quantized))
    for r in rows:
        r["ppl"] = {k: math.exp(v[0]) for k, v in r["nll"].items()}
        tokens = sum(v[1] for v in r["nll"].values())
        r["ppl"]["both"] = math.exp(sum(v[0] * v[1] for v in r["nll"].values()) / tokens)
        r["change"] = {k: r["ppl"][k] / rows[0]["ppl"][k] - 1 for k in r["ppl"]}
        r["tokens"] = {k: v[1] for k, v in r["nll"].items()}
    return rows


def minilm_rows(schemes) -> list[dict]:
    import flashc
    from flashc import pretrained
    from flashc.evaluation import embedding_agreement, load_eval_sentences
    from flashc.passes.quantize import CalibrationData, QuantConfig

    model, tokenizer = pretrained.load_minilm()
    sentences = load_eval_sentences()
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def pooled(hidden):
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    ref = pretrained.minilm_embed(model, tokenizer, sentences)
    calibration = CalibrationData.builtin(tokenizer)
    t = time.perf_counter()
    base_cm = flashc.compile(model, "cpu", (ids, mask), level=2)
    float_compiled = pooled(base_cm(ids, mask).last_hidden_state)
    rows = [dict(model="minilm-l6", scheme="float32 (compiled)", group="-",
                 result=embedding_agreement(lambda s: float_compiled, lambda s: ref, sentences),
                 bytes=weight_bytes(base_cm.program.params), seconds=time.perf_counter() - t, kept=0, quantized=0)]
    for scheme in schemes:
        t = time.perf_counter()
        cfg = QuantConfig.parse(scheme)
        cm = flashc.compile(model, "cpu", (ids, mask), level=2, quantize=cfg,
                            calibration=calibration if cfg.needs_calibration else None)
        emb = pooled(cm(ids, mask).last_hidden_state)
        kept, quantized = float_share(cm)
        rows.append(dict(model="minilm-l6", scheme=scheme, group=cfg.group_size or "channel",
                         result=embedding_agreement(lambda s: emb, lambda s: ref, sentences),
                         bytes=weight_bytes(cm.program.params), seconds=time.perf_counter() - t,
                         kept=kept, quantized=quantized))
    return rows


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def float_share_cell(r: dict) -> str:
    if not r["quantized"]:
        return "-"
    return f"{mb(r['kept'])} ({100 * r['kept'] / (r['kept'] + r['quantized']):.1f}%)"


def print_lm_table(rows: list[dict], limit, window) -> None:
    name = rows[0]["model"]
    tokens = rows[0]["tokens"]
    print(f"\n{name}: perplexity, window {window}, stride {window // 2}, "
          f"{'all windows' if limit is None else f'first {limit} windows'} per text "
          f"({tokens['prose']} prose / {tokens['code']} code tokens scored)")
    print("| scheme | group | ppl prose | change | ppl code | change | ppl both | change | weight bytes "
          "| linear weights left in float | time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        p, c = r["ppl"], r["change"]
        share = float_share_cell(r)
        print(f"| {r['scheme']} | {r['group']} | {p['prose']:.3f} | {100 * c['prose']:+.2f}% | {p['code']:.3f} | "
              f"{100 * c['code']:+.2f}% | {p['both']:.3f} | {100 * c['both']:+.2f}% | {mb(r['bytes'])} | {share} | "
              f"{r['seconds']:.0f} s |")


def print_minilm_table(rows: list[dict]) -> None:
    print("\nminilm-l6: sentence embeddings (mean pooling) vs the float encoder on the 100 evaluation sentences")
    print("| scheme | group | mean cosine | min cosine | top-1 agreement | top-5 overlap | spearman (mean) "
          "| weight bytes | linear weights left in float | time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        e = r["result"]
        share = float_share_cell(r)
        print(f"| {r['scheme']} | {r['group']} | {e.mean_cosine:.5f} | {e.min_cosine:.5f} | {e.top1_agreement:.2f} | "
              f"{e.top5_overlap:.3f} | {e.spearman_mean:.4f} | {mb(r['bytes'])} | {share} | {r['seconds']:.0f} s |")


def print_targets(all_rows: dict[str, list[dict]]) -> None:
    print("\ntargets (flashc issue #14), on perplexity of both texts together:")
    for name, rows in all_rows.items():
        by = {r["scheme"]: r for r in rows}
        if name == "minilm-l6":
            for s, r in by.items():
                if s.startswith("int8"):
                    v = r["result"].mean_cosine
                    print(f"- {name} {s}: mean cosine {v:.5f} > 0.99: {'pass' if v > 0.99 else 'MISS'}")
            continue
        caveat = " (weights already on a 4-bit grid: not a target model)" if name == "smollm2-135m" else ""
        suffix = "-g64" if name == "smollm2-135m" else ""
        rtn = by.get("int4-rtn" + suffix)
        for s in ("int4-gptq" + suffix, "int4-awq" + suffix):
            if s in by:
                c = by[s]["change"]["both"]
                group = by[s]["group"]
                line = f"- {name} {s} g{group}: {100 * c:+.2f}% (<= +3%: {'pass' if c <= 0.03 else 'MISS'}"
                if rtn is not None:
                    cr = rtn["change"]["both"]
                    ok = c <= cr * 2 / 3 if cr > 0 else c <= 0
                    line += f"; RTN {100 * cr:+.2f}%, at least a third less: {'pass' if ok else 'MISS'}"
                print(line + ")" + caveat)
        limits = {"int8": 0.005, "w8a8-smoothquant": 0.015, "fp8": 0.01}  # fp8-tensor held to fp8's
        for s, r in by.items():
            limit = next((v for k, v in limits.items() if s.startswith(k)), None)
            if limit is not None:
                c = r["change"]["both"]
                print(f"- {name} {s}: {100 * c:+.2f}% (<= +{100 * limit:g}%: {'pass' if c <= limit else 'MISS'})"
                      f"{caveat}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mixtral-ref", "minilm-l6", "smollm2-135m"])
    ap.add_argument("--schemes", nargs="+", default=None,
                    help=f"default: {' '.join(DEFAULT_SCHEMES)} (smollm2-135m: its own list, see MODEL_SCHEMES)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many windows per text (default: all)")
    ap.add_argument("--smollm2-limit", type=int, default=24, help="windows per text for smollm2-135m (slow on CPU)")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (on a shared 2-core machine 1 thread was 10-50x faster than 2)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    all_rows = {}
    for name in args.models:
        schemes = args.schemes or MODEL_SCHEMES.get(name, DEFAULT_SCHEMES)
        if name == "minilm-l6":
            all_rows[name] = minilm_rows(schemes)
            print_minilm_table(all_rows[name])
        elif name in LM_MODELS:
            limit = args.smollm2_limit if name == "smollm2-135m" and args.limit is None else args.limit
            all_rows[name] = lm_rows(name, schemes, limit, args.window)
            print_lm_table(all_rows[name], limit, args.window)
        else:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join((*LM_MODELS, 'minilm-l6'))}")
    print_targets(all_rows)


if __name__ == "__main__":
    main()
