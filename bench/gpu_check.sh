#!/usr/bin/env bash
# GPU check (README, "On a GPU"): a short search on SmolLM2-shaped, ~1B and ~7B Llama models built
# from a config with random weights, all on CUDA; prints time per scored window against one dense
# forward, time per generation and peak GPU memory. Under 8 minutes on one H100/H200.
# Works installed (`pip install -e ".[worker]"`) or from a bare source checkout: then the top-level
# folders are linked under a temporary `evosparse` package (what setuptools' package-dir does).
# Usage: bash bench/gpu_check.sh [--models smollm2,1b,7b] [--generations 4] [--out results.json]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import evosparse.pruning" 2>/dev/null; then
    shim=$(mktemp -d)
    mkdir -p "$shim/evosparse"
    cp evosparse/__init__.py "$shim/evosparse/"
    for d in api cli jobs pruning search worker; do ln -s "$PWD/$d" "$shim/evosparse/$d"; done
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi
exec $PY bench/gpu_check.py "$@"
