#!/usr/bin/env bash
# Build llama.cpp's two benchmark tools (llama-bench, llama-batched-bench) from the source tree in
# .llamacpp/src (a trimmed `git archive` of ggml-org/llama.cpp; its commit is in LLAMACPP_COMMIT), for
# bench/llamacpp_side_by_side.py: the baseline of issue #14.
#
#   bash bench/llamacpp_build.sh          # CUDA for sm_90 (H100/H200) into .llamacpp/build-cuda
#   bash bench/llamacpp_build.sh --cpu    # CPU only into .llamacpp/build-cpu (checks the flow without a GPU)
#   JOBS=2 bash bench/llamacpp_build.sh --cpu
#   bash bench/llamacpp_build.sh --configure-only   # flags and the number of compile steps only
#
# The source: llama.cpp as vendored by PyPI's llama-cpp-python 0.3.36 sdist (a shallow git of commit
# 0c1e5709, 2026-10-01), exported without the other backends, tests, examples, docs, server and web UI:
#   git -C vendor/llama.cpp archive HEAD -- . ':(exclude)examples' ':(exclude)tests' ... | tar -x -C .llamacpp/src
# (26 MB; the exclusions are listed in .llamacpp/src/LLAMACPP_EXPORT) and the commit in LLAMACPP_COMMIT.
#
# Only the two tools and what they link are built: no tests, examples, server, app or HTTPS (nothing can
# be downloaded on the GPU machine anyway). The CUDA build keeps llama.cpp's default flash-attention
# kernels (GGML_CUDA_FA_QUANTS default: f16, bf16, q4_0 and q8_0 KV caches). The build is incremental: a
# second run with the build directory present only relinks.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=${LLAMACPP_SRC:-$ROOT/.llamacpp/src}
MODE=cuda
CONFIGURE_ONLY=0
for arg in "$@"; do
  case $arg in
    --cpu) MODE=cpu ;;
    --configure-only) CONFIGURE_ONLY=1 ;;  # check the flags and count the compile steps; build nothing
    *) echo "unknown argument $arg (--cpu, --configure-only)" >&2; exit 2 ;;
  esac
done
BUILD=${LLAMACPP_BUILD:-$ROOT/.llamacpp/build-$MODE}
JOBS=${JOBS:-$(nproc)}
[ -f "$SRC/CMakeLists.txt" ] || { echo "no llama.cpp source in $SRC (see this script's header)" >&2; exit 2; }
COMMIT=$(cut -d' ' -f1 "$SRC/LLAMACPP_COMMIT" 2>/dev/null || echo unknown)
echo "llama.cpp $COMMIT ($MODE build, $JOBS jobs) from $SRC into $BUILD"

args=(-G Ninja -DCMAKE_BUILD_TYPE=Release
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
      -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_COMMIT="${COMMIT:0:8}" -DLLAMA_BUILD_NUMBER=0
      # x86-64 with AVX2, not -march=native: on a CPU with AMX, native builds ggml's AMX matmul, which
      # crashed here (SIGSEGV in ggml_backend_amx_mul_mat, in a VM) on any batch > 1; the GPU runs use
      # the CPU only to look up the token embedding
      -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
if [ "$MODE" = cuda ]; then
  args+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90)
  command -v nvcc >/dev/null || export CUDACXX=${CUDACXX:-/usr/local/cuda/bin/nvcc}
  # A CUDA toolkit assembled from pip wheels (nvcc and the runtime only, as on this workplace's images)
  # has no cuBLAS and no libcuda stub: take cuBLAS from PyTorch's nvidia-cublas wheel (nvidia/cu13/{lib,
  # include}) and the driver library from the system. CUBLAS_ROOT / CUDA_DRIVER_LIB override the search.
  if ! ls /usr/local/cuda*/lib64/libcublas.so /usr/local/cuda*/targets/*/lib/libcublas.so >/dev/null 2>&1 \
     || [ -n "${CUBLAS_ROOT:-}" ]; then
    CUBLAS_ROOT=${CUBLAS_ROOT:-$(python3 -c '
import glob, os, site
hits = [h for d in site.getsitepackages() for h in glob.glob(os.path.join(d, "nvidia", "*", "lib", "libcublas.so*"))]
print(os.path.dirname(os.path.dirname(sorted(hits)[0])) if hits else "")')}
    [ -n "$CUBLAS_ROOT" ] || { echo "no cuBLAS in the CUDA toolkit nor in python3's nvidia wheels" >&2; exit 1; }
    cublas=$(ls "$CUBLAS_ROOT"/lib/libcublas.so* | head -n 1)
    cublaslt=$(ls "$CUBLAS_ROOT"/lib/libcublasLt.so* | head -n 1)
    echo "cuBLAS from $CUBLAS_ROOT ($(basename "$cublas"))"
    # only cuBLAS's headers: the wheels' shared include directory also holds other CUDA headers that
    # must not shadow the toolkit's
    mkdir -p "$BUILD.cublas-include"
    ln -sf "$CUBLAS_ROOT"/include/cublas*.h "$BUILD.cublas-include/"
    args+=(-DCUDA_cublas_LIBRARY="$cublas" -DCUDA_cublasLt_LIBRARY="$cublaslt"
           -DCMAKE_CUDA_FLAGS="-I$BUILD.cublas-include")
  fi
  if ! ls /usr/local/cuda*/lib64/stubs/libcuda.so /usr/local/cuda*/targets/*/lib/stubs/libcuda.so >/dev/null 2>&1 \
     || [ -n "${CUDA_DRIVER_LIB:-}" ]; then
    CUDA_DRIVER_LIB=${CUDA_DRIVER_LIB:-$(ldconfig -p | awk '/libcuda\.so(\.1)? .*x86-64/ {print $NF; exit}')}
    # not in ld.so.cache (a driver mounted elsewhere): the file the dynamic loader itself finds
    CUDA_DRIVER_LIB=${CUDA_DRIVER_LIB:-$(python3 -c '
import ctypes
ctypes.CDLL("libcuda.so.1")
print(next(line.split()[-1] for line in open("/proc/self/maps") if "libcuda.so" in line))' 2>/dev/null)}
    [ -n "$CUDA_DRIVER_LIB" ] || { echo "no libcuda.so.1: not in ld.so.cache, not loadable, no stub" >&2; exit 1; }
    echo "CUDA driver library $CUDA_DRIVER_LIB"
    args+=(-DCUDA_cuda_driver_LIBRARY="$CUDA_DRIVER_LIB")
  fi
else
  args+=(-DGGML_CUDA=OFF)
fi

t0=$(date +%s)
cmake -S "$SRC" -B "$BUILD" "${args[@]}" >"$BUILD.configure.log" 2>&1 \
  || { tail -n 40 "$BUILD.configure.log"; exit 1; }
t1=$(date +%s)
targets=(llama-bench llama-batched-bench)
# how many CUDA translation units the two targets need (the bulk of a CUDA build's time)
ncu=$(ninja -C "$BUILD" -t commands "${targets[@]}" | grep -c -- '-x cu\|nvcc' || true)
ncc=$(ninja -C "$BUILD" -t commands "${targets[@]}" | grep -c -- ' -c ' || true)
echo "configured in $((t1 - t0)) s; the two tools need $ncc compile steps ($ncu of them CUDA)"
[ "$CONFIGURE_ONLY" = 1 ] && exit 0
cmake --build "$BUILD" --target "${targets[@]}" -j "$JOBS" >"$BUILD.build.log" 2>&1 \
  || { tail -n 60 "$BUILD.build.log"; exit 1; }
t2=$(date +%s)
echo "built in $((t2 - t1)) s (configure + build $((t2 - t0)) s)"
for t in "${targets[@]}"; do
  [ -x "$BUILD/bin/$t" ] || { echo "missing $BUILD/bin/$t" >&2; exit 1; }
done
echo "$(du -sh "$BUILD/bin" | cut -f1) in $BUILD/bin: ${targets[*]} and the shared libraries they load"
