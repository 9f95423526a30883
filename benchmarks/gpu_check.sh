#!/usr/bin/env bash
# GPU check of generation.backend=vllm, for a machine with an NVIDIA GPU (untested so far: the
# project's machines have none). Run from the repository root:  bash benchmarks/gpu_check.sh
# It checks, in a fresh environment: engine start, greedy parity with the HF sampler, a weight
# sync after an optimizer step (the vLLM test module, which builds models on the CPU and the
# engine on the GPU), then a few RePO steps with the training model on the GPU, and an exact
# resume. Output goes to gpu_check/ (logs, run directories). Exit code 0 means every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1 VLLM_LOGGING_LEVEL=WARNING
OUT=gpu_check
mkdir -p "$OUT"
nvidia-smi | tee "$OUT/nvidia-smi.txt"

# 1. Environment: the CUDA build of torch comes with vllm (no CPU pin here).
python3 -m venv .venv-gpu && . .venv-gpu/bin/activate
pip install -e ".[test,trl,vllm]" 2>&1 | tail -n 3
python -c "import torch, vllm, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'vllm', vllm.__version__, 'transformers', transformers.__version__)" | tee "$OUT/versions.txt"

# 2. Engine tests: start, greedy parity, seeds, log-probs, weight sync, LoRA sync, RePO steps and resume.
python -m pytest -q -m vllm tests/test_vllm_engine.py 2>&1 | tee "$OUT/pytest_vllm.txt"

# 3. A few RePO steps on the GPU through the command line, then an exact resume.
python - <<'PY'
from repo_rl.models.tiny import make_char_tokenizer, save_tiny_model_dir
save_tiny_model_dir("gpu_check/tiny-model", make_char_tokenizer(), hidden_size=128, num_heads=2, num_kv_heads=1)
import json
rows = [{"id": f"q{i}", "prompt": f"what is {i}+{i}?", "answer": str(2 * i), "solution": f"{i} plus {i} is {2 * i}"} for i in range(16)]
open("gpu_check/train.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in rows))
PY
COMMON=(model.name_or_path=gpu_check/tiny-model data.train_files=gpu_check/train.jsonl "reward.funcs=[tests.helpers.rewards:contains_answer]"
        algorithm.method=repo algorithm.num_generations=4 algorithm.max_completion_length=16 train.prompts_per_step=4
        train.device=cuda generation.backend=vllm generation.vllm_gpu_memory_utilization=0.3 logging.progress=false eval.every=0)
rm -rf "$OUT/run"
repo-rl train -o "$OUT/run" "${COMMON[@]}" train.max_steps=2 train.save_every=1 2>&1 | tee "$OUT/train.txt"
repo-rl train -o "$OUT/run" --resume "${COMMON[@]}" train.max_steps=4 train.save_every=1 2>&1 | tee "$OUT/resume.txt"
test "$(wc -l < "$OUT/run/metrics.jsonl")" -eq 4
echo "gpu_check: all checks passed"
