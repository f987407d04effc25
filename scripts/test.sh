#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the default test suite (slow tests excluded), offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -m "not slow" -q "$@"
