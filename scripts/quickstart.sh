#!/usr/bin/env bash
# Set up (if needed) and run the quickstart recipe: fine-tune the MiniLM teacher on the bundled
# Rotten Tomatoes snippets, distill a 2-layer student with a pruned vocabulary, export to ONNX,
# quantize to int8 and write a benchmark report against the teacher. Offline, CPU, ~15 min.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/compress run recipes/quickstart.yaml "$@"
echo
echo "Report: $(pwd)/runs/quickstart/report/report.md and report.html"
