#!/usr/bin/env bash
# Set up (if needed) and run the causal-LM quickstart recipe: train a small GPT-2 teacher on the
# bundled Jane Austen novels, distill a 2-layer student, export it to ONNX with a KV cache,
# quantize it to int8 and int4, and write a benchmark report (perplexity, time to first token,
# decode tokens/s) against the teacher in PyTorch fp32. Offline, CPU, ~15 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/compress run recipes/lm-quickstart.yaml "$@"
echo
echo "Report: $(pwd)/runs/lm-quickstart/report/report.md and report.html"
