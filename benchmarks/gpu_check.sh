#!/usr/bin/env bash
# GPU check (one CUDA device, under 8 minutes): bf16 correctness and decode-time ratios of S2T-Local, processor path vs
# fused loop, on a Qwen2.5-1.5B-shaped model with random weights. Writes gpu_check.json to $OUT (or the current folder).
# Needs torch with CUDA, transformers and peft on the machine (pip installs the package's own requirements if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import transformers, peft" 2>/dev/null || python3 -m pip install -q "transformers>=5.16,<6" "peft>=0.18"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 470 python3 benchmarks/gpu_check.py "$@"
