#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the default test suite (slow tests excluded), offline; then runs it again
# at the lower ends of the supported range (transformers 5.16, peft 0.18) in .venv-oldest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -m "not slow" -q "$@"
if [ "${S2T_SKIP_OLDEST:-0}" != "1" ]; then
  VENV=.venv-oldest EXTRA_PINS="transformers==5.16.0 peft==0.18.0" bash scripts/setup.sh
  echo "--- lower ends of the supported range: $(.venv-oldest/bin/python -c 'import transformers, peft; print("transformers", transformers.__version__, "peft", peft.__version__)')"
  .venv-oldest/bin/python -m pytest -m "not slow" -q -p no:cacheprovider "$@"
fi
