#!/usr/bin/env bash
# Set up, then compile the built-in Llama-family example for this machine's fast CPU target
# (onnx-cpu: flashc's fused graph run by ONNX Runtime), print the report, and run the artifact
# against the eager model (errors and time per call, with the speedup). The `cpu` target is the
# reference: the same fused graph run by PyTorch, about eager's speed.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/flashc compile llama-tiny --target onnx-cpu -O 3 --numeric-check -o artifacts/llama-tiny
.venv/bin/flashc run artifacts/llama-tiny
