#!/usr/bin/env bash
# Set up, then compile the built-in Llama-family example on the CPU and print the report.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/flashc compile llama-tiny --target cpu -O 3 --numeric-check -o artifacts/llama-tiny
.venv/bin/flashc run artifacts/llama-tiny
