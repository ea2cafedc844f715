#!/usr/bin/env bash
# Set up (if needed) and run the default test suite: tiny models, real data, CPU, offline.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the real-model tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# PASSIVE: the tests time nothing they compare, and sleeping OpenMP threads leave the cores to
# ONNX Runtime and the subprocesses the tests start. Never set it for a benchmark
# (docs/decisions.md#benchmark-timing).
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
exec .venv/bin/python -m pytest -q "$@"
